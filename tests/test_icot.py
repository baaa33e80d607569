"""iCoT-SI (codi.methods.icot): the removal schedule, the smoothing offsets, the removal itself, the
optimizer resets and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import RECORDS
from transformers import TrainerCallback

from codi.config import CODIDataArguments, CODIModelArguments, CODITrainingArguments
from codi.data.dataset import CODICollator, build_dataset
from codi.methods.icot import (
    INF,
    ICoTArguments,
    ICoTCollator,
    ICoTDataset,
    ICoTRemoval,
    RemovalSchedule,
    drop_cot_tokens,
    drop_long_rows,
    lambda_distribution,
    optimizer_steps_per_epoch,
    remove_from_batch,
    sample_offsets,
    tokens_removed,
    train_icot,
)


def reference_counts(
    num_steps: int, steps_per_epoch: int, remove_per_epoch: float, **settings
) -> list[float]:
    """A literal transcription of the reference trainer's counter (per batch, epoch loop, no
    accumulation): what it removes from every example in each batch, before the random offset."""
    pretrain_epochs = settings.get("pretrain_epochs", 0)
    start = settings.get("remove_start_from", 0)
    beyond = settings.get("remove_all_when_remove_beyond", INF)
    scheduled, counter, out = start, 0, []
    steps_per_removed_token = int(round(steps_per_epoch / remove_per_epoch))
    for epoch in range(math.ceil(num_steps / steps_per_epoch)):
        if scheduled >= beyond:
            scheduled = INF
        for _ in range(steps_per_epoch):
            if counter == steps_per_removed_token or steps_per_removed_token == 0:
                scheduled += 1
                counter = 0
            if epoch >= pretrain_epochs:
                counter += 1
            if scheduled >= beyond:
                scheduled = INF
            out.append(start if epoch < pretrain_epochs else scheduled)
    return out[:num_steps]


# --------------------------------------------------------------------------------------------------
# The schedule


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(steps_per_removed_token=2), [0, 0, 1, 1, 2, 2, 3]),
        (dict(steps_per_removed_token=3, remove_start_from=5), [5, 5, 5, 6, 6, 6, 7]),
        (dict(steps_per_removed_token=1, remove_all_when_remove_beyond=3), [0, 1, 2, INF, INF, INF, INF]),
        (dict(steps_per_removed_token=2, pretrain_steps=3), [0, 0, 0, 0, 0, 1, 1]),
        (dict(steps_per_removed_token=2, pretrain_steps=3, remove_start_from=2), [2, 2, 2, 2, 2, 3, 3]),
        # a rounded 0: one more token every step, counted from step 0 even through the pretraining
        (dict(steps_per_removed_token=0), [1, 2, 3, 4, 5, 6, 7]),
        (dict(steps_per_removed_token=0, pretrain_steps=2), [0, 0, 3, 4, 5, 6, 7]),
    ],
)
def test_tokens_removed_per_step(settings, expected):
    assert [tokens_removed(step, **settings) for step in range(len(expected))] == expected


def test_tokens_removed_per_epoch():
    # 16 steps per epoch, 8 tokens per epoch: one token every 2 steps; 8 more at each epoch start
    schedule = ICoTArguments(remove_per_epoch=8).schedule(steps_per_epoch=16)
    assert schedule == RemovalSchedule(steps_per_removed_token=2)
    assert [schedule.tokens_removed(16 * epoch) for epoch in range(4)] == [0, 8, 16, 24]
    # one pretraining epoch shifts everything by an epoch; the GSM8k setting stops at 39
    schedule = ICoTArguments(
        remove_per_epoch=8, pretrain_epochs=1, remove_all_when_remove_beyond=39
    ).schedule(16)
    assert [schedule.tokens_removed(16 * epoch) for epoch in range(7)] == [0, 0, 8, 16, 24, 32, INF]
    # 38 tokens at step 16 + 2 * 38 + 1 = 93, everything from the next step on
    assert schedule.tokens_removed(93) == 38 and schedule.tokens_removed(94) == INF
    # Python's round, as the reference: 20 / 8 = 2.5 -> 2 ; 3 / 8 -> 0 (every step)
    assert RemovalSchedule.from_epochs(20, 8).steps_per_removed_token == 2
    assert RemovalSchedule.from_epochs(3, 8).steps_per_removed_token == 0
    # the per-step forms override the per-epoch ones
    args = ICoTArguments(remove_per_epoch=8, remove_every_steps=5, pretrain_epochs=2, pretrain_steps=1)
    assert args.schedule(100) == RemovalSchedule(steps_per_removed_token=5, pretrain_steps=1)


@pytest.mark.parametrize(
    "steps_per_epoch, remove_per_epoch, settings",
    [
        (16, 8, {}),
        (10, 3, {"pretrain_epochs": 2}),
        (20, 8, {"remove_all_when_remove_beyond": 13}),
        (7, 2, {"remove_start_from": 4, "pretrain_epochs": 1}),
        (3, 8, {}),
        (3, 8, {"pretrain_epochs": 1, "remove_all_when_remove_beyond": 9}),
    ],
)
def test_schedule_equals_the_reference_counter(steps_per_epoch, remove_per_epoch, settings):
    schedule = RemovalSchedule.from_epochs(steps_per_epoch, remove_per_epoch, **settings)
    steps = 6 * steps_per_epoch
    ours = [schedule.tokens_removed(step) for step in range(steps)]
    assert ours == reference_counts(steps, steps_per_epoch, remove_per_epoch, **settings)


def test_steps_per_epoch_counts_like_the_trainer():
    assert optimizer_steps_per_epoch(100, 32) == 4
    assert optimizer_steps_per_epoch(100, 32, gradient_accumulation_steps=2) == 2
    assert optimizer_steps_per_epoch(100, 8, gradient_accumulation_steps=3, world_size=2) == 3  # 7 batches
    assert optimizer_steps_per_epoch(3, 32) == 1


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="removal_side"):
        ICoTArguments(removal_side="middle")
    with pytest.raises(ValueError, match="removal_smoothing_lambda"):
        ICoTArguments(removal_smoothing_lambda=0)
    assert ICoTArguments(remove_all_when_remove_beyond="inf").remove_all_when_remove_beyond == INF


# --------------------------------------------------------------------------------------------------
# Smoothing


def test_lambda_distribution_is_the_reference_formula():
    probs = lambda_distribution(4.0)
    assert probs.shape == (100,)
    q = math.exp(-4.0)
    assert probs[0].item() == pytest.approx(1 - q)  # 0.98168
    assert probs[1].item() == pytest.approx((1 - q) * q)
    assert probs.sum().item() == pytest.approx(1.0)
    # the tail's mass goes to the last offset: P(99) = (1-q) q^99 + q^100 = q^99
    small = lambda_distribution(0.01)
    assert small[99].item() == pytest.approx(math.exp(-0.99))
    assert small[98].item() == pytest.approx((1 - math.exp(-0.01)) * math.exp(-0.98))
    assert lambda_distribution(INF).tolist() == [1.0] + [0.0] * 99


@pytest.mark.parametrize("lam", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_offsets_follow_the_distribution(lam, seed):
    probs = lambda_distribution(lam)
    draws = sample_offsets(probs, 20000, torch.Generator().manual_seed(seed))
    again = sample_offsets(probs, 20000, torch.Generator().manual_seed(seed))
    assert torch.equal(draws, again)  # seeded: reproducible
    counts = torch.bincount(draws, minlength=100).double() / len(draws)
    for k in range(4):
        expected = (1 - math.exp(-lam)) * math.exp(-lam * k)
        # 4.5 binomial standard deviations
        assert abs(counts[k].item() - expected) < 4.5 * math.sqrt(expected * (1 - expected) / 20000) + 1e-9


# --------------------------------------------------------------------------------------------------
# The removal


def test_drop_cot_tokens_by_hand():
    ids = [1, 2, 3, 10, 11, 12, 13, 20, 21, 0]
    labels = [-100, -100, -100, 10, 11, 12, 13, 20, 21, 0]
    assert drop_cot_tokens(ids, labels, 3, 4, 2)[0] == [1, 2, 3, 12, 13, 20, 21, 0]
    assert drop_cot_tokens(ids, labels, 3, 4, 2)[1] == [-100, -100, -100, 12, 13, 20, 21, 0]
    assert drop_cot_tokens(ids, labels, 3, 4, 2, side="right")[0] == [1, 2, 3, 10, 11, 20, 21, 0]
    assert drop_cot_tokens(ids, labels, 3, 4, INF) == ([1, 2, 3, 20, 21, 0], [-100] * 3 + [20, 21, 0], 4)
    assert drop_cot_tokens(ids, labels, 3, 4, 0)[0] == ids


def _batches(model, method):
    dataset, _ = build_dataset(
        RECORDS, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id, method=method
    )
    return dataset


def test_removing_everything_gives_the_no_cot_batch_and_nothing_the_cot_batch(make_model):
    model = make_model("gpt2")
    cot = _batches(model, "cot_sft")
    icot = ICoTDataset(cot.examples)
    batch = ICoTCollator(model.pad_id)([icot[i] for i in range(len(icot))])
    no_cot = CODICollator(model.pad_id)([_batches(model, "no_cot_sft")[i] for i in range(len(RECORDS))])
    removed, all_removed = remove_from_batch(batch, torch.full((len(RECORDS),), INF), "left", model.pad_id)
    assert all_removed
    for key in ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "teacher_distill_pos"):
        assert torch.equal(removed[key], no_cot[key]), key
    kept, all_removed = remove_from_batch(batch, torch.zeros(len(RECORDS)), "left", model.pad_id)
    assert not all_removed
    plain = CODICollator(model.pad_id)([cot[i] for i in range(len(RECORDS))])
    for key in ("teacher_input_ids", "teacher_labels", "teacher_distill_pos"):
        assert torch.equal(kept[key], plain[key]), key
    # partial, per-row counts: row r loses its first r tokens
    partial, _ = remove_from_batch(batch, torch.arange(len(RECORDS)).double(), "left", model.pad_id)
    for row, example in enumerate(cot.examples):
        expected = (
            example.question_ids + example.cot_ids[row:] + example.answer_ids + [model.tokenizer.eos_token_id]
        )
        length = int(partial["teacher_attention_mask"][row].sum())
        assert partial["teacher_input_ids"][row, :length].tolist() == expected
        assert partial["teacher_distill_pos"][row] == example.teacher_distill_pos - row


def test_drop_long_rows():
    batch = {
        "teacher_input_ids": torch.tensor([[1, 2, 3, 0], [1, 2, 3, 4], [1, 2, 0, 0]]),
        "teacher_attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]),
        "teacher_labels": torch.tensor([[1, 2, 3, -100], [1, 2, 3, 4], [1, 2, -100, -100]]),
        "teacher_distill_pos": torch.tensor([1, 2, 0]),
    }
    kept = drop_long_rows(batch, 3)
    assert kept["teacher_input_ids"].tolist() == [[1, 2, 3], [1, 2, 0]]
    assert kept["teacher_distill_pos"].tolist() == [1, 0]
    assert drop_long_rows(batch, 1)["teacher_input_ids"].tolist() == [[1, 2]]  # the shortest stays


# --------------------------------------------------------------------------------------------------
# Optimizer resets


def test_reset_exactly_when_the_count_changes():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    removal = ICoTRemoval(ICoTArguments(), RemovalSchedule(steps_per_removed_token=2), pad_id=0)
    states = []
    for step in range(7):
        removal.on_step_begin(step, optimizer)
        states.append(len(optimizer.state))
        param.grad = torch.ones(3)
        optimizer.step()
    assert removal.resets == [2, 4, 6]
    assert states == [0, 1, 0, 1, 0, 1, 0]
    # no reset when the previous batch had already lost its whole CoT (the reference's rule)
    removal = ICoTRemoval(ICoTArguments(), RemovalSchedule(steps_per_removed_token=1), pad_id=0)
    removal.on_step_begin(0, optimizer)
    removal.all_removed_in_prev_batch = True
    removal.on_step_begin(1, optimizer)
    assert removal.resets == [] and removal.changes == [(1, 1)]
    # reset_optimizer off
    removal = ICoTRemoval(ICoTArguments(reset_optimizer=False), RemovalSchedule(1), pad_id=0)
    removal.on_step_begin(0, optimizer)
    removal.on_step_begin(1, optimizer)
    assert removal.resets == []


class _OptimizerSpy(TrainerCallback):
    """Records, at each step's start (after the iCoT callback), how many steps AdamW's state has seen."""

    def __init__(self):
        self.steps_seen = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        states = [s for s in inner.state.values() if "step" in s]
        self.steps_seen.append(int(states[0]["step"]) if states else 0)


def _write_jsonl(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write(
                json.dumps({"question": record.question, "cot": record.cot, "answer": record.answer}) + "\n"
            )


def test_tiny_end_to_end_run_resets_and_answers_without_cot(tiny_gpt2, tmp_path, monkeypatch):
    train_file = tmp_path / "train.jsonl"
    _write_jsonl(train_file, RECORDS)
    spy = _OptimizerSpy()
    from codi.methods import icot as icot_module

    original = icot_module.ICoTCallback  # the spy runs right after the iCoT callback
    monkeypatch.setattr(icot_module, "ICoTCallback", lambda removal: _Both(original(removal), spy))
    result = train_icot(
        CODIModelArguments(model_name_or_path=tiny_gpt2, use_lora=False, prj_dim=16, num_latent=2),
        CODIDataArguments(train_file=str(train_file)),
        CODITrainingArguments(
            output_dir=str(tmp_path / "run"),
            method="cot_sft",
            max_steps=6,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=1,
        ),
        ICoTArguments(remove_every_steps=2, removal_smoothing_lambda=4.0),
    )
    removal = result.trainer.icot
    assert removal.resets == [2, 4]
    assert spy.steps_seen == [0, 1, 0, 1, 0, 1]  # AdamW restarted at steps 2 and 4
    state = json.loads((tmp_path / "run" / "icot_state.json").read_text())
    assert state["optimizer_resets"] == [2, 4] and state["final_count"] == "2"
    outputs = result.model.generate(["Tom has 12 apples and buys 30 more."], mode="cot", max_new_tokens=4)
    assert outputs[0].num_latent_positions == 0 and outputs[0].num_generated_tokens <= 4


class _Both(TrainerCallback):
    def __init__(self, *callbacks):
        self.callbacks = callbacks

    def on_step_begin(self, *args, **kwargs):
        for callback in self.callbacks:
            callback.on_step_begin(*args, **kwargs)
