"""Hub-native checkpoints without the network: `push_to_hub` (model and `codi train --push_to_hub`) into a
local stand-in of the hub, the offline switch against the pinned libraries, `codi lm-eval` failing fast."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from test_train import quick_args

import codi
from codi.training import train

QUESTIONS = ["Tom has 12 apples and buys 30 more.", "She eats three. How many left?"]


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """`HfApi.create_repo` / `upload_folder` copy into `tmp/remote/<repo_id>` (never the network);
    returns (that root, the commit messages)."""
    root, commits = tmp_path / "remote", []

    def create_repo(self, repo_id, **kwargs):
        (root / repo_id).mkdir(parents=True, exist_ok=True)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, **kwargs):
        target = root / repo_id / (path_in_repo or "")
        for file in Path(folder_path).rglob("*"):
            name = file.relative_to(folder_path).as_posix()
            if file.is_file() and (
                allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns)
            ):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, target / name)
        commits.append(kwargs.get("commit_message"))
        return f"commit {len(commits)}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return root, commits


def test_push_to_hub_uploads_a_checkpoint_that_loads(make_model, remote):
    root, commits = remote
    model = make_model()
    expected = [o.token_ids for o in model.generate(QUESTIONS, max_new_tokens=5)]
    model.push_to_hub("someone/tiny-codi", model_card_kwargs={"datasets": ["zen-E/GSM8k-Aug"]})
    pushed = root / "someone" / "tiny-codi"
    names = {path.name for path in pushed.iterdir()}
    assert {"codi_config.json", "codi_extra.safetensors", "adapter_model.safetensors", "README.md"} <= names
    assert "config.json" not in names  # no ModelHubMixin config beside the adapter
    card = ModelCard.load(pushed / "README.md")
    assert card.data.library_name == "peft" and card.data.datasets == ["zen-E/GSM8k-Aug"]
    loaded = codi.load(str(pushed))
    assert [o.token_ids for o in loaded.generate(QUESTIONS, max_new_tokens=5)] == expected
    assert commits == ["Push model using huggingface_hub."]


def test_train_push_to_hub_uploads_through_our_saver(tiny_gpt2, train_file, tmp_path, remote):
    root, commits = remote
    extra = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    extra += ["--push_to_hub", "True", "--hub_model_id", "someone/run", "--hub_strategy", "checkpoint"]
    result = train(*quick_args(tiny_gpt2, train_file, tmp_path / "run", *extra))
    pushed = root / "someone" / "run"
    # each save: the model, then the checkpoint; at the end the final model (the Trainer's save_model push)
    assert commits == [f"Training in progress, step {s}{c}" for s in (1, 2) for c in ("", ", checkpoint")] + [
        "Model save"
    ]
    for name in ("codi_config.json", "codi_extra.safetensors", "adapter_model.safetensors", "tokenizer.json"):
        assert (pushed / name).is_file(), name
    # the model files only at the root; the whole last checkpoint (resumable) under last-checkpoint/
    assert not (pushed / "optimizer.pt").exists() and not (pushed / "training_args.bin").exists()
    assert (pushed / "last-checkpoint" / "optimizer.pt").is_file()
    assert "codi-card-info" in (pushed / "README.md").read_text()  # our card, not the Trainer's summary
    loaded = codi.load(str(pushed))
    trained = [o.token_ids for o in result.model.generate(QUESTIONS, max_new_tokens=5)]
    assert [o.token_ids for o in loaded.generate(QUESTIONS, max_new_tokens=5)] == trained


def test_offline_switch_reaches_the_pinned_libraries():
    """`codi.io.hub.go_offline` sets module constants of huggingface_hub and datasets (the variable is read
    at import only): their names must still be what those libraries read, in the versions we support."""
    import datasets
    import datasets.load
    import huggingface_hub
    from huggingface_hub import constants, is_offline_mode
    from packaging.version import Version

    assert Version("2.4") <= Version(huggingface_hub.__version__) < Version("3")
    assert Version("3.0") <= Version(datasets.__version__)
    import inspect

    saved = constants.HF_HUB_OFFLINE
    try:
        constants.HF_HUB_OFFLINE = False
        assert not is_offline_mode()
        constants.HF_HUB_OFFLINE = True
        assert is_offline_mode()  # what every hub request checks when it is made
    finally:
        constants.HF_HUB_OFFLINE = saved
    assert hasattr(datasets.config, "HF_HUB_OFFLINE") and hasattr(datasets.config, "HF_DATASETS_OFFLINE")
    assert "config.HF_HUB_OFFLINE" in inspect.getsource(datasets.load)  # read when a dataset loads


def test_lm_eval_offline_fails_fast_in_one_line(tmp_path, tiny_gpt2):
    """With no network and no HF_HUB_OFFLINE, a task whose data is on the hub: one line naming it and
    why, without lm-eval's retries."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from codi.config import CODIModelArguments
    from codi.inference.lm_eval_model import task_config
    from codi.model import CODIModel

    CODIModel.from_base(
        CODIModelArguments(model_name_or_path=tiny_gpt2, lora_r=8, prj_dim=16)
    ).save_pretrained(str(tmp_path / "model"))
    config = task_config(str(tmp_path / "unused.jsonl"), name="hub_task")
    del config["dataset_kwargs"]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hub_task.yaml").write_text(
        yaml.safe_dump({**config, "dataset_path": "someone/not-cached"})
    )
    env = {key: value for key, value in os.environ.items() if not key.endswith("_OFFLINE")}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=os.pathsep.join(sys.path)
    )
    argv = [sys.executable, "-m", "codi.cli", "lm-eval", "--model", "codi", "--tasks", "hub_task"]
    argv += ["--model_args", f"pretrained={tmp_path / 'model'}", "--include_path", str(tmp_path / "tasks")]
    start = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("codi lm-eval: error:") and "someone/not-cached" in last and "unreachable" in last
    # before: 10 "Retrying in Ns" lines and ~40 s on an idle machine; now ~18 s, lm-eval indexing its tasks
    # (the bound only catches a hang: this machine may be shared)
    assert "retrying" not in done.stderr.lower() and elapsed < 90, (elapsed, done.stderr[-2000:])


