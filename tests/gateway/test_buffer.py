"""The SQLite outbox on a real file: seq, priorities, eviction, state, corruption, durability."""

from __future__ import annotations

import json
import sqlite3

from gateway.buffer import Buffer
from gateway.model import Record


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
