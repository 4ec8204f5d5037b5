"""The station's TOML configuration, parsed into typed, validated settings.

Every model refuses unknown keys and documents each field; ``intercom check-config``
prints one line per problem, naming the key path and the reason.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import re
import tomllib
import typing
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from intercom.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/intercom/intercom.toml")
DEFAULT_STATE_DIR = Path("/var/lib/intercom")

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")]
Pin = Annotated[int, Field(ge=0, le=27, description="BCM GPIO number (0-27).")]
RESIDENT_TEXT_MAX = 40


def _resident_text(value: str) -> str:
    """Text shown to residents: printable, no control, format or private-use characters."""
    if value != value.strip():
        raise ValueError("no space at the start or the end")
    bad = [c for c in value if unicodedata.category(c)[0] in "CZ" and c != " "]
    if bad:
        raise ValueError(f"no control, format or line-break characters ({bad[0]!a})")
    return value


# What the installer types for residents to see (no markup: the page shows it as text).
ResidentText = Annotated[
    str, Field(min_length=1, max_length=RESIDENT_TEXT_MAX), AfterValidator(_resident_text)
]


class Model(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class StationConfig(Model):
    """Who this station is and where it keeps its state."""

    id: Name = Field(description="Station id; the audience of signed commands, in MQTT topics.")
    state_dir: Path = Field(
        default=DEFAULT_STATE_DIR,
        description="Keys, the event log, principals and the control socket live here.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written to stderr/journald."
    )


class ButtonConfig(Model):
    """A doorbell button and the flat it rings."""

    name: Name = Field(default="bell", description="Button name, as it appears in events.")
    pin: Pin
    flat: Name = Field(description="The flat whose residents this button rings.")
    label: ResidentText | None = Field(
        default=None,
        description="What the residents this button rings see when it rings, on the ring "
        'screen and in the notification ("Main entrance: someone is at the door"); up to '
        "40 characters, no control characters. Only that flat's devices get it; it is not "
        "in events, logs or MQTT. Unset: the door's name.",
    )
    active_low: bool = Field(
        default=True,
        description="True when a press connects the pin to ground (internal pull-up).",
    )
    debounce_ms: float = Field(
        default=30, ge=1, le=500, description="Edges closer than this are contact bounce."
    )
    coalesce_s: float = Field(
        default=3.0, ge=0, le=60, description="Presses within this time of the last make one."
    )


class RelayConfig(Model):
    """The lock relay: which pin, which polarity, how long it may stay energised."""

    pin: Pin
    door: Name = Field(default="front", description="Door name in commands and events.")
    active_high: bool = Field(default=True, description="True when a high pin energises the relay.")
    pulse_s: float = Field(
        default=3.0, ge=0.2, le=30, description="How long a granted unlock energises it."
    )
    max_open_s: float = Field(
        default=10.0,
        ge=0.5,
        le=30,
        description="Hard limit: a guard releases the relay after this, whatever the caller does.",
    )

    @model_validator(mode="after")
    def _pulse_within_max(self) -> Self:
        if self.pulse_s > self.max_open_s:
            raise ValueError(
                f"pulse_s ({self.pulse_s}) must not exceed max_open_s ({self.max_open_s})"
            )
        return self


class DoorContactConfig(Model):
    """An optional reed switch that reports the door open or closed."""

    pin: Pin
    open_when_high: bool = Field(
        default=True,
        description="True when the pin reads high with the door open (switch to ground, "
        "closed by the magnet, internal pull-up).",
    )
    held_open_s: float = Field(
        default=60, ge=1, le=3600, description="DoorHeldOpen after the door is open this long."
    )
    grant_window_s: float = Field(
        default=15,
        ge=1,
        le=300,
        description="An opening within this time of an unlock is not DoorForcedOpen.",
    )


class TamperConfig(Model):
    """An optional tamper switch on the station's cover."""

    pin: Pin
    active_low: bool = Field(
        default=False,
        description="False when the switch is normally closed to ground and opens on tamper "
        "(the pin goes high, internal pull-up).",
    )


