"""Decoding benchmark: CODI latent answers vs teacher-mode CoT answers vs `transformers.generate`.

Latency per question at batch 1 and throughput at batch 64 (`--batch_size`) on GSM8k-Aug valid
questions. The benchmark models have random (or untrained) weights, so greedy decoding would not stop
at EOS when a trained model would: every mode generates a FIXED, realistic number of tokens
(`min_new_tokens = max_new_tokens`), measured on the data with the model's tokenizer:

  cot    mean tokens of CoT ++ "The answer is: N" ++ EOS  (what a trained teacher generates)
  latent mean tokens of "The answer is: N" ++ EOS, after `<bot>`, num_latent latents and `<eot>`

modes (all greedy, KV-cached, the same weights):
  latent              `codi.inference.generate(mode="latent")`, the eager loop (`fast_decoding="off"`)
  latent_fast         the same on the fast loop (`--fast`: auto = static cache, CUDA graphs on CUDA)
  latent_prompt       eager, `feed_answer_prompt=True` (`<eot>` + prompt in one forward)
  latent_prompt_fast  the same on the fast loop
  latent_reference    eager under `reference_compat` (the reference's unmasked steps)
  cot / cot_fast      `codi.inference.generate(mode="cot")`, eager / fast
  hf_generate_cot     `transformers` `generate()` on the same LM (DynamicCache), same question ids

Beside the speeds, per mode: ATen ops per LM call (counted eagerly, `host_cost`), kernel launches per
LM call (profiler), CPU time / wall time, and on CUDA host-device syncs per LM call.

Positions and sequential LM calls are counted by a forward hook, not assumed. Modes run interleaved
(rotating order) and the median over `--repeats` rounds is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_step import PositionCounter  # noqa: E402

MODES = (
    "latent",
    "latent_fast",
    "latent_prompt",
    "latent_prompt_fast",
    "latent_reference",
    "cot",
    "cot_fast",
    "hf_generate_cot",
)


def _count(tokenizer, ids: list[int], digits_per_token: int) -> int:
    """Token count of `ids`, with each run of single-digit tokens regrouped `digits_per_token` a token."""
    count, run = 0, 0
    for token in tokenizer.convert_ids_to_tokens(ids) + [""]:
        if token.isdigit() and len(token) == 1:
            run += 1
            continue
        count += -(-run // digits_per_token) + (1 if token else 0)
        run = 0
    return count


def forced_lengths(model, data: str | None, digits_per_token: int) -> dict[str, float]:
    """Mean token counts of the generated parts on GSM8k-Aug valid.

    SmolLM2's tokenizer splits numbers into single digits; GPT-2's holds most numbers up to 3 digits
    as one token. For the GPT-2-shaped model (`digits_per_token=3`) digit runs are regrouped by 3,
    an estimate of GPT-2's lengths that keeps the CoT/latent ratio conservative.
    """
    from codi.data.dataset import build_dataset, read_records

    records = read_records(str(common.data_path(data)))
    tokenizer = model.tokenizer
    dataset, _ = build_dataset(records, tokenizer, bot_id=model.bot_id, eot_id=model.eot_id)
    examples = dataset.examples
    return {
        "question": statistics.mean(len(e.question_ids) for e in examples),
        "cot_plus_answer_eos": statistics.mean(
            _count(tokenizer, e.cot_ids + e.answer_ids, digits_per_token) + 1 for e in examples
        ),
        "answer_eos": statistics.mean(
            _count(tokenizer, e.answer_ids, digits_per_token) + 1 for e in examples
        ),
    }


class Runner:
    """Answers a list of questions in one batch in a given mode, with fixed lengths."""

    def __init__(self, model, cot_tokens: int, answer_tokens: int, fast: str = "auto"):
        from dataclasses import replace

        from transformers import GenerationConfig

        self.model = model
        self.fast = fast
        self.reference = model.with_settings(args=replace(model.args, reference_compat=True))
        self.cot_tokens = cot_tokens
        self.answer_tokens = answer_tokens
        eos = model.tokenizer.eos_token_id
        self.hf_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=cot_tokens,
            min_new_tokens=cot_tokens,
            pad_token_id=model.pad_id,
            eos_token_id=eos,
            use_cache=True,
        )

    def __call__(self, mode: str, questions: list[str]) -> list[list[int]]:
        from codi.inference.generate import generate

        if mode == "hf_generate_cot":
            return self._hf_generate(questions)
        if mode not in MODES:
            raise ValueError(mode)
        model = self.reference if mode == "latent_reference" else self.model
        tokens = self.cot_tokens if mode.startswith("cot") else self.answer_tokens
        outputs = generate(
            model,
            questions,
            mode="cot" if mode.startswith("cot") else "latent",
            batch_size=len(questions),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            feed_answer_prompt=mode.startswith("latent_prompt"),
            fast_decoding=self.fast if mode.endswith("_fast") else "off",
        )
        return [output.token_ids for output in outputs]

    @torch.inference_mode()
    def _hf_generate(self, questions: list[str]) -> list[list[int]]:
        """The same job through `transformers`: tokenise, left-pad, generate, decode."""
        from codi.data.dataset import encode_question, pad_sequences

        model = self.model
        prompts = [encode_question(model.tokenizer, question) for question in questions]
        input_ids = pad_sequences(prompts, model.pad_id, "left").to(model.device)
        mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left").to(model.device)
        out = model.hf_model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=self.hf_config
        )
        rows = out[:, input_ids.shape[1] :].tolist()
        for row in rows:
            model.tokenizer.decode(row, skip_special_tokens=True)  # as codi.inference.generate returns text
        return rows


# speed-up name -> (faster candidate, baseline)
PAIRS = {
    "latent_fast_vs_eager": ("latent_fast", "latent"),
    "latent_prompt_fast_vs_eager": ("latent_prompt_fast", "latent_prompt"),
    "cot_fast_vs_eager": ("cot_fast", "cot"),
    "latent_fast_vs_reference": ("latent_fast", "latent_reference"),
    "latent_vs_cot": ("latent", "cot"),
    "latent_prompt_vs_cot": ("latent_prompt", "cot"),
    "cot_vs_hf_generate": ("cot", "hf_generate_cot"),
}


def measure(
    runner: Runner, modes: tuple[str, ...], questions: list[str], batch_size: int, repeats: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds (wall and process CPU) per round and mode: all questions in batches of `batch_size`,
    modes interleaved (rotating order)."""
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    groups = [questions[i : i + batch_size] for i in range(0, len(questions), batch_size)]
    for round_index in range(repeats):
        totals = dict.fromkeys(modes, 0.0)
        cpu_totals = dict.fromkeys(modes, 0.0)
        for group_index, group in enumerate(groups):
            shift = (round_index + group_index) % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                with common.timed(device) as timer:
                    runner(mode, group)
                totals[mode] += timer["s"]
                cpu_totals[mode] += timer["cpu_s"]
        for mode in modes:
            seconds[mode].append(totals[mode])
            cpu_seconds[mode].append(cpu_totals[mode])
        rounded = {mode: round(value, 4) for mode, value in totals.items()}
        print(f"batch {batch_size} round {round_index}: {rounded}", file=sys.stderr, flush=True)
    return {"wall": seconds, "cpu": cpu_seconds}


