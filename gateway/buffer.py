"""The store-and-forward outbox: everything bound upstream is written here first.

One SQLite file in WAL mode. A record gets its `seq` when it is written (seq is the row key,
persisted, never reused, not even after the file had to be replaced). A row leaves only when
the broker acknowledged it (`ack`). When `max_bytes` is reached the oldest rows of the lowest
priority go first (data, then events, alarms last) and every eviction is counted.

Several upstreams share the one file, each as a *link*: a bit in the row's `owed` mask, set at
`append` for every link that takes the row's kind (the first segment of its topic). `ack(rows,
link)` clears that link's bit and deletes the rows nobody is owed any more; a refusal defers a
row for that link only (table `deferred`). One link down therefore holds back no other link.
With one link (the usual case) every row is owed to it, and fetch and ack are today's plain
queries.

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
from gateway.statelock import write_durably

log = logs.get("gateway.buffer")

ROW_OVERHEAD = 48  # bytes per row beyond topic and payload (key, index entry, columns), roughly
SEQ_RESERVE = 100_000  # seq numbers reserved in the side file at a time
WAL_FRACTION = 8  # the WAL is checkpointed (TRUNCATE) when larger than max_bytes / WAL_FRACTION ...
WAL_MAX = 1 << 20  # ... or than this
RESERVE_SLACK = 64 * 1024  # the reserve file holds the WAL limit plus this (room to checkpoint and evict)
SIZE_CHECK_EVERY = 1.0  # seconds between checks of the real page use against the cap
FULL_ROUNDS = 8  # evict-and-retry rounds before a write that meets a full disk is given up
MAX_LINKS = 62  # bits of `owed` (a signed 64-bit integer in SQLite)
ENCODED = b"\0"  # what starts a payload stored encoded rather than as JSON (Record.encoded)
VALUES = "values"  # the row kind only links that name it take (per-tag values for Sparkplug)
DEFAULT_LINK = "upstream"  # the one link of a buffer before links are set (and of an old file)
FETCH_ONE_STEP_ROW = 1024  # fetch reads rows in one statement step while rows average at most this (bytes):
# 200-byte JSON rows gain from it; 1.9 kB Sparkplug rows fetch 3x faster row by row (14 vs 4.6 ms per 2,000)
KIND_SQL = "substr(topic, 1, instr(topic || '/', '/') - 1)"  # a row's kind, in SQL


def _kinds_text(kinds: frozenset[str] | None) -> str:
    return json.dumps(sorted(kinds) if kinds is not None else None)


def row_kind(topic: str) -> str:
    """The kind links choose rows by: the first segment of the topic (`alarms/high` -> `alarms`)."""
    return topic.split("/", 1)[0]


def takes(kinds: frozenset[str] | None, kind: str) -> bool:
    """Does a link with `kinds` take rows of `kind`? None: every kind but VALUES."""
    return kind != VALUES if kinds is None else kind in kinds


@dataclass(frozen=True, slots=True)
class Link:
    """One upstream's claim on the rows: its bit in `owed`, and the kinds it takes."""

    name: str
    bit: int
    kinds: frozenset[str] | None = None

    @property
    def mask(self) -> int:
        return 1 << self.bit


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
       "owed" INTEGER NOT NULL DEFAULT 1)""",
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


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted seqs as runs of consecutive numbers: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: list[tuple[int, int]] = []
    for seq in seqs:
        if out and seq <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], seq))
        else:
            out.append((seq, seq))
    return out


def _seq(row: "Row") -> int:
    return row.seq


def encode(gateway_id: str, seq: int, record: Record) -> bytes:
    """The stored payload: the record as JSON, or a NUL and its `encoded` bytes if it has them."""
    return _json(gateway_id, seq, record) if record.encoded is None else ENCODED + record.encoded


def _json(gateway_id: str, seq: int, record: Record) -> bytes:
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
        # Links: as set (or as found in the file), their depth (rows owed), the oldest ts owed
        # (None: to be looked up), evictions each did not receive (since start).
        self.links: list[Link] = [Link(DEFAULT_LINK, 0)]
        self._by_name: dict[str, Link] = {DEFAULT_LINK: self.links[0]}
        self._owed_of: dict[str, int] = {}  # kind -> owed mask, cached
        self._link_depth: dict[int, int] = {0: 0}
        self._link_bytes: dict[int, int] = {0: 0}  # bit -> size of the rows owed to it (as counted for the cap)
        self._link_oldest: dict[int, float | None] = {}
        self.dropped_by_link: Counter[str] = Counter()
        self._deferred = 0  # rows in `deferred`: 0 keeps fetch and ack free of it
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
            self._dropped_total = int(self.noted("dropped") or 0)
            tables = self._tables()
            if "links" in tables and "owed" in self._columns():
                found = [Link(n, b) for n, b in self.conn.execute("SELECT name, bit FROM links ORDER BY bit")]
                if found:
                    self._use_links(found)
            self._deferred = self.conn.execute("SELECT COUNT(*) FROM deferred").fetchone()[0] if "deferred" in tables else 0
            self._count_links()
        except sqlite3.DatabaseError as exc:
            raise BufferError(f"{self.path} is not a readable buffer: {exc}") from None

    def _connect(self, moved_aside: Path | None = None) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
        conn.execute("PRAGMA journal_mode=WAL")
        # Many builds (Debian's among them) zero every deleted byte, which writes each acknowledged
        # row a second time (WAL, then checkpoint): FAST zeroes only in pages written anyway. It
        # halved the time to delete acknowledged 1.9 kB rows, and spares the flash of the box.
        conn.execute("PRAGMA secure_delete=FAST")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=5000")
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise BufferError(f"integrity check failed: {ok}")
        # Plain DDL (sqlite-utils imported NumPy, 15 MB of RSS for a few CREATE TABLEs). A file
        # written before links has not_before/attempts instead of owed: _migrate_links updates it.
        for ddl in _SCHEMA:
            conn.execute(ddl)
        self._migrate_links(conn)
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
        self._dropped_total = int(self.noted("dropped") or 0)
        self._count_links()
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
        meta = self.noted("last_seq")
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
        write_durably(self._seq_file, str(mark))
        self._seq_reserved = mark

    def _tables(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _columns(self) -> set[str]:
        return {r[1] for r in self.conn.execute("PRAGMA table_info(outbox)")}

    def _migrate_links(self, conn: sqlite3.Connection) -> None:
        """Tables for links, and a file written before them brought up to date: its rows owed to
        the default link (the column default), its refusals moved to `deferred`."""
        columns = self._columns()
        with self._transaction():
            if "owed" not in columns:
                conn.execute("ALTER TABLE outbox ADD COLUMN owed INTEGER NOT NULL DEFAULT 1")
            conn.execute("CREATE TABLE IF NOT EXISTS links (name TEXT PRIMARY KEY, bit INTEGER NOT NULL UNIQUE,"
                         " kinds TEXT)")
            conn.execute("CREATE TABLE IF NOT EXISTS deferred (bit INTEGER NOT NULL, seq INTEGER NOT NULL,"
                         " not_before REAL NOT NULL, attempts INTEGER NOT NULL, PRIMARY KEY (bit, seq))")
            if "attempts" in columns:  # refusals counted by a version with one upstream
                conn.execute("INSERT OR IGNORE INTO deferred SELECT 0, seq, not_before, attempts FROM outbox"
                             " WHERE attempts>0")
                conn.execute("UPDATE outbox SET attempts=0, not_before=0 WHERE attempts>0 OR not_before>0")
        found = [Link(n, b) for n, b in conn.execute("SELECT name, bit FROM links ORDER BY bit")]
        if found:
            self._use_links(found)
        self._deferred = conn.execute("SELECT COUNT(*) FROM deferred").fetchone()[0]

    def _use_links(self, links: list[Link]) -> None:
        self.links = links
        self._by_name = {link.name: link for link in links}
        self._owed_of = {}
        self._link_oldest = {}

    def set_links(self, wanted: list[tuple[str, frozenset[str] | None]]) -> None:
        """The configured upstreams, in order, each with the kinds it takes (see `takes`).

        A file that never had links set (new, or from a version with one upstream): its rows
        are owed to every link that takes their kind. Otherwise links are matched by name; a new
        one is owed what is written from now on, except that when exactly one known link is gone
        and the first wanted one is new, the first takes over its rows (the one-upstream form's
        default name `upstream` becoming a named first upstream loses nothing). A link that is
        gone otherwise has its bit cleared; rows nobody is owed any more are deleted and counted
        in the warning."""
        if not wanted:
            raise ValueError("at least one link")
        if len(wanted) > MAX_LINKS or len({n for n, _ in wanted}) != len(wanted):
            raise ValueError(f"link names must be unique, at most {MAX_LINKS}")
        conn = self.conn
        with self._transaction():
            old = dict(conn.execute("SELECT name, bit FROM links"))
            known_kinds = dict(conn.execute("SELECT name, kinds FROM links"))
            fresh = not old
            names = [n for n, _ in wanted]
            gone = [n for n in old if n not in names]
            if len(gone) == 1 and names[0] not in old:
                was = gone.pop()
                bit = old.pop(was)
                conn.execute("UPDATE links SET name=? WHERE bit=?", (names[0], bit))
                old[names[0]] = bit
                known_kinds[names[0]] = known_kinds.pop(was, None)
                log.info("buffer.link_renamed", upstream=names[0], bit=bit)
            for name in gone:
                bit = old.pop(name)
                mask = 1 << bit
                unsent = conn.execute("UPDATE outbox SET owed = owed & ~? WHERE owed & ?", (mask, mask)).rowcount
                deleted = conn.execute("DELETE FROM outbox WHERE owed=0").rowcount
                conn.execute("DELETE FROM deferred WHERE bit=?", (bit,))
                conn.execute("DELETE FROM links WHERE bit=?", (bit,))
                log.warning("buffer.link_removed", upstream=name, unsent=unsent, deleted=deleted,
                            hint="this upstream is no longer configured: what it had not received is not kept for it")
            used = set(old.values()) if not fresh else set()
            for name in names:
                if name not in old or fresh:
                    bit = 0 if fresh and name == names[0] else min(set(range(MAX_LINKS)) - used)
                    used.add(bit)
                    conn.execute("INSERT OR REPLACE INTO links (name, bit) VALUES (?, ?)", (name, bit))
                    old[name] = bit
            links = [Link(name, old[name], kinds) for name, kinds in wanted]
            # A link that kept its kinds needs no look at the rows (a restart of a large buffer
            # stays quick); a fresh file, or kinds that changed, do.
            changed = fresh or any(n in known_kinds and known_kinds[n] != _kinds_text(k) for n, k in wanted)
            for name, kinds in wanted:
                conn.execute("UPDATE links SET kinds=? WHERE name=?", (_kinds_text(kinds), name))
            kinds_found = [k for k, in conn.execute(f"SELECT DISTINCT {KIND_SQL} FROM outbox")] if changed else []
            for kind in kinds_found:
                want = sum(link.mask for link in links if takes(link.kinds, kind))
                if fresh:  # every row owed to each link taking it
                    conn.execute(f"UPDATE outbox SET owed=? WHERE {KIND_SQL}=?", (want, kind))
                else:  # a link keeps no claim on a kind it no longer takes
                    conn.execute(f"UPDATE outbox SET owed = owed & ? WHERE {KIND_SQL}=? AND owed & ~?",
                                 (want, kind, want))
            dropped = conn.execute("DELETE FROM outbox WHERE owed=0").rowcount
            if dropped:
                log.warning("buffer.rows_unwanted", deleted=dropped, kinds=kinds_found,
                            hint="no configured upstream takes these kinds")
            masks = sum(link.mask for link in links)
            conn.execute("DELETE FROM deferred WHERE NOT ((1 << bit) & ?)", (masks,))
        self._use_links(links)
        self._bytes, self._depth = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM outbox").fetchone()
        self._deferred = conn.execute("SELECT COUNT(*) FROM deferred").fetchone()[0]
        self._count_links()

    def link(self, name: str | None = None) -> Link:
        """A link by name; None: the first (the only one, with one upstream)."""
        if name is None:
            return self.links[0]
        try:
            return self._by_name[name]
        except KeyError:
            raise BufferError(f"no link {name!r} (links: {', '.join(self._by_name)})") from None

    def _owed(self, kind: str) -> int:
        mask = self._owed_of.get(kind)
        if mask is None:
            mask = self._owed_of[kind] = sum(link.mask for link in self.links if takes(link.kinds, kind))
        return mask

    def _count_links(self) -> None:
        if len(self.links) == 1:
            self._link_depth = {self.links[0].bit: self._depth}
            self._link_bytes = {self.links[0].bit: self._bytes}
        elif "owed" in self._columns():
            self._link_depth, self._link_bytes = {}, {}
            for link in self.links:
                n, size = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE owed & ?",
                                            (link.mask,)).fetchone()
                self._link_depth[link.bit], self._link_bytes[link.bit] = n, size
        self._link_oldest = {}

    def note(self, key: str, value: str) -> bool:
        """Keep `value` under `key` with the rows (e.g. what encoded rows need to be read back).
        False: the disk is full and it could not be written."""
        return self._write(lambda conn: conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)))

    def forget(self, prefix: str, keep: str) -> int:
        """Drop the notes whose keys start with `prefix`, except `keep`; how many went."""
        gone = 0

        def delete(conn: sqlite3.Connection) -> None:
            nonlocal gone
            gone = conn.execute("DELETE FROM meta WHERE substr(key, 1, ?)=? AND key<>?",
                                (len(prefix), prefix, keep)).rowcount

        self._write(delete)
        return gone

    def noted(self, key: str) -> str | None:
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

    def append(self, records: Iterable[Record], state: dict[str, Any] | None = None,
               link: str | None = None) -> list[int]:
        """Write records (and rule state changes) in one transaction; return their seqs, one per
        record (0 for a record no link takes: not stored). `link`: owed to that link only (e.g.
        the alarm replay after one upstream reconnected), else to every link taking its kind."""
        rows = []
        seqs: list[int] = []
        seq = self._next_seq
        owed_of = self._owed_of
        only = self.link(link).mask if link is not None else -1
        for r in records:
            kind = r.topic.split("/", 1)[0]
            owed = owed_of.get(kind)
            if owed is None:
                owed = self._owed(kind)
            owed &= only
            if not owed:  # no upstream takes this kind: not stored, no seq used
                seqs.append(0)
                continue
            payload = encode(self.gateway_id, seq, r)
            size = len(payload) + len(r.topic) + ROW_OVERHEAD
            rows.append((seq, r.topic, payload, int(r.retain), r.priority, r.kind, r.ts, size, owed))
            seqs.append(seq)
            seq += 1
        if not rows and not state:
            return seqs
        need = sum(r[7] for r in rows)

        def insert(conn: sqlite3.Connection) -> None:
            self._reserve_seq(seq - 1)
            if rows:
                conn.executemany(
                    "INSERT INTO outbox (seq, topic, payload, retain, priority, kind, ts, size, owed)"
                    " VALUES (?,?,?,?,?,?,?,?,?)",
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
        if len(self.links) == 1:
            self._link_depth[self.links[0].bit] += len(rows)
            self._link_bytes[self.links[0].bit] += need
        elif rows:
            for link in self.links:
                mask = link.mask
                mine = [r[7] for r in rows if r[8] & mask]
                self._link_depth[link.bit] += len(mine)
                self._link_bytes[link.bit] += sum(mine)
        if rows and self._link_oldest:
            oldest = min(r[6] for r in rows)
            for bit, known in list(self._link_oldest.items()):
                if known is None or oldest < known:
                    del self._link_oldest[bit]  # looked up again when asked
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
        return seqs

    def count_lost(self, kinds: Iterable[str]) -> dict[str, int]:
        """Records that never made it into the file: counted as dropped (persisted with the next eviction)."""
        lost = Counter(kinds)
        self.dropped.update(lost)
        self._dropped_total += lost.total()
        return dict(lost)

    def _evict(self, target: int) -> Counter[str]:
        """Drop oldest rows of the lowest priority until row bytes are at most `target`; count each."""
        dropped: Counter[str] = Counter()
        by_owed: Counter[int] = Counter()  # evicted rows by owed mask: per link, what it never got
        bytes_owed: Counter[int] = Counter()
        with self._transaction() as conn:
            left = self._bytes
            while left > target:
                batch = conn.execute(
                    "SELECT seq, size, kind, owed FROM outbox ORDER BY priority ASC, seq ASC LIMIT 1000"
                ).fetchall()
                if not batch:
                    break
                cut = []
                for seq, size, kind, owed in batch:
                    cut.append((seq,))
                    left -= size
                    dropped[kind] += 1
                    by_owed[owed] += 1
                    bytes_owed[owed] += size
                    if left <= target:
                        break
                conn.executemany("DELETE FROM outbox WHERE seq=?", cut)
                if self._deferred:
                    conn.executemany("DELETE FROM deferred WHERE seq=?", cut)
            total = self._dropped_total + sum(dropped.values())
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (str(total),))
        # only now: a transaction that failed (full disk) changed nothing
        self._bytes = left
        self._depth -= sum(dropped.values())
        self._dropped_total = total
        self.dropped.update(dropped)
        for link in self.links:
            n = sum(count for owed, count in by_owed.items() if owed & link.mask)
            if n:
                self._link_depth[link.bit] -= n
                self._link_bytes[link.bit] -= sum(size for owed, size in bytes_owed.items() if owed & link.mask)
                self.dropped_by_link[link.name] += n
                self._link_oldest.pop(link.bit, None)
        if self._deferred:
            self._deferred = self.conn.execute("SELECT COUNT(*) FROM deferred").fetchone()[0]
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
        if self._deferred:
            self._write(lambda conn: conn.execute("UPDATE deferred SET not_before=0 WHERE not_before>0"))

    def fetch(self, after: dict[int, int], limit: int, now: float | None = None, link: str | None = None) -> list[Row]:
        """Rows due for sending over `link` (default: the first), highest priority first, each
        priority in seq order after `after[p]`. `now` is on the buffer's clock (default `now()`)."""
        lk = self.link(link)
        sql = "SELECT seq, topic, payload, retain, priority, size FROM outbox WHERE priority=? AND seq>?"
        extra: tuple = ()
        if len(self.links) > 1:
            sql += " AND owed & ?"
            extra = (lk.mask,)
        if self._deferred:
            now = self.now() if now is None else now
            sql += " AND NOT EXISTS (SELECT 1 FROM deferred d WHERE d.bit=? AND d.seq=outbox.seq AND d.not_before>?)"
            extra += (lk.bit, now)
        sql += " ORDER BY seq LIMIT ?"
        # Small rows come as one JSON array in one result row: sqlite3 lets the GIL go around
        # every statement step, and while the upstream drains, the MQTT network thread takes it
        # at each step and the fetch waits for it back, row after row. Payloads go as hex (BLOBs,
        # not text); seq order is restored here (an aggregate's order is not defined). Large rows
        # one by one: the array would hold a batch's payloads several times over.
        one_step = self._bytes <= FETCH_ONE_STEP_ROW * max(self._depth, 1)
        if one_step:
            sql = f"SELECT json_group_array(json_array(seq, topic, hex(payload), retain, size)) FROM ({sql})"
        out: list[Row] = []
        fromhex = bytes.fromhex
        for priority in sorted({*after.keys(), 0, 1, 2}, reverse=True):
            if len(out) >= limit:
                break
            cur = self.conn.execute(sql, (priority, after.get(priority, 0), *extra, limit - len(out)))
            if one_step:
                (found,), = cur
                rows = [Row(s, t, fromhex(p), bool(r), priority, sz) for s, t, p, r, sz in orjson.loads(found)]
                rows.sort(key=_seq)
                out.extend(rows)
            else:
                out.extend(Row(s, t, p, bool(r), pr, sz) for s, t, p, r, pr, sz in cur)
        return out

    def ack(self, rows: list[Row], link: str | None = None) -> None:
        """The broker of `link` (default: the first) has the rows: clear its bit, and delete the
        rows no other link is owed (with one link: delete them)."""
        if not rows:
            return
        lk = self.link(link)
        single = len(self.links) == 1
        cleared = 0  # rows this link was owed and no longer is
        cleared_bytes = 0
        freed_rows = freed_bytes = 0  # rows deleted (multi-link; single: all of `rows` that were there)
        # Acks arrive in publish order, so the seqs form a few runs: one statement step per run,
        # not per row (each step lets the GIL go, and the MQTT network thread may keep it).
        runs = _runs(sorted(r.seq for r in rows))

        def delete(conn: sqlite3.Connection) -> None:
            nonlocal cleared, cleared_bytes, freed_rows, freed_bytes
            if single:
                cleared = conn.executemany("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", runs).rowcount
            else:
                mask = lk.mask
                for lo, hi in runs:
                    owed_n, owed_b, only_n, only_b = conn.execute(
                        "SELECT COUNT(*), COALESCE(SUM(size),0), COALESCE(SUM(owed=?),0),"
                        " COALESCE(SUM(CASE WHEN owed=? THEN size ELSE 0 END),0)"
                        " FROM outbox WHERE seq BETWEEN ? AND ? AND owed & ?", (mask, mask, lo, hi, mask)).fetchone()
                    cleared += owed_n
                    cleared_bytes += owed_b
                    freed_rows += only_n
                    freed_bytes += only_b
                conn.executemany("DELETE FROM outbox WHERE seq BETWEEN ? AND ? AND owed=?",
                                 [(lo, hi, mask) for lo, hi in runs])
                conn.executemany("UPDATE outbox SET owed=owed & ? WHERE seq BETWEEN ? AND ? AND owed & ?",
                                 [(~mask, lo, hi, mask) for lo, hi in runs])
            if self._deferred:
                conn.executemany("DELETE FROM deferred WHERE bit=? AND seq BETWEEN ? AND ?",
                                 [(lk.bit, lo, hi) for lo, hi in runs])

        if not self._write(delete):
            return  # the disk is full: the rows stay and are sent again (at least once)
        conn = self.conn
        if single:
            # Rows evicted while in flight are gone already: account only what this call removed.
            if cleared == len(rows):
                self._bytes -= sum(r.size for r in rows)
                self._depth -= cleared
            else:
                self._bytes, self._depth = conn.execute("SELECT COALESCE(SUM(size),0), COUNT(*) FROM outbox").fetchone()
            deleted = cleared
        else:
            self._bytes -= freed_bytes
            self._depth -= freed_rows
            deleted = freed_rows
        self._link_depth[lk.bit] -= cleared
        self._link_bytes[lk.bit] = self._bytes if single else self._link_bytes[lk.bit] - cleared_bytes
        self._link_oldest.pop(lk.bit, None)
        if self._deferred:
            self._deferred = conn.execute("SELECT COUNT(*) FROM deferred").fetchone()[0]
        self.acked += deleted
        if self.full and self._bytes <= int(self._cap() * 0.9):
            self.full = False
            log.info("buffer.not_full", evicted=dict(self._episode), bytes=self._bytes, max_bytes=self.max_bytes)
            self._episode.clear()

    def defer(self, rows: list[Row], delay: float, link: str | None = None) -> None:
        """The broker of `link` refused the rows: keep them, try that link again after `delay`
        seconds (other links are not held back)."""
        if not rows:
            return
        bit, due = self.link(link).bit, self.now() + delay
        if self._write(lambda conn: conn.executemany(
                "INSERT INTO deferred (bit, seq, not_before, attempts) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (bit, seq) DO UPDATE SET not_before=excluded.not_before, attempts=attempts+1",
                [(bit, r.seq, due) for r in rows])):
            self._deferred = self.conn.execute("SELECT COUNT(*) FROM deferred").fetchone()[0]

    def next_due(self, link: str | None = None) -> float | None:
        """When (on the buffer's clock, `now()`) the earliest row deferred for `link` becomes due
        again (None if none is deferred)."""
        if not self._deferred:
            return None
        row = self.conn.execute("SELECT MIN(not_before) FROM deferred WHERE bit=? AND not_before>0",
                                (self.link(link).bit,)).fetchone()
        return row[0] if row and row[0] else None

    def refused_count(self, link: str | None = None) -> int:
        """Rows a broker refused at least once, still waiting: for `link`, or (no link given)
        for any link."""
        if not self._deferred:
            return 0
        if link is None:
            return self.conn.execute("SELECT COUNT(DISTINCT seq) FROM deferred").fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM deferred WHERE bit=?", (self.link(link).bit,)).fetchone()[0]

    # ----- rule state (written with the records in `append`) -----

    def load_state(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM state")}

    # ----- inspection -----

    # Read-only views of counters that the writing methods keep in step.
    depth = property(lambda self: self._depth, doc="rows waiting for at least one upstream")
    bytes = property(lambda self: self._bytes, doc="their size, as counted for the cap")
    next_seq = property(lambda self: self._next_seq, doc="the seq the next record gets")
    dropped_total = property(lambda self: self._dropped_total, doc="records evicted or lost, ever (persisted)")

    def oldest_ts(self, link: str | None = None) -> float | None:
        """The measurement time of the oldest row waiting (for `link`: owed to it)."""
        if link is None or len(self.links) == 1:
            return self.conn.execute("SELECT MIN(ts) FROM outbox").fetchone()[0]
        lk = self.link(link)
        if lk.bit not in self._link_oldest:  # kept until an ack or an eviction for it, or an older row
            self._link_oldest[lk.bit] = self.conn.execute("SELECT MIN(ts) FROM outbox WHERE owed & ?",
                                                          (lk.mask,)).fetchone()[0]
        return self._link_oldest[lk.bit]

    def link_depth(self, link: str | None = None) -> int:
        """Rows owed to `link` (default: the first)."""
        return self._link_depth.get(self.link(link).bit, 0)

    def link_bytes(self, link: str | None = None) -> int:
        """The size of the rows owed to `link` (default: the first), as counted for the cap."""
        return self._link_bytes.get(self.link(link).bit, 0)

    def by_upstream(self) -> dict[str, dict[str, Any]]:
        out = {}
        for lk in self.links:
            oldest = self.oldest_ts(lk.name)
            out[lk.name] = {"depth": self.link_depth(lk.name), "bytes": self.link_bytes(lk.name), "oldest_ts": iso_ts(oldest) if oldest else None,
                            "oldest_age_s": round(time.time() - oldest, 3) if oldest else None,
                            "refused": self.refused_count(lk.name), "dropped": self.dropped_by_link[lk.name]}
        return out

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
            "by_upstream": self.by_upstream(),
        }

    def dump(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        if "deferred" in self._tables():
            attempts = "(SELECT COALESCE(MAX(attempts), 0) FROM deferred d WHERE d.seq=outbox.seq)"
        else:  # a file no version with links has opened yet
            attempts = "attempts"
        owed = "owed" if "owed" in self._columns() else "1"
        sql = f"SELECT seq, topic, retain, kind, {attempts}, {owed}, payload FROM outbox ORDER BY priority DESC, seq"
        params: tuple = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        for seq, topic, retain, kind, tries, mask, payload in self.conn.execute(sql, params):
            yield {"seq": seq, "topic": topic, "retain": bool(retain), "kind": kind, "attempts": tries,
                   "owed": [lk.name for lk in self.links if mask & lk.mask],
                   **({"encoded": payload[1:]} if payload[:1] == ENCODED else {"payload": json.loads(payload)})}
