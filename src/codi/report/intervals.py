"""The 95 % intervals every table states.

- one accuracy on n test questions: the Wilson score interval (`wilson_interval`, the comparison table
  with one seed) or the Wald half-width (`binomial_half_width`, the ablation's error bars);
- several seeds: the mean of the per-seed accuracies +- the Student-t interval (`t_interval`): the
  test-set noise is then inside the seed-to-seed spread;
- two accuracies on the SAME questions: the paired difference (`paired_drop`, the ablation's verdict).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = 1.959963984540054  # the normal quantile of two-sided 95 % intervals

# two-sided 95 % Student-t quantiles t(0.975, df), df = 1..30; above 30 the normal one (within 4 %)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion `correct / n`, as fractions in [0, 1]."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got {correct}, {n}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else Z95


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval of `values` (at least 2): (mean, low, high)."""
    if len(values) < 2:
        raise ValueError("a t interval needs at least 2 values")
    mean = statistics.fmean(values)
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def binomial_half_width(accuracy: float, n: int, z: float = Z95) -> float:
    """Half-width of the Wald 95 % interval of an accuracy (fraction) measured on n items."""
    return z * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n) if n else float("nan")


def paired_drop(base: Sequence[bool], other: Sequence[bool], z: float = Z95) -> tuple[float, float, float]:
    """Accuracy drop acc(base) - acc(other) as a fraction, with its paired 95 % interval (lo, hi).

    b = right -> wrong, c = wrong -> right over the same n items; d = (b - c) / n,
    Var(d) = ((b + c) / n - d^2) / n (Wald).
    """
    n = len(base)
    if n == 0 or n != len(other):
        raise ValueError(f"paired_drop needs two equal, non-empty lists; got {n} and {len(other)}")
    b = sum(1 for x, y in zip(base, other) if x and not y)
    c = sum(1 for x, y in zip(base, other) if y and not x)
    drop = (b - c) / n
    half = z * math.sqrt(max((b + c) / n - drop * drop, 0.0) / n)
    return drop, drop - half, drop + half
