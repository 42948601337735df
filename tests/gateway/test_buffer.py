"""The SQLite outbox on a real file: seq, priorities, eviction, state, corruption, durability."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from gateway import buffer as buffer_mod
from gateway.buffer import Buffer
from gateway.model import Record
from tests.rules.helpers import FakeClock


def recs(n: int, kind: str = "data", start: float = 1_700_000_000.0) -> list[Record]:
    return [Record(f"{'alarms' if kind == 'alarm' else kind}/x", {"i": i, "v": float(i)}, start + i, kind=kind,
                   retain=kind == "alarm") for i in range(n)]


def test_seq_grows_and_survives_reopen(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw")
    assert b.append(recs(3)) == [1, 2, 3]
    rows = b.fetch({}, 10)
    b.ack(rows)
    assert b.depth == 0
    b.close()
    b = Buffer(tmp_path / "b.db", "gw")
    assert b.append(recs(1)) == [4]  # never reused, even after every row was deleted
    payload = json.loads(b.fetch({}, 1)[0].payload)
    assert payload["gateway"] == "gw" and payload["seq"] == 4 and payload["ts"].endswith("Z")


def test_alarms_go_first_then_data_in_seq_order(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw")
    b.append(recs(5))
    b.append(recs(2, "alarm"))
    b.append(recs(2, "event"))
    order = [(r.priority, r.seq) for r in b.fetch({}, 100)]
    assert order == [(2, 6), (2, 7), (1, 8), (1, 9), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]
    # after a cursor, only newer rows of each priority
    assert [r.seq for r in b.fetch({0: 3, 1: 9, 2: 7}, 100)] == [4, 5]


def test_fetch_in_one_step_and_row_by_row_give_the_same_rows(tmp_path, monkeypatch):
    b = Buffer(tmp_path / "b.db", "gw")
    b.append(recs(7))
    b.append(recs(3, "alarm"))
    b.append([Record("data/x", {"blob": "\u00e9\"\\\n" * 50}, 1_700_000_000.0)])  # escapes, non-ASCII
    b.ack(b.fetch({}, 100)[4:6])  # a gap in the data seqs
    b.defer([r for r in b.fetch({}, 100) if r.seq == 9], 60.0)
    cursors = [{}, {0: 2}, {2: 9, 0: 5}]
    one_step = [b.fetch(c, n) for c in cursors for n in (1, 4, 100)]
    monkeypatch.setattr(buffer_mod, "FETCH_ONE_STEP_ROW", 0)
    assert [b.fetch(c, n) for c in cursors for n in (1, 4, 100)] == one_step
    assert [r.seq for r in one_step[2]] == [8, 10, 1, 4, 5, 6, 7, 11]
    assert all(isinstance(r.payload, bytes) and isinstance(r.retain, bool) for r in one_step[2])


def test_eviction_drops_oldest_data_first_and_counts(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw", max_bytes=64 * 1024)
    b.append(recs(20, "alarm"))
    for _ in range(40):
        b.append(recs(50))
    assert b.bytes <= 64 * 1024
    assert b.dropped_total > 0 and b.dropped["data"] == b.dropped_total  # no alarm evicted
    kinds = [r.priority for r in b.fetch({}, 10_000)]
    assert kinds.count(2) == 20
    data = [r.seq for r in b.fetch({}, 10_000) if r.priority == 0]
    assert data == sorted(data) and data[-1] == b.next_seq - 1  # newest kept, oldest gone
    b.close()
    assert Buffer(tmp_path / "b.db", "gw").dropped_total == b.dropped_total  # persisted


def test_refused_rows_are_kept_and_deferred(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw")
    b.append(recs(3))
    rows = b.fetch({}, 10)
    b.defer(rows[:1], 60)
    assert b.refused_count() == 1 and b.depth == 3
    assert [r.seq for r in b.fetch({}, 10)] == [2, 3]
    assert b.next_due() > 0


def test_refused_retry_waits_monotonic_seconds_whatever_the_wall_clock_does(tmp_path):
    clock = FakeClock()
    b = Buffer(tmp_path / "b.db", "gw", clock=clock)
    b.append(recs(2))
    first, second = b.fetch({}, 10)
    b.defer([first], 60)
    clock.step_wall(3600)  # an NTP step forward does not end the wait
    clock.advance(59)
    assert [r.seq for r in b.fetch({}, 10)] == [second.seq]
    b.defer([second], 60)
    clock.advance(1)
    assert [r.seq for r in b.fetch({}, 10)] == [first.seq] and b.next_due() <= b.now()
    clock.step_wall(-7200)  # a step back does not hold the other one back an hour
    clock.advance(59)
    assert [r.seq for r in b.fetch({}, 10)] == [first.seq, second.seq]
    b.defer([first, second], 60)
    b.close()
    # A retry time of an earlier run is not trusted (the wall clock may have been stepped
    # while the daemon was down): due at once after a restart, and still counted as refused.
    clock.step_wall(-3600)
    again = Buffer(tmp_path / "b.db", "gw", clock=clock)
    assert [r.seq for r in again.fetch({}, 10)] == [first.seq, second.seq]
    assert again.next_due() is None and again.refused_count() == 2


def test_rule_state_written_with_records_atomically(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw")
    b.append(recs(1, "alarm"), state={"r1": {"state": "raised"}, "r2": {"state": "raised"}})
    b.append([], state={"r2": None})
    b.close()
    assert Buffer(tmp_path / "b.db", "gw").load_state() == {"r1": {"state": "raised"}}


def test_nan_never_reaches_the_wire(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw")
    b.append([Record("features/a", {"rms": float("nan"), "x": [1.0, float("inf")]}, 1.0, kind="features")])
    payload = json.loads(b.fetch({}, 1)[0].payload)
    assert payload["rms"] is None and payload["x"] == [1.0, None]


def test_corrupt_file_is_moved_aside_and_seq_continues(tmp_path, capsys):
    path = tmp_path / "b.db"
    b = Buffer(path, "gw")
    b.append(recs(5))
    b.close()
    path.write_bytes(b"this is not a database" * 200)
    b = Buffer(path, "gw")
    assert b.depth == 0
    assert b.append(recs(1))[0] > 5  # the side file keeps seq growing across the replacement
    aside = list(tmp_path.glob("b.db.corrupt-*"))
    assert aside, "the unreadable file must be kept for inspection"
    assert "buffer.corrupt" in capsys.readouterr().out + capsys.readouterr().err or aside


def test_full_durability_sets_synchronous_full(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw", durability="full")
    assert b.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert b.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    b2 = Buffer(tmp_path / "c.db", "gw")
    assert b2.conn.execute("PRAGMA synchronous").fetchone()[0] == 1


def test_readonly_inspection_does_not_write(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw")
    b.append(recs(4))
    ro = Buffer(tmp_path / "b.db", "gw", readonly=True)
    assert ro.stats()["depth"] == 4 and len(list(ro.dump())) == 4
    try:
        ro.append(recs(1))
        raise AssertionError("read-only buffer accepted a write")
    except sqlite3.OperationalError:
        pass


def test_garbage_side_file_and_empty_db_restart_seq_above_every_earlier_one(tmp_path):
    from structlog.testing import capture_logs

    path = tmp_path / "b.db"
    b = Buffer(path, "gw")
    earlier = b.append(recs(500))
    b.ack(b.fetch({}, 1000))
    b.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"b.db{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"")  # emptied to 0 bytes
    (tmp_path / "b.db.seq").write_text("\x00garbage\n")
    with capture_logs() as logged:
        b = Buffer(path, "gw")
    resets = [e for e in logged if e["event"] == "buffer.seq_reset"]
    assert len(resets) == 1 and resets[0]["log_level"] in ("warning", "error")
    assert "side file" in resets[0]["reason"] and resets[0]["next_seq"] == b.next_seq
    first = b.append(recs(1))[0]
    assert first > max(earlier) and first > 1_600_000_000 * 10**6  # from the clock, in microseconds
    b.close()
    # the new start is persisted: a restart continues from it, without another reset
    with capture_logs() as logged:
        b = Buffer(path, "gw")
    assert not [e for e in logged if e["event"] == "buffer.seq_reset"]
    assert b.append(recs(1)) == [first + 1]


def test_corrupt_db_without_side_file_restarts_seq_from_the_clock(tmp_path):
    from structlog.testing import capture_logs

    path = tmp_path / "b.db"
    b = Buffer(path, "gw")
    b.append(recs(5))
    b.close()
    (tmp_path / "b.db.seq").unlink()
    path.write_bytes(b"this is not a database" * 200)
    with capture_logs() as logged:
        b = Buffer(path, "gw")
    resets = [e for e in logged if e["event"] == "buffer.seq_reset"]
    assert len(resets) == 1 and "moved aside" in resets[0]["reason"]
    assert b.append(recs(1))[0] > 1_600_000_000 * 10**6


def test_new_install_starts_at_1_without_a_reset(tmp_path):
    from structlog.testing import capture_logs

    with capture_logs() as logged:
        b = Buffer(tmp_path / "state" / "b.db", "gw")
    assert not [e for e in logged if e["event"] == "buffer.seq_reset"]
    assert b.next_seq == 1 and b.append(recs(2)) == [1, 2]


def test_readonly_next_seq_matches_the_daemon_for_a_drained_buffer(tmp_path):
    path = tmp_path / "b.db"
    b = Buffer(path, "gw")
    b.append(recs(658))
    b.ack(b.fetch({}, 1000))
    assert b.depth == 0
    b.close()
    assert Buffer(path, "gw", readonly=True).stats()["next_seq"] == 659
    assert Buffer(path, "gw").next_seq == 659
    # a replacement file that never held a row: both continue after the side file's mark
    mark = int((tmp_path / "b.db.seq").read_text())
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"b.db{suffix}").unlink(missing_ok=True)
    Buffer(path, "gw").close()  # a new file: schema only, no rows, no meta.last_seq
    assert Buffer(path, "gw", readonly=True).next_seq == Buffer(path, "gw").next_seq == mark + 1


# ----- a full disk, the WAL inside the cap, `buffer.full` on transitions only -----

class SmallDisk:
    """A file system of 2 MiB for the buffer. `how` says which stand-in is used: a tmpfs (needs
    root and mount), else an ext4 image on a loop device, else SQLite's max_page_count on an
    ordinary directory (the database cannot grow past 1 MiB, like a full disk; the WAL is not bounded)."""

    def __init__(self, how: str, where, filler=None) -> None:
        self.how, self.where, self.filler = how, where, filler

    def buffer(self, **kw) -> Buffer:
        b = Buffer(self.where / "b.db", "gw", **kw)
        if self.how == "max_page_count":
            used = b.conn.execute("PRAGMA page_count").fetchone()[0]
            b.conn.execute(f"PRAGMA max_page_count={used + 256}")
        return b

    def free_space(self, b: Buffer) -> None:
        if self.how == "max_page_count":
            b.conn.execute("PRAGMA max_page_count=1000000")
        else:
            self.filler.unlink()


@pytest.fixture
def small_disk(tmp_path):
    import os
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    image = tmp_path / "disk.img"
    tries = [["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]]
    if subprocess.run(["truncate", "-s", "2M", str(image)]).returncode == 0 and \
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True).returncode == 0:
        tries.append(["mount", "-o", "loop", str(image), str(mnt)])
    for how, cmd in zip(("tmpfs", "loop"), tries):
        if os.geteuid() == 0 and subprocess.run(cmd, capture_output=True).returncode == 0:
            filler = mnt / "filler"
            filler.write_bytes(b"\0" * 768 * 1024)  # freed to model space coming back
            try:
                yield SmallDisk(how, mnt, filler)
            finally:
                subprocess.run(["umount", "-l", str(mnt)], check=True)
            return
    yield SmallDisk("max_page_count", mnt)


def padded(n: int, start: int = 0) -> list[Record]:
    return [Record("data/x", {"i": start + i, "pad": "x" * 200}, 1_700_000_000.0 + i) for i in range(n)]


def test_full_disk_evicts_by_policy_keeps_the_newest_and_recovers(small_disk):
    from structlog.testing import capture_logs

    print(f"small disk: {small_disk.how}")
    b = small_disk.buffer(max_bytes=2 << 20, disk_probe_s=0.2)  # the disk fills before the cap
    b.append(recs(5, "alarm"))
    b.append(recs(5, "event"))
    with capture_logs() as logged:
        for n in range(500):  # 2 MiB hold far fewer than 500 batches of ~13 KB
            assert b.append(padded(50, n * 50)), "a batch was lost although old data could be evicted"
            if b.disk_full:
                break
        assert b.disk_full and b.stats()["disk_full"] is True
        at_full = b.depth
        t0 = time.monotonic()
        for n in range(40):  # keeps taking the newest data, evicting the oldest
            seqs = b.append(padded(50))
            assert seqs and seqs[-1] == b.next_seq - 1
            time.sleep(0.01)
        assert b.disk_full, "the disk is still full"
        assert time.monotonic() - t0 < 30
    full = [e for e in logged if e["event"] == "buffer.disk_full"]
    assert len(full) == 1 and "full" in full[0]["error"], full
    assert not any("rollback" in str(e) for e in logged), "the real error was masked"
    assert not [e for e in logged if e["event"] in ("buffer.disk_ok", "buffer.write_lost")]
    assert b.dropped_total > 0 and b.dropped["data"] == b.dropped_total  # data first
    kept = b.fetch({}, 100_000)
    assert sum(r.priority == 2 for r in kept) == 5 and sum(r.priority == 1 for r in kept) == 5
    data = [r.seq for r in kept if r.priority == 0]
    assert data[-1] == b.next_seq - 1 and len(data) >= at_full // 2, "the newest records are kept"
    assert int(b.noted("dropped")) >= b.dropped_total - 50  # persisted, up to the last batch

    small_disk.free_space(b)
    with capture_logs() as logged:
        for n in range(300):
            assert b.append(padded(10))
            if not b.disk_full:
                break
            time.sleep(0.005)
    assert not b.disk_full and b.depth > at_full, "space is back: new data must be taken again"
    events = [e["event"] for e in logged if e["event"].startswith("buffer.disk")]
    assert events == ["buffer.disk_ok"]
    b.close()


def test_database_and_wal_stay_within_max_bytes(tmp_path):
    cap = 1 << 20
    b = Buffer(tmp_path / "b.db", "gw", max_bytes=cap)
    wal = tmp_path / "b.db-wal"
    checkpoints, largest = 0, 0
    t0 = time.monotonic()
    for n in range(600):  # about 8 MB written and half of it acknowledged: a long outage in small
        b.append(padded(50, n * 50))
        if n % 3 == 0:
            b.ack(b.fetch({}, 25))
        size = b.file_bytes()
        largest = max(largest, size)
        # slack: one batch (~13 KB, 4 pages per KB of WAL frames) beyond the WAL limit
        assert size <= cap + 64 * 1024, f"db + wal = {size} after {n} batches"
        if wal.exists() and wal.stat().st_size == 0:
            checkpoints += 1
        assert time.monotonic() - t0 < 60
    assert checkpoints > 10, "the WAL must be checkpointed (TRUNCATE) as it passes its limit"
    assert b.dropped_total > 0 and largest > cap // 2
    free = b.conn.execute("PRAGMA freelist_count").fetchone()[0]
    assert free * 4096 < cap // 4, "freed pages must be reused"


def test_buffer_full_is_logged_on_the_transitions_only(tmp_path):
    from structlog.testing import capture_logs

    b = Buffer(tmp_path / "b.db", "gw", max_bytes=256 * 1024)
    with capture_logs() as logged:
        for n in range(100):
            b.append(padded(20, n * 20))
        assert b.full and b.dropped_total > 100
        while b.depth:
            b.ack(b.fetch({}, 200))
        assert not b.full
        for n in range(100):
            b.append(padded(20))
    events = [e["event"] for e in logged if e["event"] in ("buffer.full", "buffer.not_full")]
    assert events == ["buffer.full", "buffer.not_full", "buffer.full"]
    ended = [e for e in logged if e["event"] == "buffer.not_full"][0]
    assert sum(ended["evicted"].values()) > 100
