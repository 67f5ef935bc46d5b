"""A local, durable, bounded queue of records that could not (yet) be handed to Kafka.

Layout of one spool (one per worker process, ``<spool.dir>/<slot>/``)::

    lock                       flock()ed by the owning process for its whole life
    seg-<first seq>.spool      append-only segment files of framed records
    acks.log                   which sequence numbers have reached Kafka (fixed-size records)
    rejected.spool             records Kafka refused for good (too large); kept, never retried

Every record gets a sequence number, increasing in file order. A frame is ``b"GSP1"``, the payload
length (u32 LE), the CRC-32 of the payload (u32 LE), then the payload: the msgpack array
``[seq, topic, key, value, headers]``. Appends are group-committed: concurrent appends are written with
one ``write`` and made durable with one ``fsync`` (plus an fsync of the directory when a segment is
created), and ``append`` returns only after that.

A record is *done* once Kafka acknowledged it, by the drainer or because the send that timed out in the
request path completed after all. Done marks go to ``acks.log`` (20-byte records: start, end of a
half-open range of sequence numbers, CRC-32; ``start == end`` only records the sequence floor so
numbers are never reused); they are not fsynced one by one: losing a few in a crash only means those
records are sent again (and ``gitlab-event-uid`` lets the consumer drop the copy). A segment whose
records are all done is deleted.

On open, a torn last frame (a crash in the middle of a write) is cut off; a damaged frame in the middle
of a segment is skipped by resynchronising on the next frame marker, and counted, so one bad sector
does not block everything behind it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from ingest.records import OutRecord

log = logging.getLogger(__name__)

MAGIC: Final = b"GSP1"
_FRAME: Final = struct.Struct("<4sII")  # magic, payload length, crc32(payload)
_ACK: Final = struct.Struct("<QQI")  # start, end, crc32 of (start, end)
_ACK_RANGE: Final = struct.Struct("<QQ")
MAX_FRAME_PAYLOAD: Final = 256 * 1024 * 1024
_SEGMENT_RE: Final = re.compile(r"seg-(\d{20})\.spool")
_READ_CHUNK: Final = 4 * 1024 * 1024


class SpoolFull(Exception):
    """Appending would exceed the spool's size bound."""


class SpoolError(OSError):
    """The spool could not write (disk full, I/O error)."""


class SpoolBusy(Exception):
    """Another process holds the spool directory."""


class SpoolEntry(msgspec.Struct, array_like=True, frozen=True):
    seq: int
    record: OutRecord


_encoder: Final = msgspec.msgpack.Encoder()
_entry_decoder: Final = msgspec.msgpack.Decoder(SpoolEntry)


def encode_frame(entry: SpoolEntry) -> bytes:
    payload = _encoder.encode(entry)
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass(slots=True)
class Frame:
    start: int
    end: int
    entry: SpoolEntry


@dataclass(slots=True)
class ScanResult:
    frames: list[Frame] = field(default_factory=list)
    # Where valid data ends; equals the input end unless the tail is a torn (incomplete) frame.
    valid_end: int = 0
    corrupt_bytes: int = 0


def _frame_at(data: bytes | memoryview, pos: int) -> tuple[SpoolEntry, int] | str:
    """The entry and end offset of the frame at ``pos``, or "torn" / "bad"."""
    if len(data) - pos < _FRAME.size:
        return "torn"
    magic, length, crc = _FRAME.unpack_from(data, pos)
    if magic != MAGIC or length > MAX_FRAME_PAYLOAD:
        return "bad"
    end = pos + _FRAME.size + length
    if end > len(data):
        return "torn"
    payload = bytes(data[pos + _FRAME.size : end])
    if zlib.crc32(payload) != crc:
        return "bad"
    try:
        return _entry_decoder.decode(payload), end
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "bad"