class HardwareConfig(Model):
    """GPIO wiring of buttons, relay and sensors."""

    pin_factory: Literal["lgpio", "mock"] = Field(
        default="lgpio",
        description="gpiozero pin backend: lgpio on a Pi, mock for a simulated station.",
    )
    buttons: list[ButtonConfig] = Field(min_length=1, description="Doorbell buttons.")
    relay: RelayConfig
    door_contact: DoorContactConfig | None = None
    tamper: TamperConfig | None = None

    @model_validator(mode="after")
    def _pins_unique(self) -> Self:
        used: dict[int, str] = {}
        places: list[tuple[str, int]] = [
            (f"buttons[{i}].pin", b.pin) for i, b in enumerate(self.buttons)
        ]
        places.append(("relay.pin", self.relay.pin))
        if self.door_contact:
            places.append(("door_contact.pin", self.door_contact.pin))
        if self.tamper:
            places.append(("tamper.pin", self.tamper.pin))
        for where, pin in places:
            if pin in used:
                raise ValueError(f"{where}: pin {pin} is already used by {used[pin]}")
            used[pin] = where
        names = [b.name for b in self.buttons]
        if len(set(names)) != len(names):
            raise ValueError("buttons: every button needs a distinct name")
        return self


class CameraConfig(Model):
    """Where video comes from."""

    source: Literal["synthetic", "picamera2", "v4l2", "file"] = Field(
        default="picamera2",
        description="picamera2 on a Pi (hardware H.264), a V4L2 device or a video file "
        "through PyAV, or a synthetic test pattern with a running clock.",
    )
    device: str | None = Field(
        default=None, description="V4L2 device (e.g. /dev/video0) or video file path."
    )
    width: int = Field(default=640, ge=160, le=1920)
    height: int = Field(default=480, ge=120, le=1080)
    fps: int = Field(default=15, ge=1, le=30)
    passthrough: bool = Field(
        default=False,
        description="v4l2/file only: send the source's own H.264 as it is, without decoding "
        "or re-encoding (a UVC camera with H.264 output, or an H.264 file).",
    )

    encode_once: bool = Field(
        default=False,
        description="Frame sources (synthetic, v4l2, file): encode H.264 once with libx264 "
        "and send the same packets to every peer, instead of one encoder per peer.",
    )
    vp8_per_device: bool = Field(
        default=False,
        description="Frame sources without encode_once: let aiortc encode VP8 separately "
        "for each rung device (each at the bitrate its congestion feedback allows) instead "
        "of one shared VP8 encoder for every device, at the rate the worst watching device's "
        "loss allows.",
    )

    @model_validator(mode="after")
    def _device_when_needed(self) -> Self:
        if self.encode_once and (self.passthrough or self.source == "picamera2"):
            raise ValueError("encode_once: the source is already H.264 (picamera2, passthrough)")
        if self.vp8_per_device and (self.encode_once or self.passthrough
                                    or self.source == "picamera2"):
            raise ValueError("vp8_per_device: the devices are sent H.264 from this source "
                             "(picamera2, passthrough, encode_once), not VP8")
        if self.source in {"v4l2", "file"} and not self.device:
            raise ValueError(f"device: required when source is {self.source!r}")
        if self.passthrough and self.source not in {"v4l2", "file"}:
            raise ValueError(
                f"passthrough: only for v4l2 or file sources (picamera2 always passes "
                f"H.264 through), not {self.source!r}"
            )
        return self


class AudioConfig(Model):
    """Microphone and speaker at the door."""

    input: Literal["synthetic", "pyaudio"] = Field(
        default="pyaudio", description="Door microphone: pyaudio on a Pi, or a synthetic tone."
    )
    output: Literal["levels", "pyaudio"] = Field(
        default="pyaudio",
        description="Door speaker: pyaudio on a Pi, or a sink that records levels.",
    )
    input_device: int | None = Field(default=None, description="pyaudio input device index.")
    output_device: int | None = Field(default=None, description="pyaudio output device index.")


