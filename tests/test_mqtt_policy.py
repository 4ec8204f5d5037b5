"""The MQTT pieces that need no broker: reconnect policy, topics, URLs, cursor, payloads."""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import pytest

from intercom.config import MqttConfig
from intercom.errors import ConfigError
from intercom.mqtt.backoff import ReconnectPolicy
from intercom.mqtt.bridge import event_json
from intercom.mqtt.cursor import Cursor
from intercom.mqtt.fairqueue import PER_SIGNER, FairQueue, Rounds, claimed_kid
from intercom.mqtt.link import read_password
from intercom.mqtt.topics import Topics
from intercom.mqtt.url import config_from_url

CREDENTIAL = "mqtt-password"  # a credential name, not a password


def test_backoff_doubles_up_to_the_cap():
    policy = ReconnectPolicy(0.5, 4.0, jitter=0.0)
    assert [policy.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_resets_after_a_good_connection():
    policy = ReconnectPolicy(0.5, 4.0, jitter=0.0)
    for _ in range(5):
        policy.next_delay()
    policy.succeeded()
    assert policy.next_delay() == 0.5


def test_backoff_jitter_only_shortens_and_never_passes_the_cap():
    draws = iter([0.0, 1.0, 0.5])
    policy = ReconnectPolicy(1.0, 2.0, jitter=0.25, rand=lambda: next(draws))
    assert policy.next_delay() == 1.0
    assert policy.next_delay() == 1.5
    assert policy.next_delay() == 1.75


def test_backoff_survives_a_very_long_outage():
    policy = ReconnectPolicy(0.5, 30.0, jitter=0.0)
    for _ in range(10_000):
        delay = policy.next_delay()
    assert delay == 30.0


@pytest.mark.parametrize(("first", "cap", "jitter"), [(0, 1, 0), (2, 1, 0), (1, 2, 1.0)])
def test_backoff_refuses_nonsense(first, cap, jitter):
    with pytest.raises(ValueError):
        ReconnectPolicy(first, cap, jitter=jitter)


def test_topics_default_prefix_and_discovery():
    topics = Topics("intercom/door-1", "door-1")
    assert topics.availability == "intercom/door-1/availability"
    assert topics.state_lock == "intercom/door-1/state/lock"
    assert topics.events == "intercom/door-1/events"
    assert topics.command_result == "intercom/door-1/command/result"
    assert topics.checkpoint == "intercom/door-1/log/checkpoint"
    assert topics.discovery("binary_sensor", "door") == (
        "homeassistant/binary_sensor/intercom_door_1/door/config"
    )


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("building/replies/abc", True),
        ("intercom/door-1/command/result/abc", True),
        ("intercom/door-1/state/lock", False),
        ("intercom/door-1/availability", False),
        ("intercom/door-1", False),
        ("homeassistant/lock/x/config", False),
        ("replies/#", False),
        ("replies/+/x", False),
        ("$SYS/broker", False),
        ("", False),
        ("x" * 300, False),
    ],
)
def test_response_topics_never_point_at_the_stations_own(topic, allowed):
    assert Topics("intercom/door-1", "door-1").response_topic_allowed(topic) is allowed


def test_url_gives_host_port_and_tls():
    config = config_from_url("mqtts://broker.local:8884")
    assert (config.host, config.effective_port, config.uses_tls) == ("broker.local", 8884, True)
    assert config_from_url("mqtt://127.0.0.1").effective_port == 1883


def test_url_keeps_the_rest_of_the_config():
    password = secrets.token_urlsafe(8)
    base = MqttConfig(host="old", username="door", password=password, topic_prefix="b/1")
    config = config_from_url("mqtt://127.0.0.1:1999", base)
    assert config.host == "127.0.0.1"
    assert config.password is not None
    assert config.password.get_secret_value() == password
    assert config.topic_prefix == "b/1"


@pytest.mark.parametrize(
    "url", ["http://x", "mqtt://user:pw@host", "mqtt://host:99999", "mqtt://", "mqtt://h/x"]
)
def test_bad_urls_are_refused(url):
    with pytest.raises(ConfigError):
        config_from_url(url)


def test_config_refuses_two_passwords_and_half_a_client_cert(tmp_path):
    password = secrets.token_urlsafe(8)
    with pytest.raises(ValueError, match="at most one"):
        MqttConfig(host="h", username="u", password=password, password_file=tmp_path / "p")
    with pytest.raises(ValueError, match="username"):
        MqttConfig(host="h", password=password)
    with pytest.raises(ValueError, match="client_key"):
        MqttConfig(host="h", client_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError):
        MqttConfig(host="h", topic_prefix="a/#")


