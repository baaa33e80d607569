"""The charts (PNG, matplotlib's Agg backend: no display needed): the comparison's (`codi compare`,
`codi demo`) and the ablation's (`codi ablate`); the probe's are in `codi.report.probe`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .comparison import Row


def comparison_chart(rows: Sequence[Row], path: str, title: str = "") -> None:
    """Four panels: accuracy with its interval, positions decoded per answer, questions/s, train time."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    names = [row.name or row.label for row in rows]
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


def ablation_chart(result: dict, path: str) -> None:
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
