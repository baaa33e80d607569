"""One-line errors for bad files and an unreachable hub (docs/reliability.md): non-UTF-8 and empty data
files, truncated / corrupt / unsafe weight files, hub ids when offline."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from codi.data.eval_data import load_eval_set
from codi.data.records import DataError, read_records
from codi.io import hub
from codi.io.reference_weights import read_state_dict

GOOD_LINE = "Tom has 3 apples and buys 4.||<<3+4=7>>||#### 7"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------------------------------
# Data files: encoding, emptiness


def _latin1_file(path: Path, good_lines: list[str], bad_line: str) -> Path:
    data = "".join(line + "\n" for line in good_lines).encode("utf-8") + bad_line.encode("latin-1") + b"\n"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_non_utf8_data_names_file_and_line(tmp_path, suffix):
    # More than one decoder chunk (8 kB) of good lines first: the offset the decoder reports is
    # relative to its chunk, the line must still be the file's.
    good = 400
    if suffix == ".txt":
        lines, bad = [GOOD_LINE] * good, "Ren\xe9 has 3 apples.||<<3+4=7>>||#### 7"
    else:
        record = json.dumps({"question": "Q?", "cot": "<<3+4=7>>", "answer": "7"})
        lines, bad = [record] * good, '{"question": "Ren\xe9?", "cot": "c", "answer": "1"}'
        if suffix == ".json":
            lines = ["["] + [f"{record}," for _ in range(good)]
            bad += "]"
    path = _latin1_file(tmp_path / f"train{suffix}", lines, bad)
    assert path.stat().st_size > 2 * 8192
    with pytest.raises(DataError) as caught:
        read_records(str(path))
    message = _one_line(caught.value)
    line = good + 2 if suffix == ".json" else good + 1
    assert message.startswith(f"{path}:{line}: not UTF-8"), message
    assert f"(byte 0xe9 at byte {bad.index(chr(0xE9)) + 1} of the line)" in message
    assert "re-encode" in message


def test_non_utf8_eval_file_names_file_and_line(tmp_path):
    txt = _latin1_file(tmp_path / "gsm8k_aug_test.txt", [GOOD_LINE], "Caf\xe9?||c||#### 1")
    with pytest.raises(DataError, match=rf"^{txt}:2: not UTF-8 text \(byte 0xe9 at byte 4 of the line\)"):
        load_eval_set("gsm8k-aug", str(txt))
    jsonl = _latin1_file(tmp_path / "gsm8k_test.jsonl", [], '{"question": "\xe9", "answer": "#### 1"}')
    with pytest.raises(DataError, match=rf"^{jsonl}:1: not UTF-8"):
        load_eval_set("gsm8k", str(jsonl))


def test_utf8_with_byte_order_mark_reads(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "Q?", "cot": "c", "answer": "7"}).encode())
    assert [record.where for record in read_records(str(path))] == [f"{path}:1"]


@pytest.mark.parametrize("name, content", [("a.txt", ""), ("b.jsonl", "\n  \n"), ("c.json", "[]")])
def test_empty_data_file_is_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"^{path}: no records"):
        read_records(str(path))
    with pytest.raises(DataError, match=rf"^{path}: no items"):
        load_eval_set("gsm8k", str(path))


# --------------------------------------------------------------------------------------------------
# Weight files: unsafe pickles, truncated or corrupt files


def test_unsafe_pickle_is_refused_without_suggesting_weights_only_false(tmp_path):
    import argparse

    path = tmp_path / "pytorch_model.bin"
    torch.save({"codi.w": torch.zeros(2), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError) as caught:
        read_state_dict([str(path)])
    message = _one_line(caught.value)
    assert message.startswith(f"{path}: holds objects other than tensors (GLOBAL argparse.Namespace)")
    assert "unsafe to unpickle" in message
    # torch's own message (which suggests weights_only=False) is neither relayed nor chained
    assert "weights_only" not in message and caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    pickle_path = tmp_path / "plain.bin"
    pickle_path.write_bytes(pickle.dumps({"codi.w": [1.0, 2.0]}, protocol=4))
    with pytest.raises(
        ValueError, match=r"plain.bin: holds objects other than tensors \(Unsupported operand"
    ):
        read_state_dict([str(pickle_path)])


def _corrupt_copies(tmp_path: Path) -> list[Path]:
    from safetensors.torch import save_file

    tensors = {"codi.w": torch.arange(600, dtype=torch.float32)}
    save_file(tensors, tmp_path / "ok.safetensors")
    torch.save(tensors, tmp_path / "ok.bin")
    torch.save(tensors, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    paths = []
    for source in ("ok.safetensors", "ok.bin", "legacy.bin"):
        data = (tmp_path / source).read_bytes()
        stem, suffix = source.split(".")
        for label, cut in (("half", data[: len(data) // 2]), ("empty", b""), ("junk", b"not a model " * 9)):
            path = tmp_path / f"{stem}-{label}.{suffix}"
            path.write_bytes(cut)
            paths.append(path)
    return paths


def test_truncated_or_corrupt_weight_files_are_one_line_naming_the_file(tmp_path):
    for path in _corrupt_copies(tmp_path):
        with pytest.raises(ValueError) as caught:
            read_state_dict([str(path)])
        message = _one_line(caught.value)
        assert message.startswith(f"{path}: truncated or corrupt"), message
    assert set(read_state_dict([str(tmp_path / "ok.safetensors")])) == {"codi.w"}


# --------------------------------------------------------------------------------------------------
# Hub ids with no network: one check, then offline (in process, the check stubbed)


@pytest.fixture
def fresh_hub_state(monkeypatch):
    """codi.io.hub as at process start, no offline switch set by the user; everything restored after."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_reachable", {})
    monkeypatch.setattr(hub, "_went_offline", [])
    monkeypatch.setattr(hub, "_noted", set())
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        monkeypatch.setattr(config, "HF_HUB_OFFLINE", config.HF_HUB_OFFLINE)
        monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", config.HF_DATASETS_OFFLINE)
    calls = []

    def unreachable(host, port, timeout=hub.CONNECT_TIMEOUT_S):
        calls.append((host, port))
        return False

    monkeypatch.setattr(hub, "can_connect", unreachable)
    return calls


