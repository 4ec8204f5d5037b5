"""Ringing with the app closed, in Debian's Chromium: the service worker and Web Push.

Real parts: a simulated station process, Chromium trusting the station's own CA (its
NSS database, no certificate flag), the app's service worker, and the push-service
stand-in (tests/pushservice.py) the station pushes to. Two things cannot run here and
are stood in for, each at the boundary to something outside this machine:

- The browser's own push service (FCM for Chromium) is on the internet, so
  ``PushManager.subscribe`` cannot reach it: an init script gives the page a
  subscription whose endpoint is the stand-in and whose keys the test holds. The app's
  own code (push.js) then asks for it and hands it to the station, as on a phone.
- Chromium cannot receive from the push service either: the test decrypts what the
  station sent (RFC 8291, the stand-in's own code) and delivers that plaintext to the
  service worker with the DevTools protocol (``ServiceWorker.deliverPushMessage``),
  which is where a real push arrives after the browser has decrypted it.

Tapping a notification cannot be done in headless Chromium: the test dispatches the
``notificationclick`` event the browser would, inside the service worker.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import BrowserContext, Page, Worker

from .browser import SimStation, chromium, new_device, pair_device, wait_call_state
from .mosquitto import make_tls_files
from .pushservice import Browser, PushService, station_config

# The stand-in subscription (see the module's docstring): what PushManager would give.
FAKE_PUSH = """
(() => {
  const json = %s;
  const key = Uint8Array.from(atob(json.keys.p256dh.replaceAll("-", "+").replaceAll("_", "/")),
                              (c) => c.charCodeAt(0));
  let subscription = null;
  PushManager.prototype.getSubscription = async function () { return subscription; };
  PushManager.prototype.subscribe = async function (options) {
    subscription = {
      endpoint: json.endpoint, options, expirationTime: null,
      getKey: () => key.buffer, toJSON: () => json, unsubscribe: async () => true,
    };
    return subscription;
  };
})();
"""


class ServiceThread:
    """The push-service stand-in on its own event loop (Playwright's sync API owns ours)."""

    def __init__(self, folder: Path) -> None:
        self.tls = make_tls_files(folder)
        self.service = PushService(self.tls.server_cert, self.tls.server_key)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def push_service(tmp_path: Path) -> Iterator[ServiceThread]:
    service = ServiceThread(tmp_path / "push-tls")
    yield service
    service.stop()


def wait_until(check: Any, what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)
    return value


def notifications(worker: Worker) -> list[dict[str, Any]]:
    return worker.evaluate("""async () => (await self.registration.getNotifications()).map(
        (n) => ({title: n.title, body: n.body, tag: n.tag, call: n.data?.call,
                 actions: n.actions.map((a) => a.action)}))""")


def deliver(context: BrowserContext, blank: Page, message: dict[str, Any]) -> None:
    """Hand the service worker a push message, as Chromium does once it has decrypted one."""
    cdp = context.new_cdp_session(blank)
    registrations: list[dict[str, Any]] = []
    cdp.on("ServiceWorker.workerRegistrationUpdated",
           lambda event: registrations.extend(event["registrations"]))
    cdp.send("ServiceWorker.enable")
    deadline = time.monotonic() + 15
    while not registrations:  # events arrive while Playwright is called: wait through it
        assert time.monotonic() < deadline, "no service worker registration reported"
        blank.wait_for_timeout(50)
    scope = registrations[0]["scopeURL"]
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(scope))
    cdp.send("ServiceWorker.deliverPushMessage", {
        "origin": origin, "registrationId": registrations[0]["registrationId"],
        "data": json.dumps(message),
    })
    cdp.detach()


def tap(worker: Worker, action: str) -> None:
    """The notificationclick the browser dispatches when the resident taps ``action``."""
    worker.evaluate("""async (action) => {
        const [notification] = await self.registration.getNotifications();
        self.dispatchEvent(new NotificationEvent("notificationclick", {notification, action}));
    }""", action)


def answer_opens(context: BrowserContext, worker: Worker, blank: Page,
                 ring: dict[str, Any]) -> str:
    """Show ``ring``, tap its Answer action: the one address the worker opens for it."""
    deliver(context, blank, ring)
    wait_until(lambda: notifications(worker), "the ring's notification")
    worker.evaluate("""() => { Clients.prototype.openWindow = async function (url) {
        self.__opened = [...(self.__opened ?? []), url]; return null; }; }""")
    tap(worker, "answer")
    opened = wait_until(lambda: worker.evaluate("self.__opened"), "the app opened")
    assert len(opened) == 1, opened
    assert notifications(worker) == [], "the tapped notification is closed"
    return str(opened[0])


