"""`codi demo`: the offline end-to-end demonstration of CODI, as presets of the comparison harness
(`codi.compare`) on data and a model it makes itself.

1. synthetic GSM8k-Aug-style data (`codi.data.synth`): train / validation / test, disjoint by problem;
2. `codi.compare` with the preset's settings (`harness_settings`): a word/digit-level tokenizer and a
   small GPT-2 from scratch (saved HF-style under `<out>/seed<S>/base`), No-CoT-SFT and CODI trained
   with the same number of steps (No-CoT-SFT in a second process), CODI evaluated in latent mode and as
   the CoT teacher, No-CoT-SFT without a CoT; after CODI's evaluation its latent accuracy on training
   questions (a memorisation check) and the latent probe (`inspect`);
3. the harness's table in the demo's form (`codi.report.speedup_table`: accuracy, tokens and positions
   per answer, questions/s, speedup vs the CoT teacher), chart and `results.json`, plus the demo's
   claims, in a fresh output folder.

The presets are in `codi.demo.presets`; docs/demo.md records every regime tried and why these values.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace

from .presets import Preset, synth_config

logger = logging.getLogger(__name__)


@dataclass
class HarnessSettings:
    """What `codi.compare.compare` gets from a preset."""

    methods: list[str]
    model: object  # codi.compare.ModelSpec
    budget: object  # codi.compare.Budget
    options: dict
    modes: dict


def codi_method(preset: Preset) -> str:
    """The harness's CODI entry: codi_s (CODI+S) when the latent step supervision is on, else codi."""
    return "codi_s" if preset.latent_step_factor else "codi"


def method_label(preset: Preset) -> str:
    """The method's name in the table: CODI+S when the latent step supervision is on, else CODI."""
    from ..compare import METHODS

    return METHODS[codi_method(preset)].label


def harness_settings(preset: Preset, device: str = "cpu") -> HarnessSettings:
    """The preset as the harness's model, budget, per-method options and evaluation modes."""
    from ..compare import Budget, ModelSpec

    codi = codi_method(preset)
    model = ModelSpec(
        arch=preset.arch, n_layer=preset.n_layer, n_embd=preset.n_embd, n_head=preset.n_head,
        num_latent=preset.num_latent, vocab_answer_marker=True,
    )  # fmt: skip
    budget = Budget(
        max_steps=preset.steps_budget, cot_warmup_steps=preset.cot_warmup_steps, batch_size=preset.batch_size,
        learning_rate=preset.learning_rate, eval_batch_size=preset.eval_batch_size, max_new_tokens=64,
        timing_repeats=3, progress=True,
    )  # fmt: skip
    # every run (the warm-up and No-CoT-SFT too) gets the preset's loss settings; the step supervision
    # is CODI's alone
    shared = dict(
        distill_loss_factor=preset.distill_factor, distill_loss_type=preset.distill_loss_type,
        distill_loss_div_std=preset.distill_div_std, ref_loss_factor=preset.ref_loss_factor,
    )  # fmt: skip
    options = {"all": shared, codi: {**shared, "latent_step_loss_factor": preset.latent_step_factor}}
    methods = ([] if preset.skip_no_cot else ["no_cot_sft"]) + [codi]
    return HarnessSettings(methods, model, budget, options, {codi: ("cot", "latent")})


def check_demo(preset: Preset, seed: int, device: str = "cpu") -> HarnessSettings:
    """Every check of a run, before any folder is made or deleted: the data settings and every
    training run's arguments (`codi.compare.check_run`)."""
    from ..compare import check_run

    synth_config(preset, seed)
    settings = harness_settings(preset, device)
    check_run(
        settings.methods, [seed], settings.model, settings.budget, settings.options, settings.modes,
        device=device,
    )  # fmt: skip
    return settings


def claim_check(rows: dict) -> dict[str, bool]:
    """The claims the demo checks (listed in docs/demo.md), evaluated on this run's rows (accuracy in %)."""
    latent, cot = rows["codi_latent"], rows["codi_cot"]
    no_cot = rows["no_cot"].accuracy if "no_cot" in rows else 100.0
    return {
        "latent >= 0.85 x teacher CoT": latent.accuracy >= 0.85 * cot.accuracy,
        "latent >= No-CoT + 15 points": latent.accuracy >= no_cot + 15,
        "latent decodes >= 2x fewer positions": 2 * latent.positions_per_answer <= cot.positions_per_answer,
        "latent answers faster than CoT": latent.questions_per_s > cot.questions_per_s,
    }


def run_probe(model, records: list[dict], out_dir: str) -> dict | None:
    """The latent probe (paper §5, Table 3); its summary, or None."""
    from ..analysis.probe import run_probe as probe_and_report

    try:
        summary = probe_and_report(
            model, records, out_dir, title="codi demo: latent probe", batch_size=100, max_new_tokens=64
        )
    except Exception as error:  # the probe is an extra: the demo's table must survive its failure
        logger.warning("latent probe failed: %s", error)
        return {"error": repr(error)}
    rates = (summary.get("table3") or {}).get("first_token", {}).get("all", {})
    print(
        f"latent probe, {len(records)} test questions: top-5 decoded latents contain every intermediate "
        f"result in order {rates.get('in_order')}, in any order {rates.get('any_order')}; "
        f"report {(summary.get('paths') or {}).get('html')}"
    )
    return summary


