"""The verdict of `codi ablate` (`codi.cli.ablate` runs `codi.analysis.interventions`) and its files; the table,
chart and intervals are drawn by `codi.report`.

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
import os

from ..report import write_results

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The verdict


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
# Files


def write_outputs(result: dict, samples: list[dict], output_dir: str) -> dict[str, str]:
    """samples.jsonl, results.json and table.txt in `output_dir`; returns the paths (and the PNG's)."""
    files = {
        name: os.path.join(output_dir, filename)
        for name, filename in (
            ("samples", "samples.jsonl"),
            ("results", "results.json"),
            ("table", "table.txt"),
            ("png", "interventions.png"),
        )
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(files["samples"], "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in samples)
    write_results(output_dir, {**result, "files": files}, "table.txt")
    return files
