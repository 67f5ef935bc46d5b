"""GeoIP for enrich: MaxMind City (and optional ASN) databases, a lookup cache, hot reload.

``GeoIP.lookup`` is the ``geo`` callable of :func:`enrich.flatten.flatten`: it returns a
:class:`~falco_gitlab.model.GeoInfo` for a public address the databases know, ``None`` for a private,
loopback, link-local or unknown address, and raises ``ValueError`` for text that is not an IP address.

Databases are read with the ``maxminddb`` C extension (the layer under ``geoip2``), straight into the
few English names the catalogue needs, instead of building ``geoip2`` model objects per lookup. Two
modes:

* ``memory`` (default): the file is copied into an anonymous in-memory file (``memfd``) that the C
  reader maps. The copy is private, so rewriting the database file in place cannot corrupt lookups.
  Where ``memfd`` is unavailable the pure-Python in-memory reader is used (slower).
* ``mmap``: the file itself is mapped. No copy, but the file must only be replaced by an atomic rename
  (``geoipupdate`` does that); rewriting it in place would change the mapped bytes under the reader.

Reload: :meth:`GeoIP.watch` is an asyncio task that checks every database file's (mtime, size, inode)
every ``interval`` seconds. When one changed it opens the new file in a worker thread
(``asyncio.to_thread``), so the event loop never blocks on it, checks that it is a usable database of
the same kind, and then swaps it in and clears the cache in one step on the event loop thread. A file
that is missing or broken keeps the previous database in service and logs a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import maxminddb

from falco_gitlab.model import GeoInfo

log = logging.getLogger(__name__)

Signature = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)

_LANGUAGE: Final = "en"


class GeoDatabaseError(Exception):
    """A database file cannot be used (unreadable, not a MaxMind DB, wrong kind)."""


@dataclass(slots=True)
class _Database:
    kind: str  # "city" or "asn"
    path: str
    reader: Any  # maxminddb reader (C extension or pure Python)
    signature: Signature
    database_type: str
    build_epoch: int

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.reader.close()


def file_signature(path: str) -> Signature:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _open_reader(path: str, mode: str) -> Any:
    if mode == "mmap":
        return maxminddb.open_database(path, maxminddb.MODE_AUTO)
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None or not os.path.isdir("/proc/self/fd"):
        return maxminddb.open_database(path, maxminddb.MODE_MEMORY)
    with open(path, "rb") as source:
        data = source.read()
    fd = memfd_create("falco-gitlab-geoip", getattr(os, "MFD_CLOEXEC", 0))
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        # The C reader opens the path, maps it and closes its descriptor; the mapping keeps the
        # anonymous file alive until the reader is closed.
        return maxminddb.open_database(f"/proc/self/fd/{fd}", maxminddb.MODE_AUTO)
    finally:
        os.close(fd)


def open_database(kind: str, path: str, mode: str) -> _Database:
    """Open and check one database file (blocking: call it in a thread once the loop runs)."""
    for _attempt in range(3):
        try:
            before = file_signature(path)
            reader = _open_reader(path, mode)
            after = file_signature(path)
        except (OSError, maxminddb.InvalidDatabaseError, ValueError) as exc:
            raise GeoDatabaseError(f"cannot open {kind} database {path}: {exc}") from None
        if before == after:
            break
        # The file changed while it was read (being written right now): read it again.
        reader.close()
    else:
        raise GeoDatabaseError(f"{kind} database {path} keeps changing while it is read")
    metadata = reader.metadata()
    database_type = str(metadata.database_type)
    lowered = database_type.lower()
    usable = ("city" in lowered or "country" in lowered) if kind == "city" else (
        "asn" in lowered or "isp" in lowered
    )
    if not usable:
        reader.close()
        expected = "a City or Country" if kind == "city" else "an ASN or ISP"
        raise GeoDatabaseError(f"{path} is a {database_type} database, not {expected} database")
    try:  # a probe lookup catches a truncated data section early
        reader.get("1.1.1.1" if metadata.ip_version == 4 else "::1.1.1.1")
    except Exception as exc:
        reader.close()
        raise GeoDatabaseError(f"{kind} database {path} is corrupt: {exc}") from None
    return _Database(kind, path, reader, before, database_type, int(metadata.build_epoch))


def _name(record: Any) -> str | None:
    if isinstance(record, dict):
        names = record.get("names")
        if isinstance(names, dict):
            name = names.get(_LANGUAGE)
            if isinstance(name, str) and name:
                return name
    return None


def _iso(record: Any) -> str | None:
    if isinstance(record, dict):
        code = record.get("iso_code")
        if isinstance(code, str) and code:
            return code
    return None


def city_info(data: dict[str, Any] | None) -> dict[str, Any]:
    """The GeoInfo attributes a City/Country database record gives (English names)."""
    if not isinstance(data, dict):
        return {}
    country = data.get("country")
    info: dict[str, Any] = {
        "city": _name(data.get("city")),
        "country": _name(country),
        "country_iso": _iso(country),
        "continent": _name(data.get("continent")),
    }
    subdivisions = data.get("subdivisions")
    if isinstance(subdivisions, list) and subdivisions:
        # MaxMind lists subdivisions from the largest (a US state, England) to the smallest; the region
        # is the largest one. Its code is rendered as a full ISO 3166-2 code, e.g. US-WA or GB-ENG.
        top = subdivisions[0]
        info["region"] = _name(top)
        code = _iso(top)
        if code is not None:
            info["region_iso"] = f"{info['country_iso']}-{code}" if info["country_iso"] else code
    return info


def asn_info(data: dict[str, Any] | None) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {}
    number = data.get("autonomous_system_number")
    org = data.get("autonomous_system_organization")
    return {
        "asn": number if isinstance(number, int) and not isinstance(number, bool) else None,
        "as_org": org if isinstance(org, str) and org else None,
    }


_last_reader_error = 0.0


def _safe_get(reader: Any, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    global _last_reader_error
    try:
        return reader.get(address)
    except ValueError:  # an IPv6 address asked of an IPv4-only database
        return None
    except Exception as exc:  # a damaged database must cost the geo fields, never the event
        now = time.monotonic()
        if now - _last_reader_error > 60:
            _last_reader_error = now
            log.error("GeoIP lookup of %s failed: %r", address, exc)
        return None


def _resolver(city: _Database | None, asn: _Database | None) -> Callable[[str], GeoInfo | None]:
    """An uncached lookup function bound to one pair of readers."""
    city_reader = city.reader if city is not None else None
    asn_reader = asn.reader if asn is not None else None

    def resolve(text: str) -> GeoInfo | None:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:a.b.c.d is the IPv4 address a.b.c.d
        if address.is_private or address.is_loopback or address.is_link_local or address.is_multicast \
                or address.is_unspecified or address.is_reserved:
            return None
        values: dict[str, Any] = {}
        if city_reader is not None:
            values.update(city_info(_safe_get(city_reader, address)))
        if asn_reader is not None:
            values.update(asn_info(_safe_get(asn_reader, address)))
        present = {key: value for key, value in values.items() if value is not None}
        return GeoInfo(**present) if present else None

    return resolve


class GeoIP:
    """City and optional ASN databases with an LRU cache, reloaded when their files are replaced."""

    def __init__(
        self,
        city_db: str | None = None,
        asn_db: str | None = None,
        *,
        mode: str = "memory",
        cache_size: int = 65_536,
    ) -> None:
        if mode not in ("memory", "mmap"):
            raise ValueError(f"unknown GeoIP mode {mode!r}")
        self._mode = mode
        self._cache_size = cache_size
        self._paths = {"city": city_db, "asn": asn_db}
        self._dbs: dict[str, _Database | None] = {"city": None, "asn": None}
        self._broken: dict[str, Signature | None] = {}  # last signature that failed to load
        self.reloads = 0
        self.reload_failures = 0
        # Results callers derive from lookups (enrich keeps what it derives from one client address
        # here, see enrich.flatten.event_fields); emptied whenever the databases change, in the same
        # step as the lookup cache, so nothing derived from an old database outlives it.
        self.derived: dict[Any, Any] = {}
        self.derived_hits = 0  # answers callers took from ``derived`` (counted by them), in cache_info
        self._cached: Callable[[str], GeoInfo | None] = self._make_cached()
        for kind, path in self._paths.items():
            if path is not None:
                self._dbs[kind] = open_database(kind, path, mode)
        self._cached = self._make_cached()

    # -- lookups ----------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return any(db is not None for db in self._dbs.values())

    def lookup(self, ip: str) -> GeoInfo | None:
        """Geolocate one address (cached); ValueError if ``ip`` is not an IP address."""
        return self._cached(ip)

    def cache_info(self) -> Any:
        """The lookup cache's statistics; hits include the answers taken from ``derived``."""
        info = getattr(self._cached, "cache_info", lambda: None)()
        return info._replace(hits=info.hits + self.derived_hits) if info is not None else None

    @property
    def cache_size(self) -> int:
        return self._cache_size

    def _make_cached(self) -> Callable[[str], GeoInfo | None]:
        self.derived.clear()
        self.derived_hits = 0
        resolve = _resolver(self._dbs["city"], self._dbs["asn"])
        return functools.lru_cache(maxsize=self._cache_size)(resolve)

    # -- status -----------------------------------------------------------------------------------

    def describe(self) -> str:
        """One line for the startup log."""
        parts = []
        for kind in ("city", "asn"):
            db = self._dbs[kind]
            if db is not None:
                parts.append(f"{kind}={db.path} ({db.database_type}, built {db.build_epoch}, {self._mode})")
        if self._dbs["city"] is None:
            parts.insert(0, "no City database configured: geo fields absent")
        if self._dbs["asn"] is None:
            parts.append("no ASN database configured: asn/as_org absent")
        return "; ".join(parts)

    # -- reload -----------------------------------------------------------------------------------

    def changed(self) -> list[str]:
        """Kinds whose file differs from the loaded one (and from the last one that failed to load)."""
        out = []
        for kind, path in self._paths.items():
            db = self._dbs[kind]
            if path is None or db is None:
                continue
            try:
                signature = file_signature(path)
            except OSError:
                if self._broken.get(kind) != (0, 0, 0):
                    self._broken[kind] = (0, 0, 0)
                    log.warning("GeoIP %s database %s is missing; keeping the loaded one", kind, path)
                continue
            if signature != db.signature and signature != self._broken.get(kind):
                out.append(kind)
        return out

    async def reload_changed(self) -> list[str]:
        """Reload every database whose file was replaced; returns the kinds reloaded."""
        reloaded = []
        for kind in self.changed():
            path = self._paths[kind]
            assert path is not None
            try:
                new = await asyncio.to_thread(open_database, kind, path, self._mode)
            except GeoDatabaseError as exc:
                self.reload_failures += 1
                with contextlib.suppress(OSError):
                    self._broken[kind] = file_signature(path)
                log.warning("GeoIP reload failed, keeping the loaded database: %s", exc)
                continue
            self._swap(kind, new)
            reloaded.append(kind)
        return reloaded

    def _swap(self, kind: str, new: _Database) -> None:
        old = self._dbs[kind]
        self._dbs[kind] = new
        self._broken.pop(kind, None)
        # One assignment replaces readers and cache together: a lookup sees old or new, never a mix.
        self._cached = self._make_cached()
        self.reloads += 1
        log.info(
            "GeoIP %s database reloaded", kind,
            extra={"path": new.path, "database_type": new.database_type, "build_epoch": new.build_epoch},
        )
        if old is not None:
            old.close()

    async def watch(self, interval: float) -> None:
        """Check for replaced database files every ``interval`` seconds, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload_changed()
            except Exception:  # never let the watcher die silently
                log.exception("GeoIP reload check failed")

    def close(self) -> None:
        for kind, db in self._dbs.items():
            if db is not None:
                db.close()
                self._dbs[kind] = None
        self._cached = self._make_cached()
