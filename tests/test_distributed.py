"""Multi-process training and evaluation on CPU (torchrun, gloo) and the accelerate launch configs.

The equality test compares 2 processes x micro-batch 2 (DDP averages the two ranks' gradients) with 1
process x micro-batch 2 x 2 accumulation steps (the Trainer averages the two micro-batches' losses).
Both take the same 4 records per optimizer step and normalise each loss per micro-batch of 2, so they
are the same computation whatever the records' token counts - which is why this, and not 1 process x
micro-batch 4, is the single-process twin of DDP (docs/distributed.md explains the difference).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codi import distributed

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"
WEIGHT_FILES = ("adapter_model.safetensors", "codi_extra.safetensors")
TOLERANCE = 1e-5
SUBPROCESS_TIMEOUT = 180  # a deadlocked rank would hang forever: fail instead


# --------------------------------------------------------------------------------------------------
# Helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: CI has 2 cores and the two ranks share them.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _launch(nproc: int) -> list[str]:
    """`python -m codi.cli` alone, or under torchrun with `nproc` processes on a free local port."""
    if nproc == 1:
        return [sys.executable, "-m", "codi.cli"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "codi.cli",
    ]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert result.returncode == 0, (
        f"{' '.join(command)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result


def _write_records(path: Path, count: int, seed: int) -> Path:
    """GSM8k-Aug-style lines with questions of different lengths (so token counts differ per batch)."""
    rng = random.Random(seed)
    fillers = ["", " He is happy.", " It rains today and the shop is open.", " She counts them twice."]
    with open(path, "w") as handle:
        for _ in range(count):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            question = f"Tom has {a} apples and buys {b} more.{rng.choice(fillers)} How many apples now?"
            handle.write(f"{question}||<<{a}+{b}={a + b}>> <<{a + b}*1={a + b}>> #### {a + b}\n")
    return path


def _train_flags(model: str, train_file: Path, output_dir: Path) -> list[str]:
    return [
        "train",
        "--model_name_or_path",
        model,
        "--train_file",
        str(train_file),
        "--output_dir",
        str(output_dir),
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--lora_dropout",
        "0",  # equal dropout masks cannot be drawn on different ranks: no dropout in equality tests
        "--prj_dim",
        "32",
        "--num_latent",
        "2",
        "--distill_loss_div_std",
        "True",  # a per-micro-batch statistic: the comparison below must keep micro-batches equal
        "--learning_rate",
        "1e-2",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "True",
        "--seed",
        "11",
        "--disable_tqdm",
        "True",
        "--dataloader_num_workers",
        "0",
    ]


DDP_FLAGS = ["--ddp_backend", "gloo", "--ddp_find_unused_parameters", "False"]


def _log_history(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def _max_weight_difference(left: Path, right: Path) -> float:
    worst = 0.0
    for name in WEIGHT_FILES:
        a, b = load_file(str(left / name)), load_file(str(right / name))
        assert sorted(a) == sorted(b), name
        worst = max(worst, max((a[key].float() - b[key].float()).abs().max().item() for key in a))
    return worst


# --------------------------------------------------------------------------------------------------
# Sharding helpers (in one process)


def test_shard_indices_partition_every_item_once() -> None:
    for total in (0, 1, 5, 8):
        for shards in (1, 2, 3):
            parts = [distributed.shard_indices(total, rank, shards) for rank in range(shards)]
            assert sorted(index for part in parts for index in part) == list(range(total))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        distributed.shard_indices(4, 2, 2)


def test_single_process_helpers_are_identity() -> None:
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    assert not distributed.init()  # no launcher: nothing to initialise
    assert distributed.map_sharded(lambda items: [item * 2 for item in items], [3, 1, 2]) == [6, 2, 4]
    assert distributed.gather_in_order(["b", "a"], [1, 0], 2) == ["a", "b"]
    with pytest.raises(RuntimeError):
        distributed.gather_in_order(["a"], [0], 2)  # item 1 was never answered


def test_map_sharded_two_processes_uneven(tmp_path: Path) -> None:
    """7 items over 2 gloo ranks (4 + 3): results come back complete and in input order on every rank."""
    script = tmp_path / "shard_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import importlib.util, json, sys

            # Load codi/distributed.py alone: importing the codi package would pull in transformers.
            spec = importlib.util.spec_from_file_location("codi_distributed", sys.argv[2])
            distributed = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(distributed)
            assert distributed.init()
            items = list(range(7))
            seen = []
            def square(batch):
                seen.extend(batch)
                return [{"item": item, "square": item * item} for item in batch]
            results = distributed.map_sharded(square, items)
            assert results == [{"item": i, "square": i * i} for i in items], results
            with open(sys.argv[1] + f".rank{distributed.rank()}", "w") as handle:
                json.dump({"seen": seen, "results": results}, handle)
            distributed.finish()
            """
        )
    )
    command = _launch(2)[:-2] + [str(script), str(tmp_path / "out"), distributed.__file__]
    _run(command, cwd=tmp_path)
    rank0 = json.loads((tmp_path / "out.rank0").read_text())
    rank1 = json.loads((tmp_path / "out.rank1").read_text())
    assert rank0["seen"] == [0, 2, 4, 6] and rank1["seen"] == [1, 3, 5]
    assert rank0["results"] == rank1["results"]


