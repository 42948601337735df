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
    ("devices:\n  - name: d1\n    driver: modbus\n    host: h\n    tags:\n      - {name: t, address: 0, count: 3}\n"
     "      - {name: t_1, address: 10}\n", 13, "devices.0.tags.1.name",
     "duplicate tag name 't_1': also made by the range 't' (count 3) at tags.0"),
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
    # the line of the password_file key, not the upstream: line above it
    assert err.value.problems == [f"{main}:8: upstream.password_file: cannot read secret file {tmp_path}/nope: "
                                  "No such file or directory"]
    main = write(tmp_path, f"  password: pw\n  password_file: {secret}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    assert err.value.problems == [f"{main}:4: upstream: give password or password_file, not both"]


def test_password_file_of_an_mqtt_device_is_checked_at_load(tmp_path):
    main = write(tmp_path, "devices:\n  - name: m1\n    driver: mqtt\n    password_file: /nonexistent/pw\n"
                           "    subscriptions: [{topic: a/b, tag: t}]\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(main)
    assert err.value.problems == [f"{main}:10: devices.0.password_file: cannot read secret file /nonexistent/pw: "
                                  "No such file or directory"]


def test_state_dir_must_be_a_directory_we_can_write(tmp_path, read_only_dir):
    (tmp_path / "file").write_text("not a directory")
    cases = [
        (tmp_path / "file", f"{tmp_path}/file is not a directory"),
        (tmp_path / "file" / "state", f"{tmp_path}/file/state cannot be created: {tmp_path}/file is not a directory"),
        (read_only_dir, f"{read_only_dir} is not writable: "),
        (read_only_dir / "state", f"{read_only_dir}/state cannot be created in {read_only_dir}: "),
    ]
    main = tmp_path / "gw.yaml"
    for state_dir, message in cases:
        main.write_text(BASE.format(state=state_dir))
        problems = config.load(main).problems_at_runtime()  # the file itself is valid
        assert len(problems) == 1 and problems[0].startswith(f"{main}:3: gateway.state_dir: {message}"), problems
        res = run_cli("check-config", "-c", str(main))
        assert res.returncode == 2 and problems[0] in res.stderr.splitlines(), res.stderr
        assert "Traceback" not in res.stderr


def test_state_dir_that_can_be_created_passes_and_is_not_created(tmp_path, monkeypatch):
    main = tmp_path / "gw.yaml"
    main.write_text(BASE.format(state=tmp_path / "new" / "state"))
    res = run_cli("check-config", "-c", str(main))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw.yaml"]  # the probe is gone, nothing was made
    main.write_text(BASE.format(state=tmp_path))
    assert config.load(main).problems_at_runtime() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw.yaml"]
    # the environment beats the file, so a bad directory from it names the variable
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("EDGE_GATEWAY__GATEWAY__STATE_DIR", str(tmp_path / "file"))
    assert config.load(main).problems_at_runtime() == [
        f"$EDGE_GATEWAY__GATEWAY__STATE_DIR: gateway.state_dir: {tmp_path}/file is not a directory"]


def test_include_glob_matching_nothing_is_a_warning_a_missing_file_an_error(tmp_path):
    main = write(tmp_path, "include: [conf.d/*.yml]\n")
    cfg = config.load(main)
    assert cfg.warnings == [f"{main}:7: include.0: conf.d/*.yml matches no file"]
    res = run_cli("check-config", "-c", str(main))
    assert res.returncode == 0, res.stderr
    assert f"  warning: {main}:7: include.0: conf.d/*.yml matches no file" in res.stdout.splitlines()
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.yml").write_text("summaries:\n  interval: 5s\n")
    assert config.load(main).warnings == []
    main = write(tmp_path, "include: [conf.d/a.yml, conf.d/b.yml]\n")
    res = run_cli("check-config", "-c", str(main))
    assert res.returncode == 2
    assert res.stderr.splitlines()[0] == f"{main}:7: include.1: no such file: conf.d/b.yml"


def test_check_config_counts_the_tags_of_a_range(tmp_path):
    main = write(tmp_path, "devices:\n  - name: tank1\n    driver: modbus\n    host: h\n    tags:\n"
                           "      - {name: level, address: 0, count: 1000}\n      - {name: alarm, table: coil, address: 0, type: bool}\n"
                           "rules:\n  - {name: high, type: threshold, input: tank1.level_999, above: 10}\n")
    res = run_cli("check-config", "-c", str(main))
    assert res.returncode == 0, res.stderr
    [line] = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("tank1")]
    assert "1001 tags: level_0, level_1," in line, line
    assert len(config.load(main).devices[0].tags) == 1001


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


def test_shipped_configs_are_valid(tmp_path):
    from tests.conftest import REPO

    for name in ("example.yaml", "demo.yaml"):
        # the state directory is the machine's business: probe one of ours, not /var/lib
        res = run_cli("check-config", "-c", str(REPO / "config" / name),
                      env={"EDGE_GATEWAY__GATEWAY__STATE_DIR": str(tmp_path)})
        assert res.returncode == 0, res.stderr
        assert "configuration is valid" in res.stdout
