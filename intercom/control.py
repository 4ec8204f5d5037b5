"""The local control socket: one JSON request line in, one JSON answer line out.

The socket lives in the state directory with mode 0600, so only the station's own user
(and root) can use it. Components register the requests they answer; the CLI's
``status``, ``sim`` and ``unlock`` commands are its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from intercom.errors import IntercomError, StationNotRunningError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlServer:
    """Answers requests on ``STATE_DIR/control.sock``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SOCKET_NAME
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None

    def register(self, request: str, handler: Handler) -> None:
        """Answer requests of type ``request`` with ``handler``."""
        self._handlers[request] = handler

    async def start(self) -> None:
        """Bind the socket, refusing to take over one a live station answers on."""
        if self.path.exists():
            if await _answers(self.path):
                raise IntercomError(f"another station is running with state dir {self.path.parent}")
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)

    async def stop(self) -> None:
        """Close the socket and remove its file."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            answer = await self._answer(line)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("control connection dropped: %s", exc)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            log.warning("control: refused a request that is not JSON")
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("request"), str):
            return {"ok": False, "error": "request must be an object with a 'request' string"}
        handler = self._handlers.get(request["request"])
        if handler is None:
            log.warning("control: unknown request %.40r", request["request"])
            return {"ok": False, "error": f"unknown request {request['request']!r}"}
        try:
            return await handler(request)
        except IntercomError as exc:
            log.warning("control: %s refused: %s", request["request"], exc)
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("control: %s failed", request["request"])
            return {"ok": False, "error": "internal error (see the station's log)"}


async def _answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def request(state_dir: Path, payload: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """Send one request to the station of ``state_dir`` and return its answer."""
    path = state_dir / SOCKET_NAME
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=16 * MAX_REQUEST), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise StationNotRunningError(f"no station is running with state dir {state_dir}") from exc
    try:
        writer.write(json.dumps(payload).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise StationNotRunningError(f"the station at {state_dir} closed the connection")
    answer: dict[str, Any] = json.loads(line)
    return answer


def request_sync(state_dir: Path, payload: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """``request`` for synchronous callers such as the CLI."""
    return asyncio.run(request(state_dir, payload, timeout))
