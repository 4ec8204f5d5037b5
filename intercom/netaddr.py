"""The machine's network addresses: for its certificate's names and the demo's LAN address.

Addresses come from the interfaces themselves (``ifaddr``, which aiortc's ICE uses too),
never from a lookup on the network. Loopback and link-local addresses are left out: a
phone cannot reach the first, and the second needs an interface scope no URL carries.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

import ifaddr

from intercom.errors import IntercomError

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
ANY_HOSTS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - "listen on every address"


class NoLanAddressError(IntercomError, OSError):
    """The machine has no address a phone on its network could reach."""


def adapter_addresses(adapters: Iterable[ifaddr.Adapter]) -> list[Address]:
    """Every address of ``adapters``, in their order, loopback and link-local included."""
    found: list[Address] = []
    for adapter in adapters:
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if address not in found:
                found.append(address)
    return found


def reachable(addresses: Iterable[Address]) -> list[Address]:
    """The addresses another machine could reach: no loopback, link-local or unspecified."""
    return [a for a in addresses
            if not (a.is_loopback or a.is_link_local or a.is_unspecified or a.is_multicast)]


def machine_addresses(adapters: Iterable[ifaddr.Adapter] | None = None) -> list[Address]:
    """The machine's reachable addresses (IPv4 first), read from its interfaces.

    Empty when the interfaces cannot be read: first boot's unit allows no netlink socket
    (``RestrictAddressFamilies=AF_UNIX``), and ifaddr then fails with EAFNOSUPPORT. The
    certificate's names are then the host names only (docs/security.md says what that
    means for addresses).
    """
    if adapters is None:
        try:
            adapters = ifaddr.get_adapters()
        except OSError as exc:
            log.warning("the network interfaces cannot be read (%s): no addresses in the "
                        "certificate's names", exc.strerror or exc)
            return []
    found = reachable(adapter_addresses(adapters))
    return sorted(found, key=lambda a: a.version)  # stable: IPv4 before IPv6, else as listed


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def local_networks(adapters: Iterable[ifaddr.Adapter] | None = None) -> list[Network]:
    """The networks the machine's interfaces are on (no loopback or link-local ones).

    Empty when the interfaces cannot be read.
    """
    if adapters is None:
        try:
            adapters = ifaddr.get_adapters()
        except OSError:
            return []
    found: list[Network] = []
    for adapter in adapters:
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            network = ipaddress.ip_network(f"{text.split('%', 1)[0]}/{ip.network_prefix}",
                                           strict=False)
            if reachable([network.network_address]) and network not in found:
                found.append(network)
    return found


def on_networks(address: str, networks: Iterable[Network]) -> bool:
    """Whether ``address`` (text) is on one of ``networks``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def lan_address(adapters: Iterable[ifaddr.Adapter] | None = None) -> Address:
    """The address a phone on the same network opens: the first IPv4, else the first IPv6.

    Raise ``NoLanAddressError`` naming the addresses there are when none is reachable.
    """
    listed = adapter_addresses(ifaddr.get_adapters() if adapters is None else adapters)
    found = sorted(reachable(listed), key=lambda a: a.version)
    if not found:
        have = ", ".join(str(a) for a in listed) or "none at all"
        raise NoLanAddressError(
            f"no LAN address: this machine has no address a phone could reach (it has: {have}); "
            "connect it to the network the phone is on, or leave out --lan"
        )
    return found[0]

