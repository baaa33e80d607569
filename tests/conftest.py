"""Shared fixtures: tiny random GPT-2 / Llama checkpoints (built once per session) and model factories.

Everything runs offline on CPU: the models are a few hundred kB, built from configs by `codi.testing`.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tests never need the hub: fail fast instead of waiting on the network. Set before anything imports
# huggingface_hub, which reads these variables once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch

from codi.config import CODIModelArguments
from codi.data.dataset import CODICollator, RawRecord, build_dataset
from codi.losses import LossSettings, TrainingObjective
from codi.model import CODIModel
from codi.testing import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason (CI clones may lack it)."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path} (expected ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_gpt2")), arch="gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), arch="llama")


@pytest.fixture(scope="session")
def tiny_dirs(tiny_gpt2, tiny_llama) -> dict[str, str]:
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}


# Small arithmetic records in the GSM8k-Aug shape; questions of clearly different lengths so that a
# batch of them is left-padded.
RECORDS = [
    RawRecord("Tom has 12 apples and buys 30 more.", "<<12+30=42>> <<42*1=42>>", "#### 42", "r0"),
    RawRecord(
        "A shop sells 7 pens for 3 dollars each. How many dollars does the shop get for all of the pens?",
        "<<7*3=21>> <<21*1=21>>",
        "#### 21",
        "r1",
    ),
    RawRecord("She eats three. How many left?", "<<3-8=-5>> <<-5*1=-5>>", "#### -5", "r2"),
    RawRecord(
        "John cuts his grass to 2 inches. It grows .5 inches per month. How much does he pay per year "
        "if every cut costs 100 dollars and he cuts 7 times?",
        "<<100*7=700>> <<700*1=700>>",
        "#### 700",
        "r3",
    ),
]


@pytest.fixture
def train_file(tmp_path) -> str:
    """A small ICoT-format file (16 records), so training tests do not need ../shared/data."""
    path = tmp_path / "train.txt"
    lines = [f"{r.question}||{r.cot} {r.answer}" for r in RECORDS] * 4
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def make_model(tiny_dirs):
    """`make_model(arch="gpt2", method="codi", **model_arg_overrides)` -> a fresh CODIModel in eval mode."""

    def factory(
        arch: str = "gpt2",
        *,
        method: str = "codi",
        loss: dict | None = None,
        share_question: bool = True,
        seed: int = 0,
        **overrides,
    ) -> CODIModel:
        values = dict(model_name_or_path=tiny_dirs[arch], lora_r=8, lora_alpha=16, prj_dim=16, num_latent=3)
        values.update(overrides)
        torch.manual_seed(seed)
        objective = TrainingObjective(method, LossSettings(**(loss or {})), share_question)
        return CODIModel.from_base(CODIModelArguments(**values), objective).eval()

    return factory


def batch_for(
    model: CODIModel, records=RECORDS, method: str = "codi", step_targets: bool = False
) -> dict[str, torch.Tensor]:
    """Collated batch of `records` for `model` (no record dropped)."""
    dataset, stats = build_dataset(
        records,
        model.tokenizer,
        bot_id=model.bot_id,
        eot_id=model.eot_id,
        method=method,
        step_targets=step_targets,
    )
    assert stats.kept == len(records), stats
    return CODICollator(model.pad_id)([dataset[i] for i in range(len(dataset))])


# The tensors here are tiny: with several threads, OpenMP synchronisation dominates, and on a shared
# machine spinning threads made training steps 5-30x slower. One thread unless asked otherwise.
torch.set_num_threads(int(os.environ.get("CODI_TEST_THREADS", "1")))
