"""Every rule type in one static table: a new rule type is one more entry here."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from rules import downtime, iso10816, pass_fail, rate, stale, threshold
from rules.base import RuleType

REGISTRY: Mapping[str, RuleType] = MappingProxyType(
    {m.RULE.name: m.RULE for m in (threshold, iso10816, pass_fail, stale, downtime, rate)})
