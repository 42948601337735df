"""Vibration analytics and tag summaries at the edge (pure NumPy/SciPy, no I/O).

The core uses `AnalyticsEngine`; the building blocks are importable for tests and benchmarks.
The NumPy/SciPy parts (vibration, window) are imported on first use of one of their names, so
that a gateway without analyses, and config validation, never load NumPy or SciPy.
"""

from __future__ import annotations

import importlib
from typing import Any

from gateway.analytics.engine import AnalyticsEngine, feature_names
from gateway.analytics.summary import Summaries, TagStats
from gateway.analytics.workers import FeaturePool

# name -> the module that defines it, imported when the name is first asked for (PEP 562)
_ON_DEMAND = {
    "FeatureSpec": "gateway.analytics.vibration", "Plan": "gateway.analytics.vibration",
    "PlanCache": "gateway.analytics.vibration", "compute": "gateway.analytics.vibration",
    "compute_batch": "gateway.analytics.vibration", "make_plan": "gateway.analytics.vibration",
    "Window": "gateway.analytics.window", "WindowAssembler": "gateway.analytics.window",
}

__all__ = [
    "AnalyticsEngine", "FeaturePool", "FeatureSpec", "feature_names", "Plan", "PlanCache", "Summaries", "TagStats", "Window",
    "WindowAssembler", "compute", "compute_batch", "make_plan",
]


def __getattr__(name: str) -> Any:
    module = _ON_DEMAND.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
