"""Episode returns of policies: summary statistics and a two-standard-error comparison."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def return_stats(returns: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the returns themselves."""
    return {
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns, ddof=1)) if len(returns) > 1 else 0.0,
        "returns": [float(r) for r in returns],
    }


def compare_returns(candidate: dict, baseline: dict, name: str, where: str, episodes_option: str) -> str:
    """One sentence: does `name` beat random by more than two standard errors of the difference?"""
    episodes = len(baseline["returns"])
    if episodes < 2:
        return f"one episode {where}: too few to compare {name} with random (use {episodes_option} 2 or more)"
    margin = 2 * math.sqrt((candidate["std_return"] ** 2 + baseline["std_return"] ** 2) / episodes)
    gap = candidate["mean_return"] - baseline["mean_return"]
    if gap > margin:
        outcome = f"{name} beats random {where}"
    elif gap < -margin:
        outcome = f"{name} does worse than random {where}"
    else:
        outcome = f"{name} and random are within two standard errors {where}"
    return f"{outcome} (difference of mean returns {gap:+.3f}, two standard errors {margin:.3f})"
