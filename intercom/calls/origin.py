"""Which names and origins the station's web server answers: its own, and the public URL.

A browser request carries the name it was sent to (``Host``) and, for a WebSocket and
every request a script makes across origins, the page that made it (``Origin``). The
station answers only:

* a ``Host`` that is one of its names: a DNS name its certificate carries (a name the
  browser would not have trusted otherwise), the public URL's host, or an IP address
  literal. A page of another site that points its own name at the station (DNS
  rebinding) is refused, also where a certificate warning was clicked through;
* an ``Origin``, when there is one, of the public URL or of the station itself (the same
  host and port the request was sent to, a name above). A page of another site opening
  the signalling socket or posting to the API (cross-site WebSocket hijacking, CSRF) is
  refused before anything else is read; apps that are no browser send no ``Origin``.

Behind a reverse proxy the ``Host`` is the public name (``proxy_set_header Host $host``)
or the address the proxy connects to; the ``Origin`` is the public URL's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit


def split_host(host: str) -> tuple[str, int | None]:
    """``name[:port]`` or ``[v6][:port]`` as (lower-case name, port); ValueError when bad."""
    parts = urlsplit(f"//{host}")
    name = (parts.hostname or "").rstrip(".")
    if not name:
        raise ValueError("no host name")
    return name, parts.port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _matches(name: str, pattern: str) -> bool:
    """A DNS name against a certificate's name (``*.`` matches one whole label)."""
    if pattern.startswith("*."):
        head, _, tail = name.partition(".")
        return bool(head) and tail == pattern[2:]
    return name == pattern


class Origins:
    """Decides whether a request's ``Host`` and ``Origin`` are the station's own."""

    def __init__(self, names: Callable[[], Iterable[str]], public_url: str = "") -> None:
        self._names = names
        public = urlsplit(public_url) if public_url else None
        self._public_host = (public.hostname or "") if public else ""
        self._public_origin = ""
        if public is not None and public.hostname:
            port = public.port or 443
            self._public_origin = origin_of("https", self._public_host, port)

    def known_host(self, name: str) -> bool:
        """Whether ``name`` (no port) is one of the station's names."""
        if _is_ip(name) or name == self._public_host:
            return True
        return any(_matches(name, pattern.lower()) for pattern in self._names())

    def refusal(self, host: str | None, origin: str | None) -> str | None:
        """Why a request with these headers is refused, or None when it is not."""
        try:
            name, port = split_host(host or "")
        except ValueError:
            return "a well-formed Host header is required"
        if not self.known_host(name):
            return "not a name of this station (Host)"
        if origin is None:
            return None  # no browser page made it (an app, a reverse proxy's check)
        try:
            parts = urlsplit(origin)
            page = origin_of(parts.scheme, parts.hostname or "", parts.port or 443)
        except ValueError:
            return "the Origin header is malformed"
        own = {self._public_origin, origin_of("https", name, port or 443)}
        if parts.scheme == "https" and parts.hostname and page in own:
            return None
        return "a page of another origin (Origin)"


def origin_of(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, lower-case, the host without a trailing dot."""
    host = host.lower().rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"