def test_unreachable_hub_is_checked_once_and_switches_offline(fresh_hub_state, tmp_path):
    from huggingface_hub import constants, is_offline_mode

    hub.prepare_hub_access(str(tmp_path))  # a local folder: no check
    hub.prepare_hub_access("./not/there")
    assert fresh_hub_state == [] and not is_offline_mode()
    hub.prepare_hub_access("openai-community/gpt2")
    hub.prepare_hub_access("gpt2")
    assert fresh_hub_state == [("127.0.0.1", 9)]  # once per process
    assert constants.HF_HUB_OFFLINE and is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
    if "datasets.config" in sys.modules:
        assert sys.modules["datasets.config"].HF_HUB_OFFLINE
    assert hub.offline_reason() == "the hub at http://127.0.0.1:9 is unreachable"


def test_user_offline_switch_skips_the_check(fresh_hub_state, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # any value: the user decided
    hub.prepare_hub_access("gpt2")
    assert fresh_hub_state == [] and hub.offline_reason() is None


def test_proxy_is_what_the_check_connects_to(monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy.local:3128"})
    monkeypatch.setattr(urllib.request, "proxy_bypass", lambda host: False)
    assert hub._address("https://huggingface.co") == ("proxy.local", 3128)
    monkeypatch.setattr(urllib.request, "getproxies", dict)
    assert hub._address("https://huggingface.co") == ("huggingface.co", 443)
    assert hub._address("http://127.0.0.1:9") == ("127.0.0.1", 9)


def test_can_connect_is_bounded_by_its_timeout():
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub.can_connect("127.0.0.1", server.getsockname()[1], timeout=2)
    start = time.perf_counter()
    assert not hub.can_connect("127.0.0.1", 9, timeout=2)
    assert time.perf_counter() - start < 2.5


def test_missing_hub_model_offline_is_one_line_naming_it(fresh_hub_state):
    from codi.io.hf import ModelLoadError, _load_or_explain

    def loader(source, **kwargs):
        raise OSError("We couldn't connect to 'http://127.0.0.1:9' to load the files\nmore")

    with pytest.raises(ModelLoadError) as caught:
        _load_or_explain(loader, "model", "someone/missing-model", {})
    message = _one_line(caught.value)
    assert "'someone/missing-model'" in message and "unreachable" in message
    assert "local path" in message and "HF_HUB_OFFLINE=1" in message


# --------------------------------------------------------------------------------------------------
# The same, end to end in a fresh process (the switch must act on a process that started online)

_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, logging, os, shutil, sys, time
    from codi.config import CODIModelArguments
    from codi.io.hf import load_tokenizer
    from codi.model import CODIModel
    from codi.data.records import load_hub_records
    from huggingface_hub import constants

    cache = f"{constants.HF_HUB_CACHE}/models--codi-test--tiny"
    shutil.copytree(sys.argv[1], f"{cache}/snapshots/{'0' * 40}")
    os.makedirs(f"{cache}/refs")
    with open(f"{cache}/refs/main", "w") as handle:
        handle.write("0" * 40)

    def attempt(call):
        out = io.StringIO()
        logging.basicConfig(stream=out, level=logging.INFO, force=True)
        start, error = time.perf_counter(), None
        with contextlib.redirect_stderr(out):
            try:
                call()
            except OSError as caught:  # what the CLI prints as one line
                error = str(caught)
        return {"seconds": time.perf_counter() - start, "error": error, "log": out.getvalue()}

    cached = CODIModelArguments(model_name_or_path="codi-test/tiny", use_lora=False)
    missing = CODIModelArguments(model_name_or_path="someone/missing-model")
    results = {
        "cached": attempt(lambda: CODIModel.from_base(cached)),
        "tokenizer": attempt(lambda: load_tokenizer(missing)),
        "from_base": attempt(lambda: CODIModel.from_base(missing)),
        "dataset": attempt(lambda: load_hub_records("someone/missing-data")),
    }
    print(json.dumps(results))
    """
)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~10 s on 2 busy cores
def test_hub_id_offline_fails_fast_in_one_line_and_cached_model_loads(tiny_gpt2, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",  # nothing listens there: connection refused
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=str(REPO_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.pop("HF_DATASETS_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, tiny_gpt2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    cached = results.pop("cached")
    assert cached["error"] is None and cached["seconds"] < 10, cached
    assert "loaded from the HF cache: the hub at http://127.0.0.1:9 is unreachable" in cached["log"]
    for name, result in results.items():
        assert result["seconds"] < 10, (name, result)
        assert result["log"] == "", (name, result["log"])  # no retry lines, no warnings
        message = result["error"]
        assert message and "\n" not in message, (name, message)
        assert "someone/missing" in message and "unreachable" in message and "HF_HUB_OFFLINE=1" in message
    assert "Retry" not in done.stderr


# --------------------------------------------------------------------------------------------------
# Documentation that must stay true


def test_smollm2_preset_reads_what_its_comment_commands_write(tmp_path, monkeypatch):
    """configs/smollm2_synthetic.yaml names files that exist once its comment's commands have run."""
    import re
    import shlex

    import yaml

    from codi.cli import main as codi_main

    path = REPO_ROOT / "configs" / "smollm2_synthetic.yaml"
    text = path.read_text()
    preset = yaml.safe_load(text)
    export = re.search(r"codi export-smollm2 --output_dir (\S+)", text)[1]
    assert export == preset["model_name_or_path"]
    synth = shlex.split(re.search(r"codi (data synth --out .*?)(?:\s+#|$)", text, re.M)[1])
    sizes = ["--n_train", "4", "--n_validation", "2", "--n_test", "2"]
    monkeypatch.chdir(tmp_path)  # the preset's paths are relative to where `codi train` runs
    assert codi_main([*synth, *sizes]) == 0
    for key in ("train_file", "validation_file"):
        assert (tmp_path / preset[key]).is_file(), key
    assert len(read_records(preset["train_file"])) == 4


def test_missing_hub_model_with_offline_mode_set_says_how_to_download(monkeypatch):
    from huggingface_hub import constants

    from codi.io.hf import ModelLoadError, _load_or_explain

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_went_offline", [])

    def loader(source, **kwargs):
        raise OSError("offline")

    with pytest.raises(ModelLoadError, match=r"offline mode is on \(HF_HUB_OFFLINE\).*unset HF_HUB_OFFLINE"):
        _load_or_explain(loader, "tokenizer", "someone/missing-model", {})
