"""Short-lived TURN credentials: the TURN REST scheme coturn implements.

The station and the owner's TURN server share a secret (coturn's ``use-auth-secret`` and
``static-auth-secret``). For each device, and for the station's own end of each
connection, the station makes a user name ``<expiry>:<name>`` (unix seconds) and the
password ``base64(HMAC-SHA1(secret, user name))``; the TURN server recomputes it and
refuses the name once its time has passed. A device gets its credentials at sign-in and
fresh ones after half their lifetime; none is ever valid for long, and the secret never
leaves the station.

``ice_config`` is what a device is given (the browser's ``RTCConfiguration`` fields);
``station_servers`` what the station's own aiortc connections use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCIceServer

from intercom.config import TurnConfig, WebConfig
from intercom.errors import ConfigError
from intercom.identity import secret_line


def read_secret(config: TurnConfig, environ: dict[str, str] | None = None) -> bytes:
    """The shared secret from its file or systemd credential; ConfigError naming the key."""
    key = "web.turn.secret_file"
    if config.secret_credential is not None:
        key = "web.turn.secret_credential"
    secret = secret_line((key, config.secret_file), (key, config.secret_credential), environ)
    if secret is None or len(secret) < 16:
        raise ConfigError([f"{key}: the secret must have at least 16 characters"])
    return secret.encode()


@dataclass(frozen=True)
class TurnCredential:
    """One user name and password, valid until ``expires_at`` (unix seconds)."""

    urls: tuple[str, ...]
    username: str
    password: str
    expires_at: int


def credential_for(secret: bytes, urls: tuple[str, ...], name: str, expires_at: int
                   ) -> TurnCredential:
    """The TURN REST credential of ``name`` valid until ``expires_at``."""
    username = f"{expires_at}:{name}"
    digest = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return TurnCredential(urls, username, base64.b64encode(digest).decode(), expires_at)


class IceProvider:
    """What each end gets: STUN servers, short-lived TURN credentials, the ICE policy."""

    def __init__(
        self,
        web: WebConfig,
        secret: bytes | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stun = [list(s.urls) for s in web.ice_servers]
        self._turn = web.turn
        self._secret = secret
        self.policy = web.ice_policy
        self._clock = clock
        if self._turn is not None and secret is None:
            raise ValueError("a TURN server needs its secret")

    @classmethod
    def from_config(cls, web: WebConfig) -> IceProvider:
        """The provider for ``web``, the TURN secret read (ConfigError naming the key)."""
        return cls(web, read_secret(web.turn) if web.turn is not None else None)

    @property
    def ttl_s(self) -> int | None:
        """How long a TURN credential is valid (None: no TURN server)."""
        return self._turn.ttl_s if self._turn is not None else None

    def _credential(self, name: str) -> TurnCredential | None:
        if self._turn is None or self._secret is None:
            return None
        expires_at = int(self._clock()) + self._turn.ttl_s
        return credential_for(self._secret, tuple(self._turn.urls), name, expires_at)

    def ice_config(self, name: str) -> dict[str, Any]:
        """A device's ``ice_servers``, ``ice_policy`` and when its credential expires."""
        servers: list[dict[str, Any]] = [{"urls": urls} for urls in self._stun]
        turn = self._credential(name)
        if turn is not None:
            servers.append({"urls": list(turn.urls), "username": turn.username,
                            "credential": turn.password})
        return {"ice_servers": servers, "ice_policy": self.policy,
                "ice_expires_at": turn.expires_at if turn else None}

    def station_servers(self, name: str) -> list[RTCIceServer]:
        """The station's own aiortc servers for one connection (its own credential)."""
        servers = [RTCIceServer(urls=urls) for urls in self._stun]
        turn = self._credential(name)
        if turn is not None:
            servers.append(RTCIceServer(urls=list(turn.urls), username=turn.username,
                                        credential=turn.password))
        return servers