def host_costs(runner: Runner, mode: str, questions: list[str], lm_calls: int, device: str) -> dict[str, Any]:
    """Host cost of one call of `mode` on `questions` (`bench/host_cost.py`): ATen ops dispatched
    (counted eagerly: CUDA-graph replays are not ops), launches and, on CUDA, syncs per LM call;
    CPU time over wall time."""
    from host_cost import host_cost

    costs = host_cost(lambda: runner(mode, questions), device)
    counted = ("aten_ops", "launches", "kernel_launches", "graph_launches", "syncs", "compiled_kernels")
    out = {f"{key}_per_lm_call": round(costs[key] / max(lm_calls, 1), 1) for key in counted if key in costs}
    return out | {"cpu_over_wall": costs["cpu_over_wall"], "top_ops": costs["top_ops"]}


def _warm_up(runner: Runner, modes, question: str, device: str, counter) -> dict[str, dict[str, Any]]:
    """Each mode once (compiles what it compiles), then its LM calls, positions and host costs."""
    info: dict[str, dict[str, Any]] = {}
    for mode in modes:
        start = time.perf_counter()
        runner(mode, [question])
        first_s = time.perf_counter() - start
        counter.reset()
        tokens = runner(mode, [question])
        info[mode] = {
            "first_call_s": round(first_s, 2),
            "generated_tokens": len(tokens[0]),
            "lm_calls": counter.calls,
            "lm_positions": counter.positions,
        }
        print(f"warm-up {mode}: {info[mode]}", file=sys.stderr, flush=True)
    counter.remove()
    for mode in modes:
        info[mode] |= host_costs(runner, mode, [question], info[mode]["lm_calls"], device)
    return info


def _summarise(modes, info, single, batched, n_single: int, n_batch: int) -> dict[str, Any]:
    """Per mode: ms per question at batch 1, questions/s at batch n (wall and CPU time), the runs."""
    out: dict[str, Any] = {}
    for mode in modes:
        ms = [1000 * s / n_single for s in single["wall"][mode]]
        cpu_ms = [1000 * s / n_single for s in single["cpu"][mode]]
        out[mode] = dict(info[mode])
        out[mode] |= {
            "batch1_ms_per_question": round(common.median(ms), 1),
            "batch1_ms_per_question_runs": [round(v, 1) for v in ms],
            "batch1_cpu_ms_per_question": round(common.median(cpu_ms), 1),
        }
        if batched is not None:
            qps = [n_batch / s for s in batched["wall"][mode]]
            cpu_qps = [n_batch / s for s in batched["cpu"][mode]]
            out[mode] |= {
                f"batch{n_batch}_questions_per_s": round(common.median(qps), 2),
                f"batch{n_batch}_questions_per_s_runs": [round(v, 2) for v in qps],
                f"batch{n_batch}_questions_per_cpu_s": round(common.median(cpu_qps), 2),
            }
    return out


