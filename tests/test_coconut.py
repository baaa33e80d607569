"""Coconut: our cached, batched forward against a literal cache-free re-implementation of the reference
(facebookresearch/coconut `dataset.py` + `coconut.py`), the curriculum, optimizer resets, decoding."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT
from torch.nn import CrossEntropyLoss
from transformers import TrainerCallback

from codi.config import ARGUMENT_CLASSES, CODIModelArguments, parse_args
from codi.data.dataset import RawRecord, encode_question
from codi.inference.generate import generate, suppressed_token_ids
from codi.io.loader import load
from codi.methods.coconut import (
    CoconutArguments,
    CoconutCollator,
    CoconutDataset,
    CoconutModel,
    CurriculumCallback,
    MarkerIds,
    loss_targets,
    stage_for_epoch,
    stage_for_step,
    stage_plan,
    tokenize_records,
    train_coconut,
)
from codi.model import CODIModel

# 1 to 4 equation steps (include_last_cot: every step kept), questions of different lengths
STEP_RECORDS = [
    RawRecord("Tom has 12 apples and buys 30 more.", "<<12+30=42>>", "#### 42", "s0"),
    RawRecord(
        "A shop sells 7 pens for 3 dollars each. How many dollars does the shop get for all of the pens?",
        "<<7*3=21>> <<21*1=21>>",
        "#### 21",
        "s1",
    ),
    RawRecord("She eats three. How many left?", "<<3-8=-5>> <<-5*1=-5>> <<-5+0=-5>>", "#### -5", "s2"),
    RawRecord(
        "John cuts his grass to 2 inches. It grows .5 inches per month. How much does he pay per year?",
        "<<100*7=700>> <<700*1=700>> <<700+0=700>> <<700-0=700>>",
        "#### 700",
        "s3",
    ),
]
QUESTIONS = [record.question for record in STEP_RECORDS] + ["Hi", "The answer is: 21"]


def coconut_model(
    path: str,
    settings: CoconutArguments,
    std: float = 0.3,
    seed: int = 0,
    use_lora: bool = True,
    lora_dropout: float = 0.1,
) -> CoconutModel:
    """A tiny Coconut model whose weights are re-drawn with a larger std (varied hidden states and
    greedy outputs; a default-init tiny model repeats one token)."""
    torch.manual_seed(seed)
    args = CODIModelArguments(
        model_name_or_path=path, lora_r=8, use_prj=False, use_lora=use_lora, lora_dropout=lora_dropout
    )
    model = CoconutModel.from_base(args).configure(settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, std, generator=generator)
    return model.eval()


def records_for(model, **kwargs):
    return tokenize_records(STEP_RECORDS, model.tokenizer, include_last_cot=True, **kwargs)[0]


# --------------------------------------------------------------------------------------------------
# The reference, literally: dataset.py get_cot_latent_dataset / MyCollator, coconut.py Coconut.forward
# with each pass recomputing the whole sequence instead of reusing a KV cache.


def reference_features(record, stage, settings, start_id, latent_id, end_id):
    """dataset.py process_dataset at `scheduled_stage_to_train = stage` (the mixing draw is separate)."""
    steps = record.step_ids
    c_thought = 0 if settings.no_thoughts else settings.c_thought  # run.py: no_thoughts sets c_thought 0
    markers = not settings.no_thoughts  # run.py: no_special_marker for no_thoughts
    if stage > settings.max_latent_stage:
        n_skip_steps = 10000
        n_latent_tokens = (
            settings.max_latent_stage
            if settings.pad_latent_to_max
            else min(len(steps), settings.max_latent_stage)
        )
    else:
        n_skip_steps, n_latent_tokens = stage, stage
    n_latent_tokens *= c_thought
    n_additional_tokens = 2 if markers else 0
    tokens = (
        record.question_ids
        + ([start_id] if markers else [])
        + [latent_id] * n_latent_tokens
        + ([end_id] if markers else [])
        + list(itertools.chain.from_iterable(steps[n_skip_steps:]))
        + record.answer_ids
    )
    head = len(record.question_ids) + n_latent_tokens + n_additional_tokens
    return {
        "input_ids": tokens,
        "labels": [-100] * head + tokens[head:],
        "attention_mask": [1] * len(tokens),
        "position_ids": list(range(len(tokens))),
    }


def reference_collate(features, pad_id, latent_id):
    """MyCollator: left-pad so that every row's first latent is in the same column, then right-pad."""
    left = [0] * len(features)
    earliest = [f["input_ids"].index(latent_id) for f in features if latent_id in f["input_ids"]]
    if earliest:
        latest = max(earliest)
        for row, feature in enumerate(features):
            n_pad = latest - feature["input_ids"].index(latent_id) if latent_id in feature["input_ids"] else 0
            left[row] = n_pad
            feature["position_ids"] = [0] * n_pad + list(range(len(feature["input_ids"])))
            feature["input_ids"] = [pad_id] * n_pad + feature["input_ids"]
            feature["labels"] = [-100] * n_pad + feature["labels"]
            feature["attention_mask"] = [0] * n_pad + feature["attention_mask"]
    width = max(len(f["input_ids"]) for f in features)

    def pad(key, value):
        return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", -100),
        "position_ids": pad("position_ids", 0),
    }
    return batch, left


