"""The GPU check script's CPU smoke run: every stage runs, finishes, and lands in the final table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

STAGES = [
    "bench_train",
    "bench_decode",
    "data",
    "base",
    "train_codi",
    "train_cot_sft",
    "train_no_cot_sft",
    "eval_codi",
    "eval_cot_sft",
    "eval_no_cot_sft",
    "ablate",
]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    """~2-4 min on the shared 2-core machine: eleven stages, each a fresh Python process (tiny model,
    3 training steps, 8 test questions). Each stage's line is printed when it ends, then the table."""
    env = {
        **os.environ,
        "PY": sys.executable,
        "OUT": str(tmp_path),
        "CODI_BENCH_CACHE": str(tmp_path / "cache"),
    }
    env["PYTHONPATH"] = str(REPO_ROOT / "src")
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "results.tsv").read_text().splitlines()]
    assert [row[0] for row in rows] == STAGES[:1] + ["bench_compiled"] + STAGES[1:]
    assert rows.pop(1)[1:3] == ["skipped", "0"]  # inductor's CPU compile takes minutes: GPU runs only
    assert all(row[1] == "0" for row in rows), rows
    printed = done.stdout
    assert all(f"=== {stage} rc=0" in printed for stage in STAGES)
    assert printed.index("=== ablate") < printed.index("stage               rc")  # the table comes last
    decode = next(row[3] for row in rows if row[0] == "bench_decode")
    assert '"latent_fast_tokens_identical_to_latent":true' in decode
    assert "train_loss=" in next(row[3] for row in rows if row[0] == "train_codi")
    assert "gsm8k-aug latent 8" in next(row[3] for row in rows if row[0] == "eval_codi")
