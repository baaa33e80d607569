"""The paper's comparison (Table 1) in one harness: train several methods with the same budget, model,
tokenizer and data, evaluate them on the same test questions, one table (+ results.json, results.png).

    from codi.compare import Budget, ModelSpec, compare
    result = compare(["codi", "icot", "no_cot_sft"], "train.jsonl", "test.jsonl",
                     ModelSpec(), Budget(max_steps=600), seeds=[0, 1], out_dir="runs/compare")
    print(result.table)

Data: any file `codi train` reads (ICoT text `question||cot #### answer`, JSONL {question, cot, answer},
GSM8k JSONL). Model: from scratch (`ModelSpec()`: a word/digit tokenizer built from the training file
and a small random GPT-2 or Llama, one per seed; `codi.offline_models`) or a pretrained causal LM
(`ModelSpec(path=...)`, LoRA optional). Every method gets `budget.max_steps` optimizer steps; codi, codi_s
and coconut start from a CoT-SFT warm-up of `budget.cot_warmup_steps` steps counted inside their budget
(Coconut's reference starts from a CoT-SFT checkpoint; from scratch, CODI needs it).

A method can be evaluated in several modes (`modes={"codi_s": ("cot", "latent")}`: the same model as a
CoT teacher and in latent mode, two rows); `parallel=True` trains the methods that need no warm-up in a
second process while the others train here; `inspect(ctx, model)` runs on every trained model after
its evaluation (its result lands in the runs' `extra`). `codi demo` is a set of presets of this harness.

A method is an entry of `METHODS` (name -> how to train, how to evaluate): add one with `register`.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from ..data.dataset import answer_value
from ..data.eval_data import EvalItem
from ..data.records import read_records
from ..inference.scoring import parse_gold
from ..report import RunRecord, aggregate, comparison_chart, comparison_table, write_results
from .methods import (
    METHODS,
    TABLE1_METHODS,
    Budget,
    Method,
    MethodUnavailable,
    ModelSpec,
    RunContext,
    check_arguments,
    data_arguments,
    evaluate_generation,
    evaluate_mode,
    model_arguments,
    register,
    split_options,
    training_arguments,
)
from .parallel import join_aside, start_aside

logger = logging.getLogger(__name__)
__all__ = [
    "METHODS",
    "TABLE1_METHODS",
    "TABLE1_OPTIONS",
    "Budget",
    "CompareResult",
    "Method",
    "MethodUnavailable",
    "ModelSpec",
    "compare",
    "evaluate_mode",
    "register",
    "run_synthetic",
]


# --------------------------------------------------------------------------------------------------
# Data, base model, warm-up, evaluation


def read_test_items(path: str, limit: int | None = None) -> list[EvalItem]:
    """Test questions and gold answers from a file in any training format (the CoT is not used)."""
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{path}: no test records")
    return [
        EvalItem(record.question, parse_gold(answer_value(record.answer), record.where), record.where)
        for record in records
    ]


def prepare_base(spec: ModelSpec, train_file: str, directory: str, seed: int) -> str:
    """The model every method of one seed starts from: `spec.path`, or a fresh from-scratch model whose
    word/digit tokenizer is built from the training file (saved in `directory`)."""
    if spec.path is not None:
        return spec.path
    from ..data.synth import to_icot_line
    from ..offline_models import build_base_model

    marker = "#### " if spec.vocab_answer_marker else ""
    texts = [
        to_icot_line({"question": r.question, "cot": r.cot, "answer": marker + r.answer})
        for r in read_records(train_file)
    ]
    return build_base_model(directory, texts, spec.arch, spec.n_layer, spec.n_embd, spec.n_head, seed)


def cot_warmup(ctx: RunContext, steps: int) -> str:
    """Train CoT-SFT for `steps` steps into `ctx.out_dir`; returns a folder later runs start from (a
    LoRA run is merged into its base first, so that it loads as a plain causal LM)."""
    from ..training import train

    training, model, data = split_options("cot warm-up", ctx.options)
    result = train(
        model_arguments(ctx, ctx.base, **model),
        data_arguments(ctx, **data),
        training_arguments(ctx, "cot_sft", steps, ctx.out_dir, **training),
    )
    if not result.model.is_lora:
        return ctx.out_dir
    merged = os.path.join(ctx.out_dir, "merged")
    result.model.lm.merge_and_unload().save_pretrained(merged)
    result.model.tokenizer.save_pretrained(merged)
    return merged


def _run_one(
    ctx: RunContext,
    items: Sequence[EvalItem],
    modes: Sequence[str],
    warmup_s: float,
    inspect: Callable | None,
    trained: tuple | None = None,
) -> list[RunRecord]:
    """Train (unless `trained` = (model, train seconds) from a second process), evaluate in each mode."""
    if trained is None:
        start = time.perf_counter()
        model = ctx.method.train(ctx)
        train_s = time.perf_counter() - start + warmup_s
    else:
        model, train_s = trained
    if ctx.device != "cpu":
        model.to(ctx.device)
    results = {mode: (ctx.method.evaluate or evaluate_generation)(model, items, ctx, mode) for mode in modes}
    extra = {"inspect": inspect(ctx, model)} if inspect else {}
    del model
    gc.collect()
    records = []
    for mode, result in results.items():
        n = result["n"]
        records.append(
            RunRecord(
                method=ctx.method.name,
                label=ctx.method.label,
                mode=mode,
                seed=ctx.seed,
                steps=ctx.budget.max_steps,
                train_wall_s=train_s,
                n=n,
                correct=round(result["accuracy"] * n / 100),
                accuracy=result["accuracy"],
                tokens_per_answer=result["mean_generated_tokens"],
                positions_per_answer=result["mean_positions_before_answer_end"],
                questions_per_s=result["questions_per_s"],
                cot_warmup_s=warmup_s,
                extra={
                    "strict_accuracy": result.get("strict_accuracy"),
                    "samples": result.get("samples_files"),
                }
                | extra,
            )
        )
    return records


# --------------------------------------------------------------------------------------------------
# The harness


@dataclass
class CompareResult:
    rows: list
    runs: list[RunRecord]
    table: str
    paths: dict[str, str]


def check_methods(methods: Sequence[str]) -> list[Method]:
    """The registry entries of `methods`, or one error naming every unknown or unavailable one."""
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    missing = [f"{name} ({METHODS[name].available()})" for name in methods if METHODS[name].available()]
    if missing:
        raise MethodUnavailable(f"method(s) not available here: {', '.join(missing)}")
    if len(set(methods)) != len(methods) or not methods:
        raise ValueError(f"methods must be distinct and non-empty, got {list(methods)}")
    return [METHODS[name] for name in methods]


def _contexts(chosen, seed, train_file, out_dir, model, budget, options, device) -> list[RunContext]:
    """The runs of one seed; those that start from the warm-up name its folder in `init_from`."""
    seed_dir = os.path.join(out_dir, f"seed{seed}")
    base = model.path or os.path.join(seed_dir, "base")
    contexts = []
    for method in chosen:
        merged = {**options.get("all", {}), **method.defaults, **options.get(method.name, {})}
        ctx = RunContext(
            method, seed, base, train_file, os.path.join(seed_dir, method.name), budget, model, merged, device,
            budget.max_steps,
        )  # fmt: skip
        if method.starts_from_cot and budget.cot_warmup_steps:
            steps = budget.max_steps - budget.cot_warmup_steps
            ctx = replace(ctx, init_from=os.path.join(seed_dir, "cot_warmup"), steps=steps)
        contexts.append(ctx)
    return contexts


def _warmup_context(ctx: RunContext, options: Mapping) -> RunContext:
    return replace(
        ctx, method=METHODS["cot_sft"], out_dir=ctx.init_from, options=dict(options.get("all", {})),
        init_from=None, steps=ctx.budget.cot_warmup_steps,
    )  # fmt: skip


def check_run(methods, seeds, model, budget, options, modes, train_file="train", out_dir="out", device="cpu"):
    """Every check `compare` makes before it reads data or makes a folder: seeds (non-empty, distinct),
    methods, option keys, modes, and every run's argument objects (a bad value names its field)."""
    if not seeds:
        raise ValueError("compare: no seeds (--seeds: comma-separated integers, e.g. 0,1)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"compare: seeds must be distinct, got {list(seeds)} (--seeds: e.g. 0,1)")
    chosen = check_methods(methods)
    bad = set(options) - set(METHODS) - {"all"}
    if bad:
        raise ValueError(f"options given for unknown method(s) {sorted(bad)}")
    bad_modes = {
        name: m for name, m in modes.items() if name not in methods or not set(m) <= {"latent", "cot"}
    }
    if bad_modes or not all(modes.values()):
        raise ValueError(f"modes: per chosen method, some of 'latent', 'cot'; got {dict(modes)}")
    for ctx in _contexts(chosen, seeds[0], train_file, out_dir, model, budget, options, device):
        ctx.method.check_options(ctx.options)
        check_arguments(ctx)
        if ctx.init_from:
            check_arguments(_warmup_context(ctx, options))
    return chosen


def _run_seed(contexts, items, options, modes, inspect, parallel) -> list[RunRecord]:
    """Train and evaluate the runs of one seed: the base model, the shared warm-up, each method."""
    first = contexts[0]
    prepare_base(first.model, first.train_file, first.base, first.seed)
    side = [ctx for ctx in contexts if parallel and not ctx.init_from and ctx.method.load]
    side = side if len(side) < len(contexts) else []
    aside = {ctx.method.name for ctx in side}
    child = start_aside(side) if side else None
    runs, warm, warm_s = [], None, 0.0
    for ctx in contexts:
        if ctx.method.name in aside:
            continue
        if ctx.init_from:
            if warm is None:
                start = time.perf_counter()
                warm = cot_warmup(_warmup_context(ctx, options), first.budget.cot_warmup_steps)
                warm_s = time.perf_counter() - start
            ctx = replace(ctx, init_from=warm)
        logger.info("seed %d: training %s (%d steps)", ctx.seed, ctx.method.name, ctx.steps)
        mine = modes.get(ctx.method.name, (ctx.method.eval_mode,))
        runs += _run_one(ctx, items, mine, warm_s if ctx.init_from else 0.0, inspect)
    if child is not None:
        times = join_aside(*child, side)
        for ctx in side:
            trained = (ctx.method.load(ctx), times[ctx.method.name])
            mine = modes.get(ctx.method.name, (ctx.method.eval_mode,))
            runs += _run_one(ctx, items, mine, 0.0, inspect, trained)
    return runs


def compare(
    methods: Sequence[str],
    train_file: str,
    test_file: str,
    model: ModelSpec | None = None,
    budget: Budget | None = None,
    seeds: Sequence[int] = (0,),
    out_dir: str = "runs/compare",
    *,
    options: Mapping[str, Mapping] | None = None,
    device: str = "cpu",
    test_limit: int | None = None,
    title: str = "",
    modes: Mapping[str, Sequence[str]] | None = None,
    parallel: bool = False,
    inspect: Callable | None = None,
    table: Callable = comparison_table,
) -> CompareResult:
    """Train `methods` on `train_file` for each seed, evaluate on `test_file`, one table.

    options: per method name (or "all"), argument overrides: training (`CODITrainingArguments`), model
    (`CODIModelArguments`), data (`CODIDataArguments`) or the method's own (e.g. `ICoTArguments`) fields.
    iCoT without a schedule in its options removes the longest CoT by half of its steps
    (`removal_done_at`, see `codi.compare.methods.icot_step_schedule`): the reference's 8 tokens per epoch
    would not fit a step budget. modes, parallel, inspect: see the module docstring; table: how the rows
    are printed (`codi.report.comparison_table`, or `speedup_table` as the demo does).
    Everything is checked before anything is read or made (`check_run`).
    Writes `out_dir/results.json`, `results.png`, `table.txt`; each run in `out_dir/seed<S>/<method>`.
    """
    model, budget, options = model or ModelSpec(), budget or Budget(), dict(options or {})
    modes = {name: tuple(value) for name, value in (modes or {}).items()}
    seeds = list(seeds)
    chosen = check_run(methods, seeds, model, budget, options, modes, train_file, out_dir, device)
    items = read_test_items(test_file, test_limit)
    read_records(train_file)  # a bad training file fails before anything trains
    os.makedirs(out_dir, exist_ok=True)
    runs = []
    for seed in seeds:
        contexts = _contexts(chosen, seed, train_file, out_dir, model, budget, options, device)
        runs += _run_seed(contexts, items, options, modes, inspect, parallel)
    rows = aggregate(runs, [method.name for method in chosen])
    text = table(rows)
    config = {
        "methods": list(methods), "train_file": train_file, "test_file": test_file,
        "model": dataclasses.asdict(model), "budget": dataclasses.asdict(budget), "seeds": seeds,
        "options": options, "modes": modes, "device": device,
    }  # fmt: skip
    paths = {name: os.path.join(out_dir, name) for name in ("results.json", "results.png", "table.txt")}
    rows_json = [dataclasses.asdict(row) for row in rows]
    runs_json = [dataclasses.asdict(run) for run in runs]
    write_results(out_dir, {"config": config, "rows": rows_json, "runs": runs_json, "table": text})
    comparison_chart(rows, paths["results.png"], title)
    print(f"\n{title or 'comparison'}: {len(items)} test questions, {budget.max_steps} steps per method\n")
    print(text)
    return CompareResult(rows, runs, text, paths)


# --------------------------------------------------------------------------------------------------
# The demo's synthetic data (what `codi demo --preset table1` needs)

TABLE1_MODEL = ModelSpec(arch="gpt2", n_layer=4, n_embd=64, n_head=4, num_latent=4)
TABLE1_BUDGET = Budget(
    max_steps=2400, cot_warmup_steps=400, batch_size=32, learning_rate=3e-3, eval_batch_size=250
)
# Per-method options of the demo's Table-1 run. Coconut's reference schedule (3 epochs a stage) does not
# fit TABLE1_BUDGET (2000 steps after the shared CoT warm-up are 3.2 epochs of the 20000 records), so it
# runs the step schedule: it starts from the warm-up (stage 0 done) at stage 1, 400 steps for each of
# stages 1, 2, 3, then the final stage (every step removed) for the last 800 steps; one thought per
# step of the demo's 3-step chains (CODI uses 4 latents there).
TABLE1_OPTIONS: dict[str, dict] = {
    "coconut": dict(
        steps_per_stage=400, start_stage=1, c_thought=1, max_latent_stage=3, pad_latent_to_max=True
    ),
}


def synthetic_data(out_dir: str, synth=None) -> dict[str, str]:
    """Write the demo's data (default: its default preset's: 3-step mod-10 chains, uniform wording,
    20000 / 200 / 500 records, data seed 0) into `out_dir`; returns the `.txt` path of each split."""
    from ..data.synth import SynthConfig, synthesize

    config = synth or SynthConfig(
        n_train=20000, n_validation=200, n_test=500, min_steps=3, max_steps=3, wording="uniform", seed=0
    )
    return synthesize(out_dir, config)


def run_synthetic(
    methods: Sequence[str] = TABLE1_METHODS,
    budget: Budget = TABLE1_BUDGET,
    seeds: Sequence[int] = (0, 1),
    out_dir: str = "runs/table1",
    *,
    model: ModelSpec = TABLE1_MODEL,
    synth=None,
    options: Mapping[str, Mapping] | None = None,
    device: str = "cpu",
    test_limit: int | None = None,
) -> CompareResult:
    """Every row of Table 1 on the demo's synthetic data (one data set; seeds vary the models), with
    the demo's from-scratch model, budget and per-method options (`TABLE1_OPTIONS`, used when `options`
    is None) by default. Unavailable methods are left out, with a note."""
    usable = [name for name in methods if not (name in METHODS and METHODS[name].available())]
    for name in set(methods) - set(usable):
        print(f"note: {name} left out: {METHODS[name].available()}")
    paths = synthetic_data(os.path.join(out_dir, "data"), synth)
    return compare(
        usable,
        paths["train"],
        paths["test"],
        model,
        budget,
        seeds,
        out_dir,
        options=TABLE1_OPTIONS if options is None else options,
        device=device,
        test_limit=test_limit,
        title=f"Table 1 on synthetic data ({budget.max_steps} steps, seeds {list(seeds)})",
    )
