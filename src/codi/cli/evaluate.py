"""`codi eval`: load a checkpoint, evaluate every requested set (`codi.evaluate`), print and save."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

from .args import parse

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    """Evaluate a CODI checkpoint: accuracy (the reference's and a strict score) and speed, per dataset."""

    model: str = field(metadata={"help": "CODI checkpoint directory (save_pretrained)."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model for a LoRA checkpoint, if it moved since training."}
    )
    datasets: str = field(
        default="gsm8k",
        metadata={
            "help": "Comma-separated: gsm8k, svamp, gsm-hard, multiarith, ... (aliases: gsm_hard, ...)."
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder of plain-file copies of the sets; default: hub ids."}
    )
    data_file: str | None = field(
        default=None, metadata={"help": "One file to read (only with one dataset)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Only the first N items of each set."})
    batch_size: int = field(default=32, metadata={"help": "Questions decoded together."})
    max_new_tokens: int = field(default=256, metadata={"help": "Answer tokens generated at most."})
    output_dir: str = field(default="eval_results", metadata={"help": "Where results and samples go."})
    mode: Literal["latent", "cot"] = field(
        default="latent", metadata={"help": "latent: CODI's latent thoughts; cot: teacher-mode explicit CoT."}
    )
    compare_cot: bool = field(default=False, metadata={"help": "Run both modes and report the speedup."})
    num_runs: int = field(default=1, metadata={"help": "Repeat (for sampling): mean and std of accuracy."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most probable tokens (0: all)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: all)."})
    seed: int = field(default=0, metadata={"help": "Run r samples with seed + r."})
    inf_latent_iterations: int | None = field(
        default=None, metadata={"help": "Latent thoughts at inference; default: the checkpoint's."}
    )
    feed_answer_prompt: bool = field(
        default=False,
        metadata={
            "help": "Latent mode: feed <eot> + the answer prompt in one forward (faster; same answers "
            "when the model has learned the prompt)."
        },
    )
    reference_compat: bool = field(default=False, metadata={"help": "The reference's unmasked decoding."})
    fix_attn_mask: bool = field(
        default=False, metadata={"help": "With --reference_compat: mask the padding."}
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = field(
        default=None, metadata={"help": "Weights dtype; default: the checkpoint's."}
    )
    device: str | None = field(
        default=None, metadata={"help": "cuda | cpu | cuda:1 ... (default: cuda:LOCAL_RANK if any GPU)."}
    )
    no_progress: bool = field(default=False, metadata={"help": "No progress bar."})


def main(argv: list[str]) -> int:
    (args,) = parse("codi eval", (EvalArguments,), argv)
    if args.fix_attn_mask and not args.reference_compat:
        logger.warning("--fix_attn_mask has no effect without --reference_compat")
    from .. import distributed
    from ..evaluate import evaluate_sets, format_table, load_eval_sets, write_results
    from ..model import CODIModel

    distributed.init()  # no-op unless launched by torchrun / accelerate with several processes
    sets = load_eval_sets(args.datasets, args.data_dir, args.data_file, args.limit)
    overrides = {}
    if args.inf_latent_iterations is not None:
        overrides["inf_latent_iterations"] = args.inf_latent_iterations
    if args.reference_compat:
        overrides.update(reference_compat=True, fix_attn_mask=args.fix_attn_mask)
    model = CODIModel.from_pretrained(args.model, args.base_model, dtype=args.dtype, **overrides)
    model.to(args.device or str(distributed.local_device()))  # cuda:LOCAL_RANK when there is a GPU
    model.eval()
    results, speedups = evaluate_sets(
        model,
        sets,
        ["latent", "cot"] if args.compare_cot else [args.mode],
        batch_size=args.batch_size,
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
    if distributed.is_main_process():  # metrics and files once
        table = format_table(results, speedups)
        print(table)
        settings = {
            key: value
            for key, value in dataclasses.asdict(args).items()
            if key not in ("model", "no_progress")
        }
        summary = {
            "model": args.model,
            "device": str(model.device),
            "settings": settings,
            "inf_latent_iterations": model.args.inf_latent_iterations,
            "reference_compat": model.args.reference_compat,
            "results": results,
            "speedups_vs_cot": speedups,
        }
        logger.info("results written to %s", write_results(summary, table, args.output_dir))
    distributed.finish()
    return 0
