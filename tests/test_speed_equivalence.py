"""The speed optimisations change no result.

Each fast path is compared with the straightforward computation on the same weights and batch:
- sharing the question's keys/values between teacher and student (`TrainingObjective.share_question`):
  same losses and same gradients of every trainable parameter, and fewer forward positions;
- decoding with a forced length (`min_new_tokens`) and with the answer prompt fed in one forward
  (`feed_answer_prompt`): same tokens as step-by-step greedy decoding when the model would have
  produced the prompt itself.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import RECORDS, batch_for, shared_file

from codi.data.dataset import read_records

ATOL = 1e-5


def _randomise_lora(model, seed: int = 1) -> None:
    """LoRA B starts at zero (then A gets no gradient): give every adapter weight a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _loss_and_grads(model, batch, share: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    view = model.with_settings(replace(model.objective, share_question=share))
    model.zero_grad(set_to_none=True)
    out = view(**batch)
    out["loss"].backward()
    losses = {key: float(value.detach()) for key, value in out.items()}
    grads = {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad and param.grad is not None
    }
    return losses, grads


def _assert_same(model, batch) -> None:
    shared_losses, shared_grads = _loss_and_grads(model, batch, share=True)
    plain_losses, plain_grads = _loss_and_grads(model, batch, share=False)
    assert shared_losses.keys() == plain_losses.keys()
    for key, value in plain_losses.items():
        assert shared_losses[key] == pytest.approx(value, abs=ATOL), key
    assert shared_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "loss",
    [
        {"distill_loss_type": "smooth_l1", "distill_loss_div_std": True},
        {"distill_loss_type": "l2", "distill_loss_factor": 20.0, "ref_loss_factor": 0.5},
    ],
)
def test_shared_question_same_losses_and_gradients(make_model, arch, loss):
    model = make_model(arch, loss=loss, lora_dropout=0.0)
    _randomise_lora(model)
    _assert_same(model, batch_for(model))


def test_shared_question_with_trained_special_tokens_and_full_finetuning(make_model):
    model = make_model("gpt2", use_lora=False, train_special_token_embeddings=True)
    _assert_same(model, batch_for(model))


def test_shared_question_on_gsm8k_aug_records(make_model):
    records = read_records(str(shared_file("gsm8k_aug_valid.txt")))[:6]
    model = make_model("gpt2", lora_dropout=0.0, num_latent=6, loss={"distill_loss_div_std": True})
    _randomise_lora(model)
    _assert_same(model, batch_for(model, records))


def test_shared_question_is_ignored_by_reference_compat(make_model):
    model = make_model("gpt2", reference_compat=True, lora_dropout=0.0)
    batch = batch_for(model)
    shared = model.with_settings(replace(model.objective, share_question=True))
    first = float(shared(**batch)["loss"].detach())
    unshared = model.with_settings(replace(model.objective, share_question=False))
    assert float(unshared(**batch)["loss"].detach()) == first