class MediaConfig(Model):
    """Camera and audio sources."""

    camera: CameraConfig = CameraConfig()
    audio: AudioConfig = AudioConfig()


class EventLogConfig(Model):
    """The encrypted, tamper-evident event log."""

    retention_hours: float = Field(
        default=168, ge=1, le=24 * 366, description="Events older than this are shredded."
    )
    checkpoint_every: int = Field(
        default=100, ge=1, le=100_000, description="Sign a checkpoint after this many records."
    )
    checkpoint_minutes: float = Field(
        default=10, gt=0, le=1440, description="...or after this many minutes, if any record."
    )
    epoch_minutes: float = Field(
        default=60,
        ge=1,
        le=1440,
        description="Records of one epoch this long share a key; shredding removes whole "
        "epochs, so a record lives at most retention plus one epoch.",
    )


class MqttConfig(Model):
    """The building's MQTT broker: state, events, Home Assistant discovery, signed commands."""

    host: str = Field(min_length=1, description="Broker host name or address.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Broker port (default 1883, 8883 with TLS)."
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto",
        description="MQTT version: auto tries 5 and falls back to 3.1.1 when refused.",
    )
    client_id: str | None = Field(
        default=None, max_length=64, description="Client id (default intercom-<station id>)."
    )
    topic_prefix: str | None = Field(
        default=None,
        pattern=r"^[^#+$/]([^#+]*[^#+/])?$",
        description="Prefix of every topic (default intercom/<station id>).",
    )
    username: str | None = Field(default=None, description="User name at the broker.")
    password: SecretStr | None = Field(
        default=None, description="Password (prefer password_file or password_credential)."
    )
    password_file: Path | None = Field(
        default=None, description="File holding the password (first line)."
    )
    password_credential: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of a systemd credential ($CREDENTIALS_DIRECTORY/NAME) with the password.",
    )
    tls: bool = Field(default=False, description="Connect with TLS (implied by ca_file).")
    ca_file: Path | None = Field(
        default=None, description="CA certificate(s) that sign the broker's certificate."
    )
    client_cert: Path | None = Field(default=None, description="Client certificate (PEM).")
    client_key: Path | None = Field(default=None, description="Client certificate's key (PEM).")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keep-alive interval.")
    reconnect_min_s: float = Field(
        default=0.5, gt=0, le=60, description="First delay before reconnecting."
    )
    reconnect_max_s: float = Field(
        default=4.0, gt=0, le=600, description="Cap of the doubling reconnect delay."
    )
    discovery: bool = Field(default=True, description="Publish Home Assistant discovery.")
    ring_image: bool = Field(
        default=False,
        description="At each ring, publish a frame with faces redacted and the privacy "
        "zones masked on <prefix>/ring_image, shown by Home Assistant's image entity "
        "'Last ring' (JPEG, never retained; a plain grey image replaces it after "
        "[privacy] snapshot_retention_hours and at each start).",
    )
    discovery_prefix: str = Field(
        default="homeassistant",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="Home Assistant's discovery prefix.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        secrets = [self.password, self.password_file, self.password_credential]
        if sum(s is not None for s in secrets) > 1:
            raise ValueError(
                "password: give at most one of password, password_file, password_credential"
            )
        if any(s is not None for s in secrets) and not self.username:
            raise ValueError("username: required when a password is given")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert: client_cert and client_key go together")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s: must not exceed reconnect_max_s")
        return self

    @property
    def uses_tls(self) -> bool:
        """Whether the link is encrypted."""
        return self.tls or self.ca_file is not None or self.client_cert is not None

    @property
    def effective_port(self) -> int:
        """The configured port, or the standard one for the transport."""
        return self.port or (8883 if self.uses_tls else 1883)


class IceServerConfig(Model):
    """A STUN server (a device behind a NAT learns its public address from it)."""

    urls: list[Annotated[str, Field(pattern=r"^stuns?:\S+$")]] = Field(
        min_length=1,
        description="stun: URLs of one server (TURN servers go in [web.turn], with "
        "short-lived credentials).",
    )


