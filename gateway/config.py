"""Configuration: YAML files (+ `include:` globs) -> typed pydantic models, errors as FILE:LINE.

The root model is a pydantic-settings `BaseSettings`, so `EDGE_GATEWAY__UPSTREAM__PORT=1884`
overrides `upstream.port` (environment beats YAML). Device and rule models come from the driver
and rule registries as discriminated unions: a new driver or rule type adds a model, not a branch.
"""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

import drivers
import rules
from drivers.registry import REGISTRY as DRIVER_REGISTRY
from gateway.analytics.config import AnalysisConfig, AnalyticsConfig, SummariesConfig
from gateway.commands import CommandsConfig
from gateway.metrics import MetricsConfig
from gateway.model import TagReport, source_of
from gateway.schema import BrokerConfig, ByteSize, Duration, Name, StrictModel, tagged_union
from rules.registry import REGISTRY as RULE_REGISTRY

ENV_PREFIX = "EDGE_GATEWAY__"

Path_ = tuple[str | int, ...]


@dataclass
class Located:
    """Merged plain data plus where each dotted path came from."""

    data: dict[str, Any] = field(default_factory=dict)
    lines: dict[Path_, tuple[str, int]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # FILE:LINE lines, like problems, that do not stop a start


class GatewaySection(StrictModel):
    id: Name = Field(description="[A-Za-z0-9_-]+, unique per site; in every topic and payload")
    state_dir: Path = Field(Path("/var/lib/edge-gateway"), description="holds the buffer; must be writable")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = Field("auto", description="auto: JSON lines without a TTY (systemd), console text on a TTY")


class UpstreamConfig(BrokerConfig):
    name: Name = Field("upstream", description="names this upstream in health, logs and the buffer's delivery cursors; unique")
    format: Literal["json", "sparkplug"] = Field("json", description="json: the gateway's own topics below topic_prefix; sparkplug: Sparkplug B 3.0 edge node")
    group_id: str | None = Field(None, description="Sparkplug group id (required with format: sparkplug)")
    primary_host_id: str | None = Field(None, description="Sparkplug primary host application: data waits while its STATE is offline")
    topic_prefix: str = Field("edge/{gateway_id}", description="start of every topic; {gateway_id} is replaced")
    max_inflight: int = Field(100, ge=1, le=65535, description="QoS 1 messages on the wire awaiting PUBACK")
    health_interval: Duration = Field(10.0, gt=0, description="period of the health topic")
    batch: int = Field(500, ge=1, le=10000, description="rows read from the buffer per query")
    refused_retry: Duration = Field(60.0, gt=0, description="a record the broker refused waits this long before it is tried again")


class BufferConfig(StrictModel):
    path: Path = Field(Path("buffer.db"), description="relative to gateway.state_dir")
    max_bytes: ByteSize = Field(1 << 30, ge=1 << 16, description="when full, oldest data goes first, alarms last; every drop is counted")
    durability: Literal["normal", "full"] = Field("normal", description="normal: WAL + synchronous=NORMAL; full: synchronous=FULL (fsync per commit)")


def _device_union() -> Any:
    return tagged_union([t.config for t in DRIVER_REGISTRY.values()], "driver")


def _rule_union() -> Any:
    return tagged_union([t.config for t in RULE_REGISTRY.values()], "type")


class GatewayConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )

    gateway: GatewaySection
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig, description="the one upstream broker (or use upstreams:)")
    upstreams: list[UpstreamConfig] = Field(default_factory=list, description="several upstream brokers, each with its own delivery cursor; not with upstream:")
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    devices: list[_device_union()] = Field(default_factory=list)  # type: ignore[valid-type]
    summaries: SummariesConfig = Field(default_factory=SummariesConfig)
    analyses: list[AnalysisConfig] = Field(default_factory=list)
    analytics: AnalyticsConfig = Field(default_factory=AnalyticsConfig)
    rules: list[_rule_union()] = Field(default_factory=list)  # type: ignore[valid-type]
    metrics: MetricsConfig | None = Field(None, description="Prometheus /metrics; off when absent")
    commands: CommandsConfig = Field(default_factory=CommandsConfig, description="cmd/write and cmd/call (write-back); off by default")
    _located: Located = PrivateAttr(default_factory=Located)  # the files it was read from, lines, warnings

    @model_validator(mode="after")
    def _first_upstream(self) -> "GatewayConfig":
        # `upstream` stays the first one, so code and settings that know one upstream keep working.
        if self.upstreams:
            if "upstream" in self.model_fields_set:
                raise ValueError("give upstream or upstreams, not both")
            self.upstream = self.upstreams[0]
        return self

    @property
    def all_upstreams(self) -> list[UpstreamConfig]:
        return list(self.upstreams) or [self.upstream]

    def client_id_of(self, upstream: UpstreamConfig) -> str:
        """The first upstream is the gateway id (as with one upstream); others add their name, so
        two links to one broker do not take each other's session."""
        if upstream.client_id:
            return upstream.client_id
        first = self.all_upstreams[0]
        return self.gateway.id if upstream is first else f"{self.gateway.id}-{upstream.name}"

    def topic_prefix_of(self, upstream: UpstreamConfig) -> str:
        return upstream.topic_prefix.replace("{gateway_id}", self.gateway.id).rstrip("/")

    @property
    def files(self) -> list[str]:
        return list(self._located.files)

    @property
    def warnings(self) -> list[str]:
        return list(self._located.warnings)

    def problems_at_runtime(self) -> list[str]:
        """What the file cannot show: the state directory must be a directory we can write."""
        problem = _state_dir_problem(self.gateway.state_dir)
        if problem is None:
            return []
        main = self._located.files[0] if self._located.files else "(config)"
        return [f"{_origin(self._located, ('gateway', 'state_dir'), main)}: gateway.state_dir: {problem}"]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: an operator's override must beat the file.
        return env_settings, init_settings

    # ----- derived views used by the app and by check-config -----

    @property
    def topic_prefix(self) -> str:
        return self.upstream.topic_prefix.replace("{gateway_id}", self.gateway.id).rstrip("/")

    @property
    def client_id(self) -> str:
        return self.client_id_of(self.upstream)

    @property
    def buffer_path(self) -> Path:
        return self.buffer.path if self.buffer.path.is_absolute() else self.gateway.state_dir / self.buffer.path

    def tag_units(self) -> dict[str, str | None]:
        return {source_of(d.name, tag): unit for d in self.devices for tag, unit in d.tag_units().items()}

    def report_policy(self) -> dict[str, TagReport]:
        """How each scalar tag (`device.tag`) is reported by exception (Sparkplug)."""
        return {source_of(d.name, tag): r for d in self.devices for tag, r in d.reporting().items()}

    def device_tags(self) -> dict[str, list[str]]:
        return {d.name: d.tag_names() for d in self.devices}

    def known_inputs(self) -> set[str]:
        from gateway.analytics import feature_names

        names = {source_of(d.name, t) for d in self.devices for t in d.tag_names()}
        for a in self.analyses:
            names.update(feature_names(a))  # already qualified: analysis.feature
        return names


