"""The local control socket: one JSON request line in, one JSON answer line out.

The socket lives in the state directory with mode 0600, so only the station's own user
(and root) can use it. Components register the requests they answer; the CLI is its
client. Each request is stamped with its ``actor``, ``local:<user>``, from the socket's
peer credentials (``SO_PEERCRED``): whatever a client writes there is overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from intercom.errors import IntercomError, StationNotRunningError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


def user_actor(uid: int, sudo_user: object = None) -> str:
    """``local:<user>`` for ``uid``, with who used sudo when root says so."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid{uid}"
    actor = f"local:{user}"
    sudo = sudo_user if isinstance(sudo_user, str) and USER_NAME.match(sudo_user) else None
    if uid == 0 and sudo is not None and sudo != user:
        actor += f" (sudo by {sudo})"
    return actor


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The uid of the process at the other end of a Unix socket."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def answer(handlers: dict[str, Handler], request: Any) -> dict[str, Any]:
    """The answer of ``handlers`` to one request: an error names what was wrong."""
    if not isinstance(request, dict) or not isinstance(request.get("request"), str):
        return {"ok": False, "error": "request must be an object with a 'request' string"}
    handler = handlers.get(request["request"])
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
            result = await self._answer(line, peer_uid(writer))
            writer.write(json.dumps(result).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("control connection dropped: %s", exc)
        finally:
            writer.close()

    async def _answer(self, line: bytes, uid: int | None) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            log.warning("control: refused a request that is not JSON")
            return {"ok": False, "error": "request is not JSON"}
        if isinstance(request, dict):
            sudo = request.pop("sudo_user", None)
            request["actor"] = user_actor(os.getuid() if uid is None else uid, sudo)
        return await answer(self._handlers, request)


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
        raise StationNotRunningError(
            f"no station is running with state dir {state_dir}; start it (intercom run) or "
            "point elsewhere with --state-dir DIR, $INTERCOM_STATE_DIR or --config FILE"
        ) from exc
    try:
        writer.write(json.dumps(payload).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise StationNotRunningError(f"the station at {state_dir} closed the connection")
    result: dict[str, Any] = json.loads(line)
    return result


def request_sync(state_dir: Path, payload: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """``request`` for synchronous callers such as the CLI."""
    return asyncio.run(request(state_dir, payload, timeout))
