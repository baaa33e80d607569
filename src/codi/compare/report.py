"""The comparison table of `codi.compare`: per-method rows over seeds, 95 % intervals, text, JSON, PNG.

Intervals: with one seed, the Wilson score interval of the accuracy over the test questions (a
binomial proportion); with several seeds, the mean of the per-seed accuracies +- the Student-t interval
over seeds (the test-set noise is then inside the seed-to-seed spread).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..scoring import Z95

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


@dataclass
class RunRecord:
    """One method trained and evaluated with one seed."""

    method: str
    label: str
    mode: str
    seed: int
    steps: int
    train_wall_s: float
    n: int
    correct: int
    accuracy: float  # %
    tokens_per_answer: float
    positions_per_answer: float
    questions_per_s: float
    cot_warmup_s: float = 0.0  # the shared CoT-SFT warm-up this run started from (inside train_wall_s)
    extra: dict = field(default_factory=dict)


@dataclass
class Row:
    """One line of the table: a method over its seeds."""

    method: str
    label: str
    mode: str
    seeds: list[int]
    n: int
    accuracy: float  # %, mean over seeds
    ci_low: float  # %
    ci_high: float  # %
    ci_kind: str  # "wilson" (one seed) or "t over seeds"
    seed_accuracies: list[float]
    tokens_per_answer: float
    positions_per_answer: float
    questions_per_s: float
    train_wall_s: float
    steps: int


def aggregate(runs: Sequence[RunRecord], order: Sequence[str]) -> list[Row]:
    """One row per method (in `order`), means over seeds, the interval described in the module doc."""
    rows = []
    for method in order:
        mine = [run for run in runs if run.method == method]
        if not mine:
            continue
        accuracies = [run.accuracy for run in mine]
        if len(mine) == 1:
            low, high = wilson_interval(mine[0].correct, mine[0].n)
            accuracy, low, high, kind = accuracies[0], 100 * low, 100 * high, "wilson"
        else:
            accuracy, low, high = t_interval(accuracies)
            low, high, kind = max(0.0, low), min(100.0, high), "t over seeds"
        rows.append(
            Row(
                method=method,
                label=mine[0].label,
                mode=mine[0].mode,
                seeds=[run.seed for run in mine],
                n=mine[0].n,
                accuracy=accuracy,
                ci_low=low,
                ci_high=high,
                ci_kind=kind,
                seed_accuracies=accuracies,
                tokens_per_answer=statistics.fmean(run.tokens_per_answer for run in mine),
                positions_per_answer=statistics.fmean(run.positions_per_answer for run in mine),
                questions_per_s=statistics.fmean(run.questions_per_s for run in mine),
                train_wall_s=statistics.fmean(run.train_wall_s for run in mine),
                steps=mine[0].steps,
            )
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'method':<14}{'mode':<8}{'accuracy % [95% CI]':>24}{'tok/ans':>9}{'pos/ans':>9}"
        f"{'q/s':>9}{'train s':>9}{'steps':>7}{'seeds':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        accuracy = f"{row.accuracy:5.1f} [{row.ci_low:5.1f}, {row.ci_high:5.1f}]"
        lines.append(
            f"{row.label:<14}{row.mode:<8}{accuracy:>24}{row.tokens_per_answer:>9.1f}"
            f"{row.positions_per_answer:>9.1f}{row.questions_per_s:>9.1f}{row.train_wall_s:>9.0f}"
            f"{row.steps:>7}{len(row.seeds):>7}"
        )
    kinds = sorted({row.ci_kind for row in rows})
    lines.append(
        f"n = {rows[0].n if rows else 0} test questions; interval: "
        + " / ".join(
            "Wilson (binomial over the test set)" if k == "wilson" else "Student t over seeds" for k in kinds
        )
        + "; mode latent = continuous thoughts, cot = decoding from the question (explicit CoT for CoT-SFT, "
        "none for No-CoT-SFT and iCoT)"
    )
    return "\n".join(lines)


def save_chart(rows: Sequence[Row], path: str, title: str = "") -> None:
    """Four panels: accuracy with its interval, positions decoded per answer, questions/s, train time."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    names = [row.label for row in rows]
    positions = range(len(rows))
    # clipped at 0: an interval bound equal to the accuracy can land a rounding error below it
    errors = [
        [max(0.0, row.accuracy - row.ci_low) for row in rows],
        [max(0.0, row.ci_high - row.accuracy) for row in rows],
    ]
    panels = (
        ("accuracy % (95% CI)", [row.accuracy for row in rows], errors),
        ("positions decoded per answer", [row.positions_per_answer for row in rows], None),
        ("questions / s", [row.questions_per_s for row in rows], None),
        ("train wall time (s)", [row.train_wall_s for row in rows], None),
    )
    for axis, (name, values, error) in zip(axes, panels):
        axis.bar(positions, values, yerr=error, capsize=4 if error else 0, color="#4c72b0")
        axis.set_xticks(list(positions), names, rotation=25, ha="right", fontsize=8)
        axis.set_title(name, fontsize=10)
        for index, value in enumerate(values):
            top = value + (error[1][index] if error else 0)  # above the interval's bar
            axis.text(index, top, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    path: str, config: dict, rows: Sequence[Row], runs: Sequence[RunRecord], table: str
) -> None:
    with open(path, "w") as handle:
        json.dump(
            {
                "config": config,
                "rows": [asdict(row) for row in rows],
                "runs": [asdict(run) for run in runs],
                "table": table,
            },
            handle,
            indent=2,
            default=str,
        )
