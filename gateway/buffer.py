"""The store-and-forward outbox: everything bound upstream is written here first.

One SQLite file in WAL mode. A record gets its `seq` when it is written (seq is the row key,
persisted, never reused, not even after the file had to be replaced). A row leaves only when
the broker acknowledged it (`ack`). When `max_bytes` is reached the oldest rows of the lowest
priority go first (data, then events, alarms last) and every eviction is counted.

The cap covers the database and its WAL: the WAL is checkpointed (TRUNCATE) when it passes
WAL_FRACTION of the cap, freed pages are reused, and the real page use is checked now and then
beside the fast sum of row sizes. A full disk (SQLITE_FULL, ENOSPC) is not fatal: a reserve file
kept beside the database is given up so that a checkpoint can run, rows are evicted by the same
policy, the write is retried, and `disk_full` stays set until the buffer holds what it could not
when the disk filled and the file system has room for the WAL again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway import logs
from gateway.model import Clock, Record, iso_ts

log = logs.get("gateway.buffer")

ROW_OVERHEAD = 48  # bytes per row beyond topic and payload (key, index entry, columns), roughly
SEQ_RESERVE = 100_000  # seq numbers reserved in the side file at a time
WAL_FRACTION = 8  # the WAL is checkpointed (TRUNCATE) when larger than max_bytes / WAL_FRACTION ...
WAL_MAX = 1 << 20  # ... or than this
RESERVE_SLACK = 64 * 1024  # the reserve file holds the WAL limit plus this (room to checkpoint and evict)
SIZE_CHECK_EVERY = 1.0  # seconds between checks of the real page use against the cap
FULL_ROUNDS = 8  # evict-and-retry rounds before a write that meets a full disk is given up


@dataclass(slots=True)
class Row:
    seq: int
    topic: str
    payload: bytes
    retain: bool
    priority: int
    size: int


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS "outbox" ("seq" INTEGER PRIMARY KEY, "topic" TEXT, "payload" BLOB,
       "retain" INTEGER, "priority" INTEGER, "kind" TEXT, "ts" REAL, "size" INTEGER,
       "not_before" REAL DEFAULT 0.0, "attempts" INTEGER DEFAULT 0)""",
    'CREATE INDEX IF NOT EXISTS "idx_outbox_priority_seq" ON "outbox" ("priority", "seq")',
    'CREATE TABLE IF NOT EXISTS "meta" ("key" TEXT PRIMARY KEY, "value" TEXT)',
    'CREATE TABLE IF NOT EXISTS "state" ("key" TEXT PRIMARY KEY, "value" TEXT)',
)


class BufferError(Exception):
    """The buffer file cannot be used."""


def _is_full(exc: BaseException) -> bool:
    """SQLITE_FULL from SQLite, ENOSPC (or EDQUOT) from a plain file write."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def clock_seq() -> int:
    """A seq start no earlier seq can reach: microseconds since 1970 (a buffer would have had to
    issue more than a million seqs a second, ever since 1970, to get there)."""
    return time.time_ns() // 1000


def _finite(value: Any) -> Any:
    """Replace NaN/inf (which JSON cannot carry) by None: an unknown value, never a made-up one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode(gateway_id: str, seq: int, record: Record) -> bytes:
    body = {"gateway": gateway_id, "seq": seq, "ts": iso_ts(record.ts), **record.payload}
    try:
        # orjson: a 5,000-tag summary in 1.4 ms instead of 10 ms, on the event loop. It writes
        # NaN and infinity as null, as `_finite` does; what it refuses (an integer beyond 64
        # bits, an unknown type) takes the json module's road below.
        return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        pass
    try:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(body), separators=(",", ":"), allow_nan=False)
    return text.encode()