# ---------------------------------------------------------------------------------------------
# Loading with line numbers

class ConfigError(Exception):
    """Every problem found, one `FILE:LINE: dotted.path: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Loader(yaml.SafeLoader):
    pass


def _node_to_python(loader: _Loader, node: yaml.Node, path: Path_, file: str, out: Located, problems: list[str]) -> Any:
    out.lines.setdefault(path, (file, node.start_mark.line + 1))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int)):
                problems.append(f"{file}:{key_node.start_mark.line + 1}: {_dotted(path)}: keys must be strings")
                continue
            key = str(key)
            if key in result:
                problems.append(f"{file}:{key_node.start_mark.line + 1}: {_dotted(path + (key,))}: duplicate key")
            result[key] = _node_to_python(loader, value_node, path + (key,), file, out, problems)
            out.lines[path + (key,)] = (file, key_node.start_mark.line + 1)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(loader, item, path + (i,), file, out, problems) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _read_yaml(path: Path, problems: list[str]) -> Located:
    located = Located(files=[str(path)])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"{path}:0: (file): cannot read: {exc.strerror or exc}")
        return located
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return located
            data = _node_to_python(loader, node, (), str(path), located, problems)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        problems.append(f"{path}:{line}: (yaml): {getattr(exc, 'problem', None) or exc}")
        return located
    if not isinstance(data, dict):
        problems.append(f"{path}:1: (root): the file must hold a mapping of sections")
        return located
    located.data = data
    return located


def _merge(dst: Located, src: Located, src_path: Path_ = (), dst_path: Path_ = ()) -> None:
    """Merge src into dst: mappings merge key by key, lists append, scalars are replaced."""

    def move_lines(sp: Path_, dp: Path_) -> None:
        n = len(sp)
        for p, where in src.lines.items():
            if p[:n] == sp:
                dst.lines[dp + p[n:]] = where

    def get(data: Any, p: Path_) -> Any:
        for k in p:
            data = data[k]
        return data

    src_node = get(src.data, src_path)
    dst_node = get(dst.data, dst_path)
    for key, value in src_node.items():
        if key in dst_node and isinstance(dst_node[key], dict) and isinstance(value, dict):
            _merge(dst, src, src_path + (key,), dst_path + (key,))
        elif key in dst_node and isinstance(dst_node[key], list) and isinstance(value, list):
            offset = len(dst_node[key])
            dst_node[key].extend(value)
            for i in range(len(value)):
                move_lines(src_path + (key, i), dst_path + (key, offset + i))
        else:
            dst_node[key] = value
            move_lines(src_path + (key,), dst_path + (key,))


def load_located(path: str | Path, problems: list[str]) -> Located:
    main = Path(path)
    root = _read_yaml(main, problems)
    includes = root.data.pop("include", None)
    if includes is None:
        return root
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        file, line = root.lines.get(("include",), (str(main), 1))
        problems.append(f"{file}:{line}: include: expected a list of file names or globs")
        return root
    seen = {main.resolve()}
    for i, pattern in enumerate(includes):
        file, line = root.lines.get(("include", i), root.lines.get(("include",), (str(main), 1)))
        full = pattern if os.path.isabs(pattern) else str(main.parent / pattern)
        matches = sorted(glob.glob(full))
        if not matches and not glob.has_magic(pattern):
            problems.append(f"{file}:{line}: include.{i}: no such file: {pattern}")
        elif not matches:  # an empty conf.d is legitimate; a typo would lose every device in it
            root.warnings.append(f"{file}:{line}: include.{i}: {pattern} matches no file")
        for match in matches:
            if Path(match).resolve() in seen:
                continue
            seen.add(Path(match).resolve())
            part = _read_yaml(Path(match), problems)
            if "include" in part.data:
                f2, l2 = part.lines[("include",)]
                problems.append(f"{f2}:{l2}: include: only the main file may include others")
                part.data.pop("include")
            _merge(root, part)
            root.files.append(match)
    return root


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path) if path else "(root)"


def _clean_loc(data: Any, loc: tuple) -> Path_:
    """Drop pydantic's union tags (e.g. the 'modbus' in devices.0.modbus.port) from a location."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, list) and isinstance(part, int):
            node = node[part] if part < len(node) else None
            out.append(part)
        elif isinstance(node, dict):
            if part in node:
                node = node[part]
                out.append(part)
            elif part in (node.get("driver"), node.get("type")) or str(part).startswith("function-"):
                continue  # discriminator tag or validator wrapper, not a key the user wrote
            else:
                out.append(part)
                node = None
        elif node is None and isinstance(part, str) and part.startswith(("function-", "tagged-union")):
            continue
        else:
            out.append(part)
            node = None
    return tuple(out)


