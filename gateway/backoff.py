"""The one reconnect/restart back-off, for drivers (drivers.base.supervise), the upstream link and
the pipeline's driver restarts."""

from __future__ import annotations

import ipaddress
import random
import socket

# While a nearby peer refuses TCP (nothing listens: it is restarting), retry this often.
SOON = (0.25, 0.5)

# RFC 1918 and the IPv6 unique-local range: a LAN. Loopback and link-local are asked of the address.
_LAN = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


class Backoff:
    """Jittered exponential back-off between `low` and `high` seconds.

    Jitter keeps many devices that failed together (a switch reboot) from reconnecting in lockstep.
    """

    def __init__(self, low: float, high: float, rng: random.Random | None = None) -> None:
        self.low = max(0.01, low)
        self.high = max(self.low, high)
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self, *, soon: bool = False) -> float:
        """The next delay. `soon`: the failure was a TCP "connection refused" from a peer on this
        host or the LAN (`refused_nearby`). Nothing listens there, which on a LAN means a broker or
        device restarting, and a refused SYN costs next to nothing: the delay stays within
        `SOON` (still jittered) so that the link is back within half a second of the peer.
        The attempts still count, so a peer that then answers and refuses at the protocol level
        (CONNACK refused, bad credentials) gets the full back-off."""
        ceiling = min(self.high, self.low * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        delay = self._rng.uniform(max(self.low, ceiling / 2), ceiling)
        return min(delay, self._rng.uniform(*SOON)) if soon else delay

    def reset(self) -> None:
        self._attempt = 0


def is_nearby(host: str) -> bool:
    """`host` (an address or a name) is on this machine or the LAN: loopback, link-local, RFC 1918
    or IPv6 unique-local, every address it resolves to. Resolves names: call it off the loop."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return False
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return bool(addresses) and all(_nearby(a) for a in addresses)


def _nearby(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_loopback or address.is_link_local or any(address in net for net in _LAN)


def refused_nearby(exc: BaseException, host: str) -> bool:
    """A TCP connection refused by a nearby host (see `Backoff.next(soon=True)`)."""
    return isinstance(exc, ConnectionRefusedError) and is_nearby(host)
