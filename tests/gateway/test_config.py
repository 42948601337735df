"""Configuration: a table of broken files, each with the exact FILE:LINE: path line expected."""

from __future__ import annotations


import pytest

from gateway import config
from tests.conftest import run_cli

BASE = """\
gateway:
  id: gw1
  state_dir: {state}
upstream:
  host: 127.0.0.1
  port: 1883
"""


def write(tmp_path, body: str, name: str = "gw.yaml"):
    path = tmp_path / name
    path.write_text(BASE.format(state=tmp_path) + body)
    return path


BROKEN = [
    # (extra YAML after BASE, expected line number, dotted path, fragment of the message)
    ("buffer:\n  max_bytes: 12zz\n", 8, "buffer.max_bytes", "invalid size"),
    ("upstream2: {}\n", 7, "upstream2", "unknown key"),
    ("summaries:\n  interval: soon\n", 8, "summaries.interval", "invalid duration"),
    ("summaries:\n  interval: 10s\n  colour: red\n", 9, "summaries.colour", "unknown key"),
    ("buffer:\n  durability: sometimes\n", 8, "buffer.durability", "'normal' or 'full'"),
    ("devices:\n  - name: bad name\n    driver: modbus\n    host: h\n    tags: []\n", 8, "devices.0.name", "pattern"),
    ("devices:\n  - name: d1\n    driver: teleport\n", 9, "devices.0.driver", "unknown driver 'teleport'"),
    ("devices:\n  - name: d1\n    driver: modbus\n    host: h\n    port: 99999\n    tags: []\n", 11,
     "devices.0.port", "less than or equal"),
    ("devices:\n  - name: d1\n    driver: modbus\n    host: h\n    tags: [{name: t, address: 0}]\n"
     "  - name: d1\n    driver: modbus\n    host: h\n    tags: [{name: t, address: 0}]\n", 12, "devices.1.name",
     "duplicate name"),
    ("rules:\n  - {name: r1, type: threshold, input: nowhere.tag, above: 1}\n", 8, "rules.0.input", "unknown input"),
    ("rules:\n  - name: r1\n    type: threshold\n    input: a.b\n    above: 1\n    wobble: 2\n", 12,
     "rules.0.wobble", "unknown key"),
    ("analyses:\n  - name: a1\n    input: nodev.accel\n    features: [rms]\n", 9, "analyses.0.input",
     "not a waveform tag"),
]


@pytest.mark.parametrize("body,line,path,fragment", BROKEN, ids=[b[2] for b in BROKEN])
def test_broken_configs_report_file_line_path(tmp_path, body, line, path, fragment):
    cfg_file = write(tmp_path, body)
    with pytest.raises(config.ConfigError) as err:
        config.load(cfg_file)
    expected = f"{cfg_file}:{line}: {path}: "
    matching = [p for p in err.value.problems if p.startswith(expected)]
    assert matching, f"expected a line starting {expected!r}, got {err.value.problems}"
    assert fragment in matching[0]


def test_all_errors_at_once_across_included_files(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-a.yaml").write_text("summaries:\n  interval: never\n")
    (tmp_path / "conf.d" / "20-b.yaml").write_text("analyses:\n  - name: a1\n    input: x.y\n    windoww: 3\n")
    main = write(tmp_path, "include: [conf.d/*.yaml]\nbuffer:\n  max_bytes: lots\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    problems = err.value.problems
    assert f"{main}:9: buffer.max_bytes: invalid size 'lots': expected e.g. 64MiB, 1GiB, 500MB" in problems
    assert any(p.startswith(f"{tmp_path}/conf.d/10-a.yaml:2: summaries.interval: ") for p in problems)
    assert any(p.startswith(f"{tmp_path}/conf.d/20-b.yaml:4: analyses.0.windoww: unknown key") for p in problems)


def test_include_lists_append_and_keep_their_own_lines(tmp_path):
    (tmp_path / "rules.yaml").write_text("rules:\n  - {name: r2, type: threshold, input: ghost.t, above: 1}\n")
    main = write(tmp_path, "include: [rules.yaml]\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    assert err.value.problems == [f"{tmp_path}/rules.yaml:2: rules.0.input: unknown input 'ghost.t' "
                                  "(expected device.tag or analysis.feature)"]


def test_yaml_syntax_error_and_missing_include(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway:\n  id: [unclosed\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(bad)
    assert err.value.problems[0].startswith(f"{bad}:")
    main = write(tmp_path, "include: [missing.yaml]\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    assert err.value.problems == [f"{main}:7: include.0: no such file: missing.yaml"]


def test_duplicate_yaml_key_is_an_error(tmp_path):
    main = write(tmp_path, "buffer:\n  durability: full\n  durability: normal\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    assert f"{main}:9: buffer.durability: duplicate key" in err.value.problems


def test_values_durations_sizes_and_env_override(tmp_path, monkeypatch):
    main = write(tmp_path, "buffer:\n  max_bytes: 64MiB\nsummaries:\n  interval: 500ms\n")
    monkeypatch.setenv("EDGE_GATEWAY__UPSTREAM__PORT", "1884")
    monkeypatch.setenv("EDGE_GATEWAY__UPSTREAM__USERNAME", "line1")
    cfg = config.load(main)
    assert cfg.buffer.max_bytes == 64 * 2**20
    assert cfg.summaries.interval == 0.5
    assert cfg.upstream.port == 1884 and cfg.upstream.username == "line1"
    assert cfg.upstream.host == "127.0.0.1"  # untouched keys keep the file's value
    assert cfg.topic_prefix == "edge/gw1" and cfg.client_id == "gw1"
    monkeypatch.setenv("EDGE_GATEWAY__UPSTREAM__PORT", "not-a-port")
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    assert err.value.problems[0].startswith("$EDGE_GATEWAY__UPSTREAM__PORT: upstream.port: ")


def test_password_file_secret(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    main = write(tmp_path, f"  username: u\n  password_file: {secret}\n")
    assert config.load(main).upstream.resolved_password() == "s3cret"
    main = write(tmp_path, f"  username: u\n  password_file: {tmp_path}/nope\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    assert err.value.problems[0].startswith(f"{main}:4: upstream: cannot read secret file")


def test_check_config_cli_exit_codes(tmp_path):
    good = write(tmp_path, "")
    ok = run_cli("check-config", "-c", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "gateway gw1: configuration is valid" in ok.stdout and "devices   0" in ok.stdout
    bad = write(tmp_path, "buffer:\n  max_bytes: 12zz\n  nope: 1\n", name="bad.yaml")
    res = run_cli("check-config", "-c", str(bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert f"{bad}:8: buffer.max_bytes: invalid size '12zz': expected e.g. 64MiB, 1GiB, 500MB" in lines
    assert f"{bad}:9: buffer.nope: unknown key" in lines


def test_shipped_configs_are_valid():
    from tests.conftest import REPO

    for name in ("example.yaml", "demo.yaml"):
        res = run_cli("check-config", "-c", str(REPO / "config" / name))
        assert res.returncode == 0, res.stderr
        assert "configuration is valid" in res.stdout
