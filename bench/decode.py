"""Decoding benchmark: CODI latent answers vs teacher-mode CoT answers vs `transformers.generate`.

Latency per question at batch 1 and throughput at batch 64 (`--batch_size`) on GSM8k-Aug valid
questions. The benchmark models have random (or untrained) weights, so greedy decoding would not stop
at EOS when a trained model would: every mode generates a FIXED, realistic number of tokens
(`min_new_tokens = max_new_tokens`), measured on the data with the model's tokenizer:

  cot    mean tokens of CoT ++ "The answer is: N" ++ EOS  (what a trained teacher generates)
  latent mean tokens of "The answer is: N" ++ EOS, after `<bot>`, num_latent latents and `<eot>`

modes (all greedy, KV-cached, the same weights):
  latent          `codi.generate(mode="latent")`
  latent_prompt   the same with `feed_answer_prompt=True` (`<eot>` + prompt in one forward)
  cot             `codi.generate(mode="cot")`
  hf_generate_cot `transformers` `generate()` on the same LM (DynamicCache), same question ids

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

MODES = ("latent", "latent_prompt", "cot", "hf_generate_cot")


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
    from codi.data import build_dataset, read_records

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

    def __init__(self, model, cot_tokens: int, answer_tokens: int):
        from transformers import GenerationConfig

        self.model = model
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
        model = self.model
        batch = len(questions)
        if mode in ("latent", "latent_prompt"):
            outputs = model.generate(
                questions,
                mode="latent",
                batch_size=batch,
                max_new_tokens=self.answer_tokens,
                min_new_tokens=self.answer_tokens,
                feed_answer_prompt=mode == "latent_prompt",
            )
            return [output.token_ids for output in outputs]
        if mode == "cot":
            outputs = model.generate(
                questions,
                mode="cot",
                batch_size=batch,
                max_new_tokens=self.cot_tokens,
                min_new_tokens=self.cot_tokens,
            )
            return [output.token_ids for output in outputs]
        if mode == "hf_generate_cot":
            return self._hf_generate(questions)
        raise ValueError(mode)

    @torch.inference_mode()
    def _hf_generate(self, questions: list[str]) -> list[list[int]]:
        """The same job through `transformers`: tokenise, left-pad, generate, decode."""
        from codi.data import encode_question, pad_sequences

        model = self.model
        prompts = [encode_question(model.tokenizer, question) for question in questions]
        input_ids = pad_sequences(prompts, model.pad_id, "left").to(model.device)
        mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left").to(model.device)
        out = model.hf_model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=self.hf_config
        )
        rows = out[:, input_ids.shape[1] :].tolist()
        for row in rows:
            model.tokenizer.decode(row, skip_special_tokens=True)  # as codi.generate returns text
        return rows


# speed-up name -> (faster candidate, baseline)
PAIRS = {
    "latent_vs_cot": ("latent", "cot"),
    "latent_prompt_vs_cot": ("latent_prompt", "cot"),
    "cot_vs_hf_generate": ("cot", "hf_generate_cot"),
}


def measure(
    runner: Runner, questions: list[str], batch_size: int, repeats: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds (wall and process CPU) per round and mode: all questions in batches of `batch_size`, modes interleaved."""
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu_seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    groups = [questions[i : i + batch_size] for i in range(0, len(questions), batch_size)]
    for round_index in range(repeats):
        totals = dict.fromkeys(MODES, 0.0)
        cpu_totals = dict.fromkeys(MODES, 0.0)
        for group_index, group in enumerate(groups):
            shift = (round_index + group_index) % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                with common.timed(device) as timer:
                    runner(mode, group)
                totals[mode] += timer["s"]
                cpu_totals[mode] += timer["cpu_s"]
        for mode in MODES:
            seconds[mode].append(totals[mode])
            cpu_seconds[mode].append(cpu_totals[mode])
        print(f"batch {batch_size} round {round_index}: {totals}", file=sys.stderr, flush=True)
    return {"wall": seconds, "cpu": cpu_seconds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from codi.data import read_records

    start = time.perf_counter()
    dtype = common.DTYPES[args.dtype]
    model, weights = common.load_codi(args.model, args.device, weights_dtype=dtype)
    model.eval()
    digits = args.digits_per_token or (3 if args.model == "gpt2-124m" else 1)
    lengths = forced_lengths(model, args.data, digits)
    cot_tokens = round(lengths["cot_plus_answer_eos"])
    answer_tokens = round(lengths["answer_eos"])
    runner = Runner(model, cot_tokens, answer_tokens)
    records = read_records(str(common.data_path(args.data)))
    questions = [record.question for record in records]
    latency_questions = questions[: args.latency_questions]
    batch_questions = questions[: args.batch_size]
    setup_s = time.perf_counter() - start

    # Warm-up, counts of LM calls/positions per mode, and whether our CoT = transformers' CoT.
    counter = PositionCounter(model)
    counts: dict[str, dict[str, int]] = {}
    tokens: dict[str, list[list[int]]] = {}
    for mode in MODES:
        counter.reset()
        tokens[mode] = runner(mode, latency_questions[:1])
        counts[mode] = {"lm_calls": counter.calls, "lm_positions": counter.positions}
    counter.handle.remove()
    same_as_hf = [runner("cot", [q]) == runner("hf_generate_cot", [q]) for q in latency_questions[:2]]

    single = measure(runner, latency_questions, 1, args.repeats, args.device)
    # --batch_size 1: latency only (a "batch 1 throughput" would also collide with the latency keys)
    batched = (
        measure(runner, batch_questions, args.batch_size, args.repeats, args.device)
        if args.batch_size > 1
        else None
    )
    n_single, n_batch = len(latency_questions), len(batch_questions)
    modes: dict[str, Any] = {}
    for mode in MODES:
        ms = [1000 * s / n_single for s in single["wall"][mode]]
        cpu_ms = [1000 * s / n_single for s in single["cpu"][mode]]
        modes[mode] = {
            "batch1_ms_per_question": round(common.median(ms), 1),
            "batch1_ms_per_question_runs": [round(v, 1) for v in ms],
            "batch1_cpu_ms_per_question": round(common.median(cpu_ms), 1),
            "generated_tokens": len(tokens[mode][0]),
            **counts[mode],
        }
        if batched is not None:
            qps = [n_batch / s for s in batched["wall"][mode]]
            cpu_qps = [n_batch / s for s in batched["cpu"][mode]]
            modes[mode] |= {
                f"batch{n_batch}_questions_per_s": round(common.median(qps), 2),
                f"batch{n_batch}_questions_per_s_runs": [round(v, 2) for v in qps],
                f"batch{n_batch}_questions_per_cpu_s": round(common.median(cpu_qps), 2),
            }

    def ratio(a: str, b: str, key: str, inverse: bool = False) -> float:  # a's speed-up over b
        x, y = modes[a][key], modes[b][key]
        return round(y / x if inverse else x / y, 2)

    key_batch = f"batch{n_batch}_questions_per_s"
    result: dict[str, Any] = {
        "bench": "decode",
        "model": args.model,
        "weights": weights,
        "dtype": args.dtype,
        "num_latent": model.args.inf_latent_iterations,
        "mean_lengths_gsm8k_aug_valid": {key: round(value, 1) for key, value in lengths.items()},
        "digits_per_token": digits,
        "forced_new_tokens": {"cot": cot_tokens, "latent_answer": answer_tokens},
        "latency_questions": n_single,
        "throughput_batch_size": n_batch,
        "repeats": args.repeats,
        "modes": modes,
        "speedup_batch1": {
            "latent_vs_cot": ratio("latent", "cot", "batch1_ms_per_question", inverse=True),
            "latent_prompt_vs_cot": ratio("latent_prompt", "cot", "batch1_ms_per_question", inverse=True),
            "cot_vs_hf_generate": ratio("cot", "hf_generate_cot", "batch1_ms_per_question", inverse=True),
        },
        "speedup_batch1_cpu_time": {
            "latent_vs_cot": ratio("latent", "cot", "batch1_cpu_ms_per_question", inverse=True),
            "latent_prompt_vs_cot": ratio("latent_prompt", "cot", "batch1_cpu_ms_per_question", inverse=True),
            "cot_vs_hf_generate": ratio("cot", "hf_generate_cot", "batch1_cpu_ms_per_question", inverse=True),
        },
        "cot_tokens_identical_to_hf_generate": all(same_as_hf),
        "setup_s": round(setup_s, 1),
        "environment": common.environment(args.device),
    }
    # Rounds interleave the modes, so the ratio within a round cancels slow phases of a shared machine.
    result["speedup_batch1_median_of_round_ratios"] = {
        name: round(common.median([y / x for x, y in zip(single["wall"][a], single["wall"][b])]), 2)
        for name, (a, b) in PAIRS.items()
    }
    if batched is not None:
        result[f"speedup_batch{n_batch}_cpu_time"] = {
            name: ratio(a, b, f"batch{n_batch}_questions_per_cpu_s") for name, (a, b) in PAIRS.items()
        }
        result[f"speedup_batch{n_batch}"] = {name: ratio(a, b, key_batch) for name, (a, b) in PAIRS.items()}
    return result


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
    args = parser.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.batch_size, args.latency_questions, args.repeats = 8, 2, 1
    common.emit(run(args), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
