"""The rows of `codi compare` and `codi demo`: one run per method, mode and seed (`RunRecord`), one row
per method and mode over the seeds (`Row`, with the interval of `codi.report.intervals`), and the two
tables drawn from them: with intervals (`comparison_table`) or with the speedup over the teacher's
explicit CoT (`speedup_table`, the demo's).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from .intervals import t_interval, wilson_interval

# a method evaluated in both modes shows them as two rows, named by mode
MODE_NAMES = {"latent": "latent", "cot": "teacher (CoT)"}


@dataclass
class RunRecord:
    """One method trained with one seed, evaluated in one mode."""

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
    """One line of the table: a method in one mode over its seeds."""

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
    name: str = ""  # the label, plus the mode when the method has two rows
    speedup_vs_cot: float | None = None  # questions/s over the teacher-CoT row's (speedup_table)


def _interval(mine: Sequence[RunRecord]) -> tuple[float, float, float, str]:
    accuracies = [run.accuracy for run in mine]
    if len(mine) == 1:
        low, high = wilson_interval(mine[0].correct, mine[0].n)
        return accuracies[0], 100 * low, 100 * high, "wilson"
    accuracy, low, high = t_interval(accuracies)
    return accuracy, max(0.0, low), min(100.0, high), "t over seeds"


def aggregate(runs: Sequence[RunRecord], order: Sequence[str]) -> list[Row]:
    """One row per method (in `order`) and mode (in run order), means over seeds, the interval
    described in `codi.report.intervals`."""
    rows = []
    for method in order:
        modes = list(dict.fromkeys(run.mode for run in runs if run.method == method))
        for mode in modes:
            mine = [run for run in runs if run.method == method and run.mode == mode]
            accuracy, low, high, kind = _interval(mine)
            label = mine[0].label
            rows.append(
                Row(
                    method=method,
                    label=label,
                    mode=mode,
                    seeds=[run.seed for run in mine],
                    n=mine[0].n,
                    accuracy=accuracy,
                    ci_low=low,
                    ci_high=high,
                    ci_kind=kind,
                    seed_accuracies=[run.accuracy for run in mine],
                    tokens_per_answer=statistics.fmean(run.tokens_per_answer for run in mine),
                    positions_per_answer=statistics.fmean(run.positions_per_answer for run in mine),
                    questions_per_s=statistics.fmean(run.questions_per_s for run in mine),
                    train_wall_s=statistics.fmean(run.train_wall_s for run in mine),
                    steps=mine[0].steps,
                    name=f"{label} {MODE_NAMES.get(mode, mode)}" if len(modes) > 1 else label,
                )
            )
    return rows


def comparison_table(rows: Sequence[Row]) -> str:
    """Accuracy with its 95 % interval, tokens and positions per answer, questions/s, train time."""
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


def set_speedups(rows: Sequence[Row]) -> None:
    """`speedup_vs_cot` of every row: its questions/s over that of the teacher-CoT row (the cot row of
    the first method evaluated in both modes); left None when there is no such row."""
    both = [row.method for row in rows if row.mode == "latent"]
    reference = next((row for row in rows if row.mode == "cot" and row.method in both), None)
    for row in rows:
        row.speedup_vs_cot = row.questions_per_s / reference.questions_per_s if reference else None


def speedup_table(rows: Sequence[Row]) -> str:
    """Accuracy, tokens and positions decoded per answer, questions/s and the speedup over the teacher's
    explicit CoT (`set_speedups`): the demo's table."""
    set_speedups(rows)
    header = f"{'method':<26}{'accuracy':>9}{'tokens/ans':>12}{'positions/ans':>15}{'questions/s':>13}{'speedup':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        speedup = "" if row.speedup_vs_cot is None else f"{row.speedup_vs_cot:>8.2f}x"
        lines.append(
            f"{row.name or row.label:<26}{row.accuracy:>8.1f}%{row.tokens_per_answer:>12.1f}"
            f"{row.positions_per_answer:>15.1f}{row.questions_per_s:>13.1f}{speedup}"
        )
    return "\n".join(lines)