def _where(located: Located, path: Path_, fallback_file: str) -> tuple[str, int]:
    for n in range(len(path), -1, -1):
        if path[:n] in located.lines:
            return located.lines[path[:n]]
    return fallback_file, 1


def _origin(located: Located, path: Path_, main: str) -> str:
    """`$VARIABLE` when the environment set the value (it beats the file), else `FILE:LINE`."""
    env = _env_var_for(path)
    if env:
        return f"${env}"
    file, line = _where(located, path, main)
    return f"{file}:{line}"


def _env_var_for(path: Path_) -> str | None:
    name = ENV_PREFIX + "__".join(str(p).upper() for p in path)
    for key in os.environ:
        if key.upper() == name:
            return key
    return None


def _message(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown {ctx.get('discriminator', 'type').strip(chr(39))} {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if err["type"] == "union_tag_not_found":
        return "required key is missing"
    return msg.removeprefix("Value error, ")


def _cross_check(cfg: GatewayConfig) -> list[tuple[Path_, str]]:
    """References between sections: names unique, inputs that exist."""
    problems: list[tuple[Path_, str]] = []

    def unique(section: str, items: list[Any]) -> None:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                problems.append(((section, i, "name"), f"duplicate name {item.name!r}"))
            seen.add(item.name)

    unique("upstreams", cfg.upstreams)
    for i, up in enumerate(cfg.upstreams or [cfg.upstream]):
        at = ("upstreams", i) if cfg.upstreams else ("upstream",)
        if up.format == "sparkplug" and not up.group_id:
            problems.append((at + ("group_id",), "required with format: sparkplug"))
        for key in ("group_id", "primary_host_id"):
            value = getattr(up, key)
            if value is not None and (not value or any(c in value for c in "/+#")):
                problems.append((at + (key,), f"{value!r}: must be non-empty without / + #"))
    unique("devices", cfg.devices)
    unique("analyses", cfg.analyses)
    unique("rules", cfg.rules)
    device_names = {d.name for d in cfg.devices}
    waveforms = {source_of(d.name, t) for d in cfg.devices for t in d.waveform_tags()}
    scalars = {source_of(d.name, t) for d in cfg.devices for t in d.tag_names()} - waveforms
    for i, a in enumerate(cfg.analyses):
        if a.input not in waveforms:
            hint = " (it is a scalar tag)" if a.input in scalars else ""
            problems.append((("analyses", i, "input"), f"{a.input!r} is not a waveform tag of a configured device{hint}"))
        if a.bearing is not None and a.bearing.shaft_tag and a.bearing.shaft_tag not in scalars:
            problems.append((("analyses", i, "bearing", "shaft_tag"), f"unknown tag {a.bearing.shaft_tag!r}"))
    known = cfg.known_inputs()
    for i, r in enumerate(cfg.rules):
        for name in r.inputs():
            if name in known or ("." not in name and name in device_names):
                continue
            key = "input" if name == getattr(r, "input", None) else "device"
            problems.append((("rules", i, key), f"unknown input {name!r} (expected device.tag or analysis.feature)"))
    return problems


def load(path: str | Path) -> GatewayConfig:
    """Load and validate; raise ConfigError with every problem at once."""
    problems: list[str] = []
    located = load_located(path, problems)
    if problems:
        raise ConfigError(problems)
    main = str(path)
    if "upstream" in located.data and "upstreams" in located.data:
        raise ConfigError([f"{_origin(located, ('upstreams',), main)}: upstreams: give upstream or upstreams, not both"])
    try:
        cfg = GatewayConfig(**located.data)
    except ValidationError as exc:
        for err in exc.errors():
            p = _clean_loc(located.data, err["loc"])
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                p += (str(err.get("ctx", {}).get("discriminator", "type")).strip("'"),)
            problems.append(f"{_origin(located, p, main)}: {_dotted(p)}: {_message(err)}")
        raise ConfigError(_dedupe(problems)) from None
    for p, msg in _cross_check(cfg):
        problems.append(f"{_origin(located, p, main)}: {_dotted(p)}: {msg}")
    if problems:
        raise ConfigError(problems)
    cfg._located = located
    return cfg


def _state_dir_problem(state_dir: Path) -> str | None:
    """None when `run` can create (if needed) and write the state directory, else why not.

    Permission bits do not tell (root writes through 0555; a read-only mount refuses everyone),
    so this creates and removes a probe: a file in the directory, or, when the directory does not
    exist yet, a directory in its nearest existing ancestor. Nothing is left behind."""
    target = state_dir
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        return f"{target} is not a directory" if target == state_dir else f"{state_dir} cannot be created: {target} is not a directory"
    try:
        if target == state_dir:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=target)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=target))
    except OSError as exc:
        what = "is not writable" if target == state_dir else f"cannot be created in {target}"
        return f"{state_dir} {what}: {exc.strerror or exc}"
    return None


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


__all__ = ["GatewayConfig", "ConfigError", "load", "drivers", "rules"]
