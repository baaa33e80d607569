"""One loader for every checkpoint: `codi.load` gives CODI, CoT-SFT, iCoT and Coconut checkpoints the class
they need, from a folder or a hub id (an offline HF cache here), and every command loads through it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import codi
from codi import cli
from codi.config import CODIModelArguments
from codi.losses import TrainingObjective
from codi.methods.coconut import CoconutArguments, CoconutModel
from codi.model import CODIModel

QUESTIONS = ["Tom has 12 apples and buys 30 more.", "She eats three. How many left?"]
KINDS = ("codi", "cot_sft", "icot", "coconut")


def _build(kind: str, base: str) -> CODIModel:
    args = CODIModelArguments(model_name_or_path=base, lora_r=8, lora_alpha=16, prj_dim=16, num_latent=2)
    if kind == "coconut":  # as `codi train --method coconut` leaves it: no projection, its settings saved
        model = CoconutModel.from_base(dataclasses.replace(args, use_prj=False))
        return model.configure(CoconutArguments(c_thought=1, max_latent_stage=2)).eval()
    if kind == "cot_sft":  # a full fine-tune, as the baselines are in the demo
        args = dataclasses.replace(args, use_lora=False)
    return CODIModel.from_base(args, TrainingObjective(method=kind)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_gpt2) -> dict[str, str]:
    """A saved checkpoint of each kind, and what the model that saved it generates."""
    root = tmp_path_factory.mktemp("kinds")
    saved = {}
    for kind in KINDS:
        model = _build(kind, tiny_gpt2)
        model.save_pretrained(str(root / kind))
        mode = "latent" if kind in ("codi", "coconut") else "cot"
        tokens = [o.token_ids for o in model.generate(QUESTIONS, mode=mode, max_new_tokens=5)]
        saved[kind] = (str(root / kind), mode, tokens)
    return saved


@pytest.mark.parametrize("kind", KINDS)
def test_one_loader_returns_the_class_each_checkpoint_needs(checkpoints, kind):
    path, mode, tokens = checkpoints[kind]
    model = codi.load(path)
    assert type(model) is (CoconutModel if kind == "coconut" else CODIModel)
    assert model.objective.method == ("codi" if kind == "coconut" else kind)
    assert [o.token_ids for o in model.generate(QUESTIONS, mode=mode, max_new_tokens=5)] == tokens
    assert type(codi.AutoCODIModel.from_pretrained(path, inf_latent_iterations=3)) is type(model)
    if kind == "coconut":
        assert model.coconut == CoconutArguments(c_thought=1, max_latent_stage=2)


@pytest.fixture
def loads(monkeypatch):
    """The classes `codi.io.loader.load` returned while a command ran (commands import it when they run)."""
    import codi.io.loader

    seen, original = [], codi.io.loader.load

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        seen.append(type(model))
        return model

    monkeypatch.setattr(codi.io.loader, "load", spy)
    return seen


def _gsm8k_file(tmp_path) -> str:
    path = tmp_path / "gsm8k_test.jsonl"
    rows = [{"question": q, "answer": f"steps #### {n}"} for q, n in zip(QUESTIONS, (42, -5))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("kind", KINDS)
def test_every_command_loads_every_kind_through_the_loader(checkpoints, kind, tmp_path, loads, monkeypatch):
    path, _, _ = checkpoints[kind]
    expected = CoconutModel if kind == "coconut" else CODIModel
    data = _gsm8k_file(tmp_path)
    common = ["--max_new_tokens", "4", "--batch_size", "2"]
    argv = ["eval", "--model", path, "--datasets", "gsm8k", "--data_file", data, "--no_progress"]
    assert cli.main(argv + common + ["--output_dir", str(tmp_path / "eval")]) == 0
    # probe reads CODI's latents, ablate CODI's or Coconut's: the others load, then are refused (rc 2)
    probe = ["probe", "--model", path, "--data", data, "--output_dir", str(tmp_path / "probe")]
    assert cli.main(probe + common) == (0 if kind == "codi" else 2)
    argv = ["ablate", "--model", path, "--data", data, "--interventions", "zero", "--no_progress"]
    ablated = cli.main(argv + common + ["--output_dir", str(tmp_path / "ablate")])
    assert ablated == (0 if kind in ("codi", "coconut") else 2)
    from codi.analysis import explore

    monkeypatch.setattr(explore, "_gradio", lambda: None)
    monkeypatch.setattr(explore, "build_app", lambda model, *args, **kwargs: model)
    monkeypatch.setattr(explore, "serve", lambda app, **kwargs: app)
    assert type(explore.launch(path, device="cpu", block=False)) is expected
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from codi.inference.lm_eval_model import CODILM

    assert type(CODILM(pretrained=path, device="cpu").model) is expected
    assert loads == [expected] * 5  # eval, probe, ablate, explore, lm-eval


def _cache_repo(cache, repo_id: str, folder: str, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """`folder` laid out as the HF cache holds a downloaded repository (what snapshot_download reads)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo


def test_hub_id_loads_from_the_offline_cache(checkpoints, tmp_path, monkeypatch, loads):
    from huggingface_hub import constants, is_offline_mode

    assert is_offline_mode()  # tests never reach the hub (conftest)
    cache = tmp_path / "hub"
    for kind in ("codi", "coconut"):
        _cache_repo(cache, f"someone/tiny-{kind}", checkpoints[kind][0])
    path, mode, tokens = checkpoints["codi"]
    model = codi.load("someone/tiny-codi", cache_dir=str(cache))
    assert [o.token_ids for o in model.generate(QUESTIONS, mode=mode, max_new_tokens=5)] == tokens
    loaded = CODIModel.from_pretrained("someone/tiny-codi", cache_dir=str(cache))
    assert [o.token_ids for o in loaded.generate(QUESTIONS, mode=mode, max_new_tokens=5)] == tokens
    assert type(codi.load("someone/tiny-coconut", cache_dir=str(cache))) is CoconutModel
    # the commands take hub ids too, from the default cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    argv = ["eval", "--model", "someone/tiny-coconut", "--datasets", "gsm8k", "--no_progress"]
    argv += [
        "--data_file",
        _gsm8k_file(tmp_path),
        "--max_new_tokens",
        "4",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == 0 and loads == [CoconutModel]
    assert not list(cache.rglob("MODEL_CARD.md"))  # the cached copy's card is left alone


def test_missing_hub_id_offline_is_one_line_naming_it(tmp_path, capsys):
    from codi.io.hub import OfflineError

    with pytest.raises(OfflineError, match="cannot load the checkpoint 'someone/not-cached'"):
        codi.load("someone/not-cached", cache_dir=str(tmp_path))
    argv = [
        "eval",
        "--model",
        "someone/not-cached",
        "--datasets",
        "gsm8k",
        "--data_file",
        _gsm8k_file(tmp_path),
    ]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "someone/not-cached" in line and "HF cache" in line
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        codi.load(str(tmp_path / "missing"))
