"""`codi demo`: the offline end-to-end demonstration of CODI on data and a model it makes itself.

1. synthetic GSM8k-Aug-style data (`codi.demo.synth`): train / validation / test, disjoint by problem;
2. a word/digit-level tokenizer (`tokenizers` WordLevel, every digit its own token) and a small
   GPT-2 from scratch (`codi.demo.offline_models`), saved HF-style under `<out>/base` so every other
   command can load it;
3. No-CoT-SFT and CODI trained with the same model size and the same number of steps;
4. evaluation on the held-out test split: CODI in latent mode, the same CODI model in teacher CoT mode,
   and No-CoT; the latent probe;
5. one table (accuracy, tokens generated per answer, questions/s, speedup vs CoT) printed and saved as
   `results.json` and `results.png` in a fresh output folder.

The presets are in `codi.demo.presets`; docs/demo.md records every regime tried and why these values.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from .offline_models import build_base_model
from .presets import Preset, synth_config
from .synth import make_splits, to_icot_line, write_splits

logger = logging.getLogger(__name__)


def train_method(
    method: str,
    base: str,
    train_file: str,
    out_dir: str,
    preset: Preset,
    seed: int,
    max_steps: int,
    device: str = "cpu",
    progress: bool = True,
):
    """Train one method from `base` for `max_steps` steps; returns the `TrainResult`."""
    from ..config import CODIDataArguments, CODIModelArguments, CODITrainingArguments
    from ..training import train

    model_args = CODIModelArguments(
        model_name_or_path=base,
        use_lora=False,
        prj_dim=2 * preset.n_embd,
        num_latent=preset.num_latent,
        inf_latent_iterations=preset.num_latent,
    )
    data_args = CODIDataArguments(train_file=train_file)
    training_args = CODITrainingArguments(
        output_dir=out_dir,
        method=method,
        max_steps=max_steps,
        per_device_train_batch_size=preset.batch_size,
        learning_rate=preset.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(50, max_steps // 10),
        weight_decay=0.01,
        max_grad_norm=2.0,
        distill_loss_factor=preset.distill_factor,
        distill_loss_type=preset.distill_loss_type,
        distill_loss_div_std=preset.distill_div_std,
        ref_loss_factor=preset.ref_loss_factor,
        latent_step_loss_factor=preset.latent_step_factor if method == "codi" else 0.0,
        logging_steps=max(1, max_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )
    return train(model_args, data_args, training_args)


def _train_quietly(*args) -> None:
    """Child-process entry: one thread (the parent trains on the other core), no progress bar."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    train_method(*args, progress=False)


def _final_logs(run_dir: str) -> list[dict]:
    """The last logged training losses of a run (from the Trainer's saved state)."""
    path = os.path.join(run_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [entry for entry in json.load(handle)["log_history"] if "loss" in entry][-1:]


# --------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Row:
    """One line of the results table."""

    name: str
    mode: str
    accuracy: float
    tokens_per_answer: float
    positions_per_answer: float
    questions_per_s: float
    n: int
    speedup_vs_cot: float = 1.0


def score(model, records: list[dict], mode: str, preset: Preset, name: str, timing_repeats: int = 3) -> Row:
    """Greedy answers for `records`; accuracy by `codi.scoring` (the rule `codi eval` uses)."""
    from ..generate import generate
    from ..scoring import extract_answer, is_correct, parse_gold

    questions = [record["question"] for record in records]
    model.eval()
    # Speed: the fastest of `timing_repeats` identical passes (greedy decoding is deterministic), so a
    # busy shared machine (another demo, the No-CoT child finishing) does not decide the comparison.
    seconds = float("inf")
    for _ in range(max(1, timing_repeats)):
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = generate(
                model, questions, mode=mode, max_new_tokens=64, batch_size=preset.eval_batch_size
            )
        seconds = min(seconds, time.perf_counter() - start)
    correct = 0
    for output, record in zip(outputs, records):
        correct += is_correct(extract_answer(output.text), parse_gold(record["answer"]))
    n = len(records)
    tokens = sum(output.num_generated_tokens for output in outputs) / n
    latent = sum(output.num_latent_positions for output in outputs) / n
    # positions decoded per answer: generated tokens, plus <bot>, the latents and <eot> in latent mode
    positions = tokens + (latent + 2 if mode == "latent" else 0)
    return Row(name, mode, correct / n, tokens, positions, n / seconds, n)


def run_probe(model, records: list[dict], out_dir: str) -> dict | None:
    """The latent probe (paper §5, Table 3); its summary, or None."""
    from ..probe import run_probe as probe_and_report

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


# --------------------------------------------------------------------------------------------------
# Report


def method_label(preset: Preset) -> str:
    """The method's name in the table: CODI+S when the latent step supervision is on, else CODI."""
    return "CODI+S" if preset.latent_step_factor else "CODI"


def format_table(rows: list[Row]) -> str:
    header = f"{'method':<26}{'accuracy':>9}{'tokens/ans':>12}{'positions/ans':>15}{'questions/s':>13}{'speedup':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.name:<26}{100 * row.accuracy:>8.1f}%{row.tokens_per_answer:>12.1f}"
            f"{row.positions_per_answer:>15.1f}{row.questions_per_s:>13.1f}{row.speedup_vs_cot:>8.2f}x"
        )
    return "\n".join(lines)


