"""Interventions on the latents: each changes exactly what it says; the unmodified path is `codi eval`'s."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from codi.analysis.ablate import verdict
from codi.analysis.interventions import (
    Intervention,
    ablate,
    build_interventions,
    cyclic_permutation,
    length_batches,
    noise_factory,
    parse_families,
    replay_factory,
    replay_plan,
    run_latent,
    zero_factory,
)
from codi.data.dataset import encode_question
from codi.data.eval_data import EvalItem
from codi.inference.evaluate import evaluate, extract_answer
from codi.inference.generate import generate
from codi.report import paired_drop

QUESTIONS = [
    "Tom has 12 apples and buys 30 more. How many apples does he have now?",
    "A shop sells 7 pens.",
    "John cuts his grass to 2 inches. It grows .5 inches per month. How much does he pay per year?",
    "Hi 3",
    "The answer is: 21",
]
STEPS = 3
MAX_NEW = 6


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    """A tiny CODI model with large random weights, so that answers vary with the latents."""
    from codi.config import CODIModelArguments
    from codi.model import CODIModel

    torch.manual_seed(0)
    args = CODIModelArguments(
        model_name_or_path=tiny_gpt2, lora_r=8, prj_dim=16, num_latent=STEPS, inf_latent_iterations=STEPS
    )
    model = CODIModel.from_base(args)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.5, generator=generator)
    return model.eval()


@contextmanager
def fed_embeddings(model):
    """Every `inputs_embeds` (B, T, d) the LM receives, in call order."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(kwargs["inputs_embeds"].detach().clone())

    handle = model.hf_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def latent_inputs(calls: list[torch.Tensor], steps: int) -> torch.Tensor:
    """(steps, B, d) latent embeddings among the calls of ONE batch: after the question call, one call
    per latent, the last latent fed together with `<eot>` (first position of that call) in the eager
    loop, alone in the static one."""
    return torch.stack([call[:, 0] for call in calls[1 : steps + 1]])


def recorded_latents(model, batches):
    outputs = run_latent(model, QUESTIONS, batches, STEPS, return_latents=True, max_new_tokens=MAX_NEW)
    return outputs, torch.stack([output.latents for output in outputs])


def test_zeroed_latents_reach_the_lm_as_zeros(model):
    batches = length_batches(model, QUESTIONS, len(QUESTIONS))
    base, _ = recorded_latents(model, batches)
    with fed_embeddings(model) as calls:
        zeroed = run_latent(model, QUESTIONS, batches, STEPS, zero_factory(), max_new_tokens=MAX_NEW)
    fed = latent_inputs(calls, STEPS)
    assert fed.shape == (STEPS, len(QUESTIONS), model.hf_model.config.n_embd)
    assert torch.count_nonzero(fed) == 0
    # the call before (question + <bot>) and the token after (<eot>) are untouched, and it matters;
    # <eot> is fed with the last latent (eager loop) or in the next call (static loop: one position a call)
    eot = calls[STEPS][:, 1] if calls[STEPS].shape[1] > 1 else calls[STEPS + 1][:, 0]
    assert torch.count_nonzero(calls[0]) > 0 and torch.count_nonzero(eot) > 0
    assert [o.text for o in zeroed] != [o.text for o in base]


def test_shuffle_feeds_another_questions_recorded_latents(model):
    batches = length_batches(model, QUESTIONS, 2)  # several batches of unequal lengths
    _, recorded = recorded_latents(model, batches)
    sources, orders = replay_plan("shuffle", len(QUESTIONS), STEPS, seed=3)
    assert sorted(sources) == list(range(len(QUESTIONS)))  # a permutation ...
    assert all(source != index for index, source in enumerate(sources))  # ... without fixed points
    factory = replay_factory(recorded, sources, orders)
    shuffled = run_latent(
        model, QUESTIONS, batches, STEPS, factory, return_latents=True, max_new_tokens=MAX_NEW
    )
    for index, output in enumerate(shuffled):
        assert torch.equal(output.latents, recorded[sources[index]])


def test_reverse_feeds_the_recorded_latents_in_reverse_order(model):
    batches = length_batches(model, QUESTIONS, len(QUESTIONS))
    _, recorded = recorded_latents(model, batches)
    factory = replay_factory(recorded, *replay_plan("reverse", len(QUESTIONS), STEPS, seed=0))
    with fed_embeddings(model) as calls:
        run_latent(model, QUESTIONS, batches, STEPS, factory, max_new_tokens=MAX_NEW)
    rows = batches[0]
    fed = latent_inputs(calls, STEPS)  # (steps, B, d), rows in batch order
    assert torch.equal(fed.transpose(0, 1), recorded[rows].flip(1))


