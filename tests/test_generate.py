"""Generation: batch invariance (latent and CoT, GPT-2 and Llama), reference reproduction, stopping."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers452 import first_forward_mask_452

import codi.inference.generate as generation
from codi.config import CODIModelArguments
from codi.inference.generate import GenerationOutput, generate, sample_next
from codi.model import CODIModel
from codi.testing import save_tiny_model

QUESTIONS = [
    "Tom has 12 apples and buys 30 more. How many apples does he have now?",
    "A shop sells 7 pens.",
    "John cuts his grass to 2 inches. It grows .5 inches per month. How much does he pay per year? yes",
    "Hi",
    "The answer is: 21",
]
MAX_NEW = 10


def _tiny_codi(directory, arch: str) -> CODIModel:
    """A tiny CODI model whose weights are re-drawn with a large std, so that greedy outputs vary
    from token to token and question to question (a default-init tiny model repeats one token,
    which would make the invariance test vacuous)."""
    path = save_tiny_model(str(directory / arch), arch=arch)
    model = CODIModel.from_base(CODIModelArguments(model_name_or_path=path, lora_r=8, prj_dim=64))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.5, generator=generator)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory) -> CODIModel:
    return _tiny_codi(tmp_path_factory.mktemp("generate"), request.param)


@pytest.mark.parametrize("mode", ["latent", "cot"])
def test_batch_invariance(model, mode):
    """Every example's greedy output is identical alone and inside a mixed, padded batch."""
    batched = generate(model, QUESTIONS, mode=mode, max_new_tokens=MAX_NEW, batch_size=len(QUESTIONS))
    alone = [generate(model, [question], mode=mode, max_new_tokens=MAX_NEW)[0] for question in QUESTIONS]
    for together, single in zip(batched, alone):
        assert together.token_ids == single.token_ids
        assert together.text == single.text
    # not vacuous: the outputs differ between questions and are not one repeated token
    assert len({tuple(output.token_ids) for output in batched}) == len(QUESTIONS)
    assert all(len(set(output.token_ids)) > 1 for output in batched if output.num_generated_tokens > 2)
    # other batch sizes (other groupings by length) and the input order are respected too
    for size in (2,):
        again = generate(model, QUESTIONS, mode=mode, max_new_tokens=MAX_NEW, batch_size=size)
        assert [output.token_ids for output in again] == [output.token_ids for output in batched]


def test_output_fields(model):
    outputs = generate(model, QUESTIONS[:3], max_new_tokens=MAX_NEW, return_latents=True, num_latent=4)
    hidden = model.hf_model.get_input_embeddings().weight.shape[1]
    eos = model.tokenizer.eos_token_id
    for output in outputs:
        assert isinstance(output, GenerationOutput)
        assert output.num_generated_tokens == len(output.token_ids) <= MAX_NEW
        assert output.num_latent_positions == 4
        assert output.latents.shape == (4, hidden) and output.latents.dtype == torch.float32
        assert eos not in output.token_ids[:-1]
        assert not {model.bot_id, model.eot_id} & set(output.token_ids)
        assert output.text == model.tokenizer.decode(output.token_ids, skip_special_tokens=True)
    cot = generate(model, QUESTIONS[:2], mode="cot", max_new_tokens=3, return_latents=True)
    assert all(output.latents is None and output.num_latent_positions == 0 for output in cot)
    assert generate(model, []) == []
    with pytest.raises(ValueError, match="mode"):
        generate(model, QUESTIONS, mode="explicit")


def test_finished_rows_stop_and_do_not_disturb_others(model, monkeypatch):
    """Force one row of the batch to emit EOS at its third token: it stops there (EOS kept), and every
    other row's output equals its unforced greedy output."""
    reference = generate(model, QUESTIONS, max_new_tokens=MAX_NEW, batch_size=len(QUESTIONS))
    eos = model.tokenizer.eos_token_id
    calls = {"count": 0}
    real = sample_next

    def forced(logits, **kwargs):
        ids = real(logits, **kwargs)
        calls["count"] += 1
        if calls["count"] == 3:
            ids = ids.clone()
            ids[0] = eos  # row 0 of the length-sorted batch: the longest question
        return ids

    monkeypatch.setattr(generation, "sample_next", forced)
    outputs = generate(model, QUESTIONS, max_new_tokens=MAX_NEW, batch_size=len(QUESTIONS))
    longest = max(
        range(len(QUESTIONS)), key=lambda index: len(model.tokenizer(QUESTIONS[index])["input_ids"])
    )
    for index, (output, expected) in enumerate(zip(outputs, reference)):
        if index == longest and eos not in expected.token_ids[:3]:
            assert output.token_ids == expected.token_ids[:2] + [eos]
            assert output.num_generated_tokens == 3
        else:
            assert output.token_ids == expected.token_ids