class TurnConfig(Model):
    """The owner's TURN server (coturn), for calls through NAT: short-lived credentials.

    The TURN REST scheme coturn implements (``use-auth-secret``): the station and the
    TURN server share a secret; the station hands each device, at sign-in and again
    before they expire, a user name ``<expiry>:<principal>`` and its HMAC as password.
    No long-lived TURN password ever reaches a device.
    """

    urls: list[Annotated[str, Field(pattern=r"^turns?:\S+$")]] = Field(
        min_length=1, max_length=8, description="turn:/turns: URLs of the server."
    )
    secret_file: Path | None = Field(
        default=None,
        description="File holding the secret shared with the TURN server (first line; "
        "coturn's static-auth-secret).",
    )
    secret_credential: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of a systemd credential ($CREDENTIALS_DIRECTORY/NAME) holding "
        "that secret, instead of secret_file.",
    )
    ttl_s: int = Field(
        default=4 * 3600, ge=600, le=24 * 3600,
        description="How long a credential is valid; devices get fresh ones (and a fresh "
        "connection) after half of it.",
    )

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if (self.secret_file is None) == (self.secret_credential is None):
            raise ValueError("secret_file: give one of secret_file, secret_credential")
        return self


class WebConfig(Model):
    """The station's HTTPS server: the resident web client and call signalling."""

    host: str = Field(default="0.0.0.0", min_length=1, description="Address to listen on.")  # noqa: S104
    port: int = Field(
        default=8443, ge=0, le=65535, description="TCP port (0: any free port, for tests)."
    )
    public_url: str = Field(
        default="",
        pattern=r"^(https://[^\s#?]+)?$",
        description="URL residents use (default https://<host, or hostname.local>:<port>/).",
    )
    ice_servers: list[IceServerConfig] = Field(
        default_factory=list,
        description="STUN servers given to both ends; none by default (home network).",
    )
    turn: TurnConfig | None = Field(
        default=None, description="The owner's TURN server; none by default."
    )
    ice_policy: Literal["all", "relay"] = Field(
        default="all",
        description="ICE candidates both ends use: all, or relay (only through [web.turn]).",
    )
    trusted_proxies: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        max_length=16,
        description="Addresses of reverse proxies whose X-Forwarded-For names the client "
        "(rate limits then count the client, not the proxy).",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="The owner's certificate chain (PEM, the leaf first), e.g. from ACME, "
        "instead of one issued by the station's own CA; reloaded when the file changes.",
    )
    tls_key_file: Path | None = Field(
        default=None,
        description="The key of tls_cert_file (unencrypted PEM), readable by the station.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            raise ValueError(f"{missing}: tls_cert_file and tls_key_file go together")
        if self.ice_policy == "relay" and self.turn is None:
            raise ValueError("ice_policy: relay needs a TURN server ([web.turn])")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_address(proxy)
            except ValueError:
                raise ValueError(f"trusted_proxies: {proxy!r} is not an IP address") from None
        return self


class CallsConfig(Model):
    """Ringing and calls."""

    ring_timeout_s: float = Field(
        default=30, ge=1, le=300, description="Unanswered for this long: the call is missed."
    )
    max_call_s: float = Field(
        default=300, ge=5, le=3600, description="A call is ended after this long."
    )


PUSH_SERVICES = [
    "fcm.googleapis.com",  # Chrome, Edge on Android, Chromium browsers
    "updates.push.services.mozilla.com",  # Firefox
    "web.push.apple.com",  # Safari, iOS 16.4+ home-screen apps
    "*.notify.windows.com",  # Edge on Windows
]


class PushConfig(Model):
    """Web Push: ringing residents' phones while the app is closed."""

    enabled: bool = Field(
        default=True,
        description="Push a ring to paired devices that have no live connection (each "
        "device opts in when its resident allows notifications).",
    )
    contact: str = Field(
        default="",
        pattern=r"^((mailto:|https://)[^\s]+)?$",
        description="Who push services may contact about this station's pushes (VAPID "
        "sub: mailto: or https:); default the station's public URL.",
    )
    allowed_hosts: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=lambda: list(PUSH_SERVICES),
        max_length=32,
        description="Push service hosts the station sends to (shell-style patterns); a "
        "subscription naming any other host is refused.",
    )
    ttl_s: int = Field(
        default=30, ge=0, le=600,
        description="How long a push service keeps an undelivered ring (TTL).",
    )
    ca_file: Path | None = Field(
        default=None,
        description="Extra CA certificate (PEM) trusted for push services, besides the "
        "system's (a private push service).",
    )


