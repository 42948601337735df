"""Alarm and event rules evaluated at the edge. Importing the package registers every rule type.

The core builds the discriminated union of rule configs from `rules.base.REGISTRY` and runs
them all through one `RuleEngine` (`rules/engine.py`); the alarm lifecycle is in
`rules/alarm.py`, how to write a rule in `rules/README.md`.
"""

from rules import base  # noqa: F401
# Each import registers its rule type.
from rules import downtime, iso10816, pass_fail, rate, stale, threshold  # noqa: F401
from rules.base import REGISTRY, RuleConfig
from rules.engine import RuleEngine

__all__ = ["REGISTRY", "RuleConfig", "RuleEngine"]
