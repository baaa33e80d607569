"""`codi compare`: train several methods on the same data, model and budget; one table (`codi.compare`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .args import parse


@dataclass
class CompareArguments:
    """Train the chosen methods with the same optimizer-step budget on the same training file and model,
    evaluate them on the same test questions, and write one table (accuracy with a 95 % interval,
    tokens and positions decoded per answer, questions/s, train time) as text, JSON and PNG."""

    train_file: str = field(metadata={"help": "Training data in any format `codi train` reads."})
    test_file: str = field(metadata={"help": "Test questions with gold answers (same formats)."})
    methods: str = field(
        default="codi,codi_s,coconut,icot,cot_sft,no_cot_sft",
        metadata={"help": "Comma-separated: codi, codi_s (CODI + latent step supervision), coconut, icot, "
                  "cot_sft, no_cot_sft."},
    )  # fmt: skip
    model: str | None = field(
        default=None,
        metadata={"help": "A pretrained model (hub id or folder); default: a small GPT-2 from scratch."},
    )
    arch: str = field(default="gpt2", metadata={"help": "From scratch: gpt2 or llama."})
    n_layer: int = field(default=4, metadata={"help": "From scratch: layers."})
    n_embd: int = field(default=64, metadata={"help": "From scratch: width."})
    n_head: int = field(default=4, metadata={"help": "From scratch: attention heads."})
    use_lora: bool = field(default=False, metadata={"help": "LoRA on a pretrained --model."})
    num_latent: int = field(default=6, metadata={"help": "Latent thoughts of CODI."})
    max_steps: int = field(default=600, metadata={"help": "Optimizer steps every method gets."})
    cot_warmup_steps: int = field(
        default=0,
        metadata={"help": "CoT-SFT steps that codi / codi_s / coconut start from (inside max_steps)."},
    )
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (cosine schedule)."})
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds; several give a t-interval."})
    test_limit: int | None = field(default=None, metadata={"help": "Only the first N test questions."})
    out_dir: str = field(default="runs/compare", metadata={"help": "Where runs, table, JSON and PNG go."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})


def main(argv: list[str]) -> int:
    (args,) = parse("codi compare", (CompareArguments,), argv)
    from ..compare import Budget, ModelSpec, compare

    model = ModelSpec(
        path=args.model, arch=args.arch, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
        use_lora=args.use_lora, num_latent=args.num_latent,
    )  # fmt: skip
    budget = Budget(
        max_steps=args.max_steps, cot_warmup_steps=args.cot_warmup_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate,
    )  # fmt: skip
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    compare(  # it prints its table
        methods, args.train_file, args.test_file, model, budget, seeds, args.out_dir,
        device=args.device, test_limit=args.test_limit,
    )  # fmt: skip
    return 0
