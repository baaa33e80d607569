"""Accuracy and speed of a CODI checkpoint on the benchmarks of docs/method.md#evaluation; `codi eval`.

Two scores per run, side by side:
  reference: the reference's extraction (commas removed, LAST match of `-?\\d+\\.?\\d*`, float);
  strict:    only the number right after the last answer prompt (the checkpoint's `answer_prompt`,
             "The answer is:" by default; no prompt -> wrong).
Speed: wall time, questions/s and mean generated tokens per question; latent positions are counted
separately. `--compare_cot` also decodes in teacher (explicit CoT) mode and reports the speedup.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, replace

from .. import distributed
from ..data.eval_data import EvalItem, EvalSetSpec, eval_set_spec, load_eval_set
from ..report import eval_table, write_results
from . import static_decode
from .decoding import DecodingConfig, make_config
from .generate import generate, generate_samples, unfit_questions

# The scoring rule lives in `codi.inference.scoring`; these names stay importable from here.
from .scoring import (  # noqa: F401
    extract_answer,
    extract_answer_strict,
    extract_choice,
    extract_choice_strict,
    is_correct,
    majority_vote,
    sample_metrics,
    score_text,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# One evaluation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def _evaluation_config(config, mode, batch_size, options) -> DecodingConfig:
    """The decoding config of one evaluation; CoT drops the latent-only options, with a warning naming
    them (`--compare_cot` runs one config in both modes)."""
    values = {name: getattr(config, name) for name in DecodingConfig.field_names()} if config else {}
    values.update(options)
    if batch_size is not None:
        values["batch_size"] = batch_size
    target = mode or values.get("mode", "latent")
    values["mode"] = "latent"
    config = make_config(None, **values)
    if target == "cot":
        dropped = [name for name in _LATENT_ONLY if getattr(config, name)]
        if dropped:  # e.g. `--compare_cot` runs one config in both modes: say what CoT mode leaves out
            logger.warning("CoT mode ignores the latent-only option(s) %s", ", ".join(dropped))
    return config.for_mode(target)


_LATENT_ONLY = ("latent_noise", "latent_dropout", "feed_answer_prompt")


def refuse_if_none_fit(unfit: dict[int, str], total: int, what: str) -> None:
    """An empty result is no result: when not one of `total` questions fits, say why (the limit)."""
    if total and len(unfit) == total:
        raise ValueError(f"{what}: none of the {total} question(s) can be answered; the first {unfit[0]}")


def _skipped(
    model, items: Sequence[EvalItem], config: DecodingConfig, name: str, refuse_all: bool = False
) -> dict[int, str]:
    """{index: reason} of the items the model cannot answer, named in one warning (`refuse_all`: an
    error when that is every item)."""
    skipped = unfit_questions(model, [item.question for item in items], config)
    if refuse_all:
        refuse_if_none_fit(skipped, len(items), name)
    if skipped:
        named = ", ".join(f"{items[index].where or f'item {index}'}" for index in list(skipped)[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        first = next(iter(skipped.values()))
        logger.warning(
            "%s (%s): %d of %d questions skipped and counted wrong: %s%s (first: %s)",
            name, config.mode, len(skipped), len(items), named, more, first,
        )  # fmt: skip
    return skipped


def _answer(
    model, questions: list[str], config: DecodingConfig, progress: bool, ids: list[int] | None = None
):
    """Outputs and the wall time in seconds: one per question, or, with `ids` (each question's index in
    the evaluated set, which seeds its sampled latents), `config.num_samples` per question."""
    start = time.perf_counter()
    # generate() copies the ids to the host at the end of each batch, so the clock includes the GPU.
    # Under torchrun each rank answers its shard; all ranks get every output back in input order.
    bar = progress and distributed.is_main_process()
    if ids is None:
        outputs = distributed.map_sharded(
            lambda shard: generate(model, shard, config, progress=bar), questions
        )
    else:
        outputs = distributed.map_sharded(
            lambda shard: generate_samples(
                model, [q for _, q in shard], config, progress=bar, question_ids=[i for i, _ in shard]
            ),
            list(zip(ids, questions)),
        )
    return outputs, time.perf_counter() - start


def _record(index: int, item: EvalItem, output, verdict: dict | None, reason: str | None) -> dict:
    record = {"index": index, "where": item.where, "question": item.question, "gold": item.gold}
    if reason is not None:  # skipped: no answer, counted wrong
        return record | {"skipped": reason, "prediction": None, "correct": False, "strict_correct": False}
    return record | {
        "prediction": verdict["prediction"],
        "correct": verdict["correct"],
        "strict_prediction": verdict["strict_prediction"],
        "strict_correct": verdict["strict_correct"],
        "generated_text": output.text,
        "num_generated_tokens": output.num_generated_tokens,
        "num_latent_positions": output.num_latent_positions,
    }


def _write_jsonl(output_dir: str | None, filename: str, records: list[dict]) -> list[str]:
    if not output_dir or not distributed.is_main_process():
        return []
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return [path]


def _releases_decoding_memory(function):
    """`function(model, ...)`, then free what fast decoding kept for the model (static caches, CUDA
    graphs, merged LoRA weights: `static_decode.release`), also when it fails: an evaluation during
    training must not keep that memory from training."""

    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        try:
            return function(model, *args, **kwargs)
        finally:
            static_decode.release(model)

    return wrapper


@_releases_decoding_memory
def evaluate(
    model,
    items: Sequence[EvalItem],
    mode: str | None = None,
    batch_size: int | None = None,
    *,
    config: DecodingConfig | None = None,
    name: str = "eval",
    answer_kind: str = "number",
    num_runs: int = 1,
    output_dir: str | None = None,
    progress: bool = False,
    warmup: bool = True,
    refuse_all_skipped: bool = False,
    **options,
) -> dict:
    """Generate answers for `items` `num_runs` times; accuracy (%, mean and std), speed, files.

    Decoding: `config` (a `DecodingConfig`) with any of its fields as keywords on top (`max_new_tokens=`,
    `do_sample=`, ...); `mode` and `batch_size` too. Run r samples with seed `seed + r` (seed None: 0).
    Writes `{output_dir}/{name}_{mode}.jsonl` (one line per question; `_run{r}` added when
    num_runs > 1) with question, gold, generated text, both predictions and both verdicts.
    Timings exclude a 2-token warm-up call (CUDA init, kernels).

    Questions the model cannot answer (longer than its positions, empty in CoT mode) are skipped,
    named in a warning and counted WRONG: `n` and the denominator stay len(items); `skipped` counts
    them and `skipped_items` names them (`where`, else the index), and their JSONL lines say why.
    `refuse_all_skipped` (`evaluate_sets`, i.e. `codi eval`): an error naming the reason when every
    question would be skipped (an accuracy of 0 over nothing is no result).

    k samples (`num_samples` > 1, `latent_noise` > 0 or `latent_dropout`): the runs are greedy and
    `evaluate_samples` adds pass@k, pass@1 and majority-vote accuracy beside them.
    """
    config = _evaluation_config(config, mode, batch_size, options)
    if not items:
        raise ValueError(f"{name}: no items to evaluate")
    if num_runs < 1:
        raise ValueError(f"num_runs must be >= 1, got {num_runs}")
    sampled = config.num_samples > 1 or config.samples_latents
    run_config = config.greedy() if sampled else config
    skipped = _skipped(model, items, config, name, refuse_all_skipped)
    kept = [index for index in range(len(items)) if index not in skipped]
    questions = [items[index].question for index in kept]
    if warmup and questions:
        generate(model, questions[:1], replace(run_config, max_new_tokens=2, min_new_tokens=0))
    accuracies, strict_accuracies, times, tokens, latent_positions, files = [], [], [], [], [], []
    base_seed = config.seed or 0
    for run in range(num_runs):
        seeded = replace(run_config, seed=base_seed + run)
        outputs, seconds = _answer(model, questions, seeded, progress) if questions else ([], 0.0)
        times.append(seconds)
        by_index = dict(zip(kept, outputs))
        records = [
            _record(index, item, by_index.get(index), _verdict(by_index, index, item, model, answer_kind),
                    skipped.get(index))
            for index, item in enumerate(items)
        ]  # fmt: skip
        accuracies.append(100.0 * sum(record["correct"] for record in records) / len(items))
        strict_accuracies.append(100.0 * sum(record["strict_correct"] for record in records) / len(items))
        tokens.append(_mean(output.num_generated_tokens for output in outputs))
        latent_positions.append(_mean(output.num_latent_positions for output in outputs))
        suffix = f"_run{run}" if num_runs > 1 else ""
        files += _write_jsonl(output_dir, f"{name}_{config.mode}{suffix}.jsonl", records)
    result = _summary(name, config, run_config, items, skipped, accuracies, strict_accuracies, times)
    result |= _speed(config.mode, len(kept), times, tokens, latent_positions) | {"samples_files": files}
    if sampled:
        result |= evaluate_samples(
            model, items, config, name=name, answer_kind=answer_kind, output_dir=output_dir,
            progress=progress, skipped=skipped,
        )  # fmt: skip
    return result


def _verdict(by_index: dict, index: int, item: EvalItem, model, answer_kind: str) -> dict | None:
    output = by_index.get(index)
    if output is None:
        return None
    return score_text(output.text, item.gold, answer_kind, model.args.answer_prompt)


def _summary(name, config, run_config, items, skipped, accuracies, strict_accuracies, times) -> dict:
    accuracy, accuracy_std = _mean_std(accuracies)
    strict_accuracy, strict_std = _mean_std(strict_accuracies)
    return {
        "dataset": name,
        "mode": config.mode,
        "n": len(items),
        "num_runs": len(accuracies),
        "accuracy": accuracy,
        "accuracy_std": accuracy_std,
        "strict_accuracy": strict_accuracy,
        "strict_accuracy_std": strict_std,
        "run_accuracies": accuracies,
        "run_strict_accuracies": strict_accuracies,
        "skipped": len(skipped),
        "skipped_items": [items[index].where or f"item {index}" for index in skipped],
        "skipped_counted_as": "wrong",
        "batch_size": config.batch_size,
        "max_new_tokens": config.max_new_tokens,
        "do_sample": run_config.do_sample,
        "decoding": asdict(config),
    }


def _speed(mode: str, answered: int, times, tokens, latent_positions) -> dict:
    wall_time = statistics.fmean(times)
    return {
        "wall_time_s": wall_time,
        "run_wall_times_s": times,
        "questions_per_s": (answered / wall_time if wall_time > 0 else float("inf")) if answered else 0.0,
        "mean_generated_tokens": statistics.fmean(tokens),
        "mean_latent_positions": statistics.fmean(latent_positions),
        # <bot> and <eot> are two more positions in latent mode (the paper's "8 positions" for 6)
        "mean_positions_before_answer_end": statistics.fmean(tokens)
        + statistics.fmean(latent_positions)
        + (2 if mode == "latent" else 0),
    }


def evaluate_samples(
    model,
    items: Sequence[EvalItem],
    config: DecodingConfig | None = None,
    *,
    name: str = "eval",
    answer_kind: str = "number",
    output_dir: str | None = None,
    progress: bool = False,
    skipped: dict[int, str] | None = None,
    **options,
) -> dict:
    """k = `num_samples` answers per question (`codi.inference.generate.generate_samples`): pass@k (%, some sample
    correct), pass@1 (mean sample accuracy), majority-vote accuracy, and their strict versions.

    Skipped questions count wrong, as in `evaluate`. Writes `{name}_{mode}_samples.jsonl`: per question
    every sample's text, predictions and verdicts, and the majority answer. Seed None: 0.
    """
    config = _evaluation_config(config, None, None, options)
    config = replace(config, seed=config.seed or 0)
    if skipped is None:
        skipped = _skipped(model, items, config, name)
    kept = [index for index in range(len(items)) if index not in skipped]
    questions = [items[index].question for index in kept]
    samples, seconds = _answer(model, questions, config, progress, ids=kept) if questions else ([], 0.0)
    by_index = dict(zip(kept, samples))
    records, verdicts, strict_verdicts, majority, strict_majority = [], [], [], [], []
    for index, item in enumerate(items):
        outputs = by_index.get(index, [])
        scored = [score_text(o.text, item.gold, answer_kind, model.args.answer_prompt) for o in outputs]
        vote = majority_vote([s["prediction"] for s in scored])
        strict_vote = majority_vote([s["strict_prediction"] for s in scored])
        verdicts.append([s["correct"] for s in scored] or [False])
        strict_verdicts.append([s["strict_correct"] for s in scored] or [False])
        majority.append(is_correct(vote, item.gold))
        strict_majority.append(is_correct(strict_vote, item.gold))
        samples_field = [{"generated_text": o.text} | s for o, s in zip(outputs, scored)]
        records.append(
            {"index": index, "where": item.where, "question": item.question, "gold": item.gold}
            | ({"skipped": skipped[index]} if index in skipped else {})
            | {"majority_prediction": vote, "majority_correct": majority[-1], "samples": samples_field}
        )
    metrics = sample_metrics(verdicts, majority)
    strict = sample_metrics(strict_verdicts, strict_majority)
    files = _write_jsonl(output_dir, f"{name}_{config.mode}_samples.jsonl", records)
    return (
        metrics
        | {f"strict_{key}": value for key, value in strict.items()}
        | {
            "num_samples": config.num_samples,
            "latent_noise": config.latent_noise,
            "latent_dropout": config.latent_dropout,
            "sample_do_sample": config.do_sample,
            "sample_temperature": config.temperature,
            "sample_wall_time_s": seconds,
            "samples_file": files[0] if files else None,
        }
    )


# --------------------------------------------------------------------------------------------------
# Several datasets, the table, the files


def evaluate_sets(
    model,
    sets: Sequence[tuple],
    config: DecodingConfig | None = None,
    *,
    modes: Sequence[str] = ("latent",),
    num_runs: int = 1,
    output_dir: str | None = None,
    progress: bool = False,
    summary: dict | None = None,
    **options,
) -> dict:
    """Evaluate each `(EvalSetSpec, items)` of `sets` in every mode; returns `summary` (e.g. model and
    settings) plus `results`, `speedups_vs_cot` and the printed `table`. Decoding: `config` and
    `options` as in `evaluate`.

    The results files are rewritten after every set (main process), so what is done survives a later
    failure: the failing set is recorded under `failed` (dataset, mode, error) and the error re-raised.
    With both modes, `speedups_vs_cot` holds each set's CoT / latent wall-time ratio.
    """
    summary = dict(summary or {})
    results: list[dict] = []
    speedups: dict[str, float] = {}

    def save(failed: dict | None = None) -> None:
        summary.update(results=results, speedups_vs_cot=speedups, table=eval_table(results, speedups))
        if failed is not None:
            summary["failed"] = failed
        if output_dir and distributed.is_main_process():
            write_results(output_dir, summary, "results_table.txt")

    for spec, items in sets:
        by_mode = {}
        for mode in modes:
            try:
                by_mode[mode] = evaluate(
                    model, items, mode, config=config, name=spec.name, answer_kind=spec.answer_kind,
                    num_runs=num_runs, output_dir=output_dir, progress=progress, refuse_all_skipped=True,
                    **options,
                )  # fmt: skip
            except Exception as error:
                save({"dataset": spec.name, "mode": mode, "error": f"{type(error).__name__}: {error}"})
                raise
            results.append(by_mode[mode])
        if len(by_mode) == 2:
            speedups[spec.name] = by_mode["cot"]["wall_time_s"] / max(by_mode["latent"]["wall_time_s"], 1e-9)
            by_mode["latent"]["speedup_vs_cot"] = speedups[spec.name]
        save()
    if output_dir and distributed.is_main_process():
        logger.info("results written to %s", os.path.join(output_dir, "results.json"))
    return summary


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
