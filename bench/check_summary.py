"""One line that says what a stage of scripts/gpu_check.sh produced (read from its log and JSON).

python bench/check_summary.py STAGE OUT_DIR
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path


def _last(lines: list[str], pattern: str) -> str | None:
    matches = [line.strip() for line in lines if re.search(pattern, line)]
    return matches[-1] if matches else None


def _speedups(result: dict) -> str:
    keys = [key for key in result if key.startswith("speedup") and "round" not in key]
    parts = [f"{key}={json.dumps(result[key], separators=(',', ':'))}" for key in keys]
    checks = result.get("checks")
    return " ".join(parts + ([f"checks={json.dumps(checks, separators=(',', ':'))}"] if checks else []))


def _train(result: dict) -> str:
    """Seconds per step, launches per step and compile time per variant, then the ratios."""
    rows = []
    for name, values in result.get("variants", {}).items():
        compiled = f", compile {values['compile_s']} s" if "compile_s" in values else ""
        rows.append(
            f"{name}: {values.get('s_per_step')} s/step, {values.get('launches_per_step')} launches{compiled}"
        )
    gains = [
        f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in result.items() if "_vs_" in key
    ]
    return "; ".join(rows) + " | " + " ".join(gains + [_speedups(result)])


def _decode(result: dict) -> str:
    """Questions/s per mode at the batch size, ms per question at batch 1, and the speed-ups."""
    batch = result.get("throughput_batch_size")
    rows = []
    for mode, values in result.get("modes", {}).items():
        qps = values.get(f"batch{batch}_questions_per_s")
        ops = values.get("aten_ops_per_lm_call")
        rows.append(
            f"{mode}: {values.get('batch1_ms_per_question')} ms/q b1, {qps} q/s b{batch}, ops/call {ops}"
        )
    return "; ".join(rows) + " | " + _speedups(result)


def summarise(stage: str, out: Path) -> str:
    log = out / f"{stage}.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    data = out / f"{stage}.json"
    if data.is_file():
        result = json.loads(data.read_text())
        summary = {"bench_decode": _decode, "bench_train": _train, "bench_compiled": _train}
        return summary.get(stage, _speedups)(result)[:1500]
    if stage.startswith("train_"):
        end = _last(lines, r"^\{'train_runtime'")
        if end:
            values = ast.literal_eval(end)
            keys = ("train_loss", "train_runtime", "train_steps_per_second", "epoch")
            return " ".join(f"{key}={round(values[key], 4)}" for key in keys if key in values)
        loss = _last(lines, r"'loss'")
        if loss:
            return f"(unfinished) last log {loss}"
    if stage.startswith("eval_"):
        table = [line.strip() for line in lines if re.match(r"\S+\s+(latent|cot)\s+\d+\s", line)]
        table += [line.strip() for line in lines if "speedup of" in line]
        if table:
            return " / ".join(re.sub(r"\s+", " ", line) for line in table[-4:])
    if stage == "ablate":
        verdict = _last(lines, r"(?i)verdict|uses its latents|does not use")
        rows = [line.strip() for line in lines if re.match(r"\s*(none|zero|shuffle|first_k)", line)]
        if verdict or rows:
            return " / ".join(rows[-6:] + ([verdict] if verdict else []))
    return lines[-1].strip()[:300] if lines else "(no output)"


if __name__ == "__main__":
    print(summarise(sys.argv[1], Path(sys.argv[2])))
