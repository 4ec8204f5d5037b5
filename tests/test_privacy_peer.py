"""Over real WebRTC and signalling: masked frames for a resident, no way in for an installer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from intercom.config import PrivacyConfig
from intercom.events import DoorbellPressed
from intercom.privacy.zones import rasterise
from intercom.security import totp
from intercom.security.principals import Principal, Role
from intercom.station import Station

from . import test_calls_client as kit
from .test_calls_client import Device, DeviceKey, call_settings, pair

devices = kit.devices
pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

ZONE = [(0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (0.0, 1.0)]
INSIDE = [(0.04, 0.54), (0.46, 0.54), (0.46, 0.96), (0.04, 0.96)]  # clear of coding blur


async def consume_keeping_frames(self: Any, track: MediaStreamTrack) -> None:
    """The device's consumer, keeping the newest decoded video frame."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if track.kind == "video":
            self.video_frames.append(time.time())
            self.last_video = frame


async def rung_frame(station: Station, devices: list[Device], button: str) -> tuple[Device, Any]:
    """Pair a resident of flat 1, ring it, and take the newest of its first 5 video frames.

    The device must keep frames: ``Device._consume`` patched to consume_keeping_frames.
    """
    phone = await pair(station, "1")
    devices.append(phone)
    await phone.connect()
    await phone.wait_connected()
    station.bus.publish(DoorbellPressed(button=button, flat="1"))
    await phone.expect("ring")
    for _ in range(200):
        if len(phone.video_frames) >= 5:
            break
        await asyncio.sleep(0.02)
    return phone, phone.last_video  # type: ignore[attr-defined]


async def test_rung_device_receives_frames_with_the_zones_masked(tmp_path, devices, monkeypatch):
    monkeypatch.setattr(Device, "_consume", consume_keeping_frames)
    settings = call_settings(tmp_path / "state", ring_timeout_s=5)
    station = Station(settings.model_copy(update={"privacy": PrivacyConfig(zones=[ZONE])}))
    await station.start()
    try:
        phone, frame = await rung_frame(station, devices, "bell0")
        assert station.calls is not None
        assert station.calls.media is not None
        encoder = station.calls.media.encoder  # the frames went through the shared VP8
        assert encoder is not None
        assert encoder.codecs_made == 1
    finally:
        await station.stop("test finished")
    assert len(phone.video_frames) >= 5, "video decoded while ringing"
    luma = frame.to_ndarray(format="yuv420p")[: frame.height]
    inside = rasterise([INSIDE], frame.width, frame.height)
    outside = ~rasterise([ZONE], frame.width, frame.height)
    assert luma[inside].mean() < 24, "black where the zone is"
    assert luma[inside].max() < 40
    assert luma[outside].mean() > 60, "the rest of the picture arrives"
    assert np.percentile(luma[: frame.height // 2], 90) > 100, "the colour bars are visible"


async def test_an_expired_installer_cannot_sign_in_to_the_station_as_a_device(
    tmp_path, devices
):
    station = Station(call_settings(tmp_path / "state"))
    await station.start()
    try:
        key = DeviceKey()
        assert station.registry is not None
        now = time.time()
        await station.registry.add(
            Principal(id="installer-old", role=Role.INSTALLER, jwk=key.jwk(),
                      valid_from=now - 80 * 3600, valid_until=now - 8 * 3600),
            totp.new_secret(),
        )
        installer = Device(station, key, "installer-old", "")
        devices.append(installer)
        with pytest.raises(AssertionError):
            await installer.connect()
        assert installer.ws is not None
        assert installer.ws.close_code == 4401
    finally:
        await station.stop("test finished")