class PrivacyConfig(Model):
    """Privacy zones, face redaction, snapshots and the installer's time box."""

    zones: list[
        Annotated[
            list[tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]]],
            Field(min_length=3, max_length=64),
        ]
    ] = Field(
        default_factory=list,
        max_length=16,
        description="Polygons blacked out in every frame at the source, each a list of "
        "[x, y] points from 0 to 1 (left to right, top to bottom).",
    )
    redact_all_outputs: bool = Field(
        default=False,
        description="Blur faces in every output, residents' calls included (managers "
        "always get redacted media).",
    )
    snapshots: bool = Field(
        default=False, description="Keep one frame per ring, encrypted in the event log."
    )
    snapshot_retention_hours: float = Field(
        default=48,
        ge=1,
        le=24 * 366,
        description="Snapshots are shredded after this long (at most the log's retention).",
    )
    installer_valid_hours: float = Field(
        default=72,
        ge=1,
        le=24 * 30,
        description="How long an installer principal stays valid after provisioning or an "
        "extension.",
    )


class MonitorConfig(Model):
    """Health metrics (`intercom status`, MQTT, optionally `/metrics`) and alert thresholds."""

    interval_s: float = Field(
        default=30, ge=0.05, le=3600, description="How often health is sampled and alerts checked."
    )
    camera_stall_s: float = Field(
        default=10, ge=0.05, le=3600,
        description="camera_stalled: a reader has waited this long for a camera frame.",
    )
    disk_low_percent: float = Field(
        default=10, ge=0, le=100,
        description="disk_low: less free space than this on the state directory's filesystem.",
    )
    broker_unreachable_s: float = Field(
        default=300, ge=0.05, le=86_400,
        description="broker_unreachable: the MQTT link has not been connected for this long.",
    )
    cert_expiry_days: float = Field(
        default=30, ge=0, le=3650,
        description="certificate_expiry: the station's TLS certificate or the MQTT client "
        "certificate expires within this many days.",
    )
    unlock_failures: int = Field(
        default=5, ge=1, le=1000,
        description="unlock_failures: this many denied commands of one principal...",
    )
    unlock_failure_window_s: float = Field(
        default=600, ge=1, le=86_400, description="...within this many seconds."
    )
    clock_check: bool = Field(
        default=True,
        description="clock_unsynchronised: ask systemd-timesyncd (`timedatectl show -p "
        "NTPSynchronized`); where it cannot be asked the state is unknown, no alert.",
    )
    metrics: bool = Field(
        default=False,
        description="Serve the health metrics as Prometheus text at `/metrics` on the "
        "station's HTTPS server, only to a manager's bearer token (`intercom sign-bearer`).",
    )


class WhepConfig(Model):
    """The redacted live view for managers over WHEP (RFC 9725), off unless enabled."""

    enabled: bool = Field(
        default=False,
        description="Serve the camera, faces pixelated and zones masked, at `/whep` on the "
        "station's HTTPS server to managers' bearer tokens (`intercom sign-bearer --scope "
        "whep`); each viewing session is logged.",
    )
    max_viewers: int = Field(
        default=2, ge=1, le=8,
        description="Viewing sessions at once (beyond: 503); each costs one video encoder.",
    )
    max_bearer_hours: float = Field(
        default=24, gt=0, le=24 * 31,
        description="Longest lifetime (exp - iat) of a WHEP bearer the station accepts; a "
        "session ends when its bearer expires.",
    )
    query_token: bool = Field(
        default=False,
        description="Also take the bearer from an `access_token` query parameter (RFC 6750 "
        "2.3), for WHEP clients that send no Authorization header (go2rtc, Frigate). The "
        "token is then in the client's config and URL: keep it short-lived.",
    )


