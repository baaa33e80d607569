"""`codi eval`: load a checkpoint, evaluate every requested set (`codi.inference.evaluate`), print and save."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

from .args import LATENT_ALIASES, parse

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    """Evaluate a CODI checkpoint: accuracy (the reference's and a strict score) and speed, per dataset."""

    model: str = field(metadata={"help": "CODI checkpoint: a directory (save_pretrained) or a hub id."})
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
    mode: Literal["latent", "cot"] | None = field(
        default=None,
        metadata={
            "help": "latent: CODI's latent thoughts; cot: explicit CoT (teacher mode). Default: the mode of "
            "the method the checkpoint was trained with (codi: latent; cot_sft, no_cot_sft: cot)."
        },
    )
    compare_cot: bool = field(default=False, metadata={"help": "Run both modes and report the speedup."})
    num_runs: int = field(default=1, metadata={"help": "Repeat (for sampling): mean and std of accuracy."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most probable tokens (0: all)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: all)."})
    seed: int = field(default=0, metadata={"help": "Run r samples with seed + r."})
    num_latent: int | None = field(
        default=None,
        metadata={"help": "Latent thoughts (inf_latent_iterations: the same); default: the checkpoint's."},
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
    num_samples: int = field(
        default=1, metadata={"help": "Answers sampled per question: pass@k and majority vote beside greedy."}
    )
    latent_noise: float = field(
        default=0.0,
        metadata={"help": "Sampled latents: Gaussian noise at this many times each latent's RMS."},
    )
    latent_dropout: bool = field(
        default=False, metadata={"help": "Sampled latents: dropout left on while the latents are made."}
    )
    allow_base_mismatch: bool = field(
        default=False,
        metadata={"help": "Load a LoRA checkpoint on a base model other than the one it was trained on."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow the base model's custom code (never taken from a checkpoint)."},
    )
    allow_incomplete_weights: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose files lack tensors (left randomly initialised)."},
    )
    no_progress: bool = field(default=False, metadata={"help": "No progress bar."})


def main(argv: list[str]) -> int:
    (args,) = parse("codi eval", (EvalArguments,), argv, aliases=LATENT_ALIASES)
    if args.fix_attn_mask and not args.reference_compat:
        logger.warning("--fix_attn_mask has no effect without --reference_compat")
    from .. import distributed
    from ..inference.evaluate import evaluate_sets, load_eval_sets
    from ..io.loader import load
    from ..io.model_card import record_eval_results

    distributed.init()  # no-op unless launched by torchrun / accelerate with several processes
    sets = load_eval_sets(args.datasets, args.data_dir, args.data_file, args.limit)
    overrides = {}
    if args.num_latent is not None:
        overrides["num_latent"] = args.num_latent
    if args.reference_compat:
        overrides.update(reference_compat=True, fix_attn_mask=args.fix_attn_mask)
    model = load(  # the class the checkpoint needs: a Coconut checkpoint decodes as Coconut
        args.model, args.base_model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        allow_base_mismatch=args.allow_base_mismatch,
        allow_incomplete_weights=args.allow_incomplete_weights, **overrides,
    )  # fmt: skip
    model.to(args.device or str(distributed.local_device()))  # cuda:LOCAL_RANK when there is a GPU
    model.eval()
    summary = evaluate_sets(
        model,
        sets,
        modes=["latent", "cot"] if args.compare_cot else [_mode(args.mode, model)],
        num_runs=args.num_runs,
        output_dir=args.output_dir if distributed.is_main_process() else None,
        progress=not args.no_progress,
        summary={
            "model": args.model,
            "device": str(model.device),
            "settings": {
                k: v for k, v in dataclasses.asdict(args).items() if k not in ("model", "no_progress")
            },
            "method": model.objective.method,
            "num_latent": model.args.num_latent,
            "reference_compat": model.args.reference_compat,
        },
        **{name: getattr(args, name) for name in _DECODING},
    )
    if distributed.is_main_process():  # metrics and files once
        print(summary["table"])
        if args.limit is None and not overrides and not args.do_sample and args.num_samples == 1:
            record_eval_results(args.model, summary["results"])  # the card states full, default runs only
        else:
            logger.info("not added to the model card: a partial or non-default evaluation")
    distributed.finish()
    return 0


_DECODING = (
    "batch_size", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed",
    "feed_answer_prompt", "num_samples", "latent_noise", "latent_dropout",
)  # fmt: skip


def _mode(requested: str | None, model) -> str:
    """The requested mode, else the one the checkpoint's training method answers in (warn on a mismatch:
    a No-CoT or CoT-SFT model never learned to read latents)."""
    trained = "latent" if model.objective.method == "codi" else "cot"
    if requested is not None and requested != trained:
        logger.warning(
            "--mode %s on a checkpoint trained with method %r (which answers in %s mode)",
            requested,
            model.objective.method,
            trained,
        )
    return requested or trained