def _reference_loop(model: CODIModel, questions: list[str], num_latent: int, max_new: int) -> list[list[int]]:
    """The reference's test.py decoding, written out literally: left-padded Q ++ [bot] with the mask
    transformers 4.52 on CUDA built for it (the authors' stack: its pad rows attend to every position),
    then latent steps and decoder steps with NO attention mask and default positions, greedy over
    logits[:, :vocab_size - 1], the token of a finished row still fed but not recorded."""
    from codi.data.dataset import encode_question, pad_sequences

    prompts = [encode_question(model.tokenizer, question) + [model.bot_id] for question in questions]
    ids = pad_sequences(prompts, model.pad_id, "left")
    mask = pad_sequences([[1] * len(prompt) for prompt in prompts], 0, "left")
    lm = model.hf_model
    with torch.no_grad():
        mask = first_forward_mask_452(mask, model.hf_model.get_input_embeddings().weight.dtype)
        out = lm(input_ids=ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
        latent = model.project(out.hidden_states[-1][:, -1:])
        for _ in range(num_latent):
            out = lm(inputs_embeds=latent, cache=out.cache, use_cache=True, output_hidden_states=True)
            latent = model.project(out.hidden_states[-1][:, -1:])
        embeds = model.embed(torch.full((len(questions), 1), model.eot_id))
        cache, finished = out.cache, [False] * len(questions)
        tokens: list[list[int]] = [[] for _ in questions]
        for _ in range(max_new):
            out = lm(inputs_embeds=embeds, cache=cache, use_cache=True)
            cache = out.cache
            next_ids = out.logits[:, -1, : lm.config.vocab_size - 1].argmax(-1)
            for row in range(len(questions)):
                if not finished[row]:
                    tokens[row].append(int(next_ids[row]))
                    finished[row] = int(next_ids[row]) == model.tokenizer.eos_token_id
            if all(finished):
                break
            embeds = model.embed(next_ids.unsqueeze(1))
    return tokens


def test_reference_compat_reproduces_reference(model):
    compat = model.with_settings(args=replace(model.args, reference_compat=True))
    ours = generate(compat, QUESTIONS, max_new_tokens=MAX_NEW, num_latent=3, batch_size=len(QUESTIONS))
    alone = [generate(compat, [question], max_new_tokens=MAX_NEW, num_latent=3)[0] for question in QUESTIONS]
    # generate() sorts by length: the reference sees the same batch in that order
    order = sorted(
        range(len(QUESTIONS)), key=lambda index: -len(model.tokenizer(QUESTIONS[index])["input_ids"])
    )
    expected = _reference_loop(model, [QUESTIONS[index] for index in order], 3, MAX_NEW)
    assert [ours[index].token_ids for index in order] == expected
    # and the reference bug is real: some padded row depends on its batch
    assert any(a.token_ids != b.token_ids for a, b in zip(ours, alone))


def test_sampling(model):
    kwargs = dict(max_new_tokens=MAX_NEW, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    first = generate(model, QUESTIONS, seed=3, **kwargs)
    second = generate(model, QUESTIONS, seed=3, **kwargs)
    assert [output.token_ids for output in first] == [output.token_ids for output in second]
    greedy = generate(model, QUESTIONS, max_new_tokens=MAX_NEW)
    top1 = generate(model, QUESTIONS, seed=5, max_new_tokens=MAX_NEW, do_sample=True, top_k=1)
    assert [output.token_ids for output in top1] == [output.token_ids for output in greedy]


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, do_sample=False).tolist() == [3]
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, do_sample=True, top_k=2, generator=generator)) for _ in range(50)}
    assert draws <= {2, 3} and len(draws) == 2
    # top_p 0.5: token 3 alone holds 0.64 of the mass, so it is always drawn
    draws = {int(sample_next(logits, do_sample=True, top_p=0.5, generator=generator)) for _ in range(20)}
    assert draws == {3}


def test_generation_stops_at_the_position_limit(tmp_path):
    """A model with few positions gets a shorter answer budget, not an IndexError deep in torch."""
    directory = save_tiny_model(str(tmp_path / "short"), "gpt2", max_positions=40)
    model = CODIModel.from_base(CODIModelArguments(model_name_or_path=directory, lora_r=4, prj_dim=16))
    question = "How many apples does Tom have now?"
    used = len(generation.encode_question(model.tokenizer, question)) + 1 + model.args.num_latent + 1
    out = generate(model, [question], max_new_tokens=256)
    assert out[0].num_generated_tokens <= 40 - used
    with pytest.raises(ValueError, match="does not fit"):
        generate(model, ["word " * 60], max_new_tokens=4)
