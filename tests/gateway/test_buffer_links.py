"""One outbox, several upstreams: each link has its own cursor (a bit in `owed`), on a real file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

from gateway.buffer import Buffer
from gateway.model import Record

TWO = [("scada", None), ("cloud", None)]


def recs(n: int, kind: str = "data", start: float = 1_700_000_000.0) -> list[Record]:
    topic = {"alarm": "alarms/x", "event": "events/x", "values": "values/dev"}.get(kind, f"{kind}/x")
    return [Record(topic, {"i": i}, start + i, kind=kind, retain=kind == "alarm") for i in range(n)]


def seqs(rows) -> list[int]:
    return [r.seq for r in rows]


def test_a_row_leaves_only_when_every_link_has_it(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw", links=TWO)
    b.append(recs(5))
    assert b.depth == 5 and b.link_depth(0) == 5 and b.link_depth(1) == 5
    b.ack(b.fetch({}, 100, link=0), link=0)
    assert b.depth == 5 and b.link_depth(0) == 0 and b.link_depth(1) == 5
    assert b.fetch({}, 100, link=0) == []  # nothing left for scada ...
    assert seqs(b.fetch({}, 100, link=1)) == [1, 2, 3, 4, 5]  # ... everything still there for cloud
    b.ack(b.fetch({}, 3, link=1), link=1)
    assert b.depth == 2 and b.link_depth(1) == 2
    b.ack(b.fetch({}, 100, link=1), link=1)
    assert b.depth == 0 and b.bytes == 0
    assert b.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def test_kinds_decide_who_is_owed(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw", links=[("cloud", frozenset({"data", "alarm"})),
                                               ("scada", frozenset({"values", "alarm"}))])
    b.append(recs(2, "data") + recs(2, "values") + recs(1, "alarm") + recs(1, "event"))  # nobody takes events
    assert b.depth == 5
    assert sorted(r.topic for r in b.fetch({}, 100, link=0)) == ["alarms/x", "data/x", "data/x"]
    assert sorted(r.topic for r in b.fetch({}, 100, link=1)) == ["alarms/x", "values/dev", "values/dev"]
    b.ack(b.fetch({}, 100, link=1), link=1)
    assert b.depth == 3 and sorted(r.topic for r in b.fetch({}, 100, link=0)) == ["alarms/x", "data/x", "data/x"]


def test_a_refusal_holds_back_only_its_own_link(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw", links=TWO)
    b.append(recs(3))
    rows = b.fetch({}, 10, link=0)
    b.defer(rows[:1], 60, link=0)
    assert seqs(b.fetch({}, 10, link=0)) == [2, 3]
    assert seqs(b.fetch({}, 10, link=1)) == [1, 2, 3]
    assert b.next_due(0) is not None and b.next_due(1) is None
    assert b.refused_count(0) == 1 and b.refused_count(1) == 0 and b.refused_count() == 1
    b.ack(b.fetch({}, 10, link=1), link=1)
    assert b.depth == 3  # scada still owes all three
    b.ack(rows, link=0)  # later the broker took it after all
    assert b.depth == 0 and b.refused_count() == 0


def test_reopen_keeps_each_cursor_and_a_removed_link_gives_up_its_rows(tmp_path):
    path = tmp_path / "b.db"
    b = Buffer(path, "gw", links=TWO)
    b.append(recs(4))
    b.ack(b.fetch({}, 2, link=1), link=1)  # cloud has 1, 2; scada has nothing
    b.close()
    b = Buffer(path, "gw", links=TWO)
    assert (b.link_depth(0), b.link_depth(1)) == (4, 2)
    assert seqs(b.fetch({}, 10, link=1)) == [3, 4]
    b.close()
    b = Buffer(path, "gw", links=[("cloud", None)])  # scada left the configuration
    assert b.depth == 2 and b.link_depth(0) == 2 and seqs(b.fetch({}, 10)) == [3, 4]
    b.append(recs(1))
    assert b.depth == 3


def test_one_link_renamed_keeps_its_rows(tmp_path):
    path = tmp_path / "b.db"
    b = Buffer(path, "gw")
    b.append(recs(3))
    b.close()
    b = Buffer(path, "gw", links=[("plant", None)])
    assert b.depth == 3 and seqs(b.fetch({}, 10)) == [1, 2, 3]


def test_a_new_link_is_owed_what_is_written_from_then_on(tmp_path):
    path = tmp_path / "b.db"
    b = Buffer(path, "gw", links=[("cloud", None)])
    b.append(recs(2))
    b.close()
    b = Buffer(path, "gw", links=[("cloud", None), ("scada", None)])
    b.append(recs(1))
    assert seqs(b.fetch({}, 10, link=0)) == [1, 2, 3]
    assert seqs(b.fetch({}, 10, link=1)) == [3]


def test_a_file_from_the_one_upstream_version_is_taken_over(tmp_path):
    """The schema before links: not_before/attempts columns, no owed. Every row is owed to every
    link, and a refusal counted then is still counted."""
    path = tmp_path / "b.db"
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE "outbox" ("seq" INTEGER PRIMARY KEY, "topic" TEXT, "payload" BLOB, "retain" INTEGER,'
                 ' "priority" INTEGER, "kind" TEXT, "ts" REAL, "size" INTEGER, "not_before" FLOAT DEFAULT 0.0,'
                 ' "attempts" INTEGER DEFAULT 0)')
    conn.execute('CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT)')
    conn.execute('CREATE TABLE "state" ("key" TEXT PRIMARY KEY, "value" TEXT)')
    for seq in (1, 2, 3):
        payload = json.dumps({"gateway": "gw", "seq": seq}).encode()
        conn.execute("INSERT INTO outbox VALUES (?,?,?,?,?,?,?,?,?,?)",
                     (seq, "data/x", payload, 0, 0, "data", 1.7e9 + seq, 100, 0.0, 1 if seq == 2 else 0))
    conn.execute("INSERT INTO meta VALUES ('last_seq', '3')")
    conn.commit()
    conn.close()
    b = Buffer(path, "gw", links=TWO)
    assert b.depth == 3 and (b.link_depth(0), b.link_depth(1)) == (3, 3)
    assert b.refused_count(0) == 1
    assert seqs(b.fetch({}, 10, link=0)) == [1, 2, 3] and seqs(b.fetch({}, 10, link=1)) == [1, 2, 3]
    assert b.append(recs(1)) == [4]


def test_eviction_counts_what_each_upstream_never_got(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw", max_bytes=64 * 1024, links=TWO)
    for _ in range(40):
        b.append(recs(50))
        b.ack(b.fetch({}, 50, link=0), link=0)  # scada keeps up, cloud is away
    assert b.dropped["data"] > 0
    assert b.dropped_by_link["cloud"] == b.dropped["data"]
    assert b.dropped_by_link["scada"] < b.dropped_by_link["cloud"]
    stats = b.stats()["by_upstream"]
    assert stats["cloud"]["depth"] == b.link_depth(1) == b.depth
    assert stats["cloud"]["dropped"] == b.dropped_by_link["cloud"]
    assert stats["scada"]["depth"] == b.link_depth(0)


def test_stats_show_depth_and_oldest_per_upstream(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw", links=TWO)
    b.append(recs(3, start=1_700_000_000.0))
    b.ack(b.fetch({}, 2, link=0), link=0)
    stats = b.stats()["by_upstream"]
    assert stats["scada"]["depth"] == 1 and stats["scada"]["oldest_ts"].startswith("2023-11-14T22:13:22")
    assert stats["cloud"]["depth"] == 3 and stats["cloud"]["oldest_ts"].startswith("2023-11-14T22:13:20")
    ro = Buffer(tmp_path / "b.db", "gw", readonly=True)
    assert ro.stats()["by_upstream"]["scada"]["depth"] == 1
    assert [d["owed_to"] for d in ro.dump()] == [["cloud"], ["cloud"], ["scada", "cloud"]]


def test_acks_of_each_link_survive_a_kill(tmp_path):
    """A process acks for one link and is killed with SIGKILL: the next open sees that link's
    cursor where the last committed ack left it, and the other link still owed everything."""
    path = tmp_path / "b.db"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from gateway.buffer import Buffer
        from gateway.model import Record
        b = Buffer({str(path)!r}, "gw", links=[("scada", None), ("cloud", None)])
        b.append([Record("data/x", {{"i": i}}, 1.7e9 + i) for i in range(100)])
        b.ack(b.fetch({{}}, 60, link=0), link=0)
        print("acked", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=os.getcwd())
    assert done.returncode == -signal.SIGKILL and "acked" in done.stdout, done.stderr
    b = Buffer(path, "gw", links=TWO)
    assert b.depth == 100 and b.link_depth(0) == 40 and b.link_depth(1) == 100
    assert seqs(b.fetch({}, 1000, link=0)) == list(range(61, 101))
