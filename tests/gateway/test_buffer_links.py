"""Several upstreams over one SQLite buffer: owed bits, per-link ack/defer/eviction, reopen, removal."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time

import pytest

from gateway.buffer import Buffer, BufferError
from gateway.model import Record

JSON = None  # every kind but `values`
SPB = frozenset({"values", "features", "alarms", "events"})


def rec(topic: str, i: int = 0, kind: str | None = None) -> Record:
    kind = kind or {"alarms": "alarm", "events": "event", "features": "features"}.get(topic.split("/")[0], "data")
    return Record(topic, {"i": i}, time.time(), kind=kind)


def seqs(rows) -> list[int]:
    return [r.seq for r in rows]


def owed_column(path) -> dict[int, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT seq, owed FROM outbox"))


def test_rows_are_owed_by_kind_and_leave_when_every_taker_acked(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw1")
    b.set_links([("cloud", JSON), ("scada", SPB)])
    data, value, alarm = b.append([rec("data/p1"), rec("values/p1"), rec("alarms/hot")])
    assert seqs(b.fetch({}, 10, link="cloud")) == [alarm, data]  # priority first; no values
    assert seqs(b.fetch({}, 10, link="scada")) == [alarm, value]  # no summaries
    assert (b.link_depth("cloud"), b.link_depth("scada"), b.depth) == (2, 2, 3)

    b.ack(b.fetch({}, 10, link="cloud"), link="cloud")
    # data went (only cloud took it); the alarm waits for scada
    assert b.depth == 2 and b.link_depth("cloud") == 0 and b.link_depth("scada") == 2
    assert seqs(b.fetch({}, 10, link="cloud")) == []
    assert owed_column(tmp_path / "b.db") == {value: 2, alarm: 2}
    assert b.link_bytes("cloud") == 0 and b.link_bytes("scada") == b.bytes > 0
    before = b.bytes
    b.ack(b.fetch({}, 10, link="scada"), link="scada")
    assert b.depth == 0 and b.bytes == 0 < before and owed_column(tmp_path / "b.db") == {}
    assert b.stats()["by_upstream"]["scada"]["depth"] == 0


def test_ack_twice_or_after_eviction_counts_once(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw1")
    b.set_links([("a", JSON), ("b", JSON)])
    b.append([rec("data/p1", i) for i in range(4)])
    rows = b.fetch({}, 10, link="a")
    b.ack(rows, link="a")
    b.ack(rows, link="a")  # a duplicate PUBACK path: nothing more to clear
    assert b.link_depth("a") == 0 and b.link_depth("b") == 4 and b.depth == 4
    b.ack(rows, link="b")
    assert b.depth == 0 and b.bytes == 0 and b.acked == 4


def test_a_refusal_defers_the_row_for_that_link_only(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw1")
    b.set_links([("a", JSON), ("b", JSON)])
    s1, s2 = b.append([rec("data/p1", 1), rec("data/p1", 2)])
    first = b.fetch({}, 1, link="a")
    b.defer(first, 60, link="a")
    assert seqs(b.fetch({}, 10, link="a")) == [s2]
    assert seqs(b.fetch({}, 10, link="b")) == [s1, s2]
    assert b.refused_count("a") == 1 and b.refused_count("b") == 0 and b.refused_count() == 1
    assert b.next_due("a") > b.now() and b.next_due("b") is None
    b.ack(b.fetch({}, 10, link="b"), link="b")
    assert b.depth == 2  # still owed to a
    b.ack(first, link="a")  # acked later (after a retry): its deferral goes with it
    assert b.refused_count() == 0 and b.depth == 1


def test_eviction_is_oldest_first_alarms_last_and_counted_per_link(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw1", max_bytes=1 << 16)
    b.set_links([("up", JSON), ("down", JSON)])
    alarm = b.append([Record("alarms/hot", {"pad": "x" * 200}, time.time(), kind="alarm", retain=True)])[0]
    n = 0
    while not b.dropped_total:
        b.append([Record("data/p1", {"i": n, "pad": "x" * 200}, time.time()) for _ in range(10)])
        n += 10
        b.ack(b.fetch({}, 1000, link="up"), link="up")  # `up` keeps up; `down` is away
        assert n < 10_000
    assert b.dropped["data"] > 0 and not b.dropped["alarm"]
    assert b.dropped_by_link["down"] == b.dropped["data"] and b.dropped_by_link["up"] == 0
    left = seqs(b.fetch({}, 100_000, link="down"))
    assert left[0] == alarm and left[1:] == sorted(left[1:]) and left[1] > alarm + 1  # oldest data went
    assert b.link_depth("down") == len(left) == b.depth and b.link_bytes("down") == b.bytes
    assert b.link_bytes("up") == 0
    assert b.stats()["by_upstream"]["down"]["dropped"] == b.dropped_by_link["down"]


def _writer(path: str, ready) -> None:
    b = Buffer(path, "gw1")
    b.set_links([("a", JSON), ("b", SPB)])
    b.append([rec("data/p1", i) for i in range(3)] + [rec("alarms/hot"), rec("values/p1")])
    b.ack(b.fetch({}, 2, link="a"), link="a")  # alarm and data 0 reached a
    ready.set()
    time.sleep(60)  # killed here


def test_links_survive_a_kill(tmp_path):
    path = str(tmp_path / "b.db")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_writer, args=(path, ready))
    proc.start()
    try:
        assert ready.wait(30)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(10)
    b = Buffer(path, "gw1")
    b.set_links([("a", JSON), ("b", SPB)])
    assert b.link_depth("a") == 2 and b.link_depth("b") == 2 and b.depth == 4
    assert [r.topic for r in b.fetch({}, 10, link="a")] == ["data/p1", "data/p1"]
    assert [r.topic for r in b.fetch({}, 10, link="b")] == ["alarms/hot", "values/p1"]
    oldest = b.oldest_ts("b")
    assert oldest is not None and b.stats()["by_upstream"]["a"]["oldest_ts"]


def test_a_buffer_from_before_links_is_owed_to_every_taker(tmp_path):
    path = tmp_path / "b.db"
    old = Buffer(path, "gw1")  # no set_links: one default link, as a one-upstream version wrote it
    old.append([rec("data/p1"), rec("alarms/hot")])
    old.defer(old.fetch({}, 1), 60)  # the alarm was refused once
    old.close()
    with sqlite3.connect(path) as conn:  # undo what this version added: the schema of the last release
        conn.execute("DROP TABLE links")
        conn.execute("DROP TABLE deferred")
        conn.execute("ALTER TABLE outbox DROP COLUMN owed")
        conn.execute("ALTER TABLE outbox ADD COLUMN not_before REAL DEFAULT 0")
        conn.execute("ALTER TABLE outbox ADD COLUMN attempts INTEGER DEFAULT 0")
        conn.execute("UPDATE outbox SET attempts=1 WHERE topic='alarms/hot'")
    b = Buffer(path, "gw1")
    assert b.refused_count() == 1
    b.set_links([("cloud", JSON), ("scada", SPB)])
    assert b.link_depth("cloud") == 2 and b.link_depth("scada") == 1  # scada takes the alarm, not the summary
    assert b.refused_count("cloud") == 1 and b.refused_count("scada") == 0


def test_a_removed_link_frees_its_rows(tmp_path, capsys):
    path = tmp_path / "b.db"
    b = Buffer(path, "gw1")
    b.set_links([("a", JSON), ("b", JSON), ("c", SPB)])
    b.append([rec("data/p1", i) for i in range(5)] + [rec("alarms/hot")])
    b.ack(b.fetch({}, 10, link="a"), link="a")
    b.close()
    b = Buffer(path, "gw1")
    b.set_links([("a", JSON), ("c", SPB)])  # b is gone: its data rows (only it still wanted) go
    assert b.depth == 1 and b.link_depth("c") == 1 and b.link_depth("a") == 0
    assert "buffer.link_removed" in capsys.readouterr().out
    b.set_links([("a", JSON), ("c", SPB), ("d", JSON)])  # a new link is owed what comes from now on
    assert b.link_depth("d") == 0
    new = b.append([rec("data/p1")])[0]
    assert seqs(b.fetch({}, 10, link="d")) == [new]
    with pytest.raises(BufferError):
        b.fetch({}, 10, link="b")


def test_the_one_upstream_form_renamed_keeps_its_backlog(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw1")
    b.set_links([("upstream", JSON)])
    b.append([rec("data/p1", i) for i in range(3)])
    b.set_links([("cloud", JSON), ("scada", SPB)])  # `upstream:` became `upstreams:`
    assert b.link_depth("cloud") == 3 and b.depth == 3 and b.link_depth("scada") == 0


def test_a_kind_nobody_takes_is_not_stored(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw1")
    b.set_links([("cloud", JSON)])
    got = b.append([rec("values/p1"), rec("data/p1")])
    assert got[0] == 0 and got[1] > 0 and b.depth == 1


def test_append_for_one_link(tmp_path):
    b = Buffer(tmp_path / "b.db", "gw1")
    b.set_links([("a", JSON), ("b", JSON)])
    b.append([rec("alarms/hot")], link="b")  # a replay after b reconnected
    assert b.link_depth("a") == 0 and b.link_depth("b") == 1


def test_a_link_whose_kinds_change_gives_up_the_rows_it_no_longer_takes(tmp_path):
    path = tmp_path / "b.db"
    b = Buffer(path, "gw1")
    b.set_links([("a", JSON), ("b", JSON)])
    b.append([rec("data/p1"), rec("alarms/hot")])
    b.close()
    b = Buffer(path, "gw1")
    b.set_links([("a", JSON), ("b", SPB)])  # b became a Sparkplug upstream: no summaries for it
    assert b.link_depth("a") == 2 and b.link_depth("b") == 1
    assert [r.topic for r in b.fetch({}, 10, link="b")] == ["alarms/hot"]
    b.close()
    b = Buffer(path, "gw1")
    b.set_links([("a", JSON), ("b", SPB)])  # unchanged: the same claims
    assert b.link_depth("a") == 2 and b.link_depth("b") == 1


@pytest.mark.parametrize("links", [[("only", JSON)], [("cloud", JSON), ("other", JSON)]])
def test_acks_of_scattered_rows_remove_exactly_those(tmp_path, links):
    """Acks go to SQLite as runs of consecutive seqs: gaps, repeats, rows acked out of order and
    rows evicted meanwhile must each count once, and nothing else may go."""
    import random

    rnd = random.Random(7)
    b = Buffer(tmp_path / "b.db", "gw1")
    b.set_links(links)
    first = links[0][0]
    all_seqs = b.append([rec("data/p1", i) for i in range(300)])
    acked: set[int] = set()
    for _ in range(4):
        rows = b.fetch({}, 300, link=first)
        pick = [r for r in rows if rnd.random() < 0.25]
        pick += pick[:3]  # a repeat
        rnd.shuffle(pick)
        b.ack(pick, link=first)
        acked.update(r.seq for r in pick)
        left = [r.seq for r in b.fetch({}, 300, link=first)]
        assert left == [s for s in all_seqs if s not in acked]
        assert b.link_depth(first) == len(left)
    assert 100 < len(acked) < 300
    if len(links) == 1:
        assert b.depth == 300 - len(acked) and b.acked == len(acked)
    else:  # still owed to the other link: nothing deleted, the other's view is whole
        assert b.depth == 300 and seqs(b.fetch({}, 300, link="other")) == all_seqs
        b.ack(b.fetch({}, 300, link="other"), link="other")
        assert b.depth == 300 - len(acked) and b.bytes > 0
        b.ack(b.fetch({}, 300, link=first), link=first)
        assert b.depth == 0 and b.bytes == 0