def reference_forward(model, batch, latent_id, continuous=True):
    """Coconut.forward, cache-free: pass k recomputes the whole sequence and fills every row's k-th
    latent with the last hidden state of the position before it; then the final pass and the mean CE."""
    input_ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    embeds = model.hf_model.get_input_embeddings()(input_ids)
    rows, width = input_ids.shape
    latent_lists = [
        [j for j in range(width) if continuous and input_ids[i, j] == latent_id] for i in range(rows)
    ]
    for pass_idx in range(max(len(found) for found in latent_lists)):
        out = model.hf_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True
        )
        hidden = out.hidden_states[-1]
        tensor_list = [[embeds[i, j, :] for j in range(width)] for i in range(rows)]
        for i, found in enumerate(latent_lists):
            if len(found) > pass_idx:
                tensor_list[i][found[pass_idx]] = hidden[i, found[pass_idx] - 1, :]
        embeds = torch.stack([torch.stack(row) for row in tensor_list])
    logits = model.hf_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    shift_logits, shift_labels = logits[..., :-1, :], batch["labels"][..., 1:]
    loss = CrossEntropyLoss()(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
    return loss, logits, embeds


def reference_targets(batch, left):
    return [
        {(j - left[i], label) for j, label in enumerate(row) if label != -100}
        for i, row in enumerate(batch["labels"].tolist())
    ]


def compare_to_reference(model, records, stages, settings):
    """Our loss and loss positions against the reference's for one batch (row i at stages[i])."""
    ids = MarkerIds(model.bot_id, model.eot_id, model.pause_id)
    dataset = CoconutDataset(records, settings, ids)
    dataset.stage_of = lambda index: stages[index]  # the stages under test, mixed or not
    ours = CoconutCollator(model.pad_id)([dataset[i] for i in range(len(records))])
    if settings.pause_as_thought:
        latent_id, continuous = model.pause_id, False  # the reference's coconut: False keeps the tokens
    else:
        latent_id, continuous = 1, True  # any id: a latent's embedding is always replaced
        assert all(latent_id not in r.question_ids + sum(r.step_ids, []) + r.answer_ids for r in records)
    features = [
        reference_features(record, stage, settings, model.bot_id, latent_id, model.eot_id)
        for record, stage in zip(records, stages)
    ]
    reference, left = reference_collate(features, model.pad_id, latent_id)
    with torch.no_grad():
        expected, _, _ = reference_forward(model, reference, latent_id, continuous)
        loss = model(**ours)["loss"]
    assert loss_targets(ours) == reference_targets(reference, left)
    assert abs(float(loss) - float(expected)) < 1e-5, (stages, float(loss), float(expected))
    return ours


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("pad_latent_to_max", [True, False])
def test_forward_equals_reference_every_stage(tiny_dirs, arch, pad_latent_to_max):
    """Stages 0..max_latent_stage+1 (the final one removes every step), a left-padded batch of records
    with 1-4 steps: same loss (1e-5) and same (position, target) pairs as the reference."""
    settings = CoconutArguments(c_thought=2, max_latent_stage=3, pad_latent_to_max=pad_latent_to_max)
    model = coconut_model(tiny_dirs[arch], settings)
    records = records_for(model)
    assert [len(record.step_ids) for record in records] == [1, 2, 3, 4]
    for stage in range(settings.max_latent_stage + 2):
        batch = compare_to_reference(model, records, [stage] * len(records), settings)
        if stage > settings.max_latent_stage:
            expected = [6] * 4 if pad_latent_to_max else [2, 4, 6, 6]
            assert batch["num_latent"].tolist() == expected


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_equals_reference_mixed_stages_and_ablations(tiny_dirs, arch):
    """Rows at different stages in one batch (uniform_prob mixing), and the ablations' token
    sequences (pause as thought; w/o thought), against the reference."""
    settings = CoconutArguments(c_thought=2, max_latent_stage=3, pad_latent_to_max=False)
    model = coconut_model(tiny_dirs[arch], settings)
    records = records_for(model)
    for stages in ([0, 2, 1, 4], [3, 0, 4, 2], [1, 1, 0, 0]):
        compare_to_reference(model, records, stages, settings)
    for ablation in (dict(pause_as_thought=True), dict(no_thoughts=True)):
        variant = CoconutArguments(c_thought=2, max_latent_stage=3, **ablation)
        model = coconut_model(tiny_dirs[arch], variant)
        for stages in ([0, 1, 2, 3], [4, 4, 1, 0]):
            batch = compare_to_reference(model, records_for(model), stages, variant)
            assert "input_ids" in batch  # one plain LM forward, no thought loop


def test_gradients_flow_through_thoughts(tiny_gpt2):
    """The loss of the answer reaches the question through the fed-back states (no detach), as in
    the reference; the gradient equals the cache-free reference's."""
    settings = CoconutArguments(c_thought=1, max_latent_stage=2)
    model = coconut_model(tiny_gpt2, settings, use_lora=False)
    records = records_for(model)[:2]
    dataset = CoconutDataset(records, settings, MarkerIds(model.bot_id, model.eot_id))
    dataset.set_stage(3, 0)
    batch = CoconutCollator(model.pad_id)([dataset[0], dataset[1]])
    weight = model.hf_model.get_input_embeddings().weight
    grad = torch.autograd.grad(model(**batch)["loss"], weight)[0]
    features = [reference_features(r, 3, settings, model.bot_id, 1, model.eot_id) for r in records]
    reference, _ = reference_collate(features, model.pad_id, 1)
    expected = torch.autograd.grad(reference_forward(model, reference, 1)[0], weight)[0]
    assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-4)
    # the stage-3 suffix holds no question token: their gradient comes through the thoughts only
    question_token = records[0].question_ids[0]
    assert grad[question_token].abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Curriculum


