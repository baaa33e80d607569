"""The report of `codi ablate` (`codi.cli.ablate` runs `codi.interventions`): verdict, table and chart.

    codi ablate --model DIR --data test.txt --limit 500 --no_cot_model NOCOT_DIR --output_dir OUT

writes OUT/table.txt, OUT/interventions.png, OUT/results.json and OUT/samples.jsonl (one line per
intervention and question) and prints the table and the one-line verdict.

Verdict rule (`verdict`): for each of `zero` and `shuffle`, the accuracy drop d = acc(none) - acc(x)
and its 95 % interval come from the PAIRED difference of two proportions on the same n questions:
with b questions right -> wrong and c wrong -> right, d = (b - c) / n and
Var(d) = ((b + c) / n - d^2) / n (Wald), interval d +- 1.96 sqrt(Var). The answers "depend on the
latents" when the lower end of that interval exceeds `margin` (default 5 points) for zeroing or
shuffling; they "do not depend" when the upper end is below `margin` for every one run; otherwise the
result is inconclusive at this test-set size. No verdict when the unmodified accuracy is itself <= `margin`.
When k = 0 was run, the line adds whether feeding no latent at all scores lower (the latents help: the
drop's interval is above `margin`), higher (they hurt: below -`margin`) or neither (no clear gain): a
model can depend on its latents and still answer better without them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence

from .scoring import Z95

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The verdict


def paired_drop(base: Sequence[bool], other: Sequence[bool], z: float = Z95) -> tuple[float, float, float]:
    """Accuracy drop acc(base) - acc(other) as a fraction, with its paired 95 % interval (lo, hi).

    b = right -> wrong, c = wrong -> right over the same n items; d = (b - c) / n,
    Var(d) = ((b + c) / n - d^2) / n.
    """
    n = len(base)
    if n == 0 or n != len(other):
        raise ValueError(f"paired_drop needs two equal, non-empty lists; got {n} and {len(other)}")
    b = sum(1 for x, y in zip(base, other) if x and not y)
    c = sum(1 for x, y in zip(base, other) if y and not x)
    drop = (b - c) / n
    half = z * math.sqrt(max((b + c) / n - drop * drop, 0.0) / n)
    return drop, drop - half, drop + half


def binomial_half_width(accuracy: float, n: int, z: float = Z95) -> float:
    """Half-width of the Wald 95 % interval of an accuracy (fraction) measured on n items."""
    return z * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n) if n else float("nan")


def verdict(
    drops: dict[str, tuple[float, float, float]], margin: float = 0.05, base_accuracy: float | None = None
) -> str:
    """One line from the paired drops (fractions) of `zero` and/or `shuffle`; the rule is in the module
    docstring. `drops` maps a family to (drop, lo, hi); a `no_latent` entry (no latent fed at all) adds
    whether the latents help (its drop's interval above the margin) or hurt (below minus the margin).
    No verdict when the unmodified accuracy (`base_accuracy`) is <= `margin`: no drop could exceed it."""
    tested = {family: drops[family] for family in ("zero", "shuffle") if family in drops}
    if not tested:
        return "no verdict: run zero and/or shuffle to test whether the answers depend on the latents"
    if base_accuracy is not None and base_accuracy <= margin:
        return (
            f"no verdict: the unmodified accuracy ({100 * base_accuracy:.1f} %) is within the "
            f"{100 * margin:g}-point margin of 0, so no drop can exceed it"
        )
    names = {"zero": "zeroing", "shuffle": "shuffling", "no_latent": "no latent at all"}
    details = ", ".join(f"{names[family]} {_points(*drop)}" for family, drop in tested.items())
    rule = f"(accuracy drop, paired 95 % interval; margin {100 * margin:g} points)"
    if any(lo > margin for _, lo, _ in tested.values()):
        line = f"answers depend on the latents: {details}"
    elif all(hi < margin for _, _, hi in tested.values()):
        line = f"answers do not depend on the latents: {details}"
    else:
        line = f"inconclusive at this test-set size: {details}"
    if "no_latent" in drops:
        drop, lo, hi = drops["no_latent"]
        effect = "they help" if lo > margin else "they HURT" if hi < -margin else "no clear gain from them"
        line += f"; {names['no_latent']} {_points(drop, lo, hi)} ({effect})"
    return f"{line} {rule}"


def _points(drop: float, lo: float, hi: float) -> str:
    return f"{100 * drop:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"


# --------------------------------------------------------------------------------------------------
# Table, files, chart


def format_table(result: dict) -> str:
    """The plain-text table: one row per intervention, the No-CoT reference, then the verdict."""
    header = f"{'intervention':<22}{'latents':>8}{'accuracy %':>12}{'±95%':>7}{'drop, points [95% CI]':>26}{'answer changed %':>18}"
    lines = [f"{result['n']} questions, model runs {result['num_latent']} latents", header, "-" * len(header)]
    for row in result["rows"]:
        if row["family"] == "none":
            drop = "(reference)"
        else:
            drop = f"{100 * row['drop']:+.1f} [{100 * row['drop_lo']:+.1f}, {100 * row['drop_hi']:+.1f}]"
        name = "none (unmodified)" if row["family"] == "none" else row["name"]
        lines.append(
            f"{name:<22}{row['num_latent']:>8}{100 * row['accuracy']:>12.1f}{100 * row['half_width']:>7.1f}"
            f"{drop:>26}{100 * row['changed']:>18.1f}"
        )
    if result.get("no_cot_accuracy") is not None:
        lines.append(f"{'No-CoT-SFT (reference)':<22}{'-':>8}{100 * result['no_cot_accuracy']:>12.1f}")
    lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines)


def write_outputs(result: dict, samples: list[dict], output_dir: str) -> dict[str, str]:
    """samples.jsonl, results.json and table.txt in `output_dir`; returns the paths (and the PNG's)."""
    os.makedirs(output_dir, exist_ok=True)
    files = {
        name: os.path.join(output_dir, filename)
        for name, filename in (
            ("samples", "samples.jsonl"),
            ("results", "results.json"),
            ("table", "table.txt"),
            ("png", "interventions.png"),
        )
    }
    with open(files["samples"], "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in samples)
    with open(files["table"], "w", encoding="utf-8") as handle:
        handle.write(result["table"] + "\n")
    with open(files["results"], "w", encoding="utf-8") as handle:
        json.dump({**result, "files": files}, handle, indent=2)
    return files


def _reference_lines(axis, result: dict, base: float) -> None:
    axis.axhline(
        100 * base, color="#1f77b4", linestyle="--", linewidth=1, label=f"unmodified ({100 * base:.1f} %)"
    )
    if result.get("no_cot_accuracy") is not None:
        axis.axhline(
            100 * result["no_cot_accuracy"],
            color="#555555",
            linestyle=":",
            linewidth=1.2,
            label=f"No-CoT-SFT ({100 * result['no_cot_accuracy']:.1f} %)",
        )


def save_plot(result: dict, path: str) -> None:
    """Accuracy under each intervention: bars (zero, shuffle, reorder), the noise sweep, the latent count.

    Error bars: the 95 % binomial interval of each accuracy; dashed: the unmodified model; dotted: No-CoT.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on a headless machine
    import matplotlib.pyplot as plt

    rows = result["rows"]
    base = next(row for row in rows if row["family"] == "none")["accuracy"]
    bars = [row for row in rows if row["family"] in ("zero", "shuffle", "reverse", "permute")]
    noise = [row for row in rows if row["family"] == "noise"]
    counts = {row["num_latent"]: row for row in rows if row["family"] in ("first_k", "num_latent", "none")}
    panels = [
        panel for panel, present in (("bars", bars), ("noise", noise), ("counts", len(counts) > 1)) if present
    ]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.8), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        if panel == "bars":
            values = [100 * row["accuracy"] for row in bars]
            errors = [100 * row["half_width"] for row in bars]
            axis.bar(range(len(bars)), values, yerr=errors, color="#ff7f0e", capsize=3)
            axis.set_xticks(range(len(bars)), [row["name"] for row in bars])
            for index, (value, error) in enumerate(zip(values, errors)):
                axis.text(index, value + error + 1, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
            axis.set_title("latents replaced")
        elif panel == "noise":
            sigmas = [row["value"] for row in noise]
            axis.errorbar(
                sigmas,
                [100 * row["accuracy"] for row in noise],
                yerr=[100 * row["half_width"] for row in noise],
                marker="o",
                capsize=3,
                color="#2ca02c",
            )
            if min(sigmas) > 0:
                axis.set_xscale("log")
            axis.set_xlabel("noise sigma (x RMS of each latent)")
            axis.set_title("Gaussian noise on each latent")
        else:
            ns = sorted(counts)
            axis.errorbar(
                ns,
                [100 * counts[n]["accuracy"] for n in ns],
                yerr=[100 * counts[n]["half_width"] for n in ns],
                marker="o",
                capsize=3,
                color="#9467bd",
            )
            axis.axvline(result["num_latent"], color="#999999", linewidth=0.8)
            axis.set_xlabel(f"latents fed (first k; the model runs {result['num_latent']})")
            axis.set_title("number of latents")
        _reference_lines(axis, result, base)
        axis.set_ylim(0, 105)
        axis.set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", bbox_to_anchor=(0.99, 0.995), fontsize=8, ncol=len(labels))
    fig.suptitle(result.get("title") or "interventions on the latents", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
