"""A module bound to a name now and imported when first used.

A Modbus-only gateway must not pay for asyncua, cryptography, NumPy or SciPy (tens of MB of RSS
and a second of start-up), yet every driver's config model has to be importable for validation
and `check-config`. The driver modules therefore bind their protocol libraries with `lazy(...)`:
the code reads as if they were imported, and the import happens at the first attribute access,
which is in the code that connects or computes, never in the config models.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class LazyModule:
    """Attribute access goes to the module `name`, imported on the first access. Holds only the
    name: the imported module lives in `sys.modules`, as with a plain import."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self._name)
        if module is None:
            module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._name in sys.modules else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy(name: str) -> Any:
    """`np = lazy("numpy")`: typed Any so that `np.ndarray` etc. check as if imported."""
    return LazyModule(name)