def test_stage_schedule_and_plan():
    assert [stage_for_epoch(e, 3, 3) for e in range(16)] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 4
    assert [stage_for_epoch(e, 1, 0) for e in range(3)] == [0, 1, 1]
    assert {stage_for_epoch(e, 3, 3, no_curriculum=True) for e in range(10)} == {4}
    padded, per_step = CoconutArguments(c_thought=2), CoconutArguments(c_thought=2, pad_latent_to_max=False)
    # (removed steps, thoughts): up to max_latent_stage the record's length does not matter
    assert [stage_plan(stage, 2, padded) for stage in range(5)] == [(0, 0), (1, 2), (2, 4), (2, 6), (2, 6)]
    assert [stage_plan(stage, 2, per_step) for stage in range(5)] == [(0, 0), (1, 2), (2, 4), (2, 6), (2, 4)]
    assert stage_plan(9, 7, per_step) == (7, 6)
    assert stage_plan(2, 5, CoconutArguments(no_thoughts=True)) == (2, 0)
    assert CoconutArguments().inference_latents == 6
    with pytest.raises(ValueError, match="reset_optimizer_every"):
        CoconutArguments(reset_optimizer_every="step")


def test_uniform_prob_mixing_is_deterministic(tiny_gpt2):
    settings = CoconutArguments(uniform_prob=0.5, max_latent_stage=3)
    model = coconut_model(tiny_gpt2, settings)
    records = records_for(model) * 25  # 100 records
    ids = MarkerIds(model.bot_id, model.eot_id)

    def stages(seed, epoch):
        dataset = CoconutDataset(records, settings, ids, seed=seed)
        dataset.set_stage(2, epoch)
        return [dataset.stage_of(i) for i in range(len(records))]

    first = stages(0, 5)
    assert first == stages(0, 5)  # same seed and epoch: same draws, in any order of access
    assert first != stages(0, 6) and first != stages(1, 5)
    mixed = [i for i, stage in enumerate(first) if stage != 2]
    assert 20 < len(mixed) < 60  # about half drawn, some of whom drew 2 again
    assert all(0 <= first[i] <= len(records[i].step_ids) for i in mixed)
    unmixed = CoconutDataset(records, CoconutArguments(max_latent_stage=3), ids)
    unmixed.set_stage(2, 5)
    assert {unmixed.stage_of(i) for i in range(len(records))} == {2}
    # the features follow the draw
    dataset = CoconutDataset(records, settings, ids, seed=0)
    dataset.set_stage(2, 5)
    assert [dataset[i]["num_latent"] for i in mixed[:5]] == [
        stage_plan(first[i], len(records[i].step_ids), settings)[1] for i in mixed[:5]
    ]