def scan_frames(data: bytes, base: int = 0, *, final: bool = True) -> ScanResult:
    """Parse frames from ``data`` (which starts at file offset ``base``).

    With ``final`` (``data`` runs to the end of the file), whatever follows the last frame that parses
    and is followed by no frame that parses is the tail of an interrupted write: ``valid_end`` stops
    before it. A frame whose header is intact but whose payload runs past the end is such a tail too,
    and its payload is never searched for frames. Damage in the middle (bad marker or checksum with
    valid frames after it) is skipped up to the next valid frame and counted in ``corrupt_bytes``.
    Without ``final``, a frame cut short at the end of ``data`` is simply not read yet.
    """
    result = ScanResult(valid_end=base + len(data))
    pos = 0
    view = memoryview(data)
    while pos < len(data):
        parsed = _frame_at(view, pos)
        if isinstance(parsed, tuple):
            entry, end = parsed
            result.frames.append(Frame(base + pos, base + end, entry))
            pos = end
            continue
        if parsed == "torn":
            result.valid_end = base + pos
            return result
        nxt = _next_valid(data, view, pos + 1)
        if nxt is None:
            result.valid_end = base + pos
            if not final:
                result.corrupt_bytes += len(data) - pos
            return result
        result.corrupt_bytes += nxt - pos
        pos = nxt
    return result


def _next_valid(data: bytes, view: memoryview, start: int) -> int | None:
    pos = data.find(MAGIC, start)
    while pos != -1:
        if isinstance(_frame_at(view, pos), tuple):
            return pos
        pos = data.find(MAGIC, pos + 1)
    return None


@dataclass(slots=True)
class _Segment:
    path: Path
    first_seq: int
    size: int = 0  # durable bytes (valid frames only)
    last_seq: int = -1
    count: int = 0  # frames present
    done: set[int] = field(default_factory=set)  # seqs of present frames that reached Kafka

    @property
    def pending(self) -> int:
        return self.count - len(self.done)


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _to_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and ranges[-1][1] == seq:
            ranges[-1] = (ranges[-1][0], seq + 1)
        else:
            ranges.append((seq, seq + 1))
    return ranges


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _PendingWrite:
    first_seq: int
    count: int
    data: bytes
    future: asyncio.Future[None]