class Buffer:
    def __init__(self, path: str | Path, gateway_id: str, *, max_bytes: int = 1 << 30,
                 durability: str = "normal", readonly: bool = False, clock: Clock = time,
                 disk_probe_s: float = 10.0) -> None:
        self.path = Path(path)
        self._clock = clock
        self._epoch = (clock.time(), clock.monotonic())  # for `now()`
        self.gateway_id = gateway_id
        self.max_bytes = max_bytes
        self.wal_limit = min(max_bytes // WAL_FRACTION, WAL_MAX)
        self.full = False  # evicting at the cap; logged on entering and on leaving
        self.disk_full = False  # the file system refused a write; logged on entering and on leaving
        self.disk_probe_s = disk_probe_s  # while the disk is full: how often to try taking more again
        self._limit: int | None = None  # ceiling on row bytes while the disk is full
        self._full_at = 0  # row bytes the disk could not hold
        self._probe_at = 0.0
        self._row_cap = max_bytes  # row bytes that fit the cap, from the real page use
        self._episode: Counter[str] = Counter()  # evicted since `full` was entered
        self.durability = durability
        self.dropped: Counter[str] = Counter()  # evictions since start, by kind
        self.appended = 0
        self.acked = 0
        self._conn: sqlite3.Connection | None = None
        self.readonly = readonly
        if readonly:
            self._connect_readonly()
        else:
            self._open()
            self._release_deferred()

    # ----- opening, corruption handling -----

    @property
    def _seq_file(self) -> Path:
        return self.path.with_name(self.path.name + ".seq")

    @property
    def _reserve_file(self) -> Path:
        return self.path.with_name(self.path.name + ".reserve")

    @property
    def _wal_file(self) -> Path:
        return Path(str(self.path) + "-wal")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connect(moved_aside=None)
        except (sqlite3.DatabaseError, BufferError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            log.error("buffer.corrupt", path=str(self.path), moved_to=str(aside), error=str(exc),
                      hint="a fresh buffer was started; the old file is kept for inspection")
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            self._connect(moved_aside=aside)

    def _connect_readonly(self) -> None:
        """For `buffer stats|dump` beside a running daemon: never creates, moves or writes."""
        if not self.path.exists():
            raise BufferError(f"no buffer at {self.path}")
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        self._conn.execute("PRAGMA busy_timeout=5000")
        try:
            # The seq the daemon would continue with (it persists a reset at once, so beside a
            # running daemon this is its value; with no daemon it is what a start now would use).
            self._next_seq, _ = self._start_seq(moved_aside=None)
            self._seq_reserved = 1 << 62  # never writes the side file
            self._bytes, self._depth = self.conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM outbox").fetchone()
            self._dropped_total = int(self._meta("dropped") or 0)
        except sqlite3.DatabaseError as exc:
            raise BufferError(f"{self.path} is not a readable buffer: {exc}") from None

    def _connect(self, moved_aside: Path | None = None) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=5000")
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise BufferError(f"integrity check failed: {ok}")
        # Plain DDL, the schema sqlite-utils made before (files written by earlier versions are
        # the same); sqlite-utils itself imported NumPy, 15 MB of RSS for a few CREATE TABLEs.
        for ddl in _SCHEMA:
            conn.execute(ddl)
        self._next_seq, reset = self._start_seq(moved_aside)
        if reset:
            # Persist the new start at once (meta and side file): a restart, and `buffer stats`,
            # continue from it instead of resetting again.
            log.error("buffer.seq_reset", path=str(self.path), reason=reset, next_seq=self._next_seq,
                      hint="no trustworthy seq high-water mark; seq restarts from the clock so it stays above every earlier seq")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(self._next_seq - 1),))
            self._seq_reserved = 0
            self._reserve_seq(self._next_seq - 1)
        else:
            self._seq_reserved = max(self._next_seq - 1, self._read_seq_file() or 0)
        self._bytes, self._depth = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM outbox").fetchone()
        self._dropped_total = int(self._meta("dropped") or 0)
        self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={max(1, self.wal_limit // self._page_size)}")
        if not self._make_reserve():
            self._make_room(OSError(errno.ENOSPC, "no room for the reserve file"), 0)

    def _read_seq_file(self) -> int | None:
        """The side file's mark: 0 when there is no file, None when it exists but holds no number."""
        try:
            text = self._seq_file.read_text()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError):
            return None
        value = _int_or_none(text)
        return value if value is not None and value >= 0 else None

    def _start_seq(self, moved_aside: Path | None) -> tuple[int, str | None]:
        """The next seq, and why it had to be reset (None when it continues a known mark).

        The database's own mark (highest row, meta.last_seq) comes first; a file that never held
        a row may be a replacement for a lost one, so then the side file's mark. Without either,
        a new install starts at 1; but when a buffer existed before (side file unreadable, or the
        database moved aside as corrupt), its seqs are unknown: start from the clock."""
        max_row = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]
        meta = self._meta("last_seq")
        last = max(max_row, _int_or_none(meta) or 0)
        if last:
            return last + 1, None
        side = self._read_seq_file()
        if side:
            return side + 1, None
        reasons = []
        if side is None:
            reasons.append(f"side file {self._seq_file} is unreadable")
        if moved_aside is not None:
            reasons.append(f"the database was moved aside as corrupt to {moved_aside}")
        if meta is not None and _int_or_none(meta) is None:
            reasons.append(f"meta.last_seq is not a number: {meta!r}")
        if not reasons:
            return 1, None  # nothing ever existed here
        return max(clock_seq(), 1), "; ".join(reasons)

    def _reserve_seq(self, upto: int) -> None:
        """Keep a high-water mark outside the database so a replaced file never reuses a seq."""
        if upto <= self._seq_reserved:
            return
        mark = upto + SEQ_RESERVE
        tmp = self._seq_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(mark))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._seq_file)
        self._seq_reserved = mark

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BufferError("buffer is closed")
        return self._conn

    # ----- disk space -----

    def _make_reserve(self) -> bool:
        """Set disk space aside (allocated, not sparse): on a full disk, giving it up leaves room to
        checkpoint the WAL and evict. False when the file system has no room for it."""
        size = self.wal_limit + RESERVE_SLACK
        path = self._reserve_file
        try:
            if path.exists() and path.stat().st_blocks * 512 >= size:
                return True
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            return True
        except OSError as exc:
            path.unlink(missing_ok=True)
            if not _is_full(exc):
                log.warning("buffer.reserve_failed", path=str(path), error=str(exc))
            return False

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (not possible on a full disk: skipped)."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise

    def file_bytes(self) -> int:
        return sum(Path(str(self.path) + s).stat().st_size for s in ("", "-wal") if Path(str(self.path) + s).exists())

    def _make_room(self, exc: BaseException, need: int) -> bool:
        """A write met a full disk: give up the reserve, checkpoint, evict by policy (when `need`
        bytes are to be written) and keep row bytes under a lowered ceiling while it lasts.
        Returns False when nothing could be done, i.e. a retry would fail the same way."""
        if not self.disk_full:
            self.disk_full = True
            log.error("buffer.disk_full", error=str(exc), path=str(self.path), bytes=self._bytes,
                      file_bytes=self.file_bytes(),
                      hint="the file system is full: oldest data is evicted, the gateway keeps running")
        if self._limit is None:  # entering, or a try at taking more failed
            self._full_at = self._bytes + need
            self._probe_at = time.monotonic()
        released = self._reserve_file.exists()
        self._reserve_file.unlink(missing_ok=True)
        self._checkpoint()
        evicted = 0
        target = max(0, self._bytes - max(need, self._bytes // 20)) if need else self._bytes
        self._limit = target if self._limit is None else min(self._limit, target)
        if need:
            try:
                evicted = sum(self._evict(target).values())
            except sqlite3.OperationalError as again:
                if not _is_full(again):
                    raise
            self._checkpoint()
        return released or evicted > 0

    def _free_space(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def _probe_disk(self) -> None:
        """While the disk is full: now and then take the reserve back and lift the ceiling. When
        the disk is still full the next write says so (and is handled); else disk_full clears once
        the buffer holds what it could not when the disk filled, with room left for the WAL."""
        if not self.disk_full or self._limit is None or time.monotonic() - self._probe_at < self.disk_probe_s:
            return
        self._probe_at = time.monotonic()
        if self._make_reserve():
            self._limit = None

    def _check_size(self) -> None:
        """The fast path counts row bytes; near the cap, compare the real page use with the part of
        the cap the WAL leaves to the database, and derive the row bytes that fit."""
        if self._bytes < self._row_cap // 2:
            return
        pages, free = (self.conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count"))
        budget = self.max_bytes - self.wal_limit
        used = (pages - free) * self._page_size
        if used and self._bytes:
            self._row_cap = min(self.max_bytes, int(budget * self._bytes / used))
        if pages * self._page_size > budget and free:
            try:  # a file larger than the budget (e.g. max_bytes was lowered): give pages back
                with self._transaction() as conn:
                    conn.execute("PRAGMA incremental_vacuum").fetchall()
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise

    def _cap(self) -> int:
        return self._row_cap if self._limit is None else min(self._row_cap, self._limit)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; on an error ROLLBACK, but only when SQLite has not rolled
        back by itself already (it does on SQLITE_FULL), so the real error is the one raised."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.error("buffer.rollback_failed", error=str(exc))
            raise
        try:
            wal = self._wal_file.stat().st_size
        except FileNotFoundError:
            return
        if wal > self.wal_limit:
            self._checkpoint()

    def _write(self, work, need: int = 0) -> bool:
        """Run work(conn) in a transaction; on a full disk make room and try again. False: given up."""
        for _ in range(FULL_ROUNDS):
            try:
                with self._transaction() as conn:
                    work(conn)
                return True
            except (sqlite3.OperationalError, OSError) as exc:
                if not _is_full(exc):
                    raise
                if not self._make_room(exc, need):
                    return False
        return False

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError:
                pass
            self._conn.close()
            self._conn = None

    # ----- writing -----

    def append(self, records: Iterable[Record], state: dict[str, Any] | None = None) -> list[int]:
        """Write records (and rule state changes) in one transaction; return their seqs."""
        rows = []
        seq = self._next_seq
        for r in records:
            payload = encode(self.gateway_id, seq, r)
            size = len(payload) + len(r.topic) + ROW_OVERHEAD
            rows.append((seq, r.topic, payload, int(r.retain), r.priority, r.kind, r.ts, size))
            seq += 1
        if not rows and not state:
            return []
        need = sum(r[7] for r in rows)

        def insert(conn: sqlite3.Connection) -> None:
            self._reserve_seq(seq - 1)
            if rows:
                conn.executemany(
                    "INSERT INTO outbox (seq, topic, payload, retain, priority, kind, ts, size) VALUES (?,?,?,?,?,?,?,?)",
                    rows,
                )
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(seq - 1),))
            for key, value in (state or {}).items():
                if value is None:
                    conn.execute("DELETE FROM state WHERE key=?", (key,))
                else:
                    conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, json.dumps(_finite(value))))

        self._probe_disk()
        written = self._write(insert, need)
        self._next_seq = seq  # a lost batch leaves a gap in seq: how a consumer sees the loss
        if not written:
            lost = self.count_lost(r[5] for r in rows)
            log.error("buffer.write_lost", lost=lost, state_keys=sorted(state or ()),
                      hint="the disk is full and nothing is left to evict")
            return []
        self._bytes += need
        self._depth += len(rows)
        self.appended += len(rows)
        self._check_size()
        cap = self._cap()
        if self._bytes > cap:
            try:
                dropped = self._evict(int(cap * 0.95))
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                self._make_room(exc, 0)  # evicted by the next append
                dropped = Counter()
            if self._limit is None and dropped:
                self._episode.update(dropped)
                if not self.full:
                    self.full = True
                    log.warning("buffer.full", evicted=dict(dropped), max_bytes=self.max_bytes,
                                hint="the upstream broker has not taken data for long: oldest data is dropped")
        if self.disk_full and self._limit is None and self._bytes >= min(self._full_at, cap) \
                and self._free_space() >= self.wal_limit + RESERVE_SLACK:
            self.disk_full = False
            log.info("buffer.disk_ok", path=str(self.path), bytes=self._bytes, file_bytes=self.file_bytes())
        return [r[0] for r in rows]

    def count_lost(self, kinds: Iterable[str]) -> dict[str, int]:
        """Records that never made it into the file: counted as dropped (persisted with the next eviction)."""
        lost = Counter(kinds)
        self.dropped.update(lost)
        self._dropped_total += lost.total()
        return dict(lost)

    def _evict(self, target: int) -> Counter[str]:
        """Drop oldest rows of the lowest priority until row bytes are at most `target`; count each."""
        dropped: Counter[str] = Counter()
        with self._transaction() as conn:
            left = self._bytes
            while left > target:
                batch = conn.execute(
                    "SELECT seq, size, kind FROM outbox ORDER BY priority ASC, seq ASC LIMIT 1000"
                ).fetchall()
                if not batch:
                    break
                cut = []
                for seq, size, kind in batch:
                    cut.append((seq,))
                    left -= size
                    dropped[kind] += 1
                    if left <= target:
                        break
                conn.executemany("DELETE FROM outbox WHERE seq=?", cut)
            total = self._dropped_total + sum(dropped.values())
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (str(total),))
        # only now: a transaction that failed (full disk) changed nothing
        self._bytes = left
        self._depth -= sum(dropped.values())
        self._dropped_total = total
        self.dropped.update(dropped)
        return dropped

    # ----- forwarding -----

    # Retry times (`not_before`) are on the buffer's own clock, `now()`: the wall time at open
    # plus the monotonic seconds since. A step of the wall clock while the gateway runs can then
    # neither release refused rows early nor hold them back for the size of the step. That clock
    # means nothing to the next process (the wall clock may have been stepped while it was
    # down), so a retry time left by an earlier run is not trusted: those rows are due at once
    # (a restart is a retry too; at worst the broker refuses a row once more and it waits again).

    def now(self) -> float:
        """The buffer's clock for `defer`, `fetch` and `next_due` (epoch-like seconds, monotonic)."""
        wall, mono = self._epoch
        return wall + (self._clock.monotonic() - mono)

    def _release_deferred(self) -> None:
        if self.conn.execute("SELECT 1 FROM outbox WHERE not_before>0 LIMIT 1").fetchone():
            self._write(lambda conn: conn.execute("UPDATE outbox SET not_before=0 WHERE not_before>0"))

    def fetch(self, after: dict[int, int], limit: int, now: float | None = None) -> list[Row]:
        """Rows due for sending, highest priority first, each priority in seq order after `after[p]`.
        `now` is on the buffer's clock (default `now()`)."""
        now = self.now() if now is None else now
        out: list[Row] = []
        for priority in sorted({*after.keys(), 0, 1, 2}, reverse=True):
            if len(out) >= limit:
                break
            cur = self.conn.execute(
                "SELECT seq, topic, payload, retain, priority, size FROM outbox"
                " WHERE priority=? AND seq>? AND not_before<=? ORDER BY seq LIMIT ?",
                (priority, after.get(priority, 0), now, limit - len(out)),
            )
            out.extend(Row(s, t, p, bool(r), pr, sz) for s, t, p, r, pr, sz in cur)
        return out

    def ack(self, rows: list[Row]) -> None:
        """The broker has the rows: delete them."""
        if not rows:
            return
        deleted = 0

        def delete(conn: sqlite3.Connection) -> None:
            nonlocal deleted
            deleted = conn.executemany("DELETE FROM outbox WHERE seq=?", [(r.seq,) for r in rows]).rowcount

        if not self._write(delete):
            return  # the disk is full: the rows stay and are sent again (at least once)
        conn = self.conn
        # Rows evicted while in flight are gone already: account only what this call removed.
        if deleted == len(rows):
            self._bytes -= sum(r.size for r in rows)
            self._depth -= deleted
        else:
            self._bytes, self._depth = conn.execute("SELECT COALESCE(SUM(size),0), COUNT(*) FROM outbox").fetchone()
        self.acked += deleted
        if self.full and self._bytes <= int(self._cap() * 0.9):
            self.full = False
            log.info("buffer.not_full", evicted=dict(self._episode), bytes=self._bytes, max_bytes=self.max_bytes)
            self._episode.clear()

    def defer(self, rows: list[Row], delay: float) -> None:
        """The broker refused the rows: keep them, try again after `delay` seconds."""
        if rows:
            self._write(lambda conn: conn.executemany(
                "UPDATE outbox SET not_before=?, attempts=attempts+1 WHERE seq=?",
                [(self.now() + delay, r.seq) for r in rows],
            ))

    def next_due(self) -> float | None:
        """When (on the buffer's clock, `now()`) the earliest deferred row becomes due again
        (None if none is deferred)."""
        row = self.conn.execute("SELECT MIN(not_before) FROM outbox WHERE not_before>0").fetchone()
        return row[0] if row and row[0] else None

    def refused_count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM outbox WHERE attempts>0").fetchone()[0]

    # ----- rule state (written with the records in `append`) -----

    def load_state(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM state")}

    # ----- inspection -----

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def dropped_total(self) -> int:
        return self._dropped_total

    def oldest_ts(self) -> float | None:
        return self.conn.execute("SELECT MIN(ts) FROM outbox").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        oldest = self.oldest_ts()
        by_kind = {k: n for k, n in self.conn.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind")}
        return {
            "path": str(self.path),
            "depth": self._depth,
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "file_bytes": self.file_bytes(),
            "disk_full": self.disk_full,
            "oldest_ts": iso_ts(oldest) if oldest else None,
            "oldest_age_s": round(time.time() - oldest, 3) if oldest else None,
            "by_kind": by_kind,
            "refused": self.refused_count(),
            "next_seq": self._next_seq,
            "dropped": self._dropped_total,
            "alarm_states": self.conn.execute("SELECT COUNT(*) FROM state").fetchone()[0],
        }

    def dump(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        sql = "SELECT seq, topic, retain, kind, attempts, payload FROM outbox ORDER BY priority DESC, seq"
        params: tuple = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        for seq, topic, retain, kind, attempts, payload in self.conn.execute(sql, params):
            yield {"seq": seq, "topic": topic, "retain": bool(retain), "kind": kind, "attempts": attempts,
                   "payload": json.loads(payload)}