class _FakeOptimizer:
    def __init__(self):
        self.state = {"p": {"exp_avg": 1}}


def test_callback_resets_only_at_stage_switches():
    def run(settings, epochs):
        callback = CurriculumCallback(settings, [])
        optimizer = _FakeOptimizer()
        cleared = []
        for epoch in epochs:
            optimizer.state = {"p": {"exp_avg": 1}}
            callback.on_epoch_begin(None, SimpleNamespace(epoch=epoch), None, optimizer=optimizer)
            cleared.append(not optimizer.state)
        return [entry["stage"] for entry in callback.history], cleared

    stages, cleared = run(
        CoconutArguments(epochs_per_stage=2, max_latent_stage=1), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    )
    assert stages == [0, 0, 1, 1, 2, 2]
    assert cleared == [False, False, True, False, True, False]
    # the reference's own run.py: every epoch
    every = CoconutArguments(epochs_per_stage=2, max_latent_stage=1, reset_optimizer_every="epoch")
    assert run(every, [0.0, 1.0, 2.0])[1] == [False, True, True]
    # the datasets follow, from the start of training (an evaluation on start sees the first stage)
    dataset = CoconutDataset([], CoconutArguments(start_epoch=3), MarkerIds(1, 2))
    callback = CurriculumCallback(CoconutArguments(start_epoch=3), [dataset, None])
    callback.on_train_begin(None, SimpleNamespace(epoch=0.0), None)
    assert (dataset.stage, dataset.epoch) == (1, 3)
    # start_epoch (the reference's resume 3 skips stage 0); resuming mid-epoch never clears
    stages, cleared = run(CoconutArguments(start_epoch=3), [0.0, 2.0, 3.0, 3.5])
    assert stages == [1, 1, 2, 2] and cleared == [False, False, True, False]
    assert run(CoconutArguments(epochs_per_stage=1, reset_optimizer=False), [0.0, 1.0])[1] == [False, False]


