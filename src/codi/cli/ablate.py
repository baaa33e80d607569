"""`codi ablate`: interventions on the latents at inference (`codi.analysis.interventions`), one table and PNG."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .args import parse


@dataclass
class AblateArguments:
    """Flags of `codi ablate` (every field is `--name VALUE` on the command line)."""

    model: str = field(metadata={"help": "CODI checkpoint: a directory (save_pretrained) or a hub id."})
    data: str = field(
        metadata={"help": "Question file: ICoT .txt, or .jsonl/.json rows laid out as --dataset's."}
    )
    dataset: str = field(
        default="gsm8k",
        metadata={
            "help": "Field layout of --data (a `codi eval` set name); gsm8k reads question/answer rows."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Only the first N questions of --data."})
    output_dir: str = field(default="ablate_results", metadata={"help": "Where the table, PNG and JSONL go."})
    interventions: str = field(
        default="all",
        metadata={
            "help": "Comma-separated subset of zero,noise,shuffle,reverse,permute,first_k,num_latent "
            "(all: every one); the unmodified model always runs. See codi.analysis.interventions."
        },
    )
    noise_sigmas: str = field(
        default="0.1,0.25,0.5,1,2,4", metadata={"help": "Noise scales, in units of each latent's RMS."}
    )
    max_num_latent: int | None = field(
        default=None, metadata={"help": "Top of the num_latent sweep (default: 2x the model's latents)."}
    )
    no_cot_model: str | None = field(
        default=None,
        metadata={"help": "A No-CoT-SFT checkpoint: its accuracy on the same questions is a reference line."},
    )
    batch_size: int = field(default=32, metadata={"help": "Questions per generation batch."})
    max_new_tokens: int = field(default=256, metadata={"help": "Answer length limit."})
    seed: int = field(default=0, metadata={"help": "Seeds the noise, the shuffle and the permutations."})
    margin: float = field(
        default=0.05,
        metadata={"help": "Verdict margin: accuracy drop (fraction) beyond the 95-percent interval."},
    )
    title: str | None = field(default=None, metadata={"help": "Chart title (default: the model path)."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model of a LoRA checkpoint, if moved."}
    )
    dtype: str | None = field(default=None, metadata={"help": "float32 | bfloat16 | float16 | auto."})
    device: str | None = field(
        default=None, metadata={"help": "cuda | cpu | cuda:1 ... (default: cuda if any)."}
    )
    no_progress: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.max_num_latent is not None and self.max_num_latent < 0:
            raise ValueError(f"--max_num_latent must be >= 0, got {self.max_num_latent}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"--margin is a fraction in [0, 1), got {self.margin}")

    def sigmas(self) -> list[float]:
        try:
            values = [float(text) for text in self.noise_sigmas.split(",") if text.strip()]
        except ValueError:
            raise ValueError(
                f"--noise_sigmas {self.noise_sigmas!r}: expected comma-separated numbers"
            ) from None
        if not values or min(values) < 0:
            raise ValueError(f"--noise_sigmas {self.noise_sigmas!r}: expected numbers >= 0")
        return values


def _load(path: str, args: AblateArguments):

    from ..distributed import local_device
    from ..io.loader import load

    model = load(path, args.base_model, dtype=args.dtype)
    model.to(args.device or str(local_device()))
    return model.eval()


def run_ablate(args: AblateArguments) -> dict:
    """Load the checkpoint(s) and the questions, run every intervention, write and print the results."""
    from ..analysis.interventions import ablate, build_interventions, parse_families
    from ..data.eval_data import eval_set_spec, load_eval_set
    from ..inference.evaluate import evaluate
    from ..io.checkpoint_checks import require_latents

    families = parse_families(args.interventions)
    sigmas = args.sigmas()
    spec = eval_set_spec(args.dataset)
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data}: file not found")
    items = load_eval_set(spec.name, args.data, args.limit)
    no_cot_accuracy = None
    if args.no_cot_model:
        no_cot = _load(args.no_cot_model, args)
        scored = evaluate(
            no_cot,
            items,
            "cot",
            args.batch_size,
            name="no_cot",
            answer_kind=spec.answer_kind,
            max_new_tokens=args.max_new_tokens,
            warmup=False,
        )
        no_cot_accuracy = scored["accuracy"] / 100
        del no_cot
    model = _load(args.model, args)
    require_latents(model, "ablate")
    steps = model.args.latents()
    result = ablate(
        model,
        items,
        build_interventions(families, steps, sigmas, args.max_num_latent),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        answer_kind=spec.answer_kind,
        seed=args.seed,
        margin=args.margin,
        no_cot_accuracy=no_cot_accuracy,
        output_dir=args.output_dir,
        title=args.title or f"{args.model} ({len(items)} questions)",
        progress=not args.no_progress,
    )
    print(result["table"])
    return result


def main(argv: list[str]) -> int:
    (args,) = parse("codi ablate", (AblateArguments,), argv)
    run_ablate(args)
    return 0