def _ratios(modes: dict[str, Any], single, batched, n_batch: int) -> dict[str, Any]:
    """Speed-ups of each pair in PAIRS whose two modes ran (medians, and median of round ratios)."""
    pairs = {name: pair for name, pair in PAIRS.items() if pair[0] in modes and pair[1] in modes}
    ratio = {  # a's speed-up over b: a's time is smaller
        "speedup_batch1": {
            name: round(modes[b]["batch1_ms_per_question"] / modes[a]["batch1_ms_per_question"], 2)
            for name, (a, b) in pairs.items()
        },
        "speedup_batch1_cpu_time": {
            name: round(modes[b]["batch1_cpu_ms_per_question"] / modes[a]["batch1_cpu_ms_per_question"], 2)
            for name, (a, b) in pairs.items()
        },
        # rounds interleave the modes, so the ratio within a round cancels slow phases of a shared machine
        "speedup_batch1_median_of_round_ratios": {
            name: round(common.median([y / x for x, y in zip(single["wall"][a], single["wall"][b])]), 2)
            for name, (a, b) in pairs.items()
        },
    }
    if batched is not None:
        key = f"batch{n_batch}_questions_per_s"
        ratio[f"speedup_batch{n_batch}"] = {
            name: round(modes[a][key] / modes[b][key], 2) for name, (a, b) in pairs.items()
        }
        ratio[f"speedup_batch{n_batch}_cpu_time"] = {
            name: round(modes[a][f"{key[:-2]}_cpu_s"] / modes[b][f"{key[:-2]}_cpu_s"], 2)
            for name, (a, b) in pairs.items()
        }
    return ratio


def run(args: argparse.Namespace) -> dict[str, Any]:
    from codi.data.dataset import read_records

    start = time.perf_counter()
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    model, weights = common.load_codi(args.model, args.device, weights_dtype=common.DTYPES[args.dtype])
    model.eval()
    digits = args.digits_per_token or (3 if args.model == "gpt2-124m" else 1)
    lengths = forced_lengths(model, args.data, digits)
    cot_tokens = round(lengths["cot_plus_answer_eos"])
    answer_tokens = round(lengths["answer_eos"])
    runner = Runner(model, cot_tokens, answer_tokens, args.fast)
    questions = [record.question for record in read_records(str(common.data_path(args.data)))]
    latency_questions = questions[: args.latency_questions]
    batch_questions = questions[: args.batch_size]
    setup_s = time.perf_counter() - start

    info = _warm_up(runner, modes, latency_questions[0], args.device, PositionCounter(model))
    checks = {}
    for eager, fast in (("latent", "latent_fast"), ("cot", "cot_fast"), ("cot", "hf_generate_cot")):
        if eager in modes and fast in modes:  # same greedy tokens (a random model: fixed lengths)
            same = [runner(eager, batch_questions[:4]) == runner(fast, batch_questions[:4])]
            checks[f"{fast}_tokens_identical_to_{eager}"] = all(same)
    print(f"checks: {checks}", file=sys.stderr, flush=True)

    single = measure(runner, modes, latency_questions, 1, args.repeats, args.device)
    # --batch_size 1: latency only (a "batch 1 throughput" would also collide with the latency keys)
    batched = (
        measure(runner, modes, batch_questions, args.batch_size, args.repeats, args.device)
        if args.batch_size > 1
        else None
    )
    n_single, n_batch = len(latency_questions), len(batch_questions)
    summary = _summarise(modes, info, single, batched, n_single, n_batch)
    return {
        "bench": "decode",
        "model": args.model,
        "weights": weights,
        "dtype": args.dtype,
        "fast_decoding": args.fast,
        "num_latent": model.args.inf_latent_iterations,
        "mean_lengths_gsm8k_aug_valid": {key: round(value, 1) for key, value in lengths.items()},
        "digits_per_token": digits,
        "forced_new_tokens": {"cot": cot_tokens, "latent_answer": answer_tokens},
        "latency_questions": n_single,
        "throughput_batch_size": n_batch,
        "repeats": args.repeats,
        "modes": summary,
        **_ratios(summary, single, batched, n_batch),
        "checks": checks,
        "setup_s": round(setup_s, 1),
        "environment": common.environment(args.device),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--batch_size", type=int, default=64, help="throughput batch")
    parser.add_argument("--latency_questions", type=int, default=8, help="questions timed at batch 1")
    parser.add_argument(
        "--digits_per_token",
        type=int,
        default=0,
        help="regroup digit runs when counting lengths (default: 3 for gpt2-124m, GPT-2-like; else 1)",
    )
    parser.add_argument("--modes", default="", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument(
        "--fast",
        choices=("auto", "static", "graphs", "compile"),
        default="auto",
        help="the *_fast modes' engine",
    )
    args = parser.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.batch_size, args.latency_questions, args.repeats = 8, 2, 1
    common.emit(run(args), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
