"""`upstreams:` in the configuration: the list form, its errors as FILE:LINE, check-config, and
`buffer stats` per upstream."""

from __future__ import annotations

import json

import pytest

from gateway import config
from gateway.buffer import Buffer
from gateway.model import Record
from tests.conftest import run_cli

HEAD = """\
gateway:
  id: gw1
  state_dir: {state}
"""

TWO = """\
upstreams:
  - name: cloud
    host: cloud.example
    port: 8883
    tls: {{ca_file: {ca}}}
  - name: scada
    host: 10.0.0.5
    format: sparkplug
    group_id: plant1
    primary_host_id: ignition
"""


def write(tmp_path, body: str):
    path = tmp_path / "gw.yaml"
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked at load\n")
    path.write_text(HEAD.format(state=tmp_path) + body.format(ca=ca))
    return path


def test_the_list_form(tmp_path):
    cfg = config.load(write(tmp_path, TWO))
    assert [u.name for u in cfg.all_upstreams] == ["cloud", "scada"]
    assert cfg.upstream is cfg.upstreams[0]  # code that knows one upstream sees the first
    assert [cfg.client_id_of(u) for u in cfg.all_upstreams] == ["gw1", "gw1-scada"]
    assert cfg.upstreams[1].format == "sparkplug" and cfg.upstreams[1].group_id == "plant1"
    assert cfg.client_id == "gw1" and cfg.topic_prefix == "edge/gw1"


def test_the_one_upstream_form_is_a_list_of_one(tmp_path):
    cfg = config.load(write(tmp_path, "upstream:\n  host: h\n"))
    assert [(u.name, u.format, cfg.client_id_of(u)) for u in cfg.all_upstreams] == [("upstream", "json", "gw1")]


BROKEN = [
    ("upstream:\n  host: a\nupstreams:\n  - {{name: b}}\n", 6, "upstreams", "give upstream or upstreams, not both"),
    ("upstreams:\n  - {{name: a}}\n  - {{name: a, port: 1884}}\n", 6, "upstreams.1.name", "duplicate name 'a'"),
    ("upstreams:\n  - {{name: a}}\n  - {{name: s, format: sparkplug}}\n", 6, "upstreams.1.group_id",
     "required with format: sparkplug"),
    ("upstream:\n  format: sparkplug\n", 4, "upstream.group_id", "required with format: sparkplug"),
    ("upstreams:\n  - {{name: s, format: sparkplug, group_id: 'a/b'}}\n", 5, "upstreams.0.group_id", "without / + #"),
    ("upstreams:\n  - {{name: a, format: opcua}}\n", 5, "upstreams.0.format", "'json' or 'sparkplug'"),
    ("upstreams:\n  - {{name: 'no spaces'}}\n", 5, "upstreams.0.name", "pattern"),
]


@pytest.mark.parametrize("body,line,path,fragment", BROKEN, ids=[b[2] + "-" + b[3][:12] for b in BROKEN])
def test_errors_name_file_line_and_path(tmp_path, body, line, path, fragment):
    main = write(tmp_path, body)
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    expected = f"{main}:{line}: {path}: "
    matching = [p for p in err.value.problems if p.startswith(expected)]
    assert matching, f"expected a line starting {expected!r}, got {err.value.problems}"
    assert fragment in matching[0]


def test_check_config_lists_each_upstream_with_its_format(tmp_path):
    res = run_cli("check-config", "-c", str(write(tmp_path, TWO)))
    assert res.returncode == 0, res.stderr
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip().startswith("upstream")]
    assert lines[0].startswith("upstream cloud  mqtts://cloud.example:8883") and "json, topics under edge/gw1/" in lines[0]
    assert lines[1].startswith("upstream scada  mqtt://10.0.0.5:1883") and "sparkplug, group plant1" in lines[1]
    assert "client id gw1-scada" in lines[1] and len(lines) == 2


def test_buffer_stats_per_upstream(tmp_path):
    main = write(tmp_path, "upstreams:\n  - {{name: a}}\n  - {{name: b, port: 1884}}\n")
    cfg = config.load(main)
    b = Buffer(cfg.buffer_path, "gw1")
    b.set_links([("a", None), ("b", None)])
    b.append([Record("data/p1", {"i": i}, 1_790_000_000.0 + i) for i in range(3)])
    b.ack(b.fetch({}, 2, link="a"), link="a")
    b.close()
    res = run_cli("buffer", "stats", "--json", "-c", str(main))
    assert res.returncode == 0, res.stderr
    per = json.loads(res.stdout)["by_upstream"]
    assert per["a"]["depth"] == 1 and per["b"]["depth"] == 3
    assert per["a"]["oldest_ts"] == "2026-09-21T14:13:22.000Z" and per["b"]["oldest_ts"] == "2026-09-21T14:13:20.000Z"
    text = run_cli("buffer", "stats", "-c", str(main)).stdout
    assert "upstream a" in text and "depth 1, oldest 2026-09-21T14:13:22.000Z" in text