class Settings(Model):
    """The whole station configuration."""

    station: StationConfig
    hardware: HardwareConfig
    media: MediaConfig = MediaConfig()
    eventlog: EventLogConfig = EventLogConfig()
    mqtt: MqttConfig | None = None
    web: WebConfig = WebConfig()
    calls: CallsConfig = CallsConfig()
    push: PushConfig = PushConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    monitor: MonitorConfig = MonitorConfig()
    whep: WhepConfig = WhepConfig()
    simulated: bool = Field(
        default=False,
        description="Set by `intercom run --simulate`: mock pins and the simulator control.",
    )

    def with_state_dir(self, state_dir: Path) -> Settings:
        """A copy whose state lives in ``state_dir``."""
        station = self.station.model_copy(update={"state_dir": state_dir})
        return self.model_copy(update={"station": station})


def simulated_settings(state_dir: Path, base: Settings | None = None) -> Settings:
    """Settings of a simulated station: gpiozero mock pins and synthetic media.

    With ``base`` the wiring and the rest come from a real config file; only the pin
    backend and the media sources change (a video-file camera is kept). Without it, a
    station with one button (flat ``1``), a relay, a door contact and a tamper switch.
    """
    state_dir = state_dir.resolve()
    media = {"camera": {"source": "synthetic"}, "audio": {"input": "synthetic", "output": "levels"}}
    if base is not None:
        data = base.model_dump(mode="json")
        data["hardware"]["pin_factory"] = "mock"
        camera = data["media"]["camera"]
        data["media"] = media
        if camera["source"] == "file":  # a video file plays the same anywhere
            data["media"]["camera"] = camera
        keep = ("width", "height", "fps", "encode_once", "vp8_per_device")
        data["media"]["camera"].update({k: camera[k] for k in keep})
        data["station"]["state_dir"] = str(state_dir)
        data["simulated"] = True
        data["mqtt"] = base.mqtt  # as is: a JSON dump would mask its password
        # Loopback only, on the config's port: a paired browser finds it again after a restart.
        data["web"] = base.web.model_copy(update={"host": "127.0.0.1"})
        return Settings.model_validate(data)
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:6]
    return Settings.model_validate(
        {
            "station": {"id": f"sim-{digest}", "state_dir": str(state_dir)},
            "hardware": {
                "pin_factory": "mock",
                "buttons": [{"name": "bell", "pin": 17, "flat": "1"}],
                "relay": {"pin": 27, "door": "front"},
                "door_contact": {"pin": 22},
                "tamper": {"pin": 23},
            },
            "media": media,
            "web": {"host": "127.0.0.1", "port": 0},
            "simulated": True,
        }
    )


def load_settings(path: Path) -> Settings:
    """Read and validate a config file; raise ConfigError naming every bad key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    return parse_settings(text, source=str(path))


def parse_settings(text: str, source: str = "<config>") -> Settings:
    """Validate TOML text; raise ConfigError naming every bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from exc
    except RecursionError as exc:  # tomllib recurses into nested arrays and tables
        raise ConfigError([f"{source}: not valid TOML: nested too deeply"]) from exc
    if "simulated" in data:
        raise ConfigError(["simulated: set by `intercom run --simulate`, not in the file"])
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, text)) from exc


