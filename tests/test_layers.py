"""The import direction between the project's layers, as the README's design section draws it.

core      gateway (the package: version only), gateway.{model, schema, health, logs, mqttclient, statelock, backoff, aio, lazy}: the floor
          everything stands on; imports nothing of the project above it.
stages    gateway.{buffer, upstream, upstream_format, sparkplug, sparkplug_pb, report, commands} and
          gateway.analytics: core and stages.
plugins   drivers.* and rules.*: core and their own package, never each other, never a stage.
wiring    gateway.{app, config, cli, demo, docs, ...}: puts it all together; may import anything.

A module that fits no layer fails the test until it is given one here and in the README.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CORE = {"gateway", "gateway.model", "gateway.schema", "gateway.health", "gateway.logs", "gateway.mqttclient",
        "gateway.statelock", "gateway.backoff", "gateway.aio", "gateway.lazy"}
STAGES = {"gateway.buffer", "gateway.upstream", "gateway.upstream_format", "gateway.sparkplug", "gateway.sparkplug_pb",
          "gateway.report", "gateway.analytics", "gateway.commands"}
WIRING = {"gateway.__main__", "gateway.app", "gateway.config", "gateway.cli", "gateway.demo",
          "gateway.docs", "gateway.view", "gateway.watch", "gateway.metrics", "gateway.discover"}
SIMULATORS = "drivers.sim"  # test and demo peers: wiring for the protocol they simulate


def layer(module: str) -> str | None:
    if module in CORE:
        return "core"
    if any(module == s or module.startswith(s + ".") for s in STAGES):
        return "stages"
    if module == SIMULATORS or module.startswith(SIMULATORS + "."):
        return "simulators"
    if module.split(".")[0] in ("drivers", "rules"):
        return module.split(".")[0]
    if module in WIRING:
        return "wiring"
    return None


ALLOWED = {
    "core": {"core"},
    "stages": {"core", "stages"},
    "drivers": {"core", "drivers"},
    "rules": {"core", "rules"},
    "simulators": {"core", "drivers", "simulators"},
    "wiring": {"core", "stages", "drivers", "rules", "simulators", "wiring"},
}


def project_modules() -> dict[str, Path]:
    out = {}
    for top in ("gateway", "drivers", "rules"):
        for path in (REPO / top).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    """Project modules imported anywhere in the file (top level or inside functions)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]  # a module, or an attribute of `base`
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ("gateway", "drivers", "rules"))
    return found


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that `name` (a module, or a module.attribute) refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_project_module_has_a_layer():
    unplaced = sorted(m for m in project_modules() if layer(m) is None)
    assert not unplaced, f"give these modules a layer in tests/test_layers.py and the README: {unplaced}"


def test_imports_only_go_down():
    modules = project_modules()
    wrong = []
    for module, path in sorted(modules.items()):
        mine = layer(module)
        if mine is None:
            continue
        for name in sorted(imports(path, module)):
            target = resolve(name, modules)
            if target is None or target == module:
                continue
            theirs = layer(target)
            if theirs not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(REPO)}: {module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the layer direction:\n" + "\n".join(wrong)


@pytest.mark.parametrize("source,bad", [
    ("from gateway.app import App\n", "gateway.app"),
    ("from drivers import modbus\n", "drivers.modbus"),
])
def test_the_check_sees_a_wrong_import(tmp_path, source, bad):
    path = tmp_path / "model.py"
    path.write_text(source)
    modules = project_modules()
    targets = {resolve(n, modules) for n in imports(path, "gateway.model")}
    assert bad in targets and not {layer(t) for t in targets} <= ALLOWED["core"]
