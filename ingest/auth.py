"""Who is calling: token -> destination (constant time) and the source-network allow-lists.

GitLab's only authentication is a static shared secret in ``X-Gitlab-Event-Streaming-Token``. Every
configured token is compared on every request, always all of them, with ``hmac.compare_digest`` over
fixed-length keyed digests, so the time taken depends neither on which token matched, nor on how many
characters of a wrong guess were right, nor on the length of the presented value.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Sequence

from ingest.config import Destination, Network

TOKEN_HEADER = "X-Gitlab-Event-Streaming-Token"  # noqa: S105 (a header name)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Authenticator:
    """Maps a presented token to its destination. Holds only keyed digests of the tokens."""

    __slots__ = ("_entries", "_key")

    def __init__(self, destinations: Iterable[Destination]) -> None:
        # A per-process random key: the digests in memory are useless outside this process.
        self._key = secrets.token_bytes(32)
        self._entries: list[tuple[bytes, Destination]] = [
            (self._digest(token.encode("utf-8")), dest) for dest in destinations for token in dest.tokens
        ]

    def _digest(self, value: bytes) -> bytes:
        # Keyed BLAKE2b is a MAC in itself, and a third of the cost of HMAC-SHA256 per request.
        return hashlib.blake2b(value, key=self._key, digest_size=32).digest()

    def authenticate(self, presented: str | None) -> Destination | None:
        """The destination whose token was presented, or None. Never short-circuits."""
        # A missing header costs the same as a wrong one.
        candidate = self._digest((presented or "").encode("utf-8", "surrogateescape"))
        found: Destination | None = None
        for digest, dest in self._entries:
            match = hmac.compare_digest(digest, candidate)
            # Select without an early exit; the loop always runs over every token.
            found = dest if match and found is None else found
        if not presented:
            return None
        return found


def client_address(
    peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[Network]
) -> IPAddress | None:
    """The address of the client: the peer, or, when the peer is a trusted proxy, the right-most
    ``X-Forwarded-For`` entry that is not itself a trusted proxy. None when it cannot be told."""
    address = parse_address(peer)
    if address is None:
        return None
    if not forwarded_for or not _in_any(address, trusted_proxies):
        return address
    hops = [hop.strip() for hop in forwarded_for.split(",")]
    for hop in reversed(hops):
        hop_address = parse_address(hop)
        if hop_address is None:
            return None  # a garbled chain cannot be trusted
        if not _in_any(hop_address, trusted_proxies):
            return hop_address
        address = hop_address
    return address


def parse_address(text: str | None) -> IPAddress | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in_any(address: IPAddress, networks: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def network_allowed(address: IPAddress | None, networks: Sequence[Network]) -> bool:
    """True when the destination has no allow-list, or the address is in it."""
    if not networks:
        return True
    return address is not None and _in_any(address, networks)
