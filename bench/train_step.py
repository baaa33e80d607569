"""Training-step benchmark: examples/s and peak memory of CODI steps, default path vs reference_compat.

A step is forward + backward + gradient clipping (2.0) + AdamW, as the HF Trainer runs it. The
variants are views of ONE model (`CODIModel.with_settings`: the same weights), the same batches and the same
optimizer; they run interleaved (A, B, C, then C, B, A, ...) so that the load of a shared machine hits
them alike, and the median over `--repeats` rounds is reported.

variants:
  reference_compat   the reference's computation: a second, no-grad teacher forward; every latent fed
                     on its own; the question computed again for the student.
  default_unshared   this project's default path without question sharing: one teacher forward,
                     exactly num_latent latents, the last fed with the decoder tokens.
  default            the default: as above, and the student reuses the teacher's question keys/values.
  default_plain_lora the default with peft's own LoRA layers instead of the fused LoRA linear
                     (`fused_lora=False`: same results, more ops per adapter), through transformers'
                     modules.
  default_transformers  the default through transformers' modules (`layer_stack=False`) instead of
                     codi's layer stack: the default path before the layer stack.
  compiled           the default with each decoder layer compiled (`compile_layers="inductor"`); its
                     compile time is reported apart (`compile_s`), and its host cost as launches
                     (compiled kernels + ATen ops outside them), since an op counter sees it run eagerly.

It also counts the positions fed to the LM per step (a forward hook), which is what (a) saves, and the
host cost of one step of each variant (`host_cost.py`): ATen ops dispatched, launches, host-device
syncs (CUDA) and CPU time / wall time; `--model overhead` (SmolLM2's depth and LoRA layout at a tiny
width) is the overhead regime where a CPU is host-bound as a GPU is.

    python bench/train_step.py --model gpt2-124m [--batch_size 8 --steps 2 --repeats 3]
    python bench/train_step.py --model overhead --batch_size 32 --steps 1 --repeats 3
    python bench/train_step.py --device cuda --dtype bf16 --batch_size 64
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import host_cost  # noqa: E402

from codi.fused_lora import fuse_lora_layers  # noqa: E402

VARIANTS = {
    "reference_compat": {"reference_compat": True, "share_question": False, "layer_stack": False},
    "default_unshared": {"reference_compat": False, "share_question": False},
    "default": {"reference_compat": False, "share_question": True},
    "default_transformers": {"reference_compat": False, "share_question": True, "layer_stack": False},
    "compiled": {"reference_compat": False, "share_question": True, "compile_layers": "inductor"},
    "default_plain_lora": {
        "reference_compat": False,
        "share_question": True,
        "fused_lora": False,
        "layer_stack": False,
    },
}


def variant(model, name: str):
    """A view of `model` (the same weights) computing under the variant's settings."""
    flags = VARIANTS[name]
    # the LoRA layer class is module state shared by all views: set it for the variant about to run
    fuse_lora_layers(model, enabled=flags.get("fused_lora", True))
    return model.with_settings(
        replace(model.objective, share_question=flags["share_question"]),
        replace(
            model.args,
            reference_compat=flags["reference_compat"],
            layer_stack=flags.get("layer_stack", True),
            compile_layers=flags.get("compile_layers", ""),
        ),
    )


def make_batches(
    model, data: str | None, batch_size: int, count: int, seed: int, max_token_num: int = 1000
) -> list[dict]:
    """`count` collated batches of GSM8k-Aug valid records (pre-tokenised once, shuffled by seed);
    records longer than `max_token_num` tokens are skipped."""
    from codi.data.dataset import CODICollator, build_dataset, read_records

    records = read_records(str(common.data_path(data)))
    dataset, _ = build_dataset(
        records, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id, max_token_num=max_token_num
    )
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    collate = CODICollator(model.pad_id)
    batches = []
    for index in range(count):
        rows = [order[(index * batch_size + k) % len(order)] for k in range(batch_size)]
        batches.append(collate([dataset[row] for row in rows]))
    return batches


