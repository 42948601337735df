"""Alarm and event rules evaluated at the edge.

The core builds the discriminated union of rule configs from `rules.registry.REGISTRY` and runs
them all through one `RuleEngine` (`rules/engine.py`); the alarm lifecycle is in
`rules/alarm.py`, how to write a rule in `rules/README.md`.
"""

from rules.base import RuleConfig
from rules.registry import REGISTRY
from rules.engine import RuleEngine

__all__ = ["REGISTRY", "RuleConfig", "RuleEngine"]