def test_permute_is_a_derangement_of_each_questions_latents(model):
    batches = length_batches(model, QUESTIONS, 2)
    _, recorded = recorded_latents(model, batches)
    sources, orders = replay_plan("permute", len(QUESTIONS), STEPS, seed=0)
    assert sources == list(range(len(QUESTIONS)))
    for order in orders.tolist():
        assert sorted(order) == list(range(STEPS)) and all(o != t for t, o in enumerate(order))
    permuted = run_latent(
        model,
        QUESTIONS,
        batches,
        STEPS,
        replay_factory(recorded, sources, orders),
        return_latents=True,
        max_new_tokens=MAX_NEW,
    )
    for index, output in enumerate(permuted):
        assert torch.equal(output.latents, recorded[index, orders[index]])


def test_replaying_the_recorded_latents_in_order_reproduces_the_answers(model):
    batches = length_batches(model, QUESTIONS, 2)
    base, recorded = recorded_latents(model, batches)
    factory = replay_factory(recorded, *replay_plan("none", len(QUESTIONS), STEPS, seed=0))
    again = run_latent(model, QUESTIONS, batches, STEPS, factory, max_new_tokens=MAX_NEW)
    assert [o.token_ids for o in again] == [o.token_ids for o in base]


def test_noise_adds_sigma_rms_eps(model):
    batches = length_batches(model, QUESTIONS, 2)
    base, recorded = recorded_latents(model, batches)
    eps = torch.randn(len(QUESTIONS), STEPS, recorded.shape[-1], generator=torch.Generator().manual_seed(1))
    same = run_latent(model, QUESTIONS, batches, STEPS, noise_factory(eps, 0.0), max_new_tokens=MAX_NEW)
    assert [o.token_ids for o in same] == [o.token_ids for o in base]
    sigma = 0.5
    noisy = run_latent(
        model,
        QUESTIONS,
        batches,
        STEPS,
        noise_factory(eps, sigma),
        return_latents=True,
        max_new_tokens=MAX_NEW,
    )
    first = recorded[:, 0]  # step 0 is made from <bot>, before any noise
    rms = first.pow(2).mean(-1, keepdim=True).sqrt()
    expected = first + sigma * rms * eps[:, 0]
    got = torch.stack([o.latents[0] for o in noisy])
    torch.testing.assert_close(got, expected)


def test_first_k_zero_feeds_no_latent(model):
    question = QUESTIONS[0]
    batches = [[0]]
    for k in (0, STEPS):
        with fed_embeddings(model) as calls:
            (output,) = run_latent(model, [question], batches, k, max_new_tokens=MAX_NEW)
        prompt = len(encode_question(model.tokenizer, question))
        # question, <bot>, k latents, <eot>, every generated token but the last
        assert sum(call.shape[1] for call in calls) == prompt + 1 + k + 1 + output.num_generated_tokens - 1
        assert output.num_latent_positions == k
    assert Intervention("first_k", 0).run_key(STEPS) == Intervention("num_latent", 0).run_key(STEPS)
    assert Intervention("first_k", STEPS).run_key(STEPS) == Intervention("none").run_key(STEPS)


def test_unmodified_path_equals_codi_eval(model, tmp_path):
    # gold = the model's own answer on even questions, so that the accuracy is neither 0 nor 1
    own = [extract_answer(o.text) for o in generate(model, QUESTIONS, max_new_tokens=MAX_NEW)]
    golds = [own[i] if i % 2 == 0 else -1.0 for i in range(len(QUESTIONS))]
    items = [
        EvalItem(question, gold, f"q{index}") for index, (question, gold) in enumerate(zip(QUESTIONS, golds))
    ]
    reference = evaluate(
        model, items, "latent", 2, name="ref", max_new_tokens=MAX_NEW, output_dir=str(tmp_path / "eval")
    )
    result = ablate(
        model,
        items,
        build_interventions(["zero", "first_k"], STEPS, max_num_latent=None),
        batch_size=2,
        max_new_tokens=MAX_NEW,
        output_dir=str(tmp_path / "ablate"),
    )
    lines = [json.loads(line) for line in (tmp_path / "ablate" / "samples.jsonl").read_text().splitlines()]
    unmodified = [line for line in lines if line["family"] == "none"]
    expected = [json.loads(line) for line in Path(reference["samples_files"][0]).read_text().splitlines()]
    assert [(u["generated_text"], u["prediction"], u["correct"]) for u in unmodified] == [
        (e["generated_text"], e["prediction"], e["correct"]) for e in expected
    ]
    assert 100 * result["rows"][0]["accuracy"] == pytest.approx(reference["accuracy"])
    assert 0 < reference["accuracy"] < 100
    # first_k=3 is the unmodified run; every intervention has one line per question
    assert len(lines) == len(QUESTIONS) * len(result["rows"])
    assert (tmp_path / "ablate" / "interventions.png").stat().st_size > 1000
    assert "verdict:" in (tmp_path / "ablate" / "table.txt").read_text()