def test_password_from_a_systemd_credential(tmp_path):
    password = secrets.token_urlsafe(8)
    (tmp_path / CREDENTIAL).write_text(password + "\n")
    config = MqttConfig(host="h", username="u", password_credential=CREDENTIAL)
    assert read_password(config, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == password
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        read_password(config, {})


def test_password_file_missing_or_empty_is_a_config_error(tmp_path):
    config = MqttConfig(host="h", username="u", password_file=tmp_path / "nope")
    with pytest.raises(ConfigError, match="cannot read"):
        read_password(config, {})
    (tmp_path / "empty").write_text("")
    config = MqttConfig(host="h", username="u", password_file=tmp_path / "empty")
    with pytest.raises(ConfigError, match="empty"):
        read_password(config, {})


def test_cursor_survives_restarts_and_corruption(tmp_path):
    path = tmp_path / "mqtt.cursor"
    cursor = Cursor(path)
    assert cursor.load() == 0
    cursor.advance(41)
    assert cursor.dirty
    cursor.save()
    assert not cursor.dirty
    assert Cursor(path).load() == 41
    path.write_text("garbage")
    assert Cursor(path).load() == 0
    path.write_bytes(b"\xff\xfe")
    assert Cursor(path).load() == 0


def test_cursor_saves_at_most_once_a_second_during_a_burst(tmp_path):
    now = [100.0]
    cursor = Cursor(tmp_path / "mqtt.cursor", save_every_s=1.0, clock=lambda: now[0])
    cursor.advance(10)
    assert cursor.save_due()
    cursor.save()
    cursor.advance(20)
    now[0] += 0.5
    assert not cursor.save_due()
    assert cursor.dirty  # saved when the burst ends, or on stop
    now[0] += 0.5
    assert cursor.save_due()


@dataclass
class Logged:
    seq: int
    type: str
    at: float
    details: dict[str, Any] = field(default_factory=dict)


def test_event_payload_names_principals_by_id_only():
    # PrincipalPaired-like events may carry a display name; it never goes out.
    granted = Logged(7, "UnlockGranted", 1.5, {"door": "front", "principal": "p-12",
                                               "via": "mqtt", "jti": "j"})
    body = json.loads(event_json(granted))
    assert body == {"seq": 7, "type": "UnlockGranted", "at": 1.5,
                    "details": {"door": "front", "principal": "p-12", "via": "mqtt", "jti": "j"}}


def _message(payload: bytes) -> aiomqtt.Message:
    return aiomqtt.Message("intercom/x/command", payload, qos=0, retain=False, mid=0,
                           properties=None)


def _jws(kid: object, n: int = 0) -> bytes:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "Ed25519", "kid": kid}).encode())
    return header.rstrip(b"=") + f".payload{n}.sig".encode()


def test_claimed_kid_reads_the_header_only_and_never_fails():
    assert claimed_kid(_jws("alice")) == "alice"
    assert claimed_kid(_jws("alice").decode()) == "alice"
    for junk in (b"", b"\xff\xfe", b"no dots", b"!!!.x.y", _jws(5), b"W10.x.y", None, 3.5,
                 b"e30" * 400 + b".x.y"):
        assert claimed_kid(junk) == ""


async def test_fair_queue_takes_signers_in_turn_and_caps_a_flooding_one():
    queue = FairQueue(maxsize=10_000)
    for i in range(100):
        queue.put_nowait(_message(_jws("mallory", i)))
    queue.put_nowait(_message(_jws("alice")))
    queue.put_nowait(_message(b"junk"))
    assert queue.qsize() == PER_SIGNER + 2
    first = [claimed_kid((await queue.get()).payload) for _ in range(3)]
    assert first == ["mallory", "alice", ""]
    rest = [queue.get_nowait().payload for _ in range(PER_SIGNER - 1)]
    assert queue.empty()
    assert rest[-1] == _jws("mallory", 99)  # the newest were kept, the oldest dropped
    assert queue._queue.dropped == 100 - PER_SIGNER


def test_rounds_bound_the_backlog_by_dropping_the_oldest():
    rounds = Rounds(limit=4)
    for i in range(6):  # a flood that claims a new signer each time
        rounds.append(_message(_jws(f"nobody-{i}")))
    assert len(rounds) == 4
    assert [claimed_kid(m.payload) for m in rounds] == [f"nobody-{i}" for i in range(2, 6)]
    assert rounds.dropped == 2


def test_rounds_stay_consistent_when_the_limit_retires_the_same_signer():
    rounds = Rounds(limit=2)
    for i in range(5):
        rounds.append(_message(_jws("alice", i)))
    assert len(rounds) == 2
    assert [m.payload for m in rounds] == [_jws("alice", 3), _jws("alice", 4)]
    assert [rounds.popleft().payload for _ in range(2)] == [_jws("alice", 3), _jws("alice", 4)]
    assert len(rounds) == 0


def test_a_flood_over_many_ids_does_not_push_out_a_single_command():
    rounds = Rounds(limit=8)
    rounds.append(_message(_jws("manager", 0)))  # the one genuine command, first in round
    for i in range(200):  # forgeries spread over four known ids
        rounds.append(_message(_jws(f"mallory-{i % 4}", i)))
    assert len(rounds) == 8
    assert _jws("manager", 0) in [m.payload for m in rounds]
    assert rounds.popleft().payload == _jws("manager", 0)  # still first in the round