def _inspector(out_dir: str, paths: dict, n_test: int, budget, probe: bool):
    """After CODI's evaluation: its latent accuracy on training questions, then the probe."""
    from ..compare import evaluate_mode, read_test_items

    def inspect(ctx, model) -> dict | None:
        if ctx.method.trains_as != "codi":
            return None
        items = read_test_items(paths["train"], n_test)
        check = evaluate_mode(model, items, "latent", replace(budget, timing_repeats=1), "train_questions")
        summary = None
        if probe:
            with open(paths["test"].removesuffix(".txt") + ".jsonl") as handle:
                records = [json.loads(line) for line in handle][:200]
            summary = run_probe(model, records, os.path.join(out_dir, "probe"))
        return {"train_questions_latent_accuracy": check["accuracy"], "probe": summary}

    return inspect


def _final_logs(run_dir: str, last: int) -> list[dict]:
    """The last logged training losses of a run (from the Trainer's saved state)."""
    path = os.path.join(run_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [entry for entry in json.load(handle)["log_history"] if "loss" in entry][-last:]


def _print_notes(preset: Preset, rows: dict, train_accuracy: float, checks: dict) -> None:
    label = method_label(preset)
    if preset.latent_step_factor:
        print(
            f"\n{label} = the paper's CODI loss plus latent step supervision (latent_step_factor="
            f"{preset.latent_step_factor}, not part of the paper); `--preset paper` trains the paper's loss alone"
        )
    n = rows["codi_latent"].n
    print(f"\n{label} latent accuracy on {n} training questions: {train_accuracy:.1f}% (memorisation check)")
    for claim, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {claim}")


ROW_KEYS = {("cot", False): "no_cot", ("cot", True): "codi_cot", ("latent", True): "codi_latent"}


def run_demo(preset: Preset, seed: int, out_dir: str, probe: bool = True, device: str = "cpu") -> dict:
    """Data -> `codi.compare` (base model, No-CoT-SFT and CODI, evaluation, table, JSON, chart) -> claims."""
    import torch

    from ..compare import compare
    from ..data.synth import synthesize
    from ..report import speedup_table, write_results

    settings = check_demo(preset, seed, device)
    # One thread: these models are tiny, and on a shared 2-core machine two threads per process
    # measured ~7x slower per step than one (synchronisation under contention).
    torch.set_num_threads(1)
    wall = time.perf_counter()
    paths = synthesize(os.path.join(out_dir, "data"), synth_config(preset, seed))
    result = compare(
        settings.methods, paths["train"], paths["test"], settings.model, settings.budget, [seed], out_dir,
        options=settings.options, device=device, title=f"CODI demo, seed {seed} ({out_dir})",
        modes=settings.modes, parallel=preset.parallel, table=speedup_table,
        inspect=_inspector(out_dir, paths, preset.n_test, settings.budget, probe),
    )  # fmt: skip
    rows = {ROW_KEYS[row.mode, row.method != "no_cot_sft"]: row for row in result.rows}
    codi_run = next(run for run in result.runs if run.extra.get("inspect"))
    checks = claim_check(rows)
    seed_dir = os.path.join(out_dir, f"seed{seed}")
    with open(result.paths["results.json"]) as handle:
        saved = json.load(handle)
    summary = saved | {
        "preset": asdict(preset),
        "seed": seed,
        "rows": {key: asdict(row) for key, row in rows.items()},
        "train_questions_latent_accuracy": codi_run.extra["inspect"]["train_questions_latent_accuracy"],
        "claim": checks,
        "timings": {f"train_{run.method}_s": run.train_wall_s for run in result.runs}
        | {"total_s": time.perf_counter() - wall},
        "final_logs": {
            "no_cot": _final_logs(os.path.join(seed_dir, "no_cot_sft"), 1),
            "codi": _final_logs(os.path.join(seed_dir, codi_method(preset)), 2),
        },
        "probe": codi_run.extra["inspect"]["probe"],
    }
    write_results(out_dir, summary)
    _print_notes(preset, rows, summary["train_questions_latent_accuracy"], checks)
    print(
        f"wall time {summary['timings']['total_s'] / 60:.1f} min; results.json and results.png in {out_dir}"
    )
    return summary


DEMO_MARKER = ".codi-demo"  # written first into every demo folder: `--overwrite` deletes only those


def fresh_out_dir(requested: str | None, overwrite: bool) -> str:
    """A new folder per run (runs/demo-YYYYmmdd-HHMMSS), or the requested one if empty; `--overwrite`
    replaces a folder only when an earlier demo wrote it (its marker file), never anything else."""
    path = requested or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty: pass --overwrite or another --out")
        if not os.path.isfile(os.path.join(path, DEMO_MARKER)):
            raise FileExistsError(
                f"{path} was not written by codi demo (no {DEMO_MARKER} file): --overwrite refuses to delete it; "
                "pass another --out"
            )
        import shutil

        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, DEMO_MARKER), "w") as handle:
        handle.write("written by codi demo; codi demo --overwrite may replace this folder\n")
    return path
