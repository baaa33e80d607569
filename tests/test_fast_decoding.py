"""The static-cache (and compiled) decoding loop gives the eager loop's greedy tokens and seeded draws (float32).

The eager loop (`fast_decoding="off"`) is the reference; the fast one feeds every position on a static
KV cache with its own mask, merges LoRA projections, and checks for all-finished every few tokens.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections import Counter
from dataclasses import replace

import pytest
import torch
from test_coconut import coconut_model
from test_generate import _tiny_codi

import codi.inference.static_decode as static_decode
from codi.config import CODIModelArguments
from codi.inference.decoding import DecodingConfig
from codi.methods.coconut import CoconutArguments
from codi.model import CODIModel

QUESTIONS = [
    "Tom has 12 apples and buys 30 more. How many apples?",
    "Hi",
    "A shop sells 7 pens for 3 dollars each. How many dollars does the shop get for all of the pens?",
    "She eats three.",
    "The answer is: 21",
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory):
    return _tiny_codi(tmp_path_factory.mktemp("fast"), request.param)


def _same(model, questions=QUESTIONS, **options):
    """Eager and static outputs of the same call: identical tokens, latents within float rounding (the
    merged LoRA weight rounds differently; these weights are drawn large, which amplifies it)."""
    eager = model.generate(questions, fast_decoding="off", **options)
    fast = model.generate(questions, fast_decoding="static", **options)
    assert [o.token_ids for o in fast] == [o.token_ids for o in eager]
    for a, b in zip(eager, fast):
        if a.latents is not None:
            torch.testing.assert_close(b.latents, a.latents, rtol=1e-3, atol=1e-3)
    return eager


@pytest.mark.parametrize("batch_size", [1, 3])
def test_latent_and_cot_tokens_identical(model, batch_size):
    """CODI latent mode (with and without the answer prompt fed in one forward) and teacher CoT mode,
    one question per batch and left-padded batches of mixed lengths; LoRA weights merged."""
    assert static_decode.engine(model, DecodingConfig()) == "static"  # the CPU default
    options = dict(max_new_tokens=12, batch_size=batch_size)
    _same(model, return_latents=True, **options)
    _same(model, feed_answer_prompt=True, **options)
    _same(model, mode="cot", **options)


def test_early_stop_and_min_new_tokens(model):
    """Rows that end at EOS at different steps (EOS set to a token the model emits), the
    all-finished check every few tokens, and min_new_tokens: outputs cut as in the eager loop."""
    eager = model.generate(QUESTIONS, max_new_tokens=12, fast_decoding="off")
    eos_id = eager[0].token_ids[2]  # row 0 ends at its third token, others when they emit it
    tokenizer = model.tokenizer
    old = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    try:
        outputs = _same(model, max_new_tokens=30, batch_size=5)
        assert outputs[0].num_generated_tokens <= 3
        _same(model, max_new_tokens=30, min_new_tokens=5, batch_size=5)
        _same(model, mode="cot", max_new_tokens=30, batch_size=2)
    finally:
        tokenizer.eos_token = old


def test_weights_untouched_and_transform_applied(model):
    """After fast decoding the LoRA layers hold their own weights again (same tensors, same values),
    and a latent transform (an intervention) acts as in the eager loop."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = {name: p for name, p in model.named_parameters()}
    _same(model, latent_transform=lambda step, latent: latent * (0.5 if step == 1 else 1.0), max_new_tokens=8)
    after = dict(model.named_parameters())
    assert all(after[name] is objects[name] for name in objects)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_weights_changed_in_place_are_decoded(model):
    """An optimiser step between two evaluations (weights changed in place): the merged LoRA weights are
    refreshed, so the fast loop still gives the eager loop's tokens."""
    before = _same(model, max_new_tokens=8)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    saved = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():
            for p in lora_b:
                p.mul_(-3.0)
        changed = _same(model, max_new_tokens=8)
        assert [o.token_ids for o in changed] != [o.token_ids for o in before]  # the change mattered
    finally:
        with torch.no_grad():
            for p, value in zip(lora_b, saved):
                p.copy_(value)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_coconut_tokens_identical(tiny_dirs, arch):
    """Coconut's continuous thoughts decode the same; pause-as-thought keeps the eager loop."""
    model = coconut_model(tiny_dirs[arch], CoconutArguments(c_thought=2, max_latent_stage=2))
    _same(model, max_new_tokens=10, batch_size=3, return_latents=True)
    pause = coconut_model(tiny_dirs[arch], CoconutArguments(c_thought=2, pause_as_thought=True))
    assert static_decode.engine(pause, DecodingConfig()) == "eager"


def test_reference_policy_and_dropout_stay_eager(model):
    """Where the static loop would not reproduce the eager one, auto decodes eagerly."""
    reference = model.with_settings(args=replace(model.args, reference_compat=True))
    assert static_decode.engine(reference, DecodingConfig()) == "eager"
    assert static_decode.engine(model, DecodingConfig(latent_dropout=True)) == "eager"
    assert static_decode.engine(model, DecodingConfig(fast_decoding="off")) == "eager"
    assert static_decode.engine(model, DecodingConfig(fast_decoding="graphs")) == "static"  # no CUDA here