def closed_app(
    chrome: Any, station: SimStation, phone: Browser
) -> tuple[BrowserContext, Worker, Page]:
    """A paired app that subscribed to pushes, then closed: its context, worker, a blank page."""
    context, page = new_device(chrome, station.url)
    origin = station.url.rstrip("/")
    context.grant_permissions(["notifications", "microphone", "camera"], origin=origin)
    context.add_init_script(FAKE_PUSH % json.dumps(phone.subscription()))
    pair_device(page, station.pair_link("1"))
    # The app subscribed on sign-in (notifications allowed) and told the station.
    wait_until(lambda: station.status()["push"]["subscribed"] == 1, "subscribed")
    worker = wait_until(lambda: context.service_workers, "service worker")[0]
    wait_until(lambda: worker.evaluate("self.registration.active?.state") == "activated",
               "the service worker is active")
    page.close()  # the app is closed
    wait_until(lambda: station.status()["calls"]["devices_online"] == 0, "offline")
    return context, worker, context.new_page()


def test_a_push_rings_the_closed_app_and_answer_opens_the_ringing_call(
    tmp_path: Path, push_service: ServiceThread
):
    service = push_service.service
    config = tmp_path / "intercom.toml"
    config.write_text(station_config(push_service.tls.ca, ring_timeout_s=45))
    station = SimStation(tmp_path / "state", ("--config", str(config)))
    phone = Browser(service.endpoint())
    try:
        with chromium(station.url) as chrome:
            context, worker, blank = closed_app(chrome, station, phone)

            station.press()
            push = wait_until(lambda: service.pushes, "the station's push")[0]
            ring = json.loads(phone.decrypt(push.body))
            assert ring["type"] == "ring"
            deliver(context, blank, ring)
            shown = wait_until(lambda: notifications(worker), "the notification")
            assert shown == [{"title": "Someone is at the door",
                              "body": "front door: tap to see who it is",
                              "tag": f"intercom-ring:{ring['call']}", "call": ring["call"],
                              "actions": ["answer", "decline"]}]
            # A clear for another call leaves it.
            deliver(context, blank, {"v": 1, "type": "clear", "call": "c-other",
                                     "state": "taken"})
            time.sleep(0.5)
            assert len(notifications(worker)) == 1
            # The resident taps Decline: the worker declines with the device key, without
            # opening the app, and the call is over.
            tap(worker, "decline")
            wait_until(lambda: station.status()["calls"]["state"] == "idle", "declined")
            assert station.events("CallDeclined")
            assert station.status()["calls"]["last_call"]["state"] == "missed"
            assert len(context.pages) == 1, "no app opened"
            assert notifications(worker) == []
            # Another press: the station's pushes are the first call's clear, then the ring.
            first = ring["call"]
            station.press()

            def second_ring() -> dict[str, Any] | None:
                sent = [json.loads(phone.decrypt(p.body)) for p in list(service.pushes)]
                assert {"v": 1, "type": "clear", "call": first, "state": "missed"} in sent[:3]
                return next((m for m in sent if m["type"] == "ring" and m["call"] != first),
                            None)

            ring = wait_until(second_ring, "the second ring's push")
            deliver(context, blank, ring)
            wait_until(lambda: notifications(worker), "the second ring's notification")
            # A ring that is over by the time it arrives shows nothing and leaves this one.
            deliver(context, blank, {**ring, "call": "c-late", "until": time.time() - 1})
            time.sleep(0.5)
            assert [n["call"] for n in notifications(worker)] == [ring["call"]]
            # A newer ring replaces it; a clear for that call removes it.
            deliver(context, blank, {**ring, "call": "c-newer"})
            wait_until(lambda: [n["call"] for n in notifications(worker)] == ["c-newer"],
                       "the newer ring alone")
            deliver(context, blank, {"v": 1, "type": "clear", "call": "c-newer",
                                     "state": "taken"})
            wait_until(lambda: notifications(worker) == [], "cleared by its push")
            # The resident taps Answer on the station's ringing call. Headless Chromium
            # cannot open a window for an event it did not dispatch itself, so the worker's
            # clients.openWindow is replaced by one that notes the address the Answer
            # handler asks for, and the test opens that address: the app signs in, is rung
            # at once (the call still rings), shows the door and answers.
            url = answer_opens(context, worker, blank, ring)
            assert url == f"{station.url}?call={ring['call']}&answer=1"
            app = context.new_page()
            app.goto(url)
            app.wait_for_function(
                "() => document.querySelector('#preview').videoWidth > 0", timeout=20000)
            wait_call_state(app, "in_call", timeout=20)
            assert station.status()["calls"]["state"] == "in_call"
            assert "?" not in app.url, "the call's address is not kept"
    finally:
        station.stop()
