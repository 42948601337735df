"""Vibration analytics and tag summaries at the edge (pure NumPy/SciPy, no I/O).

The core uses `AnalyticsEngine`; the building blocks are importable for tests and benchmarks.
"""

from gateway.analytics.engine import AnalyticsEngine, feature_names
from gateway.analytics.summary import Summaries, TagStats
from gateway.analytics.vibration import FeatureSpec, Plan, PlanCache, compute, compute_batch, make_plan
from gateway.analytics.window import Window, WindowAssembler
from gateway.analytics.workers import FeaturePool

__all__ = [
    "AnalyticsEngine", "FeaturePool", "FeatureSpec", "feature_names", "Plan", "PlanCache", "Summaries", "TagStats", "Window",
    "WindowAssembler", "compute", "compute_batch", "make_plan",
]
