"""A resident's device, over real WebRTC, receives the camera with the zones masked."""

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
from intercom.station import Station

from . import test_calls_client as kit
from .test_calls_client import Device, call_settings, pair

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


async def test_rung_device_receives_frames_with_the_zones_masked(tmp_path, devices, monkeypatch):
    monkeypatch.setattr(Device, "_consume", consume_keeping_frames)
    settings = call_settings(tmp_path / "state", ring_timeout_s=5)
    station = Station(settings.model_copy(update={"privacy": PrivacyConfig(zones=[ZONE])}))
    await station.start()
    try:
        phone = await pair(station, "1")
        devices.append(phone)
        await phone.connect()
        await phone.wait_connected()
        station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
        await phone.expect("ring")
        for _ in range(200):
            if len(phone.video_frames) >= 5:
                break
            await asyncio.sleep(0.02)
        frame = phone.last_video
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
