"""Local spill files shared by the prediction log and the outcome log: bounded, rotated, fsynced with
their directory, read back line by line so that a torn line (a crash or a full disk mid-write) is
skipped instead of failing the whole replay, plus the dead-letter file and the rule that tells a row
the database refuses (bisect it away) from a database that is away (keep the rows for later).

Layout for a spill base path `<dir>/<name>.spill`:
- `<name>.spill`                the active segment, appended to (one JSON line per record or chunk);
- `<name>.spill.<ns>.seg`       sealed segments: the active one is renamed once it passes
                                `segment_bytes`, so no single file grows without bound and a replay
                                works through bounded pieces, oldest first;
- `<name>.spill.replaying`      the segment being replayed (a crash mid-replay leaves it for the next
                                start; replaying it again is idempotent);
- `<name>.deadletter`           rows that can never be stored, one JSON line each with the reason.
All spill segments together stay under `max_bytes`: an append beyond it (or on a full disk) raises
SpillUnavailable, which the API answers with RESOURCE_EXHAUSTED, never INTERNAL."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
DEFAULT_SPILL_MAX_BYTES = 1 << 30  # 1 GiB per spill (about 5M prediction rows without features)
DEFAULT_SEGMENT_BYTES = 64 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class SpillUnavailable(Exception):  # noqa: N818 - named for what the caller hears
    """The local spill cannot take more: its size bound is reached ("limit"), the disk is full
    ("full") or failing ("io"). Maps to RESOURCE_EXHAUSTED (gateway.api.errors)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_data_error(exc: BaseException) -> bool:
    """True when the database (or its driver) refused the statement because of what some row holds:
    a NUL byte PostgreSQL refuses (psycopg2 raises ValueError before sending), a value too long or
    malformed (DataError), a constraint (IntegrityError). Such a batch is bisected down to the bad rows.
    Anything else (connection refused or lost, timeouts, a locked SQLite, unknown errors) means the
    database is away: the rows are kept and tried again, never dead-lettered."""
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"IntegrityError", "DataError"}:
        return True
    orig = getattr(exc, "orig", None)  # SQLAlchemy's wrapper around the driver's error
    return orig is not None and orig is not exc and is_data_error(orig)


def fsync_dir(path: Path) -> None:
    """Make a file's creation, rename or removal in `path` durable (the file's own fsync does not)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_durably(path: Path, text: str) -> int:
    """Append `text` and fsync; on failure the file is cut back to its old length (no torn tail left
    in the middle of the file for later appends to follow) and SpillUnavailable is raised. Returns the
    file's new size."""
    created = not path.exists()
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                pass
            reason = "full" if exc.errno in _FULL_ERRNOS else "io"
            what = "disk full" if reason == "full" else "write failed"
            raise SpillUnavailable(f"spill file {path.name}: {os.strerror(exc.errno or 0)} ({what})",
                                   reason) from exc
        size = start + len(data)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
    return size


class SpillFiles:
    """A bounded chain of spill segments (see the module docstring). Appends come from several threads
    (writer, request path); one replay at a time reads. Sizes are tracked in memory (scanned once at
    start), so `has_data` costs no system call."""

    def __init__(self, base: Path, *, max_bytes: int = DEFAULT_SPILL_MAX_BYTES,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.base = Path(base)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.lock = threading.Lock()
        self.rotations = 0
        self._sizes: dict[Path, int] = {}
        self.rescan()

    @property
    def replaying(self) -> Path:
        return self.base.with_name(self.base.name + ".replaying")

    def sealed(self) -> list[Path]:
        """Sealed segments, oldest first."""
        def stamp(p: Path) -> int:
            part = p.name.rsplit(".", 2)[-2]
            return int(part) if part.isdigit() else 0

        return sorted(self.base.parent.glob(self.base.name + ".*.seg"), key=stamp)

    def rescan(self) -> None:
        with self.lock:
            self._sizes = {}
            for p in (self.replaying, *self.sealed(), self.base):
                try:
                    self._sizes[p] = p.stat().st_size
                except OSError:
                    pass

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def files(self) -> int:
        return len(self._sizes)

    @property
    def has_data(self) -> bool:
        return bool(self._sizes)

    def append(self, text: str) -> None:
        """Append (fsynced); rotate the active segment past `segment_bytes`. SpillUnavailable when the
        bound would be passed or the disk refuses."""
        if not text:
            return
        with self.lock:
            if self.bytes + len(text) > self.max_bytes:
                raise SpillUnavailable(f"spill {self.base.name}: size limit of {self.max_bytes} bytes "
                                       "reached (the database has been away too long)", "limit")
            self.base.parent.mkdir(parents=True, exist_ok=True)
            self._sizes[self.base] = append_durably(self.base, text)
            if self._sizes[self.base] >= self.segment_bytes:
                sealed = self.base.with_name(f"{self.base.name}.{time.time_ns()}.seg")
                os.replace(self.base, sealed)
                fsync_dir(self.base.parent)
                self._sizes[sealed] = self._sizes.pop(self.base)
                self.rotations += 1

    def next_for_replay(self) -> Path | None:
        """The file to replay now: a replay left half-way first, then the oldest sealed segment, then
        the active one (each moved to `.replaying`, so appends meanwhile start a new active file)."""
        with self.lock:
            target = self.replaying
            if target.exists():
                return target
            sealed = self.sealed()
            source = sealed[0] if sealed else (self.base if self.base.exists() else None)
            if source is None:
                self._sizes.pop(target, None)
                return None
            os.replace(source, target)
            fsync_dir(self.base.parent)
            self._sizes[target] = self._sizes.pop(source, 0) or target.stat().st_size
            return target

    def done(self, path: Path) -> None:
        """The replayed file is stored (or dead-lettered) in full: remove it, durably."""
        with self.lock:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            fsync_dir(path.parent)
            self._sizes.pop(path, None)


def read_lines(path: Path, offset: int = 0) -> Iterator[tuple[int, str]]:
    """(offset after the line, line) for each non-empty line from `offset`. A last line without its
    newline is yielded too (the caller's parse decides whether it is torn)."""
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        for raw in f:
            pos += len(raw)
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                yield pos, line


def dead_letter(path: Path, entries: list[dict[str, Any]]) -> bool:
    """Append entries (each gets `dead_at`) to a dead-letter file; False when the disk refused."""
    if not entries:
        return True
    now = time.time()
    text = "".join(json.dumps({**e, "dead_at": now}, default=str) + "\n" for e in entries)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        append_durably(path, text)
    except (SpillUnavailable, OSError) as exc:
        log.error("dead-letter file %s unwritable (%s): %d entries lost", path, exc, len(entries))
        return False
    return True