def test_step_schedule_by_hand():
    """steps_per_stage: stage = start_stage + global_step // steps_per_stage, capped at the final stage."""
    assert [stage_for_step(step, 2, 2) for step in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    # the demo's Table-1 run: 2000 steps after the CoT warm-up, stages 1, 2, 3 then the final stage 4
    table1 = {step: stage_for_step(step, 400, 3, start_stage=1) for step in (0, 399, 400, 799, 800, 1199)}
    assert table1 == {0: 1, 399: 1, 400: 2, 799: 2, 800: 3, 1199: 3}
    assert stage_for_step(1200, 400, 3, 1) == stage_for_step(1999, 400, 3, 1) == 4
    assert {stage_for_step(step, 5, 3, no_curriculum=True) for step in range(12)} == {4}
    assert CoconutArguments(steps_per_stage=400, start_stage=1).by_steps and not CoconutArguments().by_steps
    # each schedule has its own start; a setting of the other one would be silently ignored
    with pytest.raises(ValueError, match="start_stage applies to steps_per_stage"):
        CoconutArguments(start_stage=1)
    with pytest.raises(ValueError, match="use start_stage"):
        CoconutArguments(steps_per_stage=10, start_epoch=3)
    with pytest.raises(ValueError, match="reset_optimizer_every epoch"):
        CoconutArguments(steps_per_stage=10, reset_optimizer_every="epoch")
    with pytest.raises(ValueError, match="steps_per_stage must be >= 0"):
        CoconutArguments(steps_per_stage=-1)


def test_step_callback_switches_and_resets_at_stage_boundaries_and_on_resume():
    settings = CoconutArguments(steps_per_stage=2, max_latent_stage=2)

    def run(steps):
        callback = CurriculumCallback(settings, [])
        optimizer, cleared = _FakeOptimizer(), []
        for step in steps:
            optimizer.state = {"p": {"exp_avg": 1}}
            state = SimpleNamespace(global_step=step, epoch=step / 4)
            callback.on_epoch_begin(None, state, None, optimizer=optimizer)  # a no-op under steps
            callback.on_step_begin(None, state, None, optimizer=optimizer)
            cleared.append(not optimizer.state)
        return callback.history, cleared

    history, cleared = run(range(10))
    assert [(entry["step"], entry["stage"], entry["reset"]) for entry in history] == [
        (0, 0, False),
        (2, 1, True),
        (4, 2, True),
        (6, 3, True),
    ]
    assert cleared == [False, False, True, False, True, False, True, False, False, False]
    # resumed at a switch step it clears (as the uninterrupted run did), one step later it does not
    assert run([4, 5, 6])[1] == [True, False, True]
    assert run([5, 6])[1] == [False, True]
    # the datasets follow the step, from the start of training (here a run resumed at step 5)
    dataset = CoconutDataset([], settings, MarkerIds(1, 2))
    callback = CurriculumCallback(settings, [dataset, None])
    callback.on_train_begin(None, SimpleNamespace(global_step=5, epoch=1.25), None)
    assert (dataset.stage, dataset.epoch) == (2, 1)


# --------------------------------------------------------------------------------------------------
# Decoding


def reference_generate(model, question, num_latent, max_new_tokens, latent_id=1, continuous=True):
    """Coconut.generate (batch 1, the prefix recomputed at every token); like ours it never emits the
    suppressed marker/pad ids and stops at a first EOS too (the reference checks EOS from the second)."""
    ids = (
        encode_question(model.tokenizer, question)
        + [model.bot_id]
        + [latent_id] * num_latent
        + [model.eot_id]
    )
    input_ids = torch.tensor([ids])
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        "position_ids": torch.arange(len(ids)).unsqueeze(0),
    }
    _, logits, embeds = reference_forward(model, batch, latent_id, continuous)
    suppress, eos, tokens = suppressed_token_ids(model), model.tokenizer.eos_token_id, []
    embedding = model.hf_model.get_input_embeddings()
    for _ in range(max_new_tokens):
        next_token = int(logits[0, -1].index_fill(0, torch.tensor(suppress), float("-inf")).argmax())
        tokens.append(next_token)
        if next_token == eos:
            break
        embeds = torch.cat([embeds, embedding(torch.tensor([[next_token]]))], dim=1)
        logits = model.hf_model(inputs_embeds=embeds).logits
    return tokens


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_generation_equals_batch_one_and_reference(tiny_dirs, arch):
    settings = CoconutArguments(c_thought=2, max_latent_stage=2)
    model = coconut_model(tiny_dirs[arch], settings, std=0.5)
    batched = model.generate(QUESTIONS, max_new_tokens=8, batch_size=len(QUESTIONS))
    assert all(output.num_latent_positions == 4 for output in batched)
    alone = [model.generate([question], max_new_tokens=8)[0] for question in QUESTIONS]
    assert [output.token_ids for output in batched] == [output.token_ids for output in alone]
    assert len({tuple(output.token_ids) for output in batched}) > 2  # not vacuous
    with torch.no_grad():
        for question, output in zip(QUESTIONS[:3], batched):
            assert output.token_ids == reference_generate(model, question, 4, 8)
    # pause as thought: <pause> embeddings at the thought positions (a plain token sequence)
    pause = coconut_model(
        tiny_dirs[arch], CoconutArguments(c_thought=1, max_latent_stage=2, pause_as_thought=True)
    )
    outputs = pause.generate(QUESTIONS[:3], max_new_tokens=6)
    with torch.no_grad():
        for question, output in zip(QUESTIONS[:3], outputs):
            assert output.token_ids == reference_generate(pause, question, 2, 6, pause.pause_id, False)
    # `codi eval` calls codi.inference.generate.generate(model, ...): the same thoughts
    assert [o.token_ids for o in generate(pause, QUESTIONS[:3], max_new_tokens=6)] == [
        o.token_ids for o in outputs
    ]
    # w/o thought: trained without markers or thoughts, it decodes from the question alone
    bare = coconut_model(tiny_dirs[arch], CoconutArguments(no_thoughts=True))
    assert bare.args.num_latent == 0
    latent = bare.generate(QUESTIONS[:3], max_new_tokens=6, num_latent=3)
    cot = generate(bare, QUESTIONS[:3], mode="cot", max_new_tokens=6)
    assert [o.token_ids for o in latent] == [o.token_ids for o in cot]
    assert all(o.num_latent_positions == 0 for o in latent)


