"""Typed, validated arguments for model, data and training.

The field names are those of the authors' reference scripts, so their command lines work unchanged
(`--num_latent 6 --use_prj True --distill_loss_factor 20 ...`); the older spellings `mse_loss_*` are
accepted as aliases. `CODITrainingArguments` extends `transformers.TrainingArguments`, so every HF
Trainer flag (batch size, schedule, bf16, DeepSpeed/FSDP, ...) is available too. `codi.CODIConfig`
(`codi.trainer_inputs`) holds all three in one object, as the trainers take them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .inference.scoring import ANSWER_PROMPT
from .losses import DISTILL_LOSS_TYPES, LossSettings

logger = logging.getLogger(__name__)


# Other names of a setting -> its field: the seed README's spellings of the loss settings, and the
# reference's name for the number of latents at inference. Every spelling is accepted everywhere.
ALIASES = {
    "mse_loss_div_std": "distill_loss_div_std",
    "mse_loss_type": "distill_loss_type",
    "mse_loss_factor": "distill_loss_factor",
    "inf_latent_iterations": "num_latent",  # the reference scripts pass both, with the same value
}
# Defaults when --learning_rate is not given: the Llama presets' LoRA value, HF's for full fine-tuning.
LORA_LEARNING_RATE = 8e-4
FULL_LEARNING_RATE = 5e-5
METHODS = ("codi", "cot_sft", "no_cot_sft", "icot", "coconut")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class CODIModelArguments:
    """Everything needed to rebuild a CODI model; saved as `codi_config.json` with every checkpoint."""

    model_name_or_path: str = field(
        default="gpt2", metadata={"help": "Base causal LM: a hub id or a local directory."}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside `model_name_or_path` (de-quantised on load)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer location when it differs from the model's."}
    )
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (False: full fine-tuning)."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to wrap with LoRA; default per architecture (docs/method.md#model)."},
    )
    fused_lora: bool = field(
        default=True,
        metadata={
            "help": "Run each LoRA projection as one fused autograd node (same results and adapter files "
            "as plain peft, far fewer ops per step; docs/speed.md). False: peft's own layers."
        },
    )
    layer_stack: bool = field(
        default=True,
        metadata={
            "help": "Run GPT-2 and Llama models through codi's own decoder stack (grouped projections, "
            "fused or merged LoRA updates, the key/value cache passed explicitly): the same function in "
            "fewer operations (docs/speed.md). False: transformers' forward."
        },
    )
    compile_layers: str = field(
        default="",
        metadata={
            "help": "Compile each layer of codi's layer stack with this torch.compile backend (inductor): "
            "for GPUs, after a minute or more of compiling (docs/speed.md). Empty: eager."
        },
    )
    lora_init: bool = field(
        default=True,
        metadata={"help": "Reference flag: standard LoRA init (B=0). Accepted for compatibility."},
    )
    use_prj: bool = field(
        default=True, metadata={"help": "Project each latent thought before feeding it back."}
    )
    prj_dim: int | None = field(
        default=None,
        metadata={
            "help": "Hidden width of the projection MLP. Default: the base model's hidden size (as in "
            "every preset: 768 for GPT-2, 2048 for Llama-3.2-1B)."
        },
    )
    prj_dropout: float = field(default=0.0, metadata={"help": "Dropout at the projection's input."})
    prj_no_ln: bool = field(default=False, metadata={"help": "Omit the projection's final LayerNorm."})
    train_special_token_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Train the <bot>/<eot> embedding rows under LoRA. Off by default: the reference "
            "keeps them at their random initial values, which produced the paper's numbers."
        },
    )
    num_latent: int = field(
        default=6,
        metadata={
            "help": "Latent thoughts, in training and by default at inference (`codi eval --num_latent` "
            "decodes with another count). The reference's inf_latent_iterations is the same setting."
        },
    )
    # The reference's name for the count at inference, accepted (and in old checkpoints' configs, where
    # it is what decoding used) as an alias: given, it sets num_latent. Not a field: one name is saved.
    inf_latent_iterations: dataclasses.InitVar[int | None] = None
    remove_eos: bool = field(
        default=True,
        metadata={"help": "Reference flag; every reference script sets it. Only True is supported."},
    )
    answer_prompt: str = field(
        default=ANSWER_PROMPT, metadata={"help": "Text that precedes the answer value in every target."}
    )
    reference_compat: bool = field(
        default=False,
        metadata={
            "help": "Reproduce the reference exactly, bugs included: unmasked latent/decoder steps "
            "(unless fix_attn_mask), default position ids, a second no-grad teacher forward, "
            "l2 divided by the std twice."
        },
    )
    fix_attn_mask: bool = field(
        default=False,
        metadata={
            "help": "Reference flag (only read with reference_compat): mask padding at the decoder step."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype when loading: float32 | bfloat16 | float16 | auto."},
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "Attention kernel passed to from_pretrained (sdpa | eager | ...)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the hub."}
    )

    def __post_init__(self, inf_latent_iterations: int | None = None) -> None:
        if inf_latent_iterations is not None:
            self.num_latent = inf_latent_iterations
        _check(self.lora_r > 0, f"lora_r must be positive, got {self.lora_r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check(0.0 <= self.prj_dropout < 1.0, f"prj_dropout must be in [0, 1), got {self.prj_dropout}")
        _check(self.prj_dim is None or self.prj_dim > 0, f"prj_dim must be positive, got {self.prj_dim}")
        _check(self.num_latent >= 0, f"num_latent must be >= 0, got {self.num_latent}")
        _check(
            self.remove_eos, "remove_eos=False is not supported: every reference script uses remove_eos=True"
        )
        _check(bool(self.answer_prompt.strip()), "answer_prompt must not be empty")
        _check(self.dtype in DTYPES, f"dtype must be {' | '.join(DTYPES)}, got {self.dtype!r}")
        if self.compile_layers:  # only then: importing dynamo takes seconds
            from torch._dynamo import list_backends

            backend = self.compile_layers
            _check(
                backend in list_backends(exclude_tags=()),
                f"compile_layers: no torch.compile backend {backend!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def latents(self, requested: int | None = None) -> int:
        """The number of latent thoughts to feed: `requested` (a decoding option, an intervention's
        count), else `num_latent`. Every command and decoding path resolves the count here."""
        count = self.num_latent if requested is None else int(requested)
        _check(count >= 0, f"num_latent must be >= 0, got {count}")
        return count


@dataclass
class CODIDataArguments:
    """Where the training data comes from and how it is preprocessed (docs/method.md#data)."""

    data_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id (zen-E/GSM8k-Aug, zen-E/GSM8k-Aug-NL, whynlp/gsm8k-aug, "
            "zen-E/CommonsenseQA-GPT4omini) or the reference aliases icot | icot-full | commonsense."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training file: ICoT .txt, JSONL {question, cot, answer} or GSM8k JSONL."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file (same formats) for periodic validation loss."}
    )
    validation_split: str | None = field(
        default=None,
        metadata={"help": "Hub split used for validation (e.g. 'validation' for whynlp/gsm8k-aug)."},
    )
    cot_style: str = field(
        default="auto",
        metadata={
            "help": "equation | nl | commonsense | auto: how a CoT is split into steps (auto: equation "
            "if '<<' present, else nl; commonsense for a data_name containing 'commonsense'). commonsense "
            "is the reference's CommonsenseQA formatting: the whole CoT, question and CoT each + newline."
        },
    )
    include_last_cot: bool = field(
        default=False, metadata={"help": "Keep the last CoT step (paper Table 2: dropping it helps)."}
    )
    max_token_num: int = field(
        default=1000, metadata={"help": "Drop records whose question+cot+answer exceed this many tokens."}
    )
    skip_negative_answers: bool = field(
        default=False,
        metadata={"help": "Reference behaviour: drop records whose answer does not start with a digit."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training records."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation records."}
    )
    # Reference-script flags kept so their command lines parse; their effect is stated in the help.
    exp_mode: bool = field(default=False, metadata={"help": "Reference flag: use only exp_data_num records."})
    exp_data_num: int = field(default=10000, metadata={"help": "Reference flag: records used when exp_mode."})

    def __post_init__(self) -> None:
        _check(
            self.cot_style in ("auto", "equation", "nl", "commonsense"),
            f"cot_style must be auto|equation|nl|commonsense, got {self.cot_style!r}",
        )
        if self.cot_style == "auto" and "commonsense" in (self.data_name or "").lower():
            self.cot_style = "commonsense"  # the reference formats this dataset on its own branch
        _check(self.max_token_num > 0, f"max_token_num must be positive, got {self.max_token_num}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name} must be positive, got {value}")
        if self.exp_mode and self.max_train_samples is None:
            self.max_train_samples = self.exp_data_num


