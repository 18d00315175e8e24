"""Assertions shared by the tests."""

import numpy as np


def max_error_on_mask(ours, theirs, mask) -> float:
    """Largest absolute difference over the positions where ``mask`` is set (all trailing dims)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs)[np.asarray(mask).astype(bool)].max())
