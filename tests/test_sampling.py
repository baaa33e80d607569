"""Decoding options (`DecodingConfig`), the next-token rule on transformers' logits processors, and
sampling in latent space (k trajectories per question: pass@k and majority vote beside greedy)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import HfArgumentParser

from codi.data.eval_data import EvalItem
from codi.inference import decoding
from codi.inference.decoding import DecodingConfig, apply_processors, sample_next, token_processors
from codi.inference.evaluate import evaluate, evaluate_samples
from codi.inference.generate import generate, generate_samples

QUESTIONS = [
    "Tom has 12 apples and buys 30 more.",
    "A shop sells 7 pens for 3 dollars each. How many dollars?",
    "The answer is: 21",
    "Hi 100 42",
]


# --------------------------------------------------------------------------------------------------
# The options object


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": float("nan")}, "temperature must be > 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"latent_noise": -0.1}, "latent_noise must be >= 0"),
        ({"mode": "cot", "latent_noise": 0.5}, "latent_noise applies to mode='latent' only"),
        ({"mode": "cot", "latent_dropout": True}, "latent_dropout applies to mode='latent' only"),
        ({"mode": "explicit"}, "mode must be"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"num_latent": -1}, "num_latent must be >= 0"),
    ],
)
def test_config_rejects_bad_values_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        DecodingConfig(**options)
    assert "\n" not in str(error.value) and str(error.value).startswith("decoding option ")


def test_config_is_frozen_parsable_and_switches_mode():
    config = DecodingConfig(latent_noise=0.3, feed_answer_prompt=True, num_samples=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_p = 0.5
    cot = config.for_mode("cot")
    assert (cot.mode, cot.latent_noise, cot.feed_answer_prompt, cot.num_samples) == ("cot", 0.0, False, 4)
    assert config.greedy() == DecodingConfig(feed_answer_prompt=True)
    assert config.samples_latents and config.is_sampling and not DecodingConfig().is_sampling
    # a command line can be built from the fields (help from their metadata)
    (parsed,) = HfArgumentParser(DecodingConfig).parse_args_into_dataclasses(
        ["--num_samples", "3", "--latent_noise", "0.2", "--top_p", "0.9", "--do_sample"]
    )
    assert parsed == DecodingConfig(num_samples=3, latent_noise=0.2, top_p=0.9, do_sample=True)
    assert all(field.metadata.get("help") for field in dataclasses.fields(DecodingConfig))


def test_generate_takes_a_config_or_keywords(make_model):
    model = make_model("gpt2")
    config = DecodingConfig(max_new_tokens=5, batch_size=2)
    by_config = generate(model, QUESTIONS, config)
    by_keywords = generate(model, QUESTIONS, max_new_tokens=5, batch_size=2)
    overridden = generate(model, QUESTIONS, config, mode="cot")
    assert [o.token_ids for o in by_config] == [o.token_ids for o in by_keywords]
    assert [o.token_ids for o in overridden] == [
        o.token_ids for o in generate(model, QUESTIONS, mode="cot", max_new_tokens=5)
    ]
    with pytest.raises(TypeError, match="unknown decoding option.*top_q"):
        generate(model, QUESTIONS, top_q=0.5)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):  # a torch traceback before
        generate(model, QUESTIONS, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="generate_samples"):
        generate(model, QUESTIONS, num_samples=2)


# --------------------------------------------------------------------------------------------------
# The next-token rule: transformers' processors give the old sampler's tokens


def _old_sample_next(logits, *, do_sample, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """The hand-written sampler this package used before the logits processors, verbatim."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, sorted_index, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.3, 20, 1.0),
        (1.0, 0, 0.9),
        (0.8, 50, 0.95),
        (2.0, 1, 0.5),
        (1.0, 500, 0.3),
    ],
)
def test_sampler_equals_the_old_one_on_random_logits(dtype, temperature, top_k, top_p):
    """Seeded draws on random logits (bf16 ones have many ties) are token for token the old sampler's."""
    logits = (torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    options = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    for seed in range(5):
        new = sample_next(logits, **options, generator=torch.Generator().manual_seed(seed))
        old = _old_sample_next(logits, **options, generator=torch.Generator().manual_seed(seed))
        assert new.tolist() == old.tolist()
    assert sample_next(logits, do_sample=False).tolist() == _old_sample_next(logits, do_sample=False).tolist()


def test_suppression_and_min_length_equal_the_old_index_fill():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    suppress, eos, min_new = [3, 7, 49], 11, 4
    processors = token_processors(suppress, min_new, eos, "cpu")
    for position in range(7):
        banned = suppress + ([eos] if position < min_new else [])
        expected = logits.index_fill(-1, torch.tensor(banned), float("-inf"))
        generated = torch.zeros(8, position, dtype=torch.long)
        assert torch.equal(apply_processors(processors, generated, logits), expected)


# --------------------------------------------------------------------------------------------------
# Latent sampling


def _ids(outputs):
    return [output.token_ids for output in outputs]


def _lively(model):
    """Weights re-drawn with a large std: the default tiny model repeats one token whatever its latents,
    which would make the tests of latent noise vacuous (as in tests/test_generate.py)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.5, generator=generator)
    return model


def test_k_samples_without_noise_equal_greedy(make_model):
    model = make_model("gpt2")
    greedy = generate(model, QUESTIONS, max_new_tokens=8)
    samples = generate_samples(model, QUESTIONS, max_new_tokens=8, num_samples=3, batch_size=5)
    assert [len(row) for row in samples] == [3] * len(QUESTIONS)
    for row, expected in zip(samples, greedy):
        assert all(sample.token_ids == expected.token_ids for sample in row)


def test_latent_noise_is_seeded_scaled_by_the_rms_and_batch_invariant(make_model):
    model = _lively(make_model("gpt2", num_latent=3, inf_latent_iterations=3))
    options = dict(max_new_tokens=8, num_samples=3, latent_noise=0.5, seed=7)
    first = generate_samples(model, QUESTIONS, batch_size=12, return_latents=True, **options)
    again = generate_samples(model, QUESTIONS, batch_size=12, return_latents=True, **options)
    one_by_one = generate_samples(model, QUESTIONS, batch_size=1, **options)
    other_seed = generate_samples(model, QUESTIONS, batch_size=12, **{**options, "seed": 8})
    flat = [sample for row in first for sample in row]
    assert _ids(flat) == _ids(s for row in again for s in row) == _ids(s for row in one_by_one for s in row)
    assert _ids(flat) != _ids(s for row in other_seed for s in row)
    assert len({tuple(sample.token_ids) for sample in flat}) > len(QUESTIONS)  # the samples differ
    # the first latent is prj(h_bot) + 0.5 x RMS x the (question, sample) pair's own noise
    greedy = generate(model, QUESTIONS, max_new_tokens=8, return_latents=True)
    hidden = greedy[0].latents.shape[-1]
    for question, row in enumerate(first):
        clean = greedy[question].latents[0]
        rms = clean.pow(2).mean().sqrt()
        for sample_index, sample in enumerate(row):
            noise = decoding.latent_noise([(question, sample_index)], 7, 3, hidden)[0, 0]
            torch.testing.assert_close(sample.latents[0], clean + 0.5 * rms * noise, atol=1e-5, rtol=1e-5)


def test_noise_comes_before_an_intervention(make_model):
    model = make_model("gpt2")
    zero = lambda step, latent: torch.zeros_like(latent)  # noqa: E731
    outputs = generate_samples(
        model, QUESTIONS[:2], max_new_tokens=4, num_samples=2, latent_noise=1.0, seed=0,
        latent_transform=zero, return_latents=True,
    )  # fmt: skip
    assert all(torch.count_nonzero(sample.latents) == 0 for row in outputs for sample in row)


def test_latent_dropout_is_seeded_and_restores_the_modes(make_model):
    model = _lively(make_model("gpt2", lora_dropout=0.5, prj_dropout=0.3))
    options = dict(max_new_tokens=6, num_samples=3, latent_dropout=True, seed=1, return_latents=True)
    first = generate_samples(model, QUESTIONS, **options)
    again = generate_samples(model, QUESTIONS, **options)
    flat = [s.latents for row in first for s in row]
    assert all(torch.equal(a, b) for a, b in zip(flat, [s.latents for row in again for s in row]))
    assert not torch.equal(first[0][0].latents, first[0][1].latents)  # dropout made them differ
    assert not any(module.training for module in model.modules())
    greedy = generate(model, QUESTIONS, max_new_tokens=6, return_latents=True)
    assert torch.equal(
        greedy[0].latents, generate(model, QUESTIONS, max_new_tokens=6, return_latents=True)[0].latents
    )


def test_cot_samples_with_temperature(make_model):
    model = make_model("gpt2")
    options = dict(mode="cot", max_new_tokens=8, num_samples=4, do_sample=True, temperature=1.5, seed=2)
    first, again = (
        generate_samples(model, QUESTIONS, **options),
        generate_samples(model, QUESTIONS, **options),
    )
    assert [_ids(row) for row in first] == [_ids(row) for row in again]
    assert len({tuple(s.token_ids) for row in first for s in row}) > len(QUESTIONS)


def _items(model):
    """Golds equal to some greedy answers, so that the accuracies are not all 0."""
    from codi.inference.scoring import extract_answer

    outputs = generate(model, QUESTIONS, mode="cot", max_new_tokens=16)
    golds = [extract_answer(o.text) if i % 2 == 0 else 3.0 for i, o in enumerate(outputs)]
    return [EvalItem(q, g, f"toy:{i + 1}") for i, (q, g) in enumerate(zip(QUESTIONS, golds))]


def test_pass_at_1_with_one_noiseless_sample_equals_greedy(make_model):
    model = make_model("gpt2")
    items = _items(model)
    for mode in ("latent", "cot"):
        greedy = evaluate(model, items, mode, max_new_tokens=16, warmup=False)
        sampled = evaluate_samples(model, items, mode=mode, max_new_tokens=16, num_samples=1)
        assert (
            sampled["pass_at_1"] == sampled["pass_at_k"] == sampled["majority_accuracy"] == greedy["accuracy"]
        )
        assert sampled["strict_pass_at_1"] == greedy["strict_accuracy"]


def test_evaluate_reports_pass_at_k_and_majority_beside_greedy(make_model, tmp_path):
    model = make_model("gpt2")
    items = _items(model)
    greedy = evaluate(model, items, "cot", max_new_tokens=16, warmup=False)
    options = dict(mode="cot", max_new_tokens=16, num_samples=3, do_sample=True, temperature=1.3, seed=4)
    result = evaluate(model, items, name="toy", output_dir=str(tmp_path), warmup=False, **options)
    assert result["accuracy"] == greedy["accuracy"] and result["do_sample"] is False  # the runs stay greedy
    assert result["num_samples"] == 3 and result["sample_do_sample"] is True
    assert result["pass_at_k"] >= result["majority_accuracy"] and result["pass_at_k"] >= result["pass_at_1"]
    records = [json.loads(line) for line in (tmp_path / "toy_cot_samples.jsonl").read_text().splitlines()]
    assert len(records) == len(items) and all(len(record["samples"]) == 3 for record in records)
    assert set(records[0]["samples"][0]) >= {"generated_text", "prediction", "correct", "strict_correct"}
    assert {"majority_prediction", "majority_correct", "where"} <= set(records[0])
    from codi.report import eval_table

    assert "toy cot: k=3 samples" in eval_table([result]) and "majority vote" in eval_table([result])
    again = evaluate(model, items, name="toy", warmup=False, **options)
    assert again["pass_at_k"] == result["pass_at_k"] and again["pass_at_1"] == result["pass_at_1"]
    latent = evaluate(
        model, items, "latent", max_new_tokens=16, num_samples=2, latent_noise=0.3, warmup=False
    )
    assert latent["latent_noise"] == 0.3 and latent["pass_at_k"] >= latent["majority_accuracy"]


def test_latent_noise_follows_the_question_id_not_its_position(make_model):
    """A shard (under a launcher) or a set with questions left out draws each question's own noise."""
    model = _lively(make_model("gpt2", num_latent=3, inf_latent_iterations=3))
    options = dict(max_new_tokens=8, num_samples=2, latent_noise=0.5, seed=7)
    full = generate_samples(model, QUESTIONS, **options)
    last = len(QUESTIONS) - 1
    shard = generate_samples(model, [QUESTIONS[last]], question_ids=[last], **options)
    assert _ids(shard[0]) == _ids(full[last])
    with pytest.raises(ValueError, match="question_ids: 2 ids for 1 questions"):
        generate_samples(model, [QUESTIONS[0]], question_ids=[0, 1], **options)
