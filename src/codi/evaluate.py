"""Accuracy and speed of a CODI checkpoint on the SPEC §5 benchmarks; `codi eval`.

Two scores per run, side by side:
  reference: the reference's extraction (commas removed, LAST match of `-?\\d+\\.?\\d*`, float);
  strict:    only the number right after the last `The answer is:` (no prompt -> wrong).
Speed: wall time, questions/s and mean generated tokens per question; latent positions are counted
separately. `--compare_cot` also decodes in teacher (explicit CoT) mode and reports the speedup.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Sequence

from . import distributed
from .eval_data import EVAL_SETS, EvalItem, eval_set_spec, load_eval_set
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
# Several datasets, the table, the CLI


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codi eval", description="Evaluate a CODI checkpoint (accuracy and speed)."
    )
    parser.add_argument("--model", required=True, help="CODI checkpoint directory (save_pretrained).")
    parser.add_argument("--base_model", default=None, help="Base model for a LoRA checkpoint, if moved.")
    parser.add_argument(
        "--datasets",
        default="gsm8k",
        help=f"Comma-separated: {', '.join(EVAL_SETS)} (aliases: gsm_hard, multi-arith, ...).",
    )
    parser.add_argument(
        "--data_dir", default=None, help="Folder of plain-file copies (../shared/data); default: hub ids."
    )
    parser.add_argument("--data_file", default=None, help="One file to read (only with one dataset).")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N items of each set.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--output_dir", default="eval_results")
    parser.add_argument("--mode", choices=("latent", "cot"), default="latent")
    parser.add_argument("--compare_cot", action="store_true", help="Also run teacher-mode CoT; speedup.")
    parser.add_argument("--num_runs", type=int, default=1, help="Repeat (for sampling): mean and std.")
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inf_latent_iterations", type=int, default=None)
    parser.add_argument(
        "--feed_answer_prompt",
        action="store_true",
        help="Latent mode: feed <eot> + the answer prompt in one forward (faster; same answers when the "
        "model has learned the prompt).",
    )
    parser.add_argument("--reference_compat", action="store_true", help="Reference's unmasked decoding.")
    parser.add_argument("--fix_attn_mask", action="store_true", help="With --reference_compat.")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"))
    parser.add_argument("--device", default=None, help="cuda | cpu | cuda:1 ... (default: cuda if any).")
    parser.add_argument("--no_progress", action="store_true", help="No tqdm bar.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`codi eval`: load the checkpoint, evaluate every requested set, print and save the results."""
    from .model import CODIModel

    args = build_parser().parse_args(argv)
    distributed.init()  # no-op unless launched by torchrun / accelerate with several processes
    names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    if not names:
        raise ValueError("--datasets is empty")
    specs = [eval_set_spec(name) for name in names]  # unknown names fail before the model loads
    if args.data_file and len(specs) != 1:
        raise ValueError("--data_file needs exactly one dataset in --datasets")
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir} is not a directory")
    item_sets = [load_eval_set(spec.name, args.data_file or args.data_dir, args.limit) for spec in specs]
    overrides = {}
    if args.inf_latent_iterations is not None:
        overrides["inf_latent_iterations"] = args.inf_latent_iterations
    if args.reference_compat:
        overrides.update(reference_compat=True, fix_attn_mask=args.fix_attn_mask)
    model = CODIModel.from_pretrained(args.model, args.base_model, dtype=args.dtype, **overrides)
    device = args.device or str(distributed.local_device())  # cuda:LOCAL_RANK when there is a GPU
    model.to(device)
    model.eval()
    modes = ["latent", "cot"] if args.compare_cot else [args.mode]
    results, speedups = [], {}
    for spec, items in zip(specs, item_sets):
        by_mode = {}
        for mode in modes:
            by_mode[mode] = evaluate(
                model,
                items,
                mode,
                args.batch_size,
                name=spec.name,
                answer_kind=spec.answer_kind,
                max_new_tokens=args.max_new_tokens,
                num_runs=args.num_runs,
                do_sample=args.do_sample,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                feed_answer_prompt=args.feed_answer_prompt,
                output_dir=args.output_dir,
                progress=not args.no_progress,
            )
            results.append(by_mode[mode])
        if len(by_mode) == 2:
            speedups[spec.name] = by_mode["cot"]["wall_time_s"] / max(by_mode["latent"]["wall_time_s"], 1e-9)
            by_mode["latent"]["speedup_vs_cot"] = speedups[spec.name]
    table = format_table(results, speedups)
    if not distributed.is_main_process():  # metrics and files once
        distributed.finish()
        return 0
    print(table)
    summary = {
        "model": args.model,
        "device": str(model.device),
        "settings": {key: value for key, value in vars(args).items() if key not in ("model", "no_progress")},
        "inf_latent_iterations": model.args.inf_latent_iterations,
        "reference_compat": model.args.reference_compat,
        "results": results,
        "speedups_vs_cot": speedups,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(args.output_dir, "results_table.txt"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    logger.info("results written to %s", os.path.join(args.output_dir, "results.json"))
    distributed.finish()
    return 0