def test_cpu_default_is_static_for_lora_only(tiny_gpt2):
    """On a CPU the static loop wins through the merged LoRA projections; a fully fine-tuned model
    keeps the eager loop unless asked (measured: docs/speed.md)."""
    full = CODIModel.from_base(CODIModelArguments(model_name_or_path=tiny_gpt2, use_lora=False, prj_dim=16))
    assert static_decode.engine(full, DecodingConfig()) == "eager"
    assert static_decode.engine(full, DecodingConfig(fast_decoding="static")) == "static"
    eager = full.generate(QUESTIONS, max_new_tokens=6, fast_decoding="off")
    fast = full.generate(QUESTIONS, max_new_tokens=6, fast_decoding="static")
    assert [o.token_ids for o in fast] == [o.token_ids for o in eager]


def test_compiled_step_traces_whole(tmp_path, monkeypatch):
    """The compiled step (CUDA graphs on a GPU) captures each step as one graph with no break;
    here through dynamo with the eager backend (CPU inductor takes ~30 s to compile), on Llama (the
    SmolLM2 architecture)."""
    from torch._dynamo.testing import CompileCounter

    model = _tiny_codi(tmp_path, "llama")
    counter = CompileCounter()
    compile_ = torch.compile
    monkeypatch.setattr(
        static_decode.torch, "compile", lambda fn, **kw: compile_(fn, backend=counter, fullgraph=True)
    )
    torch._dynamo.reset()
    eager = model.generate(QUESTIONS[:2], max_new_tokens=6, batch_size=2, fast_decoding="off")
    for _ in range(2):  # the second call reuses the session and its graphs
        compiled = model.generate(QUESTIONS[:2], max_new_tokens=6, batch_size=2, fast_decoding="compile")
        assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert counter.frame_count == 2  # the latent step and the token step, compiled once each


def test_bad_fast_decoding_value_names_the_field():
    with pytest.raises(ValueError, match="fast_decoding must be one of auto, off, static, graphs, compile"):
        DecodingConfig(fast_decoding="fast")


def test_engine_is_worked_out_and_logged_once_per_generate_call(model, monkeypatch, caplog):
    """The engine (and the line saying why a requested fast loop is not used) once per `generate`
    call, not once per batch."""
    reference = model.with_settings(args=replace(model.args, reference_compat=True))
    engine, calls = static_decode.engine, []
    monkeypatch.setattr(static_decode, "engine", lambda *args: calls.append(1) or engine(*args))
    with caplog.at_level(logging.INFO, logger="codi.inference.static_decode"):
        reference.generate(QUESTIONS, max_new_tokens=3, batch_size=1, fast_decoding="static")
    assert len(calls) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "codi.inference.static_decode"]
    assert lines == [
        "fast_decoding=static not used: the reference policy's steps are unmasked; decoding eagerly"
    ]


def test_release_frees_static_caches_and_merged_weights(model):
    """Fast decoding keeps its static caches and merged LoRA weights between `generate` calls (reused
    by the next); `release` frees them, and `evaluate` (what an evaluation during training runs)
    releases them when it returns."""
    from codi.data.eval_data import EvalItem
    from codi.inference.evaluate import evaluate

    def kept() -> tuple[list, list]:
        sessions = list(static_decode._sessions.get(model.hf_model, {}).values())
        merged = [static_decode._merged[m][1] for m in model.lm.modules() if m in static_decode._merged]
        return sessions, merged

    model.generate(QUESTIONS, max_new_tokens=4, fast_decoding="static")
    sessions, merged = kept()
    assert sessions and merged
    alive = [weakref.ref(session.cache) for session in sessions] + [weakref.ref(w) for w in merged]
    del sessions, merged
    static_decode.release(model)
    gc.collect()
    assert kept() == ([], []) and all(ref() is None for ref in alive)
    items = [EvalItem(question, 1.0) for question in QUESTIONS]
    evaluate(model, items, "latent", max_new_tokens=4, fast_decoding="static")
    assert kept() == ([], [])


@pytest.mark.parametrize("mode", ["latent", "cot"])
def test_seeded_sampling_draws_the_eager_loops_tokens(model, mode):
    """Same seed, temperature and top_k: the static loop draws exactly the eager loop's tokens, over
    batches that share one generator and whose rows end at EOS at different steps (one draw more or
    less than the eager loop in a batch would shift every later batch's tokens)."""
    options = dict(
        mode=mode, do_sample=True, temperature=0.8, top_k=20, seed=3, max_new_tokens=30, batch_size=2
    )
    drawn = model.generate(QUESTIONS, fast_decoding="off", **options)
    tokenizer, old = model.tokenizer, model.tokenizer.eos_token
    frequent = Counter(token for output in drawn for token in output.token_ids[1:]).most_common(1)[0][0]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(frequent)  # rows then end early, unevenly
    try:
        eager = model.generate(QUESTIONS, fast_decoding="off", **options)
        fast = model.generate(QUESTIONS, fast_decoding="static", **options)
        greedy = model.generate(QUESTIONS, fast_decoding="off", mode=mode, max_new_tokens=30, batch_size=2)
    finally:
        tokenizer.eos_token = old
    assert [o.token_ids for o in fast] == [o.token_ids for o in eager]
    assert [o.token_ids for o in eager] != [o.token_ids for o in greedy]  # it did sample
    lengths = [o.num_generated_tokens for o in eager]
    assert len(set(lengths)) > 2 and min(lengths) < 30, lengths  # rows end at different steps