class Spool:
    """One process's spool directory. Not thread-safe: use it from one event loop."""

    def __init__(
        self, directory: str | os.PathLike[str], *, max_bytes: int, segment_bytes: int, fsync: bool = True
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None  # the segment appends go to
        self._active_fd: int | None = None
        self._acks_fd: int | None = None
        self._acks_size = 0
        self._next_seq = 0
        self._durable_next = 0  # every seq below was written (or failed to be) already
        self._holes: set[int] = set()  # seqs whose write failed: they exist nowhere
        self._queued: list[_PendingWrite] = []
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._wake_writer: asyncio.Event | None = None
        self._read_seg = 0  # first_seq of the segment the reader is in
        self._read_pos = 0
        self._pending = 0
        self._bytes = 0
        self.corrupt_bytes = 0  # found at open; counted, skipped
        self.rejected = 0
        self._closed = True

    # -- opening -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Create or recover the directory (blocking: call before serving, or in a thread)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ack_ranges, floor = self._load_acks()
        merged = _merge_ranges(ack_ranges)
        starts = [r[0] for r in merged]

        def acked(seq: int) -> bool:
            i = bisect.bisect_right(starts, seq) - 1
            return i >= 0 and merged[i][0] <= seq < merged[i][1]

        segments: list[_Segment] = []
        for path in sorted(self.directory.iterdir()):
            match = _SEGMENT_RE.fullmatch(path.name)
            if not match:
                continue
            data = path.read_bytes()
            result = scan_frames(data)
            if result.valid_end < len(data):
                log.warning(
                    "spool: cutting off a torn record at the end of a segment",
                    extra={"segment": str(path), "offset": result.valid_end, "bytes": len(data)},
                )
                with open(path, "r+b") as handle:
                    handle.truncate(result.valid_end)
                    os.fsync(handle.fileno())
            if result.corrupt_bytes:
                log.error(
                    "spool: skipped damaged bytes in a segment",
                    extra={"segment": str(path), "corrupt_bytes": result.corrupt_bytes},
                )
                self.corrupt_bytes += result.corrupt_bytes
            segment = _Segment(path=path, first_seq=int(match.group(1)), size=result.valid_end)
            for frame in result.frames:
                seq = frame.entry.seq
                segment.count += 1
                segment.last_seq = max(segment.last_seq, seq)
                if acked(seq):
                    segment.done.add(seq)
            if segment.count and segment.pending == 0:
                path.unlink()
                continue
            if segment.count == 0 and result.valid_end == 0:
                path.unlink()
                continue
            segments.append(segment)
        self._segments = segments
        highest = max([s.last_seq for s in segments] + [r[1] - 1 for r in merged] + [floor - 1, -1])
        self._next_seq = self._durable_next = highest + 1
        self._pending = sum(s.pending for s in segments)
        self._bytes = sum(s.size for s in segments)
        self._read_seg = segments[0].first_seq if segments else self._next_seq
        self._read_pos = 0
        self._rewrite_acks()
        self._closed = False

    def _load_acks(self) -> tuple[list[tuple[int, int]], int]:
        path = self.directory / "acks.log"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return [], 0
        ranges: list[tuple[int, int]] = []
        floor = 0
        usable = len(data) - len(data) % _ACK.size
        for pos in range(0, usable, _ACK.size):
            start, end, crc = _ACK.unpack_from(data, pos)
            if zlib.crc32(_ACK_RANGE.pack(start, end)) != crc:
                continue  # a damaged mark only means a record may be sent twice
            if start == end:
                floor = max(floor, end)
            else:
                ranges.append((start, end))
        return ranges, floor

    def _rewrite_acks(self) -> None:
        """Replace acks.log with the marks still relevant (those of existing segments) and the floor."""
        ranges = _to_ranges(seq for s in self._segments for seq in s.done)
        data = b"".join(self._ack_record(start, end) for start, end in ranges)
        data += self._ack_record(self._next_seq, self._next_seq)
        tmp = self.directory / "acks.log.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.directory / "acks.log")
        _fsync_dir(self.directory)
        if self._acks_fd is not None:
            os.close(self._acks_fd)
        self._acks_fd = os.open(self.directory / "acks.log", os.O_WRONLY | os.O_APPEND)
        self._acks_size = len(data)

    @staticmethod
    def _ack_record(start: int, end: int) -> bytes:
        return _ACK.pack(start, end, zlib.crc32(_ACK_RANGE.pack(start, end)))

    # -- state ---------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records written and not yet acknowledged by Kafka."""
        return self._pending

    @property
    def durable_next(self) -> int:
        """Sequence numbers below this one are on disk (or were given up after a write error)."""
        return self._durable_next

    @property
    def size_bytes(self) -> int:
        """Bytes the segment files occupy (including done records of not yet deleted segments)."""
        return self._bytes

    @property
    def is_idle(self) -> bool:
        """Nothing pending and nothing being written."""
        return self._pending == 0 and not self._queued and not self._writing

    @property
    def _writing(self) -> bool:
        return self._queued_bytes > 0

    def free_bytes(self) -> int:
        return self.max_bytes - self._bytes - self._queued_bytes

    # -- appending -----------------------------------------------------------------------------------

    async def append(
        self, records: Sequence[OutRecord], assigned: Callable[[list[int]], None] | None = None
    ) -> list[int]:
        """Write ``records`` durably, all or none; returns their sequence numbers.

        ``assigned`` is called with the sequence numbers as soon as they are allocated, before the
        write (so a caller can attach state to them before a reader can see the records).
        Raises SpoolFull when the bound would be exceeded, SpoolError when the disk fails.
        """
        if self._closed:
            raise SpoolError(errno.EBADF, "spool is closed")
        if not records:
            return []
        first = self._next_seq
        data = b"".join(
            encode_frame(SpoolEntry(first + index, record)) for index, record in enumerate(records)
        )
        if self._bytes + self._queued_bytes + len(data) > self.max_bytes:
            raise SpoolFull(f"spool full ({self._bytes} of {self.max_bytes} bytes used)")
        self._next_seq += len(records)
        seqs = list(range(first, first + len(records)))
        if assigned is not None:
            assigned(seqs)
        loop = asyncio.get_running_loop()
        write = _PendingWrite(first, len(records), data, loop.create_future())
        self._queued.append(write)
        self._queued_bytes += len(data)
        if self._writer is None or self._writer.done():
            self._wake_writer = asyncio.Event()
            self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")
        assert self._wake_writer is not None
        self._wake_writer.set()
        await asyncio.shield(write.future)
        return seqs

    async def _write_loop(self) -> None:
        assert self._wake_writer is not None
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    await self._write_batch(batch)
                except Exception as exc:  # a bug must not leave appenders waiting forever
                    log.exception("spool: unexpected error while writing")
                    for write in batch:
                        if not write.future.done():
                            write.future.set_exception(SpoolError(errno.EIO, f"spool write failed: {exc}"))
                            write.future.exception()
            if self._closed:
                return

    async def _write_batch(self, batch: list[_PendingWrite]) -> None:
        data = b"".join(w.data for w in batch)
        created = False
        try:
            if self._active is None or self._active.size >= self.segment_bytes:
                self._start_segment(batch[0].first_seq)
                created = True
            assert self._active is not None and self._active_fd is not None
            segment, fd, before = self._active, self._active_fd, self._active.size
            await asyncio.to_thread(self._write_sync, fd, data, created)
        except OSError as exc:
            if self._active is not None and self._active_fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._active_fd, self._active.size)
            self._queued_bytes -= len(data)
            self._durable_next = batch[-1].first_seq + batch[-1].count
            for write in batch:
                self._holes.update(range(write.first_seq, write.first_seq + write.count))
            error = SpoolError(exc.errno or errno.EIO, f"spool write failed: {exc.strerror or exc}")
            log.error(
                "spool: write failed", extra={"error": str(exc), "records": sum(w.count for w in batch)}
            )
            for write in batch:
                if not write.future.done():
                    write.future.set_exception(error)
                    write.future.exception()  # mark retrieved: the caller may be gone
            return
        segment.size = before + len(data)
        count = sum(w.count for w in batch)
        segment.count += count
        segment.last_seq = batch[-1].first_seq + batch[-1].count - 1
        self._queued_bytes -= len(data)
        self._durable_next = batch[-1].first_seq + batch[-1].count
        self._bytes += len(data)
        self._pending += count
        for write in batch:
            if not write.future.done():
                write.future.set_result(None)

    def _start_segment(self, first_seq: int) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        path = self.directory / f"seg-{first_seq:020d}.spool"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active_fd = fd
        self._active = _Segment(path=path, first_seq=first_seq)
        self._segments.append(self._active)

    def _write_sync(self, fd: int, data: bytes, created: bool) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(fd)
            if created:
                _fsync_dir(self.directory)

    # -- reading ---------------------------------------------------------------------------------------

    def _segment_index(self, first_seq: int) -> int:
        keys = [s.first_seq for s in self._segments]
        return bisect.bisect_left(keys, first_seq)

    def rewind(self) -> None:
        """Read again from the oldest pending record (after a failed publish)."""
        for segment in self._segments:
            if segment.pending:
                self._read_seg, self._read_pos = segment.first_seq, 0
                return
        self._read_seg, self._read_pos = self._next_seq, 0

    async def read_pending(self, max_records: int, max_bytes: int = 8 * 1024 * 1024) -> list[SpoolEntry]:
        """The next records not yet done, in order, from the read position (which then moves on)."""
        out: list[SpoolEntry] = []
        budget = max_bytes
        index = self._segment_index(self._read_seg)
        while index < len(self._segments) and len(out) < max_records and budget > 0:
            segment = self._segments[index]
            if segment.first_seq != self._read_seg:
                self._read_seg, self._read_pos = segment.first_seq, 0
            if self._read_pos >= segment.size or segment.pending == 0:
                if segment is self._active:
                    break
                index += 1
                if index < len(self._segments):
                    self._read_seg, self._read_pos = self._segments[index].first_seq, 0
                continue
            length = min(segment.size - self._read_pos, max(budget, _READ_CHUNK))
            data = await asyncio.to_thread(_read_range, segment.path, self._read_pos, length)
            result = scan_frames(data, self._read_pos, final=False)
            if not result.frames:
                if result.corrupt_bytes:
                    # Damaged after open (should not happen): skip what cannot be read.
                    self.corrupt_bytes += result.corrupt_bytes
                    self._read_pos += len(data)
                    continue
                # A frame larger than the chunk: read it whole.
                _, frame_len, _ = _FRAME.unpack_from(data, 0)
                data = await asyncio.to_thread(
                    _read_range, segment.path, self._read_pos, _FRAME.size + frame_len
                )
                result = scan_frames(data, self._read_pos, final=True)
                if not result.frames:
                    self.corrupt_bytes += len(data)
                    self._read_pos += len(data)
                    continue
            for frame in result.frames:
                if len(out) >= max_records or budget <= 0:
                    break
                self._read_pos = frame.end
                if frame.entry.seq in segment.done:
                    continue
                out.append(frame.entry)
                budget -= frame.end - frame.start
        return out

    # -- completion -------------------------------------------------------------------------------------

    def _segment_of(self, seq: int) -> _Segment | None:
        keys = [s.first_seq for s in self._segments]
        index = bisect.bisect_right(keys, seq) - 1
        if index < 0:
            return None
        segment = self._segments[index]
        return segment if seq <= segment.last_seq else None

    def is_done(self, seq: int) -> bool:
        """Whether a record that was read from this spool has been acknowledged since."""
        segment = self._segment_of(seq)
        return segment is None or seq in segment.done

    def mark_done(self, seqs: Iterable[int]) -> int:
        """Record that Kafka acknowledged ``seqs``; deletes segments that became empty.
        Returns how many of them were pending until now."""
        if self._closed:
            return 0
        newly: list[int] = []
        for seq in seqs:
            segment = self._segment_of(seq)
            if segment is None or seq in segment.done or seq in self._holes:
                continue
            segment.done.add(seq)
            newly.append(seq)
        if not newly:
            return 0
        self._pending -= len(newly)
        if self._acks_fd is not None:
            data = b"".join(self._ack_record(start, end) for start, end in _to_ranges(newly))
            try:
                os.write(self._acks_fd, data)
                self._acks_size += len(data)
            except OSError as exc:
                log.warning("spool: cannot record acknowledgements", extra={"error": str(exc)})
        self._collect()
        return len(newly)

    def _collect(self) -> None:
        """Delete segments whose records are all done; compact acks.log when everything is drained."""
        keep: list[_Segment] = []
        removed = False
        for segment in self._segments:
            finished = segment.count > 0 and segment.pending == 0
            if segment is self._active:
                if not finished or self._queued_bytes:
                    keep.append(segment)
                    continue
                if self._active_fd is not None:
                    os.close(self._active_fd)
                self._active_fd = None
                self._active = None
            elif not finished:
                keep.append(segment)
                continue
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            self._bytes -= segment.size
            removed = True
        if not removed:
            return
        self._segments = keep
        if not self._segments or self._acks_size > 1024 * 1024:
            try:
                self._rewrite_acks()
            except OSError as exc:
                log.warning("spool: cannot compact acks.log", extra={"error": str(exc)})

    def quarantine(self, entry: SpoolEntry, reason: str) -> None:
        """Keep a record Kafka refuses for good beside the spool, and stop retrying it."""
        path = self.directory / "rejected.spool"
        with open(path, "ab") as handle:
            handle.write(encode_frame(entry))
            handle.flush()
            os.fsync(handle.fileno())
        self.rejected += 1
        log.error(
            "spool: Kafka refuses a record for good; kept in rejected.spool",
            extra={"seq": entry.seq, "topic": entry.record.topic, "reason": reason, "file": str(path)},
        )
        self.mark_done([entry.seq])

    # -- closing ---------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish queued writes, persist the acknowledgements, release the files."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None and self._wake_writer is not None:
            self._wake_writer.set()
            with contextlib.suppress(Exception):
                await self._writer
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        if self._acks_fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._acks_fd)
            os.close(self._acks_fd)
            self._acks_fd = None


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


# -- slots: one spool directory per process --------------------------------------------------------------


@dataclass(slots=True)
class SlotLock:
    name: str
    directory: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def try_lock_slot(base: Path, name: str) -> SlotLock | None:
    directory = base / name
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return SlotLock(name, directory, fd)


def acquire_slot(base: str | os.PathLike[str], preferred: int = 0, max_slots: int = 256) -> SlotLock:
    """Lock this process's spool slot: ``w<preferred>`` if free, else the first free ``w<n>``."""
    root = Path(base)
    root.mkdir(parents=True, exist_ok=True)
    for index in [preferred, *range(max_slots)]:
        lock = try_lock_slot(root, f"w{index}")
        if lock is not None:
            return lock
    raise SpoolBusy(f"all {max_slots} spool slots under {root} are held by running processes")


def other_slots(base: str | os.PathLike[str], own: str) -> Iterator[str]:
    """Names of the slot directories beside ``own`` (candidates for adoption)."""
    root = Path(base)
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(root.iterdir()):
            if path.is_dir() and path.name != own and re.fullmatch(r"w\d+", path.name):
                yield path.name