# What each place answers to "is this a hub repository id?": (the hub is asked: hub.is_local is False,
# the model card names it in its metadata, `codi convert` downloads it as the authors' checkpoint).
# Well-formed ids and paths keep the answers they had when each place had a rule of its own; run in a
# folder holding `runs/ckpt` and `local-model`.
HUB_ID_ANSWERS = {
    "gpt2": (True, True, False),  # the authors' checkpoints are always owner/name
    "openai-community/gpt2": (True, True, True),
    "zen-E/CODI-gpt2": (True, True, True),
    "meta-llama/Llama-3.2-1B-Instruct": (True, True, True),
    "user_1/model.v2": (True, True, True),
    "gsm8k": (True, True, False),
    "runs/missing": (True, True, True),  # no such folder: may be a hub id
    "a--b": (True, True, False),  # the hub refuses it itself
    "./runs/x": (False, False, False),
    "/abs/path": (False, False, False),
    "~/models/x": (False, False, False),
    "../x": (False, False, False),
    ".hidden": (False, False, False),
    "runs/ckpt": (False, False, False),  # existing folders are paths
    "local-model": (False, False, False),
    "/": (False, False, False),
}


def _answers(name: str, monkeypatch) -> tuple[bool, bool, bool]:
    from codi.io import hub, model_card, reference_weights

    monkeypatch.setattr(reference_weights, "_download", lambda repo_id, revision: ["downloaded"])
    try:
        downloaded = reference_weights.resolve_checkpoint_files(name) == ["downloaded"]
    except FileNotFoundError:
        downloaded = False
    return not hub.is_local(name), model_card.is_hub_id(name), downloaded


def test_every_place_asks_one_rule_whether_a_name_is_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs" / "ckpt").mkdir(parents=True)
    (tmp_path / "local-model").mkdir()
    monkeypatch.chdir(tmp_path)
    found = {name: _answers(name, monkeypatch) for name in HUB_ID_ANSWERS}
    assert found == HUB_ID_ANSWERS
    # names no repository can have: once sent to the hub (hub.is_local said no) and some to `codi
    # convert`'s download, while the card left them out; now a local path (a missing folder) everywhere
    for name in ("", "a b", "a/b/c", "org/", "-a", "a/-b", "a/.b", "C:\\models\\x"):
        assert _answers(name, monkeypatch) == (False, False, False), name
    from codi.io.hub import is_hub_id

    assert [name for name in HUB_ID_ANSWERS if is_hub_id(name)] == [
        name for name, (asked, _, _) in HUB_ID_ANSWERS.items() if asked
    ]
    assert [name for name in HUB_ID_ANSWERS if is_hub_id(name, owner=True)] == [
        name for name, (_, _, downloaded) in HUB_ID_ANSWERS.items() if downloaded
    ]
