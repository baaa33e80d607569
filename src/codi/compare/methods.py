"""The methods `codi.compare` can put in its table: a registry (name -> how to train, how to answer),
the model and budget every method shares, and the arguments of one run.

Add a method with `register(Method(name, label, eval_mode, train))`; `train(ctx: RunContext)` returns a
trained model that `evaluate(model, items, ctx, mode)` scores (default: `codi.inference.evaluate` in `mode`, by
default the method's `eval_mode`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..config import CODIDataArguments, CODIModelArguments, CODITrainingArguments
from ..data.dataset import process_cot
from ..data.eval_data import EvalItem
from ..data.records import read_records

logger = logging.getLogger(__name__)


class MethodUnavailable(ValueError):
    """A registered method whose implementation is not installed (one line, named)."""


@dataclass
class ModelSpec:
    """The model every method starts from. `path` None: from scratch (the demo's tokenizer and model)."""

    path: str | None = None
    arch: str = "gpt2"
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    use_lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 32
    num_latent: int = 6
    prj_dim: int | None = None  # None: 2 x n_embd from scratch, the model's hidden size for a path
    dtype: str = "float32"
    # from scratch: build the vocabulary from `question||cot #### answer` lines (the demo's tokenizer:
    # one more, unused, token "#") instead of `question||cot answer`
    vocab_answer_marker: bool = False

    def __post_init__(self) -> None:
        if self.path is not None:
            return
        from ..offline_models import ARCHS

        if self.arch not in ARCHS:
            raise ValueError(f"model: arch must be one of {ARCHS}, got {self.arch!r}")
        if min(self.n_layer, self.n_embd, self.n_head) < 1 or self.n_embd % self.n_head:
            raise ValueError(
                f"model: n_layer, n_embd and n_head must be >= 1 and n_embd a multiple of n_head, got "
                f"{self.n_layer}, {self.n_embd}, {self.n_head}"
            )


@dataclass
class Budget:
    """What every method gets: optimizer steps, batch, optimiser; and how they are evaluated."""

    max_steps: int = 600
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 50  # learning-rate warm-up, at most a tenth of a run
    weight_decay: float = 0.01
    max_grad_norm: float = 2.0
    cot_warmup_steps: int = 0  # CoT-SFT steps codi / codi_s / coconut start from (inside max_steps)
    bf16: bool = False
    eval_batch_size: int = 128
    max_new_tokens: int = 64
    timing_repeats: int = 1  # questions/s: the fastest of this many identical evaluation passes
    progress: bool = False

    def __post_init__(self) -> None:
        if min(self.max_steps, self.batch_size, self.eval_batch_size, self.max_new_tokens) < 1:
            raise ValueError(
                "budget: max_steps, batch_size, eval_batch_size and max_new_tokens must be >= 1, got "
                f"{self.max_steps}, {self.batch_size}, {self.eval_batch_size}, {self.max_new_tokens}"
            )
        if not 0 <= self.cot_warmup_steps < self.max_steps:
            raise ValueError(
                f"budget: cot_warmup_steps ({self.cot_warmup_steps}) must be >= 0 and < max_steps ({self.max_steps})"
            )


@dataclass
class RunContext:
    """Everything one method's training run needs."""

    method: Method
    seed: int
    base: str  # the model folder / id the method starts from
    train_file: str
    out_dir: str
    budget: Budget
    model: ModelSpec
    options: dict
    device: str
    steps: int
    init_from: str | None = None  # the CoT-SFT warm-up, for methods that start from it


@dataclass(frozen=True)
class Method:
    """A row of the table: how to train it and how it answers.

    eval_mode: `generate` mode; "latent" (continuous thoughts) or "cot" (decoding from the question:
    an explicit CoT for CoT-SFT, none for No-CoT-SFT and iCoT, whose CoT was removed in training).
    train(ctx) -> a trained model that `evaluate(model, items, ctx, mode)` (default: `codi.inference.evaluate`)
    accepts. available() -> None, or why the method cannot run here. trains_as: the `method` its
    `CODITrainingArguments` get (codi, cot_sft, ...). load(ctx) -> the model `train` saved in
    `ctx.out_dir` (when set, the method can train in a second process: `compare(parallel=True)`).
    """

    name: str
    label: str
    eval_mode: str
    train: Callable[[RunContext], object]
    starts_from_cot: bool = False
    defaults: Mapping = field(default_factory=dict)
    evaluate: Callable | None = None
    available: Callable[[], str | None] = lambda: None
    # argument classes (beyond training / model / data) and loose keys the method's options may hold
    option_classes: Callable[[], tuple[type, ...]] = lambda: ()
    option_keys: frozenset = frozenset()
    trains_as: str = "cot_sft"
    load: Callable | None = None

    def check_options(self, options: Mapping) -> None:
        """Raise on a key that neither the shared argument classes nor this method know."""
        split_options(
            self.name, {k: v for k, v in options.items() if k not in self.option_keys}, self.option_classes()
        )


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


# --------------------------------------------------------------------------------------------------
# Arguments of one run


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def split_options(method: str, options: Mapping, extra_classes: Sequence[type] = ()) -> list[dict]:
    """Options by the argument class that owns them: [training, model, data, *extra]; unknown -> error."""
    classes = (CODITrainingArguments, CODIModelArguments, CODIDataArguments, *extra_classes)
    parts: list[dict] = [{} for _ in classes]
    for key, value in options.items():
        owner = next((i for i, cls in enumerate(classes) if key in _field_names(cls)), None)
        if owner is None:
            raise ValueError(f"options for method {method!r}: unknown key {key!r}")
        parts[owner][key] = value
    return parts


def model_arguments(ctx: RunContext, path: str, **overrides) -> CODIModelArguments:
    spec = ctx.model
    prj_dim = spec.prj_dim or (2 * spec.n_embd if spec.path is None else None)  # None: the model's width
    values = dict(
        model_name_or_path=path,
        use_lora=spec.use_lora,
        lora_r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        prj_dim=prj_dim,
        num_latent=spec.num_latent,
        dtype=spec.dtype,
    )
    return CODIModelArguments(**{**values, **overrides})


def training_arguments(
    ctx: RunContext, method: str, steps: int, output_dir: str, **overrides
) -> CODITrainingArguments:
    budget = ctx.budget
    values = dict(
        output_dir=output_dir,
        method=method,
        max_steps=steps,
        per_device_train_batch_size=budget.batch_size,
        gradient_accumulation_steps=budget.gradient_accumulation_steps,
        learning_rate=budget.learning_rate,
        lr_scheduler_type=budget.lr_scheduler_type,
        warmup_steps=min(budget.warmup_steps, steps // 10),
        weight_decay=budget.weight_decay,
        max_grad_norm=budget.max_grad_norm,
        bf16=budget.bf16,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=ctx.device == "cpu",
        seed=ctx.seed,
        dataloader_num_workers=0,
        disable_tqdm=not budget.progress,
    )
    return CODITrainingArguments(**{**values, **overrides})


def data_arguments(ctx: RunContext, **overrides) -> CODIDataArguments:
    return CODIDataArguments(train_file=ctx.train_file, **overrides)


# --------------------------------------------------------------------------------------------------
# The methods


def check_arguments(ctx: RunContext) -> None:
    """Build every argument object of `ctx`'s run (nothing trains): a bad value fails here, before any
    folder is made, naming its field."""
    method = ctx.method
    options = {k: v for k, v in ctx.options.items() if k not in method.option_keys}
    classes = method.option_classes()
    training, model, data, *own = split_options(method.name, options, classes)
    model_arguments(ctx, ctx.init_from or ctx.base, **model)
    data_arguments(ctx, **data)
    training_arguments(ctx, method.trains_as, ctx.steps, ctx.out_dir, **training)
    for cls, values in zip(classes, own):
        cls(**values)


def _load_codi(ctx: RunContext):
    from ..model import CODIModel

    return CODIModel.from_pretrained(ctx.out_dir)


def _train_with_codi_trainer(ctx: RunContext):
    from ..training import train

    method = ctx.method.trains_as
    training, model, data = split_options(ctx.method.name, ctx.options)
    result = train(
        model_arguments(ctx, ctx.init_from or ctx.base, **model),
        data_arguments(ctx, **data),
        training_arguments(ctx, method, ctx.steps, ctx.out_dir, **training),
    )
    return result.model


def cot_token_lengths(ctx: RunContext, include_last_cot: bool = False) -> list[int]:
    """Tokens of each training record's (preprocessed) CoT under the base model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx.base)
    cots = [process_cot(record.cot, "auto", include_last_cot) for record in read_records(ctx.train_file)]
    return [len(tokenizer(cot, add_special_tokens=False)["input_ids"]) for cot in cots if cot]


def icot_step_schedule(steps: int, longest_cot: int, done_at: float) -> dict:
    """ICoT settings that remove the longest CoT by `done_at` x `steps` (the reference's per-epoch
    schedule does not fit a step budget): one token every k steps, and `remove_all_when_remove_beyond`
    when even one token per step would be too slow."""
    target = max(1, int(done_at * steps))
    if longest_cot <= 0:
        return {"remove_every_steps": 1}
    if longest_cot <= target:
        return {"remove_every_steps": max(1, target // longest_cot)}
    return {"remove_every_steps": 1, "remove_all_when_remove_beyond": target}


def _train_icot(ctx: RunContext):
    from ..methods.icot import ICoTArguments, train_icot

    options = dict(ctx.options)
    done_at = options.pop("removal_done_at", 0.5)
    training, model, data, icot = split_options(ctx.method.name, options, (ICoTArguments,))
    if "remove_every_steps" not in icot and "remove_per_epoch" not in icot:
        lengths = cot_token_lengths(ctx, data.get("include_last_cot", False))
        icot = {**icot_step_schedule(ctx.steps, max(lengths, default=0), done_at), **icot}
    result = train_icot(
        model_arguments(ctx, ctx.base, **model),
        data_arguments(ctx, **data),
        training_arguments(ctx, "cot_sft", ctx.steps, ctx.out_dir, **training),
        ICoTArguments(**icot),
    )
    return result.model


def _coconut_missing() -> str | None:
    if importlib.util.find_spec("codi.methods.coconut") is None:
        return "codi.methods.coconut is not installed"
    return None


def coconut_step_schedule(ctx: RunContext, settings, given: Mapping) -> dict:
    """A step schedule that walks every stage within the budget, unless the options set a schedule: the
    reference's epochs (3 per stage) would not leave stage 0 in a budget of a few hundred steps. From a
    CoT-SFT warm-up, stage 0 is done: stages 1..final share the steps, the final stage twice as many."""
    if settings.steps_per_stage or settings.no_curriculum or {"epochs_per_stage", "start_epoch"} & set(given):
        return {}
    start = 1 if ctx.init_from else 0
    shares = settings.final_stage - start + 2  # the final stage counts twice
    steps = max(1, ctx.steps // shares)
    logger.info("coconut: %d steps per stage from stage %d (no schedule in the options)", steps, start)
    return {"steps_per_stage": steps, "start_stage": start}


def _train_coconut(ctx: RunContext):
    reason = _coconut_missing()
    if reason:
        raise MethodUnavailable(f"method coconut: not available ({reason})")
    # options: CoconutArguments fields as well as the shared ones, e.g. the step schedule
    # (steps_per_stage, start_stage: see compare.TABLE1_OPTIONS)
    from ..methods import coconut

    arguments_class = coconut.CoconutArguments
    training, model, data, own = split_options(ctx.method.name, ctx.options, (arguments_class,))
    own = {**coconut_step_schedule(ctx, arguments_class(**own), own), **own}
    result = coconut.train_coconut(
        model_arguments(ctx, ctx.init_from or ctx.base, **model),
        data_arguments(ctx, **data),
        training_arguments(ctx, "coconut", ctx.steps, ctx.out_dir, **training),
        arguments_class(**own),
    )
    return result.model


# The paper's objective (distillation factor 1, smooth L1 over layers divided by the teacher's std:
# the GPT-2 preset); CODI+S adds the latent step supervision (not in the paper) as `codi demo` does.
_CODI = dict(distill_loss_type="smooth_l1", distill_loss_factor=1.0, distill_loss_div_std=True)
_BY_TRAINER = dict(train=_train_with_codi_trainer, load=_load_codi)
register(
    Method("codi", "CODI", "latent", starts_from_cot=True, defaults=_CODI, trains_as="codi", **_BY_TRAINER)
)
register(
    Method(
        "codi_s",
        "CODI+S",
        "latent",
        starts_from_cot=True,
        defaults={**_CODI, "distill_loss_factor": 0.25, "latent_step_loss_factor": 1.0},
        trains_as="codi",
        **_BY_TRAINER,
    )
)
register(Method("cot_sft", "CoT-SFT", "cot", trains_as="cot_sft", **_BY_TRAINER))
register(Method("no_cot_sft", "No-CoT-SFT", "cot", trains_as="no_cot_sft", **_BY_TRAINER))


def _icot_arguments() -> tuple[type, ...]:
    from ..methods.icot import ICoTArguments

    return (ICoTArguments,)


register(
    Method(
        "icot",
        "iCoT-SI",
        "cot",
        _train_icot,
        defaults={"removal_smoothing_lambda": 4.0},  # the reference README's value, every data set
        option_classes=_icot_arguments,
        option_keys=frozenset({"removal_done_at"}),
    )
)


def _coconut_arguments() -> tuple[type, ...]:
    if _coconut_missing():
        return ()
    from ..methods import coconut

    return (coconut.CoconutArguments,)


register(
    Method(
        "coconut",
        "Coconut",
        "latent",
        _train_coconut,
        True,
        available=_coconut_missing,
        option_classes=_coconut_arguments,
        trains_as="coconut",
    )
)
TABLE1_METHODS = ("codi", "codi_s", "coconut", "icot", "cot_sft", "no_cot_sft")


def evaluate_mode(
    model,
    items: Sequence[EvalItem],
    mode: str,
    budget: Budget,
    name: str = "eval",
    out_dir: str | None = None,
) -> dict:
    """`codi.inference.evaluate.evaluate` in `mode` with the budget's decoding; questions/s is the fastest of
    `budget.timing_repeats` identical passes (greedy: the same answers), so a busy machine does not
    decide the comparison; answers, scores and sample files are the first pass's."""
    from ..inference.evaluate import evaluate

    result = None
    for repeat in range(max(1, budget.timing_repeats)):
        run = evaluate(
            model,
            items,
            mode,
            budget.eval_batch_size,
            name=name,
            max_new_tokens=budget.max_new_tokens,
            output_dir=out_dir if repeat == 0 else None,
            warmup=repeat == 0,
        )
        if result is None:
            result = run
        elif run["questions_per_s"] > result["questions_per_s"]:
            result = {**result, "questions_per_s": run["questions_per_s"], "wall_time_s": run["wall_time_s"]}
    return result


def evaluate_generation(model, items: Sequence[EvalItem], ctx: RunContext, mode: str | None = None) -> dict:
    """The default `Method.evaluate`: `evaluate_mode` in `mode` (default the method's), files in the run's
    folder."""
    return evaluate_mode(model, items, mode or ctx.method.eval_mode, ctx.budget, ctx.method.name, ctx.out_dir)
