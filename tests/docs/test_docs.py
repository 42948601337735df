"""The README's configuration reference is the one the models generate; the two commands are there."""

from __future__ import annotations

from gateway import docs
from tests.conftest import REPO


def test_config_reference_matches_the_models():
    readme = (REPO / "README.md").read_text()
    assert docs.START in readme and docs.END in readme
    current = readme.split(docs.START, 1)[1].split(docs.END, 1)[0]
    expected = docs.render().split(docs.START, 1)[1].split(docs.END, 1)[0]
    assert current == expected, "README.md is stale: run `python -m gateway.docs --write`"


def test_every_model_field_appears_in_the_reference():
    from drivers.registry import REGISTRY as drivers
    from gateway.config import GatewayConfig
    from rules.registry import REGISTRY as rules

    text = docs.render()
    models = [GatewayConfig] + [t.config for t in drivers.values()] + [t.config for t in rules.values()]
    for model in models:
        for name, field in model.model_fields.items():
            assert f"`{field.alias or name}`" in text, f"{model.__name__}.{name} is not documented"


def test_readme_opens_with_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    head = readme[: readme.index("## Contents")]
    assert "edge-gateway demo" in head
    ci = (REPO / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in head and ".venv/bin/python -m pytest -q" in ci
