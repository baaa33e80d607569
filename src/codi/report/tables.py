"""The text tables and result files of `codi eval`, `codi ablate` and `codi probe` (those of `codi
compare` and `codi demo` are in `codi.report.comparison`), and the one writer of `results.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ..analysis.probe_metric import BUCKETS


def write_results(output_dir: str, summary: dict, table_file: str = "table.txt") -> str:
    """`results.json` (the summary) and `table_file` (its "table") in `output_dir`; the JSON path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, default=str)
    with open(os.path.join(output_dir, table_file), "w", encoding="utf-8") as handle:
        handle.write(summary["table"] + "\n")
    return path


def eval_table(results: Sequence[dict], speedups: dict[str, float] | None = None) -> str:
    """A plain-text table of results (one row per dataset and mode)."""
    header = f"{'dataset':<16} {'mode':<6} {'n':>5} {'acc %':>13} {'strict %':>13} {'time s':>8} "
    header += f"{'q/s':>8} {'tok/q':>7} {'latent/q':>8}"
    lines = [header, "-" * len(header)]
    for result in results:
        acc = f"{result['accuracy']:.2f}"
        strict = f"{result['strict_accuracy']:.2f}"
        if result["num_runs"] > 1:
            acc += f"±{result['accuracy_std']:.2f}"
            strict += f"±{result['strict_accuracy_std']:.2f}"
        lines.append(
            f"{result['dataset']:<16} {result['mode']:<6} {result['n']:>5} {acc:>13} {strict:>13} "
            f"{result['wall_time_s']:>8.2f} {result['questions_per_s']:>8.2f} "
            f"{result['mean_generated_tokens']:>7.1f} {result['mean_latent_positions']:>8.1f}"
        )
    for dataset, speedup in (speedups or {}).items():
        lines.append(f"{dataset}: speedup of CODI (latent) over teacher-mode CoT: {speedup:.2f}x (wall time)")
    for result in results:
        if "pass_at_k" in result:
            lines.append(
                f"{result['dataset']} {result['mode']}: k={result['num_samples']} samples "
                f"(latent_noise {result['latent_noise']}, dropout {result['latent_dropout']}, "
                f"do_sample {result['sample_do_sample']}): pass@k {result['pass_at_k']:.2f} %, majority vote "
                f"{result['majority_accuracy']:.2f} %, pass@1 {result['pass_at_1']:.2f} % (greedy {result['accuracy']:.2f} %)"
            )
    if any(result.get("skipped") for result in results):
        skipped = ", ".join(f"{r['dataset']} {r['mode']} {r['skipped']}" for r in results if r.get("skipped"))
        lines.append(
            f"skipped questions (too long for the model, or empty in CoT mode; counted wrong): {skipped}"
        )
    return "\n".join(lines)


def ablation_table(result: dict) -> str:
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


def probe_table(summary: dict) -> str:
    """A small text table for the terminal: the Table-3 rates (in order / any order) and the accuracy."""

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    lines = [
        f"probed {summary['num_questions']} questions, {summary['num_latent']} latents, top-{summary['top_k']}"
        f"; answer accuracy {pct(summary.get('accuracy'))}%",
        "top-k contain the intermediate results, % in order / any order (n):",
        f"{'':34}" + "".join(f"{name + ' steps':>20}" for name in (*BUCKETS, "all")),
    ]
    for key, where in (("table3", "before projection"), ("table3_after_projection", "after projection")):
        for rule, table in summary.get(key, {}).items():
            rows = [table[name] for name in (*BUCKETS, "all")]
            cells = "".join(
                f"{pct(r['in_order'])} / {pct(r['any_order'])} ({r['n']})".rjust(20) for r in rows
            )
            lines.append(f"{where + ', ' + rule:34}{cells}")
    return "\n".join(lines)