def _problems(exc: ValidationError, text: str = "") -> list[str]:
    """One plain line per problem: ``line N: key.path: what is wrong``."""
    lines: list[tuple[int, str]] = []
    where = _key_lines(text)
    for err in exc.errors(include_url=False):
        path = _key_path(err["loc"])
        if err["type"] == "missing":
            line = f"{path}: required key is missing"
        elif err["type"] == "extra_forbidden":
            line = f"{path}: unknown key{_suggestion(err['loc'])}"
        elif err["type"] == "value_error":
            text_ = str(err["msg"]).removeprefix("Value error, ")
            # Model-level checks name their own sub-key ("relay.pin: ...").
            sub, sep, rest = text_.partition(": ")
            if sep and re.fullmatch(r"[\w.\[\]]+", sub):
                path, text_ = _join(path, sub), rest
            line = f"{path}: {text_}"
        else:
            line = f"{path}: {_message(err)}, got {err['input']!r}"
        number = _line_of(where, path)
        lines.append((number or 0, line if number is None else f"line {number}: {line}"))
    return [line for _, line in sorted(lines, key=lambda item: item[0])]


# Plain wording for pydantic's error types; ``{name}`` fills from the error's context.
PLAIN: dict[str, str] = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text in quotes",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "is not of the allowed form (the pattern {pattern})",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} characters",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} items",
    "list_type": "must be a list, [...]",
    "tuple_type": "must be a list, [...]",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "path_type": "must be a path in quotes",
}


def _message(err: Any) -> str:
    ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in (err.get("ctx") or {}).items()}
    plain = PLAIN.get(str(err["type"]))
    if plain is not None:
        try:
            return plain.format(**ctx)
        except (KeyError, IndexError):
            pass
    return str(err["msg"]).replace("Input should be", "must be")


def _suggestion(loc: tuple[int | str, ...]) -> str:
    """``; did you mean 'pulse_s'?`` (difflib), else the keys that are known there."""
    known = _fields_at(loc[:-1])
    if not known:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (known keys here: {', '.join(known)})"


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the config model at ``loc`` knows (none when the path leaves the models)."""
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        inner = _inner_models(info.annotation) if info is not None else []
        if not inner:
            return []
        model = inner[0]
    return [name for name in model.model_fields if name != "simulated"]


def _inner_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _inner_models(arg)]


_BARE_KEY = re.compile(r"[A-Za-z0-9_\-.\"' ]+")


def _key_lines(text: str) -> dict[str, int]:
    """The line of each table and key of a TOML text, by key path (``a.b[1].c``).

    Plain string work, linear in the text: only lines of the simple shapes ``[table]``,
    ``[[array]]`` and ``key = ...`` are read; anything else is passed over.
    """
    lines: dict[str, int] = {}
    counts: dict[str, int] = {}
    table = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("["):
            array = line.startswith("[[")
            name, sep, _ = line.lstrip("[").partition("]")
            if not sep or not _BARE_KEY.fullmatch(name):
                continue
            name = _dotted(name)
            if array:
                counts[name] = counts.get(name, -1) + 1
                name = f"{name}[{counts[name]}]"
            table = name
            lines.setdefault(table, number)
            continue
        key, sep, _ = line.partition("=")
        if sep and _BARE_KEY.fullmatch(key):
            path = _dotted(key)
            lines.setdefault(f"{table}.{path}" if table else path, number)
    return lines


def _dotted(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


def _line_of(lines: dict[str, int], path: str) -> int | None:
    """The line of ``path``, else of the nearest enclosing key or table that is written."""
    while path:
        if path in lines:
            return lines[path]
        cut = path.rfind("[") if path.endswith("]") else path.rfind(".")
        path = path[:max(cut, 0)]
    return None


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


def _join(path: str, sub: str) -> str:
    return sub if path == "<root>" else f"{path}.{sub}"


def wiring_warnings(settings: Settings) -> list[str]:
    """Wirings that are valid but unsafe when the daemon dies (see hw/wiring.md)."""
    relay = settings.hardware.relay
    warnings = []
    if not relay.active_high:
        warnings.append(
            "hardware.relay.active_high: an active-low relay energises when the pin is "
            "released (crash, boot) unless its input has an external pull-up; see hw/wiring.md"
        )
    elif relay.pin <= 8:
        warnings.append(
            f"hardware.relay.pin: GPIO{relay.pin} is pulled up at power-on, so the relay "
            "energises when the pin is released; use GPIO9-27 (hw/wiring.md)"
        )
    return warnings