@dataclass
class CODITrainingArguments(TrainingArguments):
    """HF `TrainingArguments` plus the CODI loss and method settings."""

    output_dir: str = field(default="runs/codi", metadata={"help": "Where checkpoints and logs are written."})
    method: str = field(
        default="codi",
        metadata={"help": "codi | cot_sft (question+CoT+answer) | no_cot_sft (question+answer)."},
    )
    distill_loss_type: str = field(
        default=LossSettings.distill_loss_type, metadata={"help": " | ".join(DISTILL_LOSS_TYPES) + "."}
    )
    distill_loss_factor: float = field(
        default=LossSettings.distill_loss_factor, metadata={"help": "beta: weight of the distillation loss."}
    )
    # None until __post_init__ (it depends on the method); typed bool so that a bare flag means True
    distill_loss_div_std: bool = field(
        default=None,
        metadata={
            "help": "Divide each layer's distillation loss by the teacher's std. Default: true for method "
            "codi (as in every CODI preset), false otherwise (no distillation)."
        },
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": f"Peak learning rate. Default: {LORA_LEARNING_RATE} with LoRA (the Llama presets' "
            f"value), {FULL_LEARNING_RATE} for full fine-tuning."
        },
    )
    ref_loss_factor: float = field(
        default=LossSettings.ref_loss_factor, metadata={"help": "gamma: weight of the teacher CE loss."}
    )
    latent_step_loss_factor: float = field(
        default=LossSettings.latent_step_loss_factor,
        metadata={
            "help": "NOT part of CODI (0 = off, the paper's method): weight of a CE asking the LM head, "
            "applied to the state at <bot> and after each latent, to predict the result of the matching "
            "equation step of the CoT (step supervision, cf. SIM-CoT)."
        },
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Reference flag: warmup as a share of total steps (an explicit warmup_steps wins)."
        },
    )
    model_max_length: int = field(
        default=512,
        metadata={
            "help": "Reference flag: truncation length (unused: over-long records are dropped by max_token_num)."
        },
    )
    expt_name: str | None = field(
        default=None, metadata={"help": "Reference flag: experiment name (used as run_name)."}
    )
    logging_dir: str | None = field(
        default=None, metadata={"help": "Reference flag: TensorBoard log folder."}
    )
    save_safetensors: bool = field(
        default=True, metadata={"help": "Reference flag: checkpoints are always safetensors."}
    )
    print_ref_model_stats: bool = field(
        default=False, metadata={"help": "Reference flag: accepted, no effect."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an --output_dir that holds an earlier run, deleting its checkpoint-* folders "
            "(without it such a folder is refused unless resuming)."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: CODI batches carry several views."}
    )

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        if self.distill_loss_div_std is None:
            self.distill_loss_div_std = self.method == "codi"
        _check(
            self.learning_rate is None or self.learning_rate > 0,
            f"learning_rate must be positive, got {self.learning_rate}",
        )
        _check(
            self.distill_loss_type in DISTILL_LOSS_TYPES,
            f"distill_loss_type must be one of {DISTILL_LOSS_TYPES}, got {self.distill_loss_type!r}",
        )
        _check(
            self.distill_loss_factor >= 0, f"distill_loss_factor must be >= 0, got {self.distill_loss_factor}"
        )
        _check(self.ref_loss_factor >= 0, f"ref_loss_factor must be >= 0, got {self.ref_loss_factor}")
        _check(
            self.latent_step_loss_factor >= 0,
            f"latent_step_loss_factor must be >= 0, got {self.latent_step_loss_factor}",
        )
        _check(
            self.latent_step_loss_factor == 0 or self.method == "codi",
            f"latent_step_loss_factor applies to method codi only (method {self.method!r})",
        )
        if self.warmup_ratio is not None:
            _check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            # As in transformers 4 (the reference's): an explicit warmup_steps overrides warmup_ratio,
            # so `--warmup_steps 100` after a preset that sets warmup_ratio takes effect.
            if not self.warmup_steps:
                self.warmup_steps = self.warmup_ratio
        if self.expt_name and not self.run_name:
            self.run_name = self.expt_name
        self.remove_unused_columns = False
        if self.bf16 and not self.use_cpu and not _has_accelerator() and not _has_mps():
            # The presets ask for bf16 (the reference's setting). Without a GPU the Trainer refuses it
            # unless told to use the CPU, where bf16 autocast works: do that rather than fail.
            logger.warning("bf16 requested but no GPU found: training on the CPU with bf16 autocast")
            self.use_cpu = True
        if self.dataloader_pin_memory and not _has_accelerator():
            self.dataloader_pin_memory = False  # avoids torch's warning on CPU-only machines
        if self.logging_dir and self.report_to in ("tensorboard", ["tensorboard"]):
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", self.logging_dir)
        super().__post_init__()


def resolve_defaults(
    model_args: CODIModelArguments, training_args=None, hidden_size: int | None = None
) -> None:
    """Fill, in place, the defaults that follow other settings: the learning rate follows `use_lora`;
    `prj_dim` the base model's hidden size (known once it is loaded). Values given are kept."""
    if hidden_size is not None and model_args.prj_dim is None:
        model_args.prj_dim = hidden_size
    if training_args is not None and getattr(training_args, "learning_rate", 0) is None:
        training_args.learning_rate = LORA_LEARNING_RATE if model_args.use_lora else FULL_LEARNING_RATE
        logger.info(
            "learning_rate not given: %g (%s)",
            training_args.learning_rate,
            "LoRA" if model_args.use_lora else "full fine-tuning",
        )


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _has_mps() -> bool:
    import torch

    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


ARGUMENT_CLASSES = (CODIModelArguments, CODIDataArguments, CODITrainingArguments)


def _valid_names(classes: Sequence[type] = ARGUMENT_CLASSES) -> list[str]:
    names = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
    return sorted(names | set(ALIASES))


def _unknown_key_error(key: str, source: str, classes: Sequence[type]) -> ValueError:
    from .cli.args import unknown_name_error

    return unknown_name_error(key, source, _valid_names(classes))


def canonical_key(key: str) -> str:
    return ALIASES.get(key, key)


TRAIN_DESCRIPTION = (
    "Train CODI, or a baseline of the paper's Table 1 (--method cot_sft | no_cot_sft | icot | coconut; "
    "icot and coconut add their own flags: codi train --method coconut --help). The flags keep the "
    "reference scripts' names (their older spellings mse_loss_* are accepted too), and every HF "
    "TrainingArguments flag works."
)


def parse_args(argv: list[str] | None = None, classes: Sequence[type] = ARGUMENT_CLASSES) -> tuple[Any, ...]:
    """The `codi train` command line: `--config preset.yaml` files plus flags (which win over the YAML)
    into the argument dataclasses; the reference's older spellings are accepted (`codi.cli.args`)."""
    from .cli.args import parse

    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = parse("codi train", classes, argv, aliases=ALIASES, description=TRAIN_DESCRIPTION)
    resolve_defaults(parsed[0], parsed[2] if len(parsed) > 2 else None)
    return parsed


def args_from_dict(values: dict[str, Any], cls: type) -> Any:
    """Build one argument dataclass from a dict, with aliases and a helpful unknown-key error."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        key = canonical_key(key)
        if key not in known:
            raise _unknown_key_error(key, cls.__name__, (cls,))
        kwargs[key] = value
    return cls(**kwargs)
