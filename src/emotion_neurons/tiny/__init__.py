"""Embedded tiny setup (random tiny models of the real classes, synthetic corpus)."""

from __future__ import annotations

import pathlib


def seeded_out_dir(out_dir: pathlib.Path | str, seed: int) -> pathlib.Path:
    """Create `out_dir` and seed Python's, NumPy's and torch's global RNGs, so a tiny build is deterministic."""
    import random

    import numpy as np
    import torch

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return out_dir