def claim_check(rows: dict[str, Row]) -> dict[str, bool]:
    """The claims the demo checks (listed in docs/demo.md), evaluated on this run."""
    latent, cot = rows["codi_latent"], rows["codi_cot"]
    no_cot = rows.get("no_cot", Row("none", "cot", 1.0, 0, 0, 0, 0))
    return {
        "latent >= 0.85 x teacher CoT": latent.accuracy >= 0.85 * cot.accuracy,
        "latent >= No-CoT + 15 points": latent.accuracy >= no_cot.accuracy + 0.15,
        "latent decodes >= 2x fewer positions": 2 * latent.positions_per_answer <= cot.positions_per_answer,
        "latent answers faster than CoT": latent.questions_per_s > cot.questions_per_s,
    }


def save_chart(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a headless machine
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [row.name for row in rows]
    colours = ["#888888", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(rows)]
    metrics = (
        ("accuracy (%)", [100 * r.accuracy for r in rows]),
        ("positions decoded per answer", [r.positions_per_answer for r in rows]),
        ("questions / s", [r.questions_per_s for r in rows]),
    )
    for axis, (title, values) in zip(axes, metrics):
        axis.bar(range(len(rows)), values, color=colours)
        axis.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        axis.set_title(title)
        for index, value in enumerate(values):
            axis.text(index, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


# --------------------------------------------------------------------------------------------------
# The pipeline


def run_demo(preset: Preset, seed: int, out_dir: str, probe: bool = True, device: str = "cpu") -> dict:
    """Data -> base model -> No-CoT-SFT and CODI -> evaluation -> table, JSON and chart."""
    from tqdm.auto import tqdm

    # One thread: these models are tiny, and on a shared 2-core machine two threads per process
    # measured ~7x slower per step than one (synchronisation under contention).
    torch.set_num_threads(1)
    wall = time.perf_counter()
    stages = tqdm(total=5, desc="codi demo", unit="stage", position=0)
    config = synth_config(preset, seed)
    splits = make_splits(config)
    paths = write_splits(splits, os.path.join(out_dir, "data"), config)
    base = build_base_model(
        os.path.join(out_dir, "base"),
        [to_icot_line(r) for r in splits["train"]],
        preset.arch,
        preset.n_layer,
        preset.n_embd,
        preset.n_head,
        seed,
    )
    stages.update()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    no_cot_dir = os.path.join(out_dir, "no_cot")
    no_cot_args = ("no_cot_sft", base, paths["train"], no_cot_dir, preset, seed, preset.steps_budget, device)
    # The baseline trains in a second process (one core each): the two trainings overlap.
    child = None
    if not preset.skip_no_cot and preset.parallel:
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(target=_train_quietly, args=no_cot_args)
        child.start()
    elif not preset.skip_no_cot:
        stages.set_postfix_str("training No-CoT-SFT")
        train_method(*no_cot_args)
        timings["train_no_cot_s"] = time.perf_counter() - start
    stages.update()
    codi_base = base
    if preset.cot_warmup_steps:
        # A short CoT-SFT warm-up: the teacher learns the task first, CODI then starts from it.
        stages.set_postfix_str("CoT warm-up")
        warm = os.path.join(out_dir, "cot_warmup")
        train_method("cot_sft", base, paths["train"], warm, preset, seed, preset.cot_warmup_steps, device)
        codi_base = warm
    stages.set_postfix_str("training CODI" + (" (No-CoT-SFT in parallel)" if child else ""))
    codi_steps = preset.steps_budget - preset.cot_warmup_steps
    codi_run = train_method(
        "codi", codi_base, paths["train"], os.path.join(out_dir, "codi"), preset, seed, codi_steps, device
    )
    codi = codi_run.model
    timings["train_codi_s"] = time.perf_counter() - start
    if child is not None:
        stages.set_postfix_str("waiting for No-CoT-SFT")
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"No-CoT-SFT training failed (exit code {child.exitcode}); see the log above")
        timings["train_no_cot_s"] = time.perf_counter() - start
    no_cot = None
    if not preset.skip_no_cot:
        from ..loader import load

        no_cot = load(no_cot_dir)
        if device == "cuda":
            no_cot.to("cuda")
    stages.update()
    stages.set_postfix_str("evaluating")
    start = time.perf_counter()
    test = splits["test"]
    rows = {} if no_cot is None else {"no_cot": score(no_cot, test, "cot", preset, "No-CoT-SFT")}
    label = method_label(preset)
    rows |= {
        "codi_cot": score(codi, test, "cot", preset, f"{label} teacher (CoT)"),
        "codi_latent": score(codi, test, "latent", preset, f"{label} latent"),
    }
    train_check = score(  # accuracy only: one pass
        codi,
        splits["train"][: len(test)],
        "latent",
        preset,
        f"{label} latent, train questions",
        timing_repeats=1,
    )
    cot_speed = rows["codi_cot"].questions_per_s
    for row in rows.values():
        row.speedup_vs_cot = row.questions_per_s / cot_speed
    timings["evaluate_s"] = time.perf_counter() - start
    stages.update()
    probe_summary = run_probe(codi, test[:200], os.path.join(out_dir, "probe")) if probe else None
    stages.update()
    stages.close()
    timings["total_s"] = time.perf_counter() - wall
    table = format_table(list(rows.values()))
    checks = claim_check(rows)
    result = {
        "preset": asdict(preset),
        "seed": seed,
        "rows": {key: asdict(row) for key, row in rows.items()},
        "train_questions_latent_accuracy": train_check.accuracy,
        "claim": checks,
        "timings": timings,
        "final_logs": {
            "no_cot": _final_logs(os.path.join(out_dir, "no_cot")),
            "codi": [e for e in codi_run.trainer.state.log_history if "loss" in e][-2:],
        },
        "probe": probe_summary,
        "table": table,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    save_chart(list(rows.values()), os.path.join(out_dir, "results.png"))
    print(f"\nCODI demo, seed {seed}, {len(test)} held-out test questions ({out_dir})\n")
    print(table)
    if preset.latent_step_factor:
        print(
            f"\n{label} = the paper's CODI loss plus latent step supervision (latent_step_factor="
            f"{preset.latent_step_factor}, not part of the paper); `--preset paper` trains the paper's loss alone"
        )
    print(
        f"\n{label} latent accuracy on {len(test)} training questions: {100 * train_check.accuracy:.1f}% (memorisation check)"
    )
    for claim, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {claim}")
    print(f"wall time {timings['total_s'] / 60:.1f} min; results.json and results.png in {out_dir}")
    return result