def test_paired_drop_and_verdict_rule():
    base = [True] * 80 + [False] * 20
    # 40 right -> wrong, 5 wrong -> right: d = 0.35, Var = (0.45 - 0.35^2) / 100
    other = [False] * 40 + [True] * 40 + [True] * 5 + [False] * 15
    drop, lo, hi = paired_drop(base, other)
    half = 1.959963984540054 * ((0.45 - 0.35**2) / 100) ** 0.5
    assert drop == pytest.approx(0.35) and (lo, hi) == pytest.approx((0.35 - half, 0.35 + half))
    assert verdict({"zero": (drop, lo, hi)}).startswith("answers depend on the latents")
    assert paired_drop(base, base) == (0.0, 0.0, 0.0)
    assert verdict({"zero": (0.0, 0.0, 0.0), "shuffle": (0.01, -0.01, 0.03)}).startswith(
        "answers do not depend"
    )
    # a 6-point drop on 50 questions: above the margin, but the interval reaches below it
    small = paired_drop([True] * 50, [False] * 3 + [True] * 47)
    assert verdict({"shuffle": small}).startswith("inconclusive")
    assert verdict({"noise": (0.9, 0.8, 1.0)}).startswith("no verdict")
    assert verdict({"zero": (0.0, 0.0, 0.0)}, base_accuracy=0.04).startswith("no verdict")
    used_but_harmful = verdict({"zero": (0.15, 0.11, 0.2), "no_latent": (-0.19, -0.24, -0.13)})
    assert used_but_harmful.startswith("answers depend on the latents") and "(they HURT)" in used_but_harmful
    assert "(they help)" in verdict({"zero": (0.8, 0.7, 0.9), "no_latent": (0.7, 0.6, 0.8)})
    assert "(no clear gain from them)" in verdict({"zero": (0.8, 0.7, 0.9), "no_latent": (0.0, -0.1, 0.1)})


def test_definitions_and_errors():
    assert cyclic_permutation(1, 0) == [0]
    assert all(i != p for i, p in enumerate(cyclic_permutation(7, 5)))
    names = [iv.name for iv in build_interventions(["noise", "first_k", "num_latent"], 2, (0.5,))]
    assert names == [
        "none",
        "noise sigma=0.5",
        "first_k=0",
        "first_k=1",
        "first_k=2",
        "num_latent=3",
        "num_latent=4",
    ]
    assert [iv.value for iv in build_interventions(["num_latent"], 2, max_num_latent=3)[1:]] == [0, 1, 2, 3]
    assert parse_families("all")[0] == "zero"
    with pytest.raises(ValueError, match="unknown intervention 'zeros'"):
        parse_families("zero,zeros")
    with pytest.raises(ValueError, match="value required"):
        Intervention("noise")


def test_ablate_command_on_a_saved_checkpoint(model, tmp_path, capsys):
    from codi.cli.ablate import main

    # A LoRA checkpoint holds only what training changes; the fixture also perturbs the frozen base,
    # which would not load back (the base fingerprint differs): perturb the trainable weights only.
    from codi.model import CODIModel

    trained = CODIModel.from_base(model.args)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad and parameter.dim() >= 2:
                parameter.normal_(0.0, 0.5, generator=generator)
    trained.save_pretrained(str(tmp_path / "ckpt"))
    data = tmp_path / "test.txt"
    data.write_text("".join(f"{question}||<<1+1=2>>####2\n" for question in QUESTIONS[:3]))
    out = tmp_path / "out"
    flags = ["--model", str(tmp_path / "ckpt"), "--data", str(data), "--output_dir", str(out)]
    flags += ["--interventions", "zero,shuffle,num_latent", "--max_num_latent", "4", "--max_new_tokens", "4"]
    assert main(flags + ["--no_cot_model", str(tmp_path / "ckpt"), "--no_progress", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "No-CoT-SFT (reference)" in table and "num_latent=4" in table and "verdict:" in table
    summary = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in summary["rows"]][:3] == ["none", "zero", "shuffle"]
    with pytest.raises(ValueError, match="--interventions: unknown intervention 'zeros'"):
        main(flags[:4] + ["--interventions", "zeros"])
    with pytest.raises(ValueError, match="--noise_sigmas"):
        main(flags[:4] + ["--noise_sigmas", "a,b"])
    with pytest.raises(SystemExit):  # every help string renders (a bare % would break argparse)
        main(["--help"])
    assert "--interventions" in capsys.readouterr().out
