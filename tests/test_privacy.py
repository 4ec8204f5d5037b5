"""Privacy zones and face redaction on every output path: peer, snapshot, manager media."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from skimage import data as skdata

from intercom.calls.tracks import SourceTrack
from intercom.config import (
    CameraConfig,
    PrivacyConfig,
    Settings,
    parse_settings,
    simulated_settings,
)
from intercom.errors import ConfigError, HardwareError
from intercom.eventlog.reader import LogReader, Query
from intercom.eventlog.store import open_log
from intercom.media.picamera import Picamera2Camera
from intercom.privacy.camera import PrivacyCamera, privacy_camera, still_frame
from intercom.privacy.redact import FaceRedactor
from intercom.privacy.snapshots import read_snapshots
from intercom.privacy.zones import ZoneMask, ZoneMasks, rasterise
from intercom.station import Station
from tests.conftest import INTERCOM
from tests.test_calls_client import H264Camera

# Bottom-left quarter and a triangle at the bottom right, in normalised coordinates
# (clear of the face, which is at the top).
QUARTER = [(0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (0.0, 1.0)]
TRIANGLE = [(0.7, 0.6), (0.95, 0.95), (0.6, 0.95)]
ZONES = [QUARTER, TRIANGLE]
W, H = 640, 480


def face_rgb() -> np.ndarray:
    """The astronaut picture shipped inside scikit-image, 640x480 (a real face)."""
    return np.ascontiguousarray(cv2.resize(skdata.astronaut(), (W, W))[80 : 80 + H])


def face_frame() -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(face_rgb(), format="rgb24").reformat(format="yuv420p")


def planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = frame.to_ndarray(format="yuv420p")
    h, w = frame.height, frame.width
    chroma = data[h:].reshape(-1)
    q = (h // 2) * (w // 2)
    return data[:h], chroma[:q].reshape(h // 2, w // 2), chroma[q:].reshape(h // 2, w // 2)


def assert_zones_masked(frame: av.VideoFrame) -> None:
    mask = ZoneMask(ZONES, frame.width, frame.height)
    y, u, v = planes(frame)
    assert (y[mask.luma] == 16).all()
    assert (u[mask.chroma] == 128).all()
    assert (v[mask.chroma] == 128).all()
    assert (y[~mask.luma] != 16).any(), "the picture outside the zones is left"


def assert_zone_dark(bgr: np.ndarray) -> None:
    """A decoded JPEG: the zones are black (allowing for compression near edges)."""
    h, w = bgr.shape[:2]
    inner = rasterise([[(0.02, 0.52), (0.48, 0.52), (0.48, 0.98), (0.02, 0.98)]], w, h)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert grey[inner].max() < 40
    assert grey[~rasterise(ZONES, w, h)].mean() > 60


def face_found(redactor: FaceRedactor, frame: av.VideoFrame) -> bool:
    return bool(redactor.detect(planes(frame)[0]))


def distinct_levels(grey: np.ndarray, box: tuple[int, int, int, int]) -> int:
    x, y, w, h = box
    return len(np.unique(grey[y : y + h, x : x + w]))


# --- the mask itself -----------------------------------------------------------------


def test_rasterise_fills_polygons_by_pixel_centre():
    mask = rasterise([QUARTER], 8, 6)
    assert mask[3:, :4].all()
    assert not mask[:3, :].any()
    assert not mask[:, 4:].any()
    # Base 0.35 wide at y = 0.95, apex 0.35 above it: area 0.35 * 0.35 / 2.
    triangle = rasterise([TRIANGLE], 400, 400)
    assert triangle.mean() == pytest.approx(0.35 * 0.35 / 2, rel=0.03)


def test_mask_applies_to_every_plane_of_a_frame():
    frame = face_frame()
    ZoneMasks(ZONES).apply_frame(frame)
    assert_zones_masked(frame)


def test_mask_of_a_strided_i420_buffer_as_picamera2_maps_it():
    # picamera2's YUV420 buffer: rows padded to the stride, U then V at half the stride.
    stride = 704
    buffer = np.full((H * 3 // 2, stride), 200, dtype=np.uint8)
    mask = ZoneMasks(ZONES).for_size(W, H)
    mask.apply_i420(buffer, stride)
    flat = buffer.reshape(-1)
    y = flat[: H * stride].reshape(H, stride)
    u = flat[H * stride : H * stride + H // 2 * stride // 2].reshape(H // 2, stride // 2)
    assert (y[:, :W][mask.luma] == 16).all()
    assert (y[:, :W][~mask.luma] == 200).all()
    assert (y[:, W:] == 200).all(), "padding untouched"
    assert (u[:, : W // 2][mask.chroma] == 128).all()
    assert (u[:, : W // 2][~mask.chroma] == 200).all()


def test_no_zones_leaves_the_source_unwrapped():
    class Source:
        encoded = False
        name = "x"

    source = Source()
    assert privacy_camera(source, PrivacyConfig()) is source  # type: ignore[arg-type]


# --- face redaction ------------------------------------------------------------------


def test_face_is_blurred_in_the_redacted_output_and_intact_in_the_other():
    redactor = FaceRedactor()
    original = face_frame()
    (box,) = redactor.detect(planes(original)[0])
    redacted = redactor.redact_frame(original)
    assert face_found(redactor, original), "the unredacted frame is untouched"
    assert not face_found(redactor, redacted)
    # The face is a few flat blocks: at most 6x6 grey levels where there were hundreds.
    assert distinct_levels(planes(original)[0], box) > 100
    assert distinct_levels(planes(redacted)[0], box) <= 36
    # Away from the face the picture is the same.
    assert np.array_equal(planes(original)[0][300:], planes(redacted)[0][300:])


# --- output paths of a running station -------------------------------------------------


def settings_with(tmp_path: Path, **privacy: object) -> Settings:
    base = simulated_settings(tmp_path / "state")
    return base.model_copy(update={"privacy": PrivacyConfig(zones=ZONES, **privacy)})


def face_video(path: Path) -> Path:
    """A short raw video of the face picture, made here (the 'file' camera loops it)."""
    out = av.open(str(path), "w", format="yuv4mpegpipe")
    stream = out.add_stream("rawvideo", rate=15)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    for _ in range(2):
        for packet in stream.encode(face_frame()):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def with_face_camera(settings: Settings, video: Path) -> Settings:
    camera = settings.media.camera.model_copy(update={"source": "file", "device": str(video)})
    media = settings.media.model_copy(update={"camera": camera})
    return settings.model_copy(update={"media": media})


async def test_peer_frames_from_station_camera_are_masked(tmp_path):
    station = Station(settings_with(tmp_path))
    await station.start()
    try:
        assert isinstance(station.camera, PrivacyCamera)
        track = SourceTrack("video", station.camera.next)  # as the calls code reads it
        for _ in range(3):
            assert_zones_masked(await track.recv())
        assert_zones_masked(await still_frame(station.camera))  # previews, snapshots
    finally:
        await station.stop("test finished")


async def test_snapshot_at_ring_is_masked_encrypted_and_redacted_for_managers(tmp_path):
    settings = with_face_camera(settings_with(tmp_path, snapshots=True),
                                face_video(tmp_path / "face.y4m"))
    station = Station(settings)
    await station.start()
    try:
        assert station.simulator is not None
        await station.simulator.act("press")
        privacy = next(c for c in station.components if c.name == "privacy")
        for _ in range(300):
            if privacy.status()["privacy"]["snapshots"]["taken"]:
                break
            await asyncio.sleep(0.02)
        assert privacy.status()["privacy"]["snapshots"]["taken"] == 1
        # Never on the bus: no subscriber or broker sees the image.
        assert not [e for e in station.bus.recent if e.type == "SnapshotTaken"]
    finally:
        await station.stop("test finished")
    raw = (settings.station.state_dir / "eventlog.db").read_bytes()
    conn, keyring = open_log(settings.station.state_dir, create=False)
    reader = LogReader(conn, keyring)
    (resident,) = read_snapshots(reader, "resident", flats=frozenset({"1"}))
    (manager,) = read_snapshots(reader, "manager")
    assert list(read_snapshots(reader, "resident", flats=frozenset({"2"}))) == []
    conn.close()
    assert base64.b64encode(resident.jpeg)[:64] not in raw, "stored encrypted"
    redactor = FaceRedactor()
    for snap in (resident, manager):
        bgr = cv2.imdecode(np.frombuffer(snap.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert_zone_dark(bgr)
    res = cv2.cvtColor(cv2.imdecode(np.frombuffer(resident.jpeg, np.uint8), 1), cv2.COLOR_BGR2GRAY)
    man = cv2.cvtColor(cv2.imdecode(np.frombuffer(manager.jpeg, np.uint8), 1), cv2.COLOR_BGR2GRAY)
    assert redactor.detect(res), "the resident of the flat rung sees the face"
    assert not redactor.detect(man), "the manager never does"
    assert manager.redacted
    assert not resident.redacted


async def test_redact_all_outputs_blurs_faces_in_peer_frames(tmp_path):
    settings = with_face_camera(settings_with(tmp_path, redact_all_outputs=True),
                                face_video(tmp_path / "face.y4m"))
    station = Station(settings)
    await station.start()
    try:
        assert station.camera is not None
        frame = await SourceTrack("video", station.camera.next).recv()
    finally:
        await station.stop("test finished")
    assert_zones_masked(frame)
    assert not face_found(FaceRedactor(), frame)


async def test_snapshots_are_shredded_after_retention_and_the_log_still_verifies(tmp_path):
    settings = settings_with(tmp_path, snapshots=True, snapshot_retention_hours=2)
    station = Station(settings)
    await station.start()
    try:
        assert station.simulator is not None
        await station.simulator.act("press")
        privacy = next(c for c in station.components if c.name == "privacy")
        snapshots = privacy.snapshots
        for _ in range(300):
            if snapshots.taken:
                break
            await asyncio.sleep(0.02)
        assert snapshots.taken == 1
        assert await snapshots.shred_expired(now=time.time() + 3600) == 0, "not yet"
        assert await snapshots.shred_expired(now=time.time() + 4 * 3600) == 1
    finally:
        await station.stop("test finished")
    conn, keyring = open_log(settings.station.state_dir, create=False)
    reader = LogReader(conn, keyring)
    assert list(read_snapshots(reader, "manager")) == []
    records = list(reader.query(Query(types=frozenset({"SnapshotTaken"}))))
    conn.close()
    assert len(records) == 1, "the record stays, its image is gone"
    assert records[0].details["image"] is None
    assert records[0].details["flat"] == "1"
    verify = log_verify(settings.station.state_dir)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def log_verify(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTERCOM, "log", "verify", "--deep", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60)


def test_preview_writes_a_png_with_the_zones_masked(tmp_path):
    config = tmp_path / "intercom.toml"
    config.write_text(
        '[station]\nid = "door"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        '[hardware]\nbuttons = [{pin = 17, flat = "1"}]\nrelay = {pin = 27}\n'
        "[privacy]\nzones = " + json.dumps([[list(p) for p in z] for z in ZONES]) + "\n"
    )
    out = tmp_path / "preview.png"
    done = subprocess.run(
        [*INTERCOM, "privacy", "preview", "--simulate", "--config", str(config), "--out",
         str(out)], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "2 zones masked" in done.stdout
    image = cv2.imread(str(out))
    assert image.shape == (H, W, 3)
    inner = rasterise([[(0.02, 0.52), (0.48, 0.52), (0.48, 0.98), (0.02, 0.98)]], W, H)
    assert image[inner].max() < 30, "masked black inside the zone"
    outline = image[:, :, 1] > 200
    assert outline[int(0.5 * H) - 1 : int(0.5 * H) + 2, 10:300].any(), "zone edge drawn"


def test_preview_refuses_a_non_png_name(tmp_path):
    done = subprocess.run([*INTERCOM, "privacy", "preview", "--simulate", "--out",
                           str(tmp_path / "x.jpg")], capture_output=True, text=True)
    assert done.returncode == 1
    assert "PNG" in done.stderr


async def test_pi_still_frame_is_rebuilt_from_the_strided_buffer_the_encoder_got():
    # picamera2 itself cannot run here; its buffer layout and our conversion can.
    camera = Picamera2Camera(CameraConfig(width=W, height=H))
    camera._loop, camera._stride = asyncio.get_running_loop(), 704
    camera.frame_filter = PrivacyCamera(camera, PrivacyConfig(zones=ZONES)).filter_i420
    source = face_frame().to_ndarray(format="yuv420p")
    buffer = np.zeros((H * 3 // 2, 704), np.uint8)
    flat = buffer.reshape(-1)
    flat[: H * 704].reshape(H, 704)[:, :W] = source[:H]
    chroma = source[H:].reshape(-1)
    half = (H // 2) * (W // 2)
    for index in range(2):
        start = H * 704 + index * (H // 2) * 352
        rows = flat[start : start + (H // 2) * 352].reshape(H // 2, 352)
        rows[:, : W // 2] = chroma[index * half : (index + 1) * half].reshape(H // 2, W // 2)
    camera.frame_filter(buffer, W, H, 704)  # what the pre-callback does to each request
    future = camera._loop.create_future()
    camera._still = future
    camera._give_still(buffer)
    frame = await future
    assert camera._still is None
    assert (frame.width, frame.height) == (W, H)
    assert_zones_masked(frame)
    assert face_found(FaceRedactor(), frame), "zones only: the face is left"


async def test_an_encoding_camera_that_cannot_mask_refuses_to_start():
    camera = PrivacyCamera(H264Camera(), PrivacyConfig(zones=ZONES))
    with pytest.raises(HardwareError, match="cannot mask the privacy zones"):
        await camera.open()


def test_a_station_without_privacy_settings_loads_neither_numpy_nor_opencv(tmp_path):
    probe = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from intercom.config import simulated_settings\n"
        "from intercom.station import Station\n"
        "async def main():\n"
        f"    station = Station(simulated_settings(Path({str(tmp_path / 'st')!r})))\n"
        "    await station.start()\n"
        "    await station.stop('probe')\n"
        "asyncio.run(main())\n"
        "print('numpy' in sys.modules, 'cv2' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


async def test_preview_from_the_running_station_that_holds_the_camera(tmp_path):
    station = Station(settings_with(tmp_path))
    await station.start()
    out = tmp_path / "running.png"
    try:
        proc = await asyncio.create_subprocess_exec(
            *INTERCOM, "privacy", "preview", "--out", str(out), "--state-dir",
            str(station.state_dir), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await station.stop("test finished")
    assert proc.returncode == 0, stderr.decode()
    assert "from the running station, 2 zones masked" in stdout.decode()
    image = cv2.imread(str(out))
    inner = rasterise([[(0.02, 0.52), (0.48, 0.52), (0.48, 0.98), (0.02, 0.98)]], W, H)
    assert image[inner].max() < 40


def test_thorough_redaction_of_stills_leaves_no_face_any_of_its_models_finds():
    redactor = FaceRedactor(thorough=True)
    bgr = cv2.cvtColor(face_rgb(), cv2.COLOR_RGB2BGR)
    assert redactor.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    redacted = redactor.redact_bgr(bgr)
    assert not redactor.detect(cv2.cvtColor(redacted, cv2.COLOR_BGR2GRAY))
    assert np.array_equal(bgr[300:], redacted[300:]), "the rest is untouched"


async def test_snapshots_switched_off_are_neither_taken_nor_kept_past_retention(tmp_path):
    settings = settings_with(tmp_path, snapshots=True, snapshot_retention_hours=1)
    station = Station(settings)
    await station.start()
    try:
        assert station.simulator is not None
        await station.simulator.act("press")
        snapshots = next(c for c in station.components if c.name == "privacy").snapshots
        for _ in range(300):
            if snapshots.taken:
                break
            await asyncio.sleep(0.02)
    finally:
        await station.stop("test finished")
    off = settings.model_copy(update={"privacy": settings.privacy.model_copy(
        update={"snapshots": False})})
    station = Station(off)
    await station.start()
    try:
        assert station.simulator is not None
        privacy = next(c for c in station.components if c.name == "privacy")
        assert privacy.status()["privacy"]["snapshots"] == {
            "enabled": False, "taken": 0, "failed": 0}
        await station.simulator.act("press")
        await asyncio.sleep(0.3)
        assert privacy.snapshots.taken == 0
        assert await privacy.snapshots.shred_expired(now=time.time() + 3 * 3600) == 1
    finally:
        await station.stop("test finished")


@pytest.mark.parametrize(
    ("zones", "problem"),
    [
        ("[[[0, 0], [1, 0]]]", "line 7: privacy.zones[0]: must have at least 3 item(s)"),
        ("[[[0, 0], [1.5, 0], [1, 1]]]",
         "line 7: privacy.zones[0][1][0]: must be at most 1, got 1.5"),
        ("[[[0, 0, 0], [1, 0], [1, 1]]]", "line 7: privacy.zones[0][0]: must have at most 2 items"),
    ],
)
def test_bad_zones_are_refused_naming_the_key(zones, problem):
    text = ('[station]\nid = "x"\n[hardware]\nbuttons = [{pin = 17, flat = "1"}]\n'
            f"relay = {{pin = 27}}\n[privacy]\nzones = {zones}\n")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text)
    assert caught.value.problems[0].startswith(problem)
