"""A real Home Assistant for the slow tests: its venv, a config dir, its REST and websocket APIs.

``scripts/ha-venv`` builds the venv once (Home Assistant Core 2024.3.3, the newest on
Python 3.11, and the requirements of the integrations it sets up; ``hass --skip-pip``
installs nothing at run time). ``HomeAssistant`` writes a config directory, starts
``hass`` bound to 127.0.0.1 on a free port, onboards an owner through the onboarding API
(the route the frontend takes on a new install) and talks to it with that owner's access
token: REST for states, templates, config flows and automations, the websocket API for
service calls (whose errors it reports) and state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.mosquitto import free_port

ROOT = Path(__file__).resolve().parent.parent
VERSION = "2024.3.3"
COMPONENT = ROOT / "integrations" / "homeassistant" / "custom_components" / "intercom"
START_TIMEOUT_S = 120.0


def venv() -> Path:
    """The Home Assistant venv, built by ``scripts/ha-venv`` when missing (minutes, once)."""
    subprocess.run([str(ROOT / "scripts" / "ha-venv")], check=True, timeout=1800)
    return Path(os.environ.get("INTERCOM_HA_VENV", ROOT / ".cache" / "ha-venv"))


CONFIGURATION = """\
homeassistant:
  name: Test building
  latitude: 0
  longitude: 0
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: CH
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
automation: !include automations.yaml
counter:
  rings:
    initial: 0
    step: 1
logger:
  default: info
"""


class HomeAssistant:
    """One ``hass`` process on a config directory of its own, and an owner's token."""

    def __init__(self, config_dir: Path, venv_dir: Path) -> None:
        self.config_dir = config_dir
        self.venv_dir = venv_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None

    def write_config(self) -> None:
        """configuration.yaml, an empty automations.yaml, our integration in custom_components."""
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "configuration.yaml").write_text(CONFIGURATION.format(port=self.port))
        (self.config_dir / "automations.yaml").write_text("[]\n")
        custom = self.config_dir / "custom_components" / "intercom"
        shutil.copytree(COMPONENT, custom, ignore=shutil.ignore_patterns("__pycache__"))

    @property
    def log(self) -> Path:
        """Home Assistant's own log file."""
        return self.config_dir / "home-assistant.log"

    async def start(self) -> None:
        """Start hass, wait for its HTTP server, onboard the owner and take a token."""
        self.write_config()
        self.process = self._spawn()
        self.session = aiohttp.ClientSession()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"hass exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(f"{self.url}/api/onboarding") as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise AssertionError("Home Assistant did not start")
            await asyncio.sleep(0.5)
        await self._onboard()

    def _spawn(self) -> subprocess.Popen[bytes]:
        """``hass`` on the config directory; its own output in ``hass.out``."""
        with (self.config_dir / "hass.out").open("wb") as out:
            return subprocess.Popen(
                [str(self.venv_dir / "bin" / "hass"), "-c", str(self.config_dir),
                 "--skip-pip", "--log-no-color"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    async def _onboard(self) -> None:
        """The owner of a new install, as the frontend makes it; then its access token."""
        assert self.session is not None
        client_id = f"{self.url}/"
        user = {"client_id": client_id, "name": "Owner", "username": "owner",
                "password": secrets.token_urlsafe(16), "language": "en"}
        async with self.session.post(f"{self.url}/api/onboarding/users", json=user) as r:
            assert r.status == 200, await r.text()
            code = (await r.json())["auth_code"]
        form = {"grant_type": "authorization_code", "code": code, "client_id": client_id}
        async with self.session.post(f"{self.url}/auth/token", data=form) as r:
            assert r.status == 200, await r.text()
            self.token = (await r.json())["access_token"]

    async def stop(self) -> None:
        """Stop hass (SIGTERM, as systemd would), then close the session."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.session is not None:
            await self.session.close()

    # --- REST --------------------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        """The owner's bearer token."""
        return {"Authorization": f"Bearer {self.token}"}

    async def get(self, path: str) -> Any:
        """GET ``/api/...`` as JSON."""
        assert self.session is not None
        async with self.session.get(f"{self.url}{path}", headers=self.headers) as response:
            assert response.status == 200, f"{path}: {response.status} {await response.text()}"
            return await response.json()

    async def get_bytes(self, path: str) -> bytes:
        """GET ``path``'s body (an image)."""
        assert self.session is not None
        async with self.session.get(f"{self.url}{path}", headers=self.headers) as response:
            assert response.status == 200, f"{path}: {response.status}"
            return await response.read()

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST JSON to ``path``; the answer as JSON."""
        assert self.session is not None
        async with self.session.post(f"{self.url}{path}", headers=self.headers,
                                     json=body) as response:
            text = await response.text()
            assert response.status == 200, f"{path}: {response.status} {text}"
            return json.loads(text)

    async def states(self) -> dict[str, dict[str, Any]]:
        """Every entity's state, by entity id."""
        return {s["entity_id"]: s for s in await self.get("/api/states")}

    async def state(self, entity_id: str) -> str | None:
        """One entity's state, or None when it does not exist (yet)."""
        return (await self.states()).get(entity_id, {}).get("state")

    async def until_state(self, entity_id: str, want: str, timeout: float = 20) -> None:
        """Wait until ``entity_id`` reads ``want``."""
        deadline = time.monotonic() + timeout
        while (got := await self.state(entity_id)) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"{entity_id} is {got!r}, not {want!r}")
            await asyncio.sleep(0.2)

    async def template(self, template: str) -> str:
        """A template rendered by Home Assistant."""
        assert self.session is not None
        async with self.session.post(f"{self.url}/api/template", headers=self.headers,
                                     json={"template": template}) as response:
            assert response.status == 200, await response.text()
            return await response.text()

    async def flow(self, handler: str, *steps: dict[str, Any]) -> list[dict[str, Any]]:
        """Run a config flow through its REST API: start it, then submit each step."""
        answers = [await self.post("/api/config/config_entries/flow", {"handler": handler})]
        for step in steps:
            flow_id = answers[-1]["flow_id"]
            answers.append(await self.post(f"/api/config/config_entries/flow/{flow_id}", step))
        return answers

    # --- websocket ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def websocket(self) -> AsyncIterator[Websocket]:
        """An authenticated websocket API connection."""
        assert self.session is not None
        async with self.session.ws_connect(f"{self.url}/api/websocket") as ws:
            assert (await ws.receive_json())["type"] == "auth_required"
            await ws.send_json({"type": "auth", "access_token": self.token})
            assert (await ws.receive_json())["type"] == "auth_ok"
            client = Websocket(ws)
            task = asyncio.create_task(client.read())
            try:
                yield client
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class Websocket:
    """Commands with ids and their results; every state change of a subscription, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 1
        self.results: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.changes: list[tuple[str, str | None]] = []  # (entity id, new state)

    async def read(self) -> None:
        async for message in self.ws:
            body = json.loads(message.data)
            if body.get("type") == "result" and body["id"] in self.results:
                self.results.pop(body["id"]).set_result(body)
            elif body.get("type") == "event":
                data = body["event"]["data"]
                new = data.get("new_state") or {}
                self.changes.append((data["entity_id"], new.get("state")))

    async def command(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send one command; its result message (``success``, ``result`` or ``error``)."""
        ident, self.next_id = self.next_id, self.next_id + 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.results[ident] = future
        await self.ws.send_json({"id": ident, **body})
        async with asyncio.timeout(30):
            return await future

    def seen(self, entity_id: str) -> list[str | None]:
        """The states ``entity_id`` went through since subscribing, in order."""
        return [state for entity, state in self.changes if entity == entity_id]
