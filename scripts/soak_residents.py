"""The residents of ``scripts/soak``: aiortc devices in worker processes, and one Chromium.

Both kinds of resident take a plan for the next ring on their stdin, one JSON line
each (``{"plan": "answer", "who": "<principal>"}``, ``{"plan": "decline"}`` or
``{"plan": "ignore"}``), and report what they saw as JSON lines on stdout.

The aiortc devices are ``scripts/bench_devices.py``'s ``BenchDevice`` (its signalling
and media, unchanged), told per ring whether to answer or decline. The answering device
signs an unlock command (a compact JWS with its key and current TOTP code) and reports
it; the soak sends it on MQTT. The Chromium resident is the web client itself, driven
through ``tests/browser.py``: it answers, opens the door from the page (over the call's
data channel) and hangs up, or declines, or lets it ring.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_devices import BenchDevice  # noqa: E402

RING_PLAN_WAIT_S = 300.0  # a plan's ring comes within this (the soak's checks are tighter)


def say(record: dict[str, Any]) -> None:
    """One JSON line on stdout, stamped with the wall clock."""
    sys.stdout.write(json.dumps({"t": time.time(), **record}) + "\n")
    sys.stdout.flush()


class SoakDevice(BenchDevice):
    """A bench device that answers, declines or ignores each ring as the soak plans it."""

    def __init__(self, spec: dict[str, Any], url: str, fp: str, station: str, door: str) -> None:
        import pyotp  # noqa: PLC0415

        super().__init__({**spec, "answerer": False}, url, fp, idle_audio=False)
        self.totp: Any = pyotp.parse_uri(spec["totp_uri"])
        self.pem = spec["key"].encode()
        self.station = station
        self.door = door
        self.plan: dict[str, Any] = {"plan": "ignore"}
        self.last_step = -1  # the TOTP time step of this device's last command
        self._signing: asyncio.Task[None] | None = None

    async def on_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "ring":
            plan = self.plan.get("plan")
            self.answerer = plan == "answer" and self.plan.get("who") == self.principal
            await super().on_message(msg)
            if plan == "decline" and self.ws is not None:
                await self.ws.send_json({"type": "decline", "call": msg["call"]})
            return
        await super().on_message(msg)
        if msg["type"] == "call" and msg.get("state") == "answered" and self.answerer:
            self.answerer = False
            # off the message loop: the call's signalling goes on while it waits
            self._signing = asyncio.create_task(self.unlock(self.call), name="soak-unlock")

    async def unlock(self, call: str | None) -> None:
        """Report a signed unlock command for ``call``, in a TOTP step not used before.

        The station takes each code of a principal once ("TOTP step already used"), so
        a device answering again within the same 30 s step waits for the next one, as a
        person would for the next code of an authenticator app.
        """
        step_s = int(self.totp.interval)
        now = time.time()
        if int(now) // step_s <= self.last_step:
            await asyncio.sleep((self.last_step + 1) * step_s - now + 0.05)
            now = time.time()
        self.last_step = int(now) // step_s
        self.emit("unlock", call=call, token=self.sign_unlock(self.totp.at(int(now))))

    def sign_unlock(self, code: str) -> str:
        """A signed unlock command for this station's door with TOTP ``code``."""
        from intercom.security import command  # noqa: PLC0415

        key = command.load_private_key(self.pem)
        return command.sign(key, kid=self.principal, station=self.station, door=self.door,
                            totp=code)


async def device_worker(spec_path: str) -> None:
    """Run the devices of one spec file; plans arrive on stdin for every device."""
    spec = json.loads(Path(spec_path).read_text())  # noqa: ASYNC240 - once, at the start
    devices = [
        SoakDevice(d, spec["url"], spec["fp"], spec["station"], spec["door"])
        for d in spec["devices"]
    ]
    tasks = [asyncio.create_task(d.run(), name=f"device-{d.index}") for d in devices]
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async for line in reader:
        plan = json.loads(line)
        for device in devices:
            device.plan = plan
    for task in tasks:
        task.cancel()


# ------------------------------------------------------------------ the Chromium resident


def chromium_resident(spec_path: str) -> None:
    """Pair the web client in Chromium, then act on each plan read from stdin."""
    import pyotp  # noqa: PLC0415

    from tests.browser import chromium, new_device, pair_device, wait_call_state  # noqa: PLC0415

    spec = json.loads(Path(spec_path).read_text())
    with chromium(spec["url"]) as browser:
        _context, page = new_device(browser, spec["url"])
        enrolment = pair_device(page, spec["link"])
        totp = pyotp.parse_uri(enrolment["totp_uri"])
        principal = page.text_content("#info-principal")
        say({"e": "ready", "principal": principal})
        for line in sys.stdin:
            plan = json.loads(line)
            plan["rings"] = page.evaluate("window.intercom.rings.length")
            try:
                say({"e": "done", **act(page, plan, totp, spec["ring_wait_s"], wait_call_state)})
            except Exception as exc:  # noqa: BLE001 - reported to the soak, which counts it
                say({"e": "failed", "plan": plan.get("plan"), "why": f"{exc}"[:300]})
                page.reload()


def act(page: Any, plan: dict[str, Any], totp: Any, ring_wait_s: float, wait_state: Any) -> dict[
    str, Any
]:
    """One ring as ``plan`` says; what happened."""
    # The ring is noted in the page's history (the ringing state itself may last only
    # milliseconds when another device answers at once).
    # (told the plan before the press: the press may be a whole period away)
    page.wait_for_function("(n) => window.intercom.rings.length > n", arg=plan["rings"],
                           timeout=RING_PLAN_WAIT_S * 1000)
    what = plan.get("plan")
    mine = what == "answer" and plan.get("who") == "chromium"
    if mine or what == "decline":
        wait_state(page, "ringing", timeout=ring_wait_s)
    if mine:
        page.click("#btn-answer")
        wait_state(page, "in_call")
        page.click("#btn-open")
        page.fill("#unlock-code", totp.now())
        page.click("#unlock-send")
        # "pending" while the page waits for the station's answer
        page.wait_for_selector("#unlock-result[data-result]:not([data-result='pending'])",
                               timeout=10000)
        result = page.get_attribute("#unlock-result", "data-result")
        time.sleep(plan.get("talk_s", 2.0))
        page.click("#btn-hangup")
        wait_state(page, "idle")
        return {"plan": what, "answered": True, "unlock": result}
    if what == "decline":
        page.click("#btn-decline")
    wait_state(page, "idle", timeout=ring_wait_s + 30)
    return {"plan": what, "answered": False}


if __name__ == "__main__":
    if sys.argv[1] == "--devices":
        asyncio.run(device_worker(sys.argv[2]))
    elif sys.argv[1] == "--chromium":
        chromium_resident(sys.argv[2])
    else:
        raise SystemExit("usage: soak_residents.py --devices SPEC | --chromium SPEC")