# --------------------------------------------------------------------------------------------------
# End to end


class _OptimizerProbe(TrainerCallback):
    """Records the optimizer's state size when each epoch begins (after the curriculum callback)."""

    def __init__(self):
        self.sizes = []

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        self.sizes.append(len(optimizer.state))


def _train_args(model_dir, train_file, output_dir, *extra):
    model_args, data_args, training_args = parse_args(
        [
            "--model_name_or_path", model_dir,
            "--train_file", train_file,
            "--output_dir", str(output_dir),
            "--include_last_cot", "True",
            "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant",
            "--save_strategy", "no",
            "--report_to", "none",
            "--disable_tqdm", "True",
            "--seed", "3",
            *extra,
        ]
    )  # fmt: skip
    return model_args, data_args, training_args


@pytest.fixture
def train_file(tmp_path) -> str:
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{r.question}||{r.cot} {r.answer}\n" for r in STEP_RECORDS * 2))
    return str(path)


def test_train_from_cot_sft_checkpoint_saves_and_generates(tiny_gpt2, train_file, tmp_path):
    """2 stages x 2 epochs from a CODI-format CoT-SFT checkpoint (with its unused projection): the
    optimizer state is empty when a stage begins and kept within one; the saved model loads (as
    CoconutModel and as a plain CODIModel) and decodes like the trained one."""
    sft = tmp_path / "cot_sft"
    CODIModel.from_base(
        CODIModelArguments(model_name_or_path=tiny_gpt2, lora_r=8, prj_dim=16)
    ).save_pretrained(str(sft))
    args = _train_args(str(sft), train_file, tmp_path / "run", "--num_train_epochs", "4")
    settings = CoconutArguments(c_thought=1, epochs_per_stage=2, max_latent_stage=1)
    probe = _OptimizerProbe()
    result = train_coconut(*args, settings, callbacks=[probe])
    assert result.trainer.state.global_step == 8
    assert probe.sizes[0] == 0 and probe.sizes[2] == 0  # fresh, then cleared at the switch
    assert probe.sizes[1] > 0 and probe.sizes[3] > 0  # kept inside a stage
    (curriculum,) = [
        c for c in result.trainer.callback_handler.callbacks if isinstance(c, CurriculumCallback)
    ]
    assert [(entry["stage"], entry["reset"]) for entry in curriculum.history] == [
        (0, False),
        (0, False),
        (1, True),
        (1, False),
    ]
    assert result.model.args.use_prj is False and result.model.args.num_latent == 1
    trained = result.model.generate(QUESTIONS, max_new_tokens=6)
    loaded = CoconutModel.from_pretrained(str(tmp_path / "run"))
    assert loaded.coconut == settings
    assert [o.token_ids for o in loaded.generate(QUESTIONS, max_new_tokens=6)] == [
        o.token_ids for o in trained
    ]
    plain = CODIModel.from_pretrained(str(tmp_path / "run"))
    assert [o.token_ids for o in plain.generate(QUESTIONS, max_new_tokens=6)] == [
        o.token_ids for o in trained
    ]
    assert isinstance(load(str(tmp_path / "run")), CoconutModel)
    assert not isinstance(load(str(sft)), CoconutModel)
    # `codi eval --num_latent 3` (or the reference name --inf_latent_iterations) overrides the saved default
    overridden = CoconutModel.from_pretrained(str(tmp_path / "run"), inf_latent_iterations=3)
    assert overridden.args.num_latent == 3
    assert CoconutModel.from_pretrained(str(tmp_path / "run"), num_latent=2).args.num_latent == 2


class _StepProbe(TrainerCallback):
    """Per training forward: (global_step, thoughts per row), via a forward pre-hook on the model; per
    optimizer step: the optimizer's state size after the curriculum callback ran."""

    def __init__(self):
        self.forwards, self.state_sizes, self.state = [], {}, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state

        def hook(module, positional, named):
            if module.training:
                self.forwards.append((self.state.global_step, named["num_latent"].tolist()))

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.state_sizes[state.global_step] = len(optimizer.state)


