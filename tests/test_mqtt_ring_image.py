"""The ring image over a real Mosquitto: redacted, never retained, replaced on expiry.

A simulated station whose camera shows the astronaut picture (a real face, shipped in
scikit-image) with two privacy zones publishes, at a ring, a JPEG on
``<p>/ring_image``; a subscriber decodes it as Home Assistant's image entity would and
checks the zones are black and no face model finds a face. Past the snapshot
retention a plain grey image replaces it; switched off, nothing is published at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import cv2
import numpy as np

from intercom.config import Settings
from intercom.privacy.component import Privacy
from intercom.privacy.redact import FaceRedactor
from intercom.station import Station
from tests.mosquitto import Broker
from tests.test_mqtt_broker import PREFIX, bridge_of, mqtt_settings, retained, until
from tests.test_mqtt_commands import connected_station
from tests.test_privacy import (
    assert_zone_dark,
    face_rgb,
    face_video,
    settings_with,
    with_face_camera,
)

TOPIC = f"{PREFIX}/ring_image"
RETENTION_H = 2


def face_station(tmp_path: Path, port: int, *, ring_image: bool, **privacy: Any) -> Settings:
    tmp_path.mkdir(exist_ok=True)
    settings = with_face_camera(
        settings_with(tmp_path, snapshot_retention_hours=RETENTION_H, **privacy),
        face_video(tmp_path / "face.y4m"),
    )
    return mqtt_settings(settings, port=port, ring_image=ring_image)


class Images:
    """Every message on ``<p>/ring_image``: payload and retain flag."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, bool]] = []

    async def wait(self, count: int, what: str) -> None:
        await until(lambda: len(self.got) >= count, 15, what)


@contextlib.asynccontextmanager
async def watching(port: int) -> AsyncIterator[Images]:
    images = Images()
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(TOPIC, qos=1)

        async def run() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                images.got.append((message.payload, message.retain))

        task = asyncio.create_task(run())
        try:
            yield images
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def decoded(jpeg: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, "a JPEG Home Assistant can show"
    return bgr


def is_blank(jpeg: bytes) -> bool:
    grey = cv2.cvtColor(decoded(jpeg), cv2.COLOR_BGR2GRAY)
    return int(grey.max()) - int(grey.min()) <= 2


def privacy_of(station: Station) -> Privacy:
    return next(c for c in station.components if isinstance(c, Privacy))


async def test_a_ring_publishes_a_redacted_frame_not_retained_and_blank_on_expiry(
    tmp_path: Path, broker: Broker
) -> None:
    # The face is there to be found: in the picture the camera shows, every model finds it.
    thorough = FaceRedactor(thorough=True)
    assert thorough.detect(cv2.cvtColor(face_rgb(), cv2.COLOR_RGB2GRAY))
    settings = face_station(tmp_path, broker.port, ring_image=True)
    async with watching(broker.port) as images, connected_station(settings) as station:
        assert station.simulator is not None
        ring = privacy_of(station).ring_image
        assert ring is not None
        # At start: the blank, whatever an earlier run left shown in Home Assistant.
        await images.wait(1, "the blank image at start")
        assert is_blank(images.got[0][0])
        await station.simulator.act("press")
        await images.wait(2, "the ring's image")
        jpeg, kept = images.got[1]
        assert kept is False
        bgr = decoded(jpeg)
        assert bgr.shape[:2] == (480, 640)
        assert_zone_dark(bgr)  # the zones masked at the source
        grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        assert not thorough.detect(grey), "no model finds a face: redacted"
        assert not is_blank(jpeg)
        # Not retained: a client that subscribes now (Home Assistant restarting) gets nothing.
        assert TOPIC not in await retained(broker.port, TOPIC)
        # Before the retention has passed nothing changes; after, the blank replaces it.
        assert not ring.expire(now=time.time() + (RETENTION_H - 1) * 3600)
        assert ring.expire(now=time.time() + RETENTION_H * 3600 + 1)
        await images.wait(3, "the blank replacement")
        assert not ring.expire(now=time.time() + 3 * RETENTION_H * 3600), "once"
        status = privacy_of(station).status()["privacy"]["ring_image"]
    blank, kept = images.got[2]
    assert kept is False
    assert is_blank(blank)
    assert len(images.got) == 3
    assert status == {"enabled": True, "shown": 1, "failed": 0, "expired": 1}
    assert TOPIC not in await retained(broker.port, TOPIC)


async def test_the_image_entity_is_discovered_only_when_switched_on(
    tmp_path: Path, broker: Broker
) -> None:
    settings = face_station(tmp_path / "on", broker.port, ring_image=True)
    async with connected_station(settings) as station:
        configs = await retained(broker.port, "homeassistant/image/#")
        node = bridge_of(station).topics.node_id
    (config,) = configs.values()
    assert config["image_topic"] == TOPIC
    assert config["content_type"] == "image/jpeg"
    assert config["availability_topic"] == f"{PREFIX}/availability"
    assert config["default_entity_id"] == f"image.{node}_ring_image"
    # Switched off later: the station no longer publishes the config (clear it by hand,
    # as docs/mqtt.md says); a fresh broker shows what a station switched off publishes.
    broker.kill()
    broker.start()
    off = face_station(tmp_path / "off", broker.port, ring_image=False, snapshots=True)
    async with watching(broker.port) as images, connected_station(off) as station:
        assert station.simulator is not None
        await station.simulator.act("press")
        snapshots = privacy_of(station).snapshots
        await until(lambda: snapshots.taken == 1, 15, "the snapshot (the same still frame)")
        await asyncio.sleep(0.5)  # a ring image would have followed within this
        assert privacy_of(station).status()["privacy"]["ring_image"] == {"enabled": False}
        assert await retained(broker.port, "homeassistant/image/#") == {}
    assert images.got == []