class PositionCounter:
    """Positions (rows x columns) fed to the LM, summed over its forward calls."""

    def __init__(self, model):
        self.positions = 0
        self.calls = 0
        # a hooked model runs on transformers' forward (codi's layer stack steps aside): the same calls
        self.handle = model.hf_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    def _hook(self, module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = kwargs.get("input_ids", args[0] if args else None)
        self.positions += embeds.shape[0] * embeds.shape[1]
        self.calls += 1

    def reset(self) -> None:
        self.positions = self.calls = 0


def train_steps(model, optimizer, batches: list[dict], device: str, dtype: torch.dtype) -> None:
    for batch in batches:
        with common.autocast(device, dtype):
            loss = model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def step_host_cost(name: str, view, optimizer, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Host cost of ONE training step of each variant (`host_cost`): ATen ops dispatched (eager),
    launches (profiler: top-level ATen ops + compiled kernels on CPU; kernel and graph launches on
    CUDA), host-device syncs (CUDA), and CPU time / wall time of an uninstrumented step."""
    dtype = common.DTYPES[args.dtype]

    def step() -> None:
        train_steps(view, optimizer, [batch], args.device, dtype)

    compiled = bool(VARIANTS[name].get("compile_layers"))
    cost = host_cost.host_cost(step, args.device, eager_ops=not compiled)
    names = {
        "aten_ops": "aten_ops_per_step",
        "top_ops": "most_frequent_aten_ops",
        "launches": "launches_per_step",
        "kernel_launches": "kernel_launches_per_step",
        "graph_launches": "graph_launches_per_step",
        "syncs": "host_device_syncs_per_step",
        "cpu_over_wall": "cpu_time_over_wall_time",
    }
    return {label: cost[key] for key, label in names.items() if key in cost}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    if any(VARIANTS[name].get("compile_layers") for name in args.variants):
        host_cost.enable_compiled_kernel_profile()  # before the first compile
    dtype = common.DTYPES[args.dtype]
    start = time.perf_counter()
    model, weights = common.load_codi(args.model, args.device)  # fp32 master weights (Trainer-style)
    model.train()
    trainable = [param for param in model.parameters() if param.requires_grad]
    # fused, as the HF Trainer's default optimizer (`adamw_torch_fused` from torch 2.8) builds it: one
    # kernel for every parameter, where torch's per-parameter loop (its CPU default) issues ~10 ops each
    fused = {} if args.adamw_loop else {"fused": True}
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.1, **fused)
    # the overhead model's tiny BPE vocabulary makes GSM8k-Aug ~3x longer than SmolLM2's tokenizer does:
    # records up to 120 tokens keep the mean teacher length near SmolLM2's (~100)
    max_tokens = 120 if args.model == "overhead" else 1000
    batches = make_batches(model, args.data, args.batch_size, args.steps, args.seed, max_tokens)
    batches = [{key: value.to(args.device) for key, value in batch.items()} for batch in batches]
    setup_s = time.perf_counter() - start

    counter = PositionCounter(model)
    positions: dict[str, int] = {}
    calls: dict[str, int] = {}
    for name in args.variants:  # warm-up (allocator, kernels, AdamW state) and per-step counts
        view = variant(model, name)
        counter.reset()
        train_steps(view, optimizer, batches[:1], args.device, dtype)
        positions[name], calls[name] = counter.positions, counter.calls
    counter.remove()
    compile_s = {}
    for name in args.variants:  # a hooked model runs transformers' forward: compile now, timed
        if VARIANTS[name].get("compile_layers"):
            with common.timed(args.device) as timer:
                train_steps(variant(model, name), optimizer, batches[:1], args.device, dtype)
            compile_s[name] = round(timer["s"], 1)
    costs = {
        name: step_host_cost(name, variant(model, name), optimizer, batches[0], args)
        for name in args.variants
    }

    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    peak: dict[str, list[int]] = {name: [] for name in args.variants}
    delta: dict[str, list[int]] = {name: [] for name in args.variants}
    for round_index in range(args.repeats):
        order = args.variants if round_index % 2 == 0 else args.variants[::-1]
        for name in order:
            view = variant(model, name)
            with common.PeakMemory(args.device) as memory, common.timed(args.device) as timer:
                train_steps(view, optimizer, batches, args.device, dtype)
            seconds[name].append(timer["s"])
            cpu_seconds[name].append(timer["cpu_s"])
            print(f"round {round_index} {name}: {timer['s']:.2f} s", file=sys.stderr, flush=True)
            peak[name].append(memory.peak_bytes)
            delta[name].append(memory.delta_bytes)

    examples = args.batch_size * len(batches)
    variants: dict[str, Any] = {}
    for name in args.variants:
        rates = [examples / s for s in seconds[name]]
        cpu_rates = [examples / s for s in cpu_seconds[name]]
        variants[name] = {
            "examples_per_s": round(common.median(rates), 3),
            "examples_per_s_runs": [round(rate, 3) for rate in rates],
            "s_per_step": round(common.median(seconds[name]) / len(batches), 4),
            "examples_per_cpu_s": round(common.median(cpu_rates), 3),
            "peak_memory_mib": common.mib(common.median(peak[name])),
            "peak_memory_rise_mib": common.mib(common.median(delta[name])),
            "lm_positions_per_step": positions[name],
            "lm_calls_per_step": calls[name],
            **costs[name],
        }
        if name in compile_s:
            variants[name]["compile_s"] = compile_s[name]
    base = variants.get("reference_compat")
    result: dict[str, Any] = {
        "bench": "train_step",
        "model": args.model,
        "weights": weights,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "steps_per_round": len(batches),
        "repeats": args.repeats,
        "adamw": "for-loop" if args.adamw_loop else "fused",
        "mean_teacher_len": round(
            sum(float(b["teacher_attention_mask"].sum()) for b in batches) / examples, 1
        ),
        "mean_question_len": round(
            sum(float(b["student_attention_mask"].sum()) - len(b["student_input_ids"]) for b in batches)
            / examples,
            1,
        ),
        "variants": variants,
        "memory_note": "GPU: max_memory_allocated; CPU: peak RSS sampled each ms after malloc_trim "
        "(rise = peak minus the RSS at the window start)",
        "setup_s": round(setup_s, 1),
    }
    if base:
        result["speedup_vs_reference_compat"] = {
            name: round(v["examples_per_s"] / base["examples_per_s"], 3) for name, v in variants.items()
        }
        result["speedup_vs_reference_compat_cpu_time"] = {
            name: round(v["examples_per_cpu_s"] / base["examples_per_cpu_s"], 3)
            for name, v in variants.items()
        }
        result["lm_positions_saved_vs_reference_compat"] = {
            name: base["lm_positions_per_step"] - v["lm_positions_per_step"] for name, v in variants.items()
        }
    if "default" in variants and "default_unshared" in variants:
        result["question_sharing_positions_saved_per_step"] = (
            variants["default_unshared"]["lm_positions_per_step"]
            - variants["default"]["lm_positions_per_step"]
        )
    # each speed trick against the path without it: the fused LoRA on transformers' forward, then the stack
    for label, faster, slower in (
        ("fused_lora_vs_plain", "default_transformers", "default_plain_lora"),
        ("layer_stack_vs_transformers", "default", "default_transformers"),
        ("compiled_vs_eager_stack", "compiled", "default"),
    ):
        if faster in variants and slower in variants:
            result[label] = _gain(variants[faster], variants[slower])
    if args.paper_projection:
        # The paper's GPT-2 preset: 40 epochs x 385,620 examples (effective batch 128).
        total = 40 * 385_620
        result["paper_gpt2_preset_projected_hours"] = {
            name: round(total / v["examples_per_s"] / 3600, 1) for name, v in variants.items()
        }
    result["environment"] = common.environment(args.device)
    return result


def _gain(faster: dict[str, Any], slower: dict[str, Any]) -> dict[str, Any]:
    return {
        "cpu_time_speedup": round(faster["examples_per_cpu_s"] / slower["examples_per_cpu_s"], 3),
        "wall_speedup": round(faster["examples_per_s"] / slower["examples_per_s"], 3),
        **{
            f"{key}_saved": slower[key] - faster[key]
            for key in ("aten_ops_per_step", "launches_per_step")
            if key in faster and key in slower
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--batch_size", type=int, default=None, help="default 8 (CPU) / 64 (GPU)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant and round")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=[name for name in VARIANTS if name != "compiled"],  # compiling takes minutes on a CPU
    )
    parser.add_argument(
        "--adamw_loop",
        action="store_true",
        help="torch's per-parameter AdamW loop instead of the fused kernel",
    )
    parser.add_argument("--paper_projection", action="store_true", help="project the paper's GPT-2 run time")
    args = parser.parse_args(argv)
    common.setup(args)
    on_gpu = torch.device(args.device).type == "cuda"
    if args.batch_size is None:
        args.batch_size = 64 if on_gpu else 8
    if args.quick:
        args.batch_size, args.steps, args.repeats = min(args.batch_size, 4), 1, min(args.repeats, 3)
        args.variants = [
            name
            for name in args.variants
            if name not in ("default_unshared", "default_plain_lora", "default_transformers")
        ]
    common.emit(run(args), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
