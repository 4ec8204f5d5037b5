"""Benchmark: a doorbell press -> the push request accepted by the push service.

A simulated station runs as its own process (``intercom run --simulate``, real web
server, signalling, ring group and Web Push sender). This process runs a push service
stand-in on loopback (tests/pushservice.py: TLS, VAPID checked, the payload decrypted)
and pairs ``--devices`` devices, each of which subscribes over the signalling socket and
then goes offline, as a phone does when its app is closed. Each press is asked of the
station's control socket; the clock starts just before that request is sent and stops
when the stand-in has read the push request for the device (the moment a push service
would answer 201): both ends on this machine's clock (``time.time``, one process).
Between presses the call is hung up from the door side and the bell's coalesce time
(3 s) is waited out.

    scripts/bench push [--presses 20] [--devices 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from intercom.control import request  # noqa: E402
from tests.mosquitto import make_tls_files  # noqa: E402
from tests.pushservice import Browser, PushService, station_config  # noqa: E402
from tests.test_calls_client import DeviceKey, b64url  # noqa: E402

COALESCE_S = 3.2



async def subscribe(url: str, station: str, endpoint: str, code: str) -> Browser:
    """Pair a device, sign in, subscribe it, and leave (the app closed)."""
    key = DeviceKey()
    browser = Browser(endpoint)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
        async with http.post(url + "api/pair", json={"code": code, "jwk": key.jwk()}) as resp:
            paired = await resp.json()
            if resp.status != 200:
                raise SystemExit(f"pairing failed: {paired}")
        ws = await http.ws_connect(url + "ws")
        challenge = await ws.receive_json()
        data = f"intercom-auth:{station}:{challenge['nonce']}".encode()
        await ws.send_json({"type": "auth", "principal": paired["principal"],
                            "signature": b64url(key.sign(data))})
        while (msg := await ws.receive_json(timeout=10))["type"] != "ready":
            pass
        await ws.send_json({"type": "push-subscribe", "subscription": browser.subscription()})
        while (msg := await ws.receive_json(timeout=10))["type"] != "push":
            pass
        if not msg["subscribed"]:
            raise SystemExit(f"subscribing failed: {msg}")
        await ws.close()
    return browser


async def web_url(state: Path, log: Path) -> str:
    """The station's URL once its web server listens."""
    for _ in range(300):
        try:
            status = (await request(state, {"request": "status"}))["status"]
            url = str(status["listening"].get("web") or "")
        except Exception:  # noqa: BLE001 - not up yet
            url = ""
        if url:
            return url
        await asyncio.sleep(0.1)
    raise SystemExit(f"station did not start; see {log}")


async def press_once(state: Path, service: PushService, browsers: list[Browser]) -> float:
    """One press; ms from the request's sending to the last device's push arriving."""
    before = len(service.pushes)
    sent = time.time()
    answer = await request(state, {"request": "sim", "action": "press"})
    if not answer.get("ok"):
        raise SystemExit(f"press refused: {answer}")
    deadline = time.monotonic() + 10
    while len(service.pushes) < before + len(browsers):
        if time.monotonic() > deadline:
            raise SystemExit("no push within 10 s")
        await asyncio.sleep(0.001)
    arrived = service.pushes[before:before + len(browsers)]
    by_endpoint = {b.endpoint: b for b in browsers}
    for push in arrived:
        message = json.loads(by_endpoint[push.endpoint].decrypt(push.body))
        if message["type"] != "ring":
            raise SystemExit(f"not a ring: {message}")
    return (max(p.arrived for p in arrived) - sent) * 1000


async def run(presses: int, devices: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp:
        folder = Path(tmp)
        tls = make_tls_files(folder / "tls")
        service = PushService(tls.server_cert, tls.server_key)
        await service.start()
        config = folder / "intercom.toml"
        config.write_text(station_config(tls.ca, "bench", ring_timeout_s=30))
        state = folder / "state"
        log = (folder / "station.log").open("w")
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the clock runs
            [sys.executable, "-m", "intercom", "run", "--simulate", "--config", str(config),
             "--state-dir", str(state)],
            env={**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}, stdout=log,
            stderr=subprocess.STDOUT, cwd=ROOT,
        )
        try:
            url = await web_url(state, folder / "station.log")
            browsers = []
            for _ in range(devices):
                code = (await request(state, {"request": "pair", "flat": "1"}))["code"]
                browsers.append(await subscribe(url, "bench", service.endpoint(), code))
            await asyncio.sleep(1.0)
            figures: list[float] = []
            for _ in range(presses):
                figures.append(await press_once(state, service, browsers))
                await request(state, {"request": "hangup"})
                await asyncio.sleep(COALESCE_S)
            if service.refused:
                raise SystemExit(f"the push service refused: {service.refused}")
            return {"presses": presses, "devices": devices, "ms": figures}
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
            await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presses", type=int, default=20)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    result = asyncio.run(run(args.presses, args.devices))
    ms = sorted(result["ms"])
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(f"press -> push accepted by the push service, {args.presses} presses, "
          f"{args.devices} device(s) offline: median {statistics.median(ms):.1f} ms, "
          f"p95 {p95:.1f} ms, max {ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
