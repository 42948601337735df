"""The CWRU bearing recordings that ship with the repository (tests/data/cwru, see SOURCE.md there)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "cwru"
RECORDS = (97, 105, 118, 130, 109, 122, 135)


@cache
def load(rec: int) -> tuple[np.ndarray, float, float]:
    """(drive-end acceleration in the file's units as float64, rpm, sample rate in Hz).

    The array is read-only and shared between callers: copy it before changing it."""
    path = DATA / f"{rec}.npz"
    if not path.is_file():  # a failure, never a skip: a missing data set must not look like a pass
        raise FileNotFoundError(f"CWRU record {rec} missing: {path} is part of the repository")
    with np.load(path) as z:
        de = z["de"]
        de.setflags(write=False)
        return de, float(z["rpm"][0]), float(z["fs"])
