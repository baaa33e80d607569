"""Accuracy and speed of a CODI checkpoint on the SPEC §5 benchmarks; `codi eval`.

Two scores per run, side by side:
  reference: the reference's extraction (commas removed, LAST match of `-?\\d+\\.?\\d*`, float);
  strict:    only the number right after the last `The answer is:` (no prompt -> wrong).
Speed: wall time, questions/s and mean generated tokens per question; latent positions are counted
separately. `--compare_cot` also decodes in teacher (explicit CoT) mode and reports the speedup.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Sequence

from . import distributed
from .eval_data import EvalItem, EvalSetSpec, eval_set_spec, load_eval_set
from .generate import generate

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d+\.?\d*")
ABS_TOLERANCE = 1e-4
REL_TOLERANCE = 1e-9


# --------------------------------------------------------------------------------------------------
# Answer extraction and scoring


def extract_answer(text: str) -> float | None:
    """Reference extraction: remove commas, take the LAST match of `-?\\d+\\.?\\d*` as a float.

    "$1,200." -> 1200.0; "x = -3.5" -> -3.5; no number -> None (scored wrong, as the reference's inf).
    """
    matches = _NUMBER.findall(text.replace(",", ""))
    return float(matches[-1]) if matches else None


def extract_answer_strict(text: str, answer_prompt: str = "The answer is:") -> float | None:
    """The number right after the LAST `answer_prompt` (spaces and a `$` allowed between); else None."""
    head, found, tail = text.rpartition(answer_prompt)
    if not found:
        return None
    match = re.match(r"\s*\$?\s*(-?\d+\.?\d*)", tail.replace(",", ""))
    return float(match.group(1)) if match else None


def extract_choice(text: str) -> str | None:
    """Reference extraction for CommonsenseQA: a number means wrong (None); otherwise the first
    character after the last `The answer is:`, and the reference's guess "C" when it is not A-E."""
    if _NUMBER.search(text.replace(",", "")):
        return None
    tail = text.split("The answer is:")[-1].strip()
    return tail[0] if tail and tail[0] in "ABCDE" else "C"


def extract_choice_strict(text: str, answer_prompt: str = "The answer is:") -> str | None:
    """The letter A-E right after the last `answer_prompt`, else None."""
    head, found, tail = text.rpartition(answer_prompt)
    tail = tail.strip()
    return tail[0] if found and tail and tail[0] in "ABCDE" else None


def is_correct(prediction: float | str | None, gold: float | str | None) -> bool:
    """Float compare: |p - g| <= 1e-4 absolute, or 1e-9 relative for huge values.

    Why not the reference's exact `==`: both sides come from decimal text, so they only differ by
    float noise (e.g. gold 0.30000000000000004 from a computed target). Why not 1e-4 RELATIVE:
    GSM-Hard golds reach 1e7, where that would accept an off-by-one answer. Letters compare exactly;
    a missing prediction or gold is wrong.
    """
    if prediction is None or gold is None:
        return False
    if isinstance(prediction, str) or isinstance(gold, str):
        return prediction == gold
    return math.isclose(prediction, gold, rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE)


# --------------------------------------------------------------------------------------------------
# One evaluation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluate(
    model,
    items: Sequence[EvalItem],
    mode: str = "latent",
    batch_size: int = 32,
    *,
    name: str = "eval",
    answer_kind: str = "number",
    max_new_tokens: int = 256,
    num_latent: int | None = None,
    num_runs: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    feed_answer_prompt: bool = False,
    output_dir: str | None = None,
    progress: bool = False,
    warmup: bool = True,
) -> dict:
    """Generate answers for `items` `num_runs` times; accuracy (%, mean and std), speed, files.

    Writes `{output_dir}/{name}_{mode}.jsonl` (one line per question; `_run{r}` added when
    num_runs > 1) with question, gold, generated text, both predictions and both verdicts.
    Run r samples with seed `seed + r`. Timings exclude a 2-token warm-up call (CUDA init, kernels).
    """
    if not items:
        raise ValueError(f"{name}: no items to evaluate")
    if num_runs < 1:
        raise ValueError(f"num_runs must be >= 1, got {num_runs}")
    prompt = model.args.answer_prompt
    if answer_kind == "choice":
        reference_of, strict_of = extract_choice, (lambda text: extract_choice_strict(text, prompt))
    else:
        reference_of, strict_of = extract_answer, (lambda text: extract_answer_strict(text, prompt))
    questions = [item.question for item in items]
    options = dict(
        mode=mode,
        num_latent=num_latent,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    if feed_answer_prompt and mode == "latent":
        options["feed_answer_prompt"] = True
    if warmup:
        generate(model, questions[:1], **{**options, "max_new_tokens": 2})
    accuracies, strict_accuracies, times, tokens, latent_positions, files = [], [], [], [], [], []
    for run in range(num_runs):
        start = time.perf_counter()
        # generate() copies the ids to the host at the end of each batch, so the clock includes the GPU.
        # Under torchrun each rank answers its shard; all ranks get every output back in input order.
        bar = progress and distributed.is_main_process()
        outputs = distributed.map_sharded(
            lambda shard, run=run, bar=bar: generate(model, shard, **options, seed=seed + run, progress=bar),
            questions,
        )
        times.append(time.perf_counter() - start)
        records, correct, strict_correct = [], 0, 0
        for index, (item, output) in enumerate(zip(items, outputs)):
            prediction, strict = reference_of(output.text), strict_of(output.text)
            verdict, strict_verdict = is_correct(prediction, item.gold), is_correct(strict, item.gold)
            correct += verdict
            strict_correct += strict_verdict
            records.append(
                {
                    "index": index,
                    "where": item.where,
                    "question": item.question,
                    "gold": item.gold,
                    "prediction": prediction,
                    "correct": verdict,
                    "strict_prediction": strict,
                    "strict_correct": strict_verdict,
                    "generated_text": output.text,
                    "num_generated_tokens": output.num_generated_tokens,
                    "num_latent_positions": output.num_latent_positions,
                }
            )
        accuracies.append(100.0 * correct / len(items))
        strict_accuracies.append(100.0 * strict_correct / len(items))
        tokens.append(statistics.fmean(output.num_generated_tokens for output in outputs))
        latent_positions.append(statistics.fmean(output.num_latent_positions for output in outputs))
        if output_dir and distributed.is_main_process():
            os.makedirs(output_dir, exist_ok=True)
            suffix = f"_run{run}" if num_runs > 1 else ""
            path = os.path.join(output_dir, f"{name}_{mode}{suffix}.jsonl")
            with open(path, "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            files.append(path)
    accuracy, accuracy_std = _mean_std(accuracies)
    strict_accuracy, strict_std = _mean_std(strict_accuracies)
    wall_time = statistics.fmean(times)
    return {
        "dataset": name,
        "mode": mode,
        "n": len(items),
        "num_runs": num_runs,
        "accuracy": accuracy,
        "accuracy_std": accuracy_std,
        "strict_accuracy": strict_accuracy,
        "strict_accuracy_std": strict_std,
        "run_accuracies": accuracies,
        "run_strict_accuracies": strict_accuracies,
        "wall_time_s": wall_time,
        "run_wall_times_s": times,
        "questions_per_s": len(items) / wall_time if wall_time > 0 else float("inf"),
        "mean_generated_tokens": statistics.fmean(tokens),
        "mean_latent_positions": statistics.fmean(latent_positions),
        # <bot> and <eot> are two more positions in latent mode (the paper's "8 positions" for 6)
        "mean_positions_before_answer_end": statistics.fmean(tokens)
        + statistics.fmean(latent_positions)
        + (2 if mode == "latent" else 0),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "samples_files": files,
    }


# --------------------------------------------------------------------------------------------------
# Several datasets, the table, the files


def format_table(results: Sequence[dict], speedups: dict[str, float] | None = None) -> str:
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
    return "\n".join(lines)


def load_eval_sets(
    datasets: str | Sequence[str],
    data_dir: str | None = None,
    data_file: str | None = None,
    limit: int | None = None,
) -> list[tuple[EvalSetSpec, list[EvalItem]]]:
    """(spec, items) per evaluation set named in `datasets` (comma-separated, or a list).

    Read from `data_file` (one set only), else from plain-file copies in `data_dir`, else from the
    hub; the first `limit` items of each. Unknown names fail before anything is read."""
    names = [name.strip() for name in datasets.split(",")] if isinstance(datasets, str) else list(datasets)
    names = [name for name in names if name]
    if not names:
        raise ValueError("--datasets is empty")
    specs = [eval_set_spec(name) for name in names]
    if data_file and len(specs) != 1:
        raise ValueError("--data_file needs exactly one dataset in --datasets")
    if data_dir and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir {data_dir} is not a directory")
    return [(spec, load_eval_set(spec.name, data_file or data_dir, limit)) for spec in specs]


def evaluate_sets(
    model,
    sets: Sequence[tuple[EvalSetSpec, Sequence[EvalItem]]],
    modes: Sequence[str] = ("latent",),
    **options,
) -> tuple[list[dict], dict[str, float]]:
    """`evaluate` every set in every mode (`options` go to `evaluate`): the results in order and,
    for a set run in both modes, the wall-time speedup of latent over CoT (also stored in the
    latent result as `speedup_vs_cot`)."""
    results, speedups = [], {}
    for spec, items in sets:
        by_mode = {
            mode: evaluate(model, items, mode, name=spec.name, answer_kind=spec.answer_kind, **options)
            for mode in modes
        }
        results.extend(by_mode.values())
        if {"latent", "cot"} <= set(by_mode):
            speedups[spec.name] = by_mode["cot"]["wall_time_s"] / max(by_mode["latent"]["wall_time_s"], 1e-9)
            by_mode["latent"]["speedup_vs_cot"] = speedups[spec.name]
    return results, speedups


def write_results(summary: dict, table: str, output_dir: str) -> str:
    """`results.json` (the summary) and `results_table.txt` in `output_dir`; returns the JSON's path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(output_dir, "results_table.txt"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    return path
