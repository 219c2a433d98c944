"""How sure a difference between two eval reports is: paired bootstrap intervals over their clips.

`matrixgame-env eval` scores a few dozen held-out clips, and a clip's PSNR or IDM accuracy varies far
more from clip to clip than between two models on the same clip. Two reports scored on the same
clips (the same recording, split, seed and clip count) are therefore compared clip by clip: each
clip's figure in one report minus the same clip's in the other. Resampling the clips with
replacement gives the spread of the mean difference another draw of clips would give; its central
95 % is the interval. An interval that holds 0 says the reports' clips cannot tell the two apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """The mean of per-clip differences and the bounds of its bootstrap interval."""

    mean: float
    low: float
    high: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0: the clips tell the two apart."""
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 2) -> str:
        """E.g. "-0.62 [-0.95, -0.30]"."""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level}


def paired_interval(
    before: Sequence[float],
    after: Sequence[float],
    level: float = 0.95,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of `after[k] - before[k]` over clips k and its percentile bootstrap interval at `level`
    (`samples` resamplings of the clips, seeded: the same inputs give the same interval)."""
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired figures need one value per clip in both, got shapes {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"an interval over clips needs at least 2 clips, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-clip figures must be finite (a clip whose PSNR is infinite has no difference)")
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, got {level}")
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    differences = b - a
    picks = np.random.default_rng(seed).integers(0, len(differences), size=(samples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(differences.mean()), float(low), float(high), level)


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite: a figure a report can hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def per_clip_values(values: object, clips: int) -> list[float] | None:
    """`values` as a list of `clips` finite floats, or None where it is not one (a report written
    before reports kept per-clip figures, or a clip with an infinite PSNR)."""
    if not isinstance(values, list) or len(values) != clips or not all(map(is_finite_number, values)):
        return None
    return [float(v) for v in values]