# --------------------------------------------------------------------------------------------------
# accelerate configs: every file parses and turns into the launcher environment it documents


@pytest.mark.parametrize(
    "name", ["single_gpu", "multi_gpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
)
def test_accelerate_config_parses(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    expected = {
        "single_gpu": DistributedType.NO,
        "multi_gpu_ddp": DistributedType.MULTI_GPU,
        "fsdp": DistributedType.FSDP,
        "deepspeed_zero2": DistributedType.DEEPSPEED,
        "deepspeed_zero3": DistributedType.DEEPSPEED,
    }[name]
    assert config.distributed_type == expected
    assert config.use_cpu is False

    # What `accelerate launch --config_file ...` does before it starts any process (no GPU needed).
    monkeypatch.chdir(REPO_ROOT)  # the DeepSpeed JSON paths are relative to the repository root
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "codi.cli", "train"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if name == "single_gpu":
        assert args.num_processes == 1 and not (args.multi_gpu or args.use_fsdp or args.use_deepspeed)
        return
    if name == "multi_gpu_ddp":
        assert args.multi_gpu and prepare_multi_gpu_env(args)["ACCELERATE_MIXED_PRECISION"] == "bf16"
        return
    if name == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        env = prepare_multi_gpu_env(args)
        for key, value in env.items():
            if key.startswith(("ACCELERATE_", "FSDP_")):
                monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        # FULL_STATE_DICT: the Trainer hands CODITrainer._save the gathered weights (see train.py).
        assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        return
    from accelerate.utils import DeepSpeedPlugin

    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    json_path = Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    settings = json.loads(json_path.read_text())
    stage = int(name[-1])
    assert settings["zero_optimization"]["stage"] == stage
    # Batch sizes, accumulation and precision come from the command line via the Trainer's "auto" values.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert settings[key] == "auto", key
    if stage == 3:
        assert settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert defaults.deepspeed_config["zero3_init_flag"] is False
    plugin = DeepSpeedPlugin(hf_ds_config=str(json_path))  # accelerate's own reader; needs no deepspeed
    assert plugin.zero_stage == stage


def test_save_from_gathered_state_dict(make_model, tmp_path: Path) -> None:
    """FSDP / ZeRO-3 hand `_save` a gathered state dict: what is written must come from it, not the shards."""
    model = make_model("gpt2", train_special_token_embeddings=True)
    model.save_pretrained(str(tmp_path / "live"))
    model.save_pretrained(str(tmp_path / "gathered"), state_dict=model.state_dict())
    assert _max_weight_difference(tmp_path / "live", tmp_path / "gathered") == 0.0

    changed = {key: value + 1.0 for key, value in model.state_dict().items()}
    model.save_pretrained(str(tmp_path / "changed"), state_dict=changed)
    live = load_file(str(tmp_path / "live" / "codi_extra.safetensors"))
    written = load_file(str(tmp_path / "changed" / "codi_extra.safetensors"))
    for key in live:
        assert torch.allclose(written[key], live[key] + 1.0), key
    adapter_live = load_file(str(tmp_path / "live" / "adapter_model.safetensors"))
    adapter_written = load_file(str(tmp_path / "changed" / "adapter_model.safetensors"))
    for key in adapter_live:
        assert torch.allclose(adapter_written[key], adapter_live[key] + 1.0), key


# --------------------------------------------------------------------------------------------------
# torchrun training on CPU: equality with one process, resume, uneven batches


@pytest.fixture(scope="module")
def training_runs(tiny_gpt2, tmp_path_factory) -> dict[str, Path]:
    """One single-process run and one 2-process run of 3 optimizer steps on the same 4 records per step."""
    root = tmp_path_factory.mktemp("distributed_training")
    train_file = _write_records(root / "train.txt", 16, seed=0)
    runs = {"single": root / "single", "ddp": root / "ddp", "root": root}
    common = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2"]
    single = _launch(1) + _train_flags(tiny_gpt2, train_file, runs["single"]) + common
    _run(single + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"], root)
    ddp = _launch(2) + _train_flags(tiny_gpt2, train_file, runs["ddp"]) + common + DDP_FLAGS
    result = _run(ddp + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"], root)
    runs["ddp_stdout"] = result.stdout  # type: ignore[assignment]
    return runs


@pytest.mark.slow
def test_ddp_matches_single_process(training_runs) -> None:
    single, ddp = training_runs["single"], training_runs["ddp"]
    single_log, ddp_log = _log_history(single), _log_history(ddp)
    assert len(single_log) == len(ddp_log) == 3
    for one, two in zip(single_log, ddp_log):
        assert abs(one["loss"] - two["loss"]) <= TOLERANCE, (one, two)
        # Loss components are summed over ranks before rank 0 logs them (logged to 4 decimals).
        for key in ("student_ce", "teacher_ce", "distill_loss"):
            assert abs(one[key] - two[key]) <= 1.5e-4, (key, one, two)
        # a component a run does not compute is not logged as 0 after the reduction over ranks
        assert "latent_step_ce" not in one and "latent_step_ce" not in two
    assert single_log[-1]["loss"] < single_log[0]["loss"]  # it did train
    single_metrics = json.loads((single / "all_results.json").read_text())
    ddp_metrics = json.loads((ddp / "all_results.json").read_text())
    assert abs(single_metrics["train_loss"] - ddp_metrics["train_loss"]) <= TOLERANCE
    assert _max_weight_difference(single, ddp) <= TOLERANCE
    assert _max_weight_difference(single / "checkpoint-2", ddp / "checkpoint-2") <= TOLERANCE
    # Rank 0 alone prints the final metrics (the HF printer formats its copy as strings).
    assert len(re.findall(r"'train_loss': \d", training_runs["ddp_stdout"])) == 1


@pytest.mark.slow
def test_ddp_resume_from_last_checkpoint(training_runs, tiny_gpt2) -> None:
    """Resuming the 2-process run at step 2 (`--resume_from_checkpoint last`) ends where the uninterrupted runs end."""
    root = training_runs["root"]
    resumed = root / "resumed"
    shutil.copytree(training_runs["ddp"] / "checkpoint-2", resumed / "checkpoint-2")
    command = _launch(2) + _train_flags(tiny_gpt2, root / "train.txt", resumed) + DDP_FLAGS
    command += ["--max_steps", "3", "--save_strategy", "no", "--resume_from_checkpoint", "last"]
    _run(command + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"], root)
    assert _max_weight_difference(training_runs["single"], resumed) <= TOLERANCE
    assert (
        abs(_log_history(resumed)[-1]["loss"] - _log_history(training_runs["single"])[-1]["loss"])
        <= TOLERANCE
    )


@pytest.mark.slow
def test_ddp_uneven_batches_finish(tiny_gpt2, tmp_path: Path) -> None:
    """5 training and 3 validation records on 2 ranks: one rank runs short of data, nobody deadlocks.

    accelerate's `even_batches` (on by default) tops the short rank up with records from the start of
    the epoch, so both ranks take the same number of steps and collectives always pair up.
    """
    train_file = _write_records(tmp_path / "train.txt", 5, seed=1)
    valid_file = _write_records(tmp_path / "valid.txt", 3, seed=2)
    output = tmp_path / "uneven"
    command = _launch(2) + _train_flags(tiny_gpt2, train_file, output) + DDP_FLAGS
    command += ["--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--save_strategy", "epoch"]
    command += [
        "--validation_file",
        str(valid_file),
        "--eval_strategy",
        "epoch",
        "--per_device_eval_batch_size",
        "2",
    ]
    _run(command, tmp_path)
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # ceil(ceil(5 / 2) / 2 ranks)
    assert any("eval_loss" in entry for entry in state["log_history"])
    assert (output / "checkpoint-2" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# torchrun evaluation: sharded over ranks, gathered in order, written once


@pytest.mark.slow
def test_two_process_eval_writes_same_results(training_runs) -> None:
    """`codi eval` on 2 gloo ranks writes the same per-sample lines as 1 process (latent and CoT modes).

    7 items over 2 ranks (4 + 3) with batch size 2: the shards, and so the batches, differ from the
    single-process ones; greedy generation masks padding, so the answers must not change.
    """
    evaluate = pytest.importorskip("codi.inference.evaluate")
    if not hasattr(evaluate, "distributed"):
        pytest.skip("codi.inference.evaluate does not use codi.distributed yet: evaluation is not sharded")
    root = training_runs["root"]
    items = _write_records(root / "eval.txt", 7, seed=3)
    outputs = {}
    for nproc in (1, 2):
        output_dir = root / f"eval_{nproc}"
        command = _launch(nproc) + ["eval", "--model", str(training_runs["ddp"]), "--datasets", "gsm8k-aug"]
        command += ["--data_file", str(items), "--batch_size", "2", "--max_new_tokens", "6"]
        command += ["--compare_cot", "--device", "cpu", "--no_progress", "--output_dir", str(output_dir)]
        result = _run(command, root)
        assert result.stdout.count("dataset") == 1  # rank 0 alone prints the table
        outputs[nproc] = output_dir
    for name in ("gsm8k-aug_latent.jsonl", "gsm8k-aug_cot.jsonl"):
        single = [json.loads(line) for line in (outputs[1] / name).read_text().splitlines()]
        sharded = [json.loads(line) for line in (outputs[2] / name).read_text().splitlines()]
        assert len(single) == 7 and single == sharded, name
    single_summary = json.loads((outputs[1] / "results.json").read_text())
    sharded_summary = json.loads((outputs[2] / "results.json").read_text())
    for one, two in zip(single_summary["results"], sharded_summary["results"]):
        assert (one["accuracy"], one["strict_accuracy"], one["n"]) == (
            two["accuracy"],
            two["strict_accuracy"],
            two["n"],
        )