def _count_positions(model, batch, share: bool) -> list[tuple[int, int]]:
    """(rows, positions) of every forward call of the underlying LM during one training forward."""
    calls: list[tuple[int, int]] = []

    def hook(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        calls.append((embeds.shape[0], embeds.shape[1]))

    view = model.with_settings(replace(model.objective, share_question=share))
    handle = model.hf_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            view(**batch)
    finally:
        handle.remove()
    return calls


def test_shared_question_saves_the_student_question_positions(make_model):
    model = make_model("gpt2")
    batch = batch_for(model)
    plain = _count_positions(model, batch, share=False)
    shared = _count_positions(model, batch, share=True)
    rows, student_columns = batch["student_input_ids"].shape
    # the same number of LM calls; the student's first call shrinks from Q ++ [bot] to [bot] alone
    assert len(plain) == len(shared) == 1 + model.args.num_latent + 1
    assert plain[1] == (rows, student_columns) and shared[1] == (rows, 1)
    saved = sum(r * t for r, t in plain) - sum(r * t for r, t in shared)
    assert saved == rows * (student_columns - 1)


def test_shared_question_default_is_on():
    from codi.losses import TrainingObjective

    assert TrainingObjective().share_question is True


# --------------------------------------------------------------------------------------------------
# Decoding


QUESTIONS = [record.question for record in RECORDS]


@pytest.mark.parametrize("mode", ["latent", "cot"])
def test_min_new_tokens_forces_the_length_and_keeps_the_greedy_prefix(make_model, mode):
    model = make_model("gpt2")
    free = model.generate(QUESTIONS, mode=mode, max_new_tokens=12, batch_size=4)
    forced = model.generate(QUESTIONS, mode=mode, max_new_tokens=12, min_new_tokens=12, batch_size=4)
    eos = model.tokenizer.eos_token_id
    for a, b in zip(free, forced):
        assert b.num_generated_tokens == 12 and eos not in b.token_ids
        # up to the first EOS of the free run, forcing the length changes nothing
        stop = a.token_ids.index(eos) if eos in a.token_ids else len(a.token_ids)
        assert b.token_ids[:stop] == a.token_ids[:stop]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_feed_answer_prompt_equals_feeding_the_prompt_token_by_token(make_model, arch):
    """`<eot>` + prompt in one forward = the same tokens fed one forward each (same cache, same
    positions): the free tokens that follow are the same."""
    from codi.data.dataset import encode_question, pad_sequences
    from codi.inference.generate import _generate_batch, answer_prompt_ids, suppressed_token_ids

    model = make_model(arch)
    prompt = answer_prompt_ids(model)
    assert model.tokenizer.decode(prompt).strip() == model.args.answer_prompt
    prompts = [encode_question(model.tokenizer, q) + [model.bot_id] for q in QUESTIONS]
    total = len(prompt) + 5
    with torch.inference_mode():
        fast, _ = _generate_batch(
            model,
            prompts,
            "latent",
            3,
            total,
            {"do_sample": False},
            False,
            min_new_tokens=total,
            feed_answer_prompt=True,
        )
        # the straightforward computation: one decoder forward per token, the prompt teacher-forced
        input_ids = pad_sequences(prompts, model.pad_id, "left")
        mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left")
        prefix = model.encode_latents(input_ids, mask, 3)
        ones = torch.ones(len(prompts), 1, dtype=torch.long)
        for token in [model.eot_id] + prompt:
            logits = model.decode_step(prefix, torch.full_like(ones, token), ones).logits[:, -1]
        banned = suppressed_token_ids(model) + [model.tokenizer.eos_token_id]
        free = []
        for _ in range(total - len(prompt)):
            logits[:, banned] = float("-inf")
            free.append(logits.argmax(-1))
            logits = model.decode_step(prefix, free[-1].unsqueeze(1), ones).logits[:, -1]
    assert fast[:, : len(prompt)].tolist() == [prompt] * len(prompts)
    assert fast[:, len(prompt) :].tolist() == torch.stack(free, dim=1).tolist()


def test_feed_answer_prompt_through_generate(make_model):
    model = make_model("gpt2")
    outputs = model.generate(QUESTIONS, max_new_tokens=10, feed_answer_prompt=True)
    for output in outputs:
        assert output.text.startswith(model.args.answer_prompt)
    with pytest.raises(ValueError, match="latent"):
        model.generate(QUESTIONS, mode="cot", feed_answer_prompt=True)
    with pytest.raises(ValueError, match="min_new_tokens"):
        model.generate(QUESTIONS, max_new_tokens=4, min_new_tokens=5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_logits_only_equals_the_last_of_all_logits(make_model, arch):
    """Greedy decoding computes the LM head on the last position only: the same logits there."""
    from codi.data.dataset import encode_question, pad_sequences
    from codi.inference.generate import answer_prompt_ids

    model = make_model(arch)
    prompts = [encode_question(model.tokenizer, q) + [model.bot_id] for q in QUESTIONS]
    input_ids = pad_sequences(prompts, model.pad_id, "left")
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left")
    decoder = torch.tensor([[model.eot_id] + answer_prompt_ids(model)] * len(prompts))
    ones = torch.ones_like(decoder)
    with torch.inference_mode():
        full = model.decode_step(model.encode_latents(input_ids, mask, 3), decoder, ones).logits
        last = model.decode_step(
            model.encode_latents(input_ids, mask, 3), decoder, ones, last_logits_only=True
        ).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Length-grouped batches


def test_group_by_length_sampler_uses_teacher_lengths(make_model, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from codi.config import CODITrainingArguments
    from codi.data.dataset import CODICollator, build_dataset
    from codi.training import CODITrainer

    model = make_model("gpt2")
    records = RECORDS * 3
    dataset, _ = build_dataset(records, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id)
    args = CODITrainingArguments(
        output_dir=str(tmp_path),
        train_sampling_strategy="group_by_length",
        per_device_train_batch_size=3,
        report_to="none",
        use_cpu=True,
    )
    trainer = CODITrainer(
        model=model, args=args, train_dataset=dataset, data_collator=CODICollator(model.pad_id)
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    lengths = [len(example.teacher_input_ids) for example in dataset.examples]
    assert sampler.lengths == lengths
    order = list(sampler)
    assert sorted(order) == list(range(len(dataset)))
    assert lengths[order[0]] == max(lengths)  # HF puts the longest batch first (memory errors early)