def test_step_schedule_batches_train_at_their_step_stage_and_resume(tiny_gpt2, train_file, tmp_path):
    """steps_per_stage 2 over 8 steps (2 micro-batches of 2 records a step, 2 steps an epoch): every
    micro-batch's sequences have the stage of the step training on them (across switches and epoch
    starts, although the Trainer fetches batches ahead); the optimizer state is cleared exactly at the
    switches; resumed from step 3, the run goes on at the same stages and resets."""
    settings = CoconutArguments(c_thought=1, max_latent_stage=3, steps_per_stage=2)
    extra = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "8"]
    saving = ["--save_strategy", "steps", "--save_steps", "3"]
    args = _train_args(tiny_gpt2, train_file, tmp_path / "run", *extra, *saving)
    probe = _StepProbe()
    result = train_coconut(*args, settings, callbacks=[probe])
    assert result.trainer.state.global_step == 8
    # stage s (<= max_latent_stage) gives every record s thoughts whatever its length
    expected = {step: [step // 2] * 2 for step in range(8)}
    assert probe.forwards == [(step, expected[step]) for step in range(8) for _ in range(2)]
    assert [step for step, size in probe.state_sizes.items() if size == 0] == [0, 2, 4, 6]
    (curriculum,) = [
        c for c in result.trainer.callback_handler.callbacks if isinstance(c, CurriculumCallback)
    ]
    assert [(e["step"], e["stage"], e["reset"]) for e in curriculum.history] == [
        (0, 0, False),
        (2, 1, True),
        (4, 2, True),
        (6, 3, True),
    ]
    resumed = _StepProbe()
    args = _train_args(
        tiny_gpt2, train_file, tmp_path / "run", *extra, *saving,
        "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-3"),
    )  # fmt: skip
    train_coconut(*args, settings, callbacks=[resumed])
    assert resumed.forwards == [(step, expected[step]) for step in range(3, 8) for _ in range(2)]
    assert resumed.state_sizes[3] > 0  # the checkpoint's moments kept inside stage 1
    assert [step for step, size in resumed.state_sizes.items() if size == 0] == [4, 6]


def test_train_pause_as_thought_round_trip(tiny_llama, train_file, tmp_path):
    args = _train_args(tiny_llama, train_file, tmp_path / "pause", "--max_steps", "2")
    settings = CoconutArguments(c_thought=1, epochs_per_stage=1, max_latent_stage=1, pause_as_thought=True)
    result = train_coconut(*args, settings)
    trained = result.model.generate(QUESTIONS[:3], max_new_tokens=5)
    loaded = CoconutModel.from_pretrained(str(tmp_path / "pause"))
    assert loaded.pause_id == result.model.pause_id is not None
    assert [o.token_ids for o in loaded.generate(QUESTIONS[:3], max_new_tokens=5)] == [
        o.token_ids for o in trained
    ]
    # the marker rows start from '<<' (the reference's initialisation) and stay frozen under LoRA
    embeddings = loaded.hf_model.get_input_embeddings().weight
    assert torch.equal(embeddings[loaded.bot_id], embeddings[loaded.pause_id])


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="at most one"):
        CoconutArguments(no_thoughts=True, pause_as_thought=True)
    with pytest.raises(ValueError, match="uniform_prob"):
        CoconutArguments(uniform_prob=1.5)


def test_presets_state_the_reference_settings():
    """configs/gpt2_gsm8k_coconut.yaml carries args/gsm_coconut.yaml's values (global batch 128)."""
    preset = str(REPO_ROOT / "configs" / "gpt2_gsm8k_coconut.yaml")
    # `--method cot_sft` only until config.METHODS lists coconut (the preset says method: coconut)
    model_args, data_args, training_args, settings = parse_args(
        ["--config", preset, "--method", "cot_sft"], classes=(*ARGUMENT_CLASSES, CoconutArguments)
    )
    assert settings == CoconutArguments(c_thought=2, epochs_per_stage=3, max_latent_stage=3, start_epoch=3)
    assert settings.start_epoch + training_args.num_train_epochs == 25  # the reference's num_epochs
    assert (training_args.learning_rate, training_args.weight_decay) == (1e-4, 0.01)
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 128
    assert training_args.lr_scheduler_type == "constant" and training_args.max_grad_norm == 0
    assert not model_args.use_prj and data_args.include_last_cot
    cot = parse_args(["--config", str(REPO_ROOT / "configs" / "gpt2_gsm8k_cot.yaml")])
    assert cot[2].method == "cot_sft" and cot[2].num_train_epochs == 25 and cot[1].include_last_cot
