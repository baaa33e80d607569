"""CODIModel: losses against an independent cache-free implementation, gradients, padding, save/load."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import RECORDS, batch_for
from tokenizers import processors

from codi.config import CODIModelArguments
from codi.data.dataset import IGNORE_INDEX, CODICollator, build_dataset
from codi.model import CODIModel
from codi.testing import make_model, make_tokenizer

# --------------------------------------------------------------------------------------------------
# An independent reference: one example at a time, no padding, no KV cache, no deferred latent; the
# student sequence is re-run from scratch after every latent. Distances are written out by hand.


def _distance(student, teacher, loss_type):
    diff = student - teacher
    if loss_type == "smooth_l1":
        return torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5).mean()
    if loss_type == "l1":
        return diff.abs().mean()
    return (diff**2).mean()


def _ce_sum_and_count(logits, labels):
    """Sum of next-token CE over the counted tokens of one unpadded sequence, and their number."""
    total, count = 0.0, 0
    for t in range(labels.numel() - 1):
        target = int(labels[t + 1])
        if target != IGNORE_INDEX:
            total = total - torch.log_softmax(logits[t].float(), -1)[target]
            count += 1
    return total, count


def reference_losses(model: CODIModel, examples, teacher_no_grad: bool = True) -> dict[str, torch.Tensor]:
    lm, settings = model.hf_model, model.objective.loss
    t_sum = s_sum = 0.0
    t_count = s_count = 0
    student_layers, teacher_layers = [], []
    for ex in examples:
        teacher_ids = torch.tensor([ex.teacher_input_ids])
        with torch.set_grad_enabled(not teacher_no_grad):
            target = lm(input_ids=teacher_ids, output_hidden_states=True)
        teacher_out = lm(input_ids=teacher_ids, output_hidden_states=True)
        total, count = _ce_sum_and_count(teacher_out.logits[0], torch.tensor(ex.teacher_labels))
        t_sum, t_count = t_sum + total, t_count + count
        teacher_layers.append([h[0, ex.teacher_distill_pos] for h in target.hidden_states])

        seq = lm.get_input_embeddings()(torch.tensor([ex.student_input_ids]))
        for _ in range(model.args.num_latent):
            last = lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1:]
            seq = torch.cat([seq, model.prj(last)], dim=1)
        start = seq.shape[1]
        seq = torch.cat([seq, lm.get_input_embeddings()(torch.tensor([ex.decoder_input_ids]))], dim=1)
        out = lm(inputs_embeds=seq, output_hidden_states=True)
        total, count = _ce_sum_and_count(out.logits[0, start:], torch.tensor(ex.decoder_input_ids))
        s_sum, s_count = s_sum + total, s_count + count
        student_layers.append([h[0, start + ex.decoder_distill_pos] for h in out.hidden_states])

    per_layer = []
    for layer in range(len(student_layers[0])):
        student = torch.stack([rows[layer] for rows in student_layers]).float()
        # No detach here: with teacher_no_grad=False the target deliberately leaks gradient.
        teacher = torch.stack([rows[layer] for rows in teacher_layers]).float()
        loss = _distance(student, teacher, settings.distill_loss_type)
        if settings.distill_loss_div_std:
            n = teacher.numel()
            std = (((teacher - teacher.mean()) ** 2).sum() / (n - 1)).sqrt()
            loss = loss / std
        per_layer.append(loss)
    distill = sum(per_layer) / len(per_layer)
    teacher_ce, student_ce = t_sum / t_count, s_sum / s_count
    total = student_ce + settings.distill_loss_factor * distill + settings.ref_loss_factor * teacher_ce
    return {"loss": total, "student_ce": student_ce, "teacher_ce": teacher_ce, "distill_loss": distill}


def examples_for(model: CODIModel, records=RECORDS, method="codi"):
    dataset, _ = build_dataset(
        records, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id, method=method
    )
    return dataset.examples


def perturb_(model: CODIModel, scale: float = 0.05, seed: int = 1, trainable_only: bool = True) -> None:
    """Random trainable weights: LoRA B starts at zero, which would hide LoRA from every check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad or not trainable_only:
                param.add_(scale * torch.randn(param.shape, generator=generator))


LOSS_CASES = [
    ("gpt2", dict(distill_loss_type="smooth_l1", distill_loss_div_std=True)),
    ("gpt2", dict(distill_loss_type="l1", distill_loss_factor=2.5, ref_loss_factor=0.5)),
    ("llama", dict(distill_loss_type="l2", distill_loss_div_std=True, distill_loss_factor=20.0)),
    ("llama", dict(distill_loss_type="smooth_l1", ref_loss_factor=0.0)),
]


@pytest.mark.parametrize(("arch", "loss"), LOSS_CASES)
def test_forward_matches_cache_free_reference(make_model, arch, loss):
    model = make_model(arch, loss=loss)
    perturb_(model)
    batch = batch_for(model)  # left-padded students, right-padded teachers and decoders
    with torch.no_grad():
        ours = model(**batch)
        expected = reference_losses(model, examples_for(model))
    for key in ("loss", "student_ce", "teacher_ce", "distill_loss"):
        assert float(ours[key]) == pytest.approx(float(expected[key]), rel=1e-4, abs=1e-5), key


def test_reference_compat_l2_divides_by_std_twice(make_model, monkeypatch):
    import codi.model as model_module

    calls = []
    original = model_module.distillation_loss

    def spy(student, teacher, *args, **kwargs):
        calls.append((student, teacher, kwargs))
        return original(student, teacher, *args, **kwargs)

    monkeypatch.setattr(model_module, "distillation_loss", spy)
    loss = dict(distill_loss_type="l2", distill_loss_div_std=True)
    fixed = make_model("gpt2", loss=loss)
    compat = make_model("gpt2", loss=loss, reference_compat=True)
    compat.load_state_dict(fixed.state_dict())
    one = batch_for(fixed, RECORDS[:1])  # one example: no padding, so only the std bug differs
    with torch.no_grad():
        a, b = fixed(**one), compat(**one)
    assert float(b["student_ce"]) == pytest.approx(float(a["student_ce"]), abs=1e-5)
    assert float(b["teacher_ce"]) == pytest.approx(float(a["teacher_ce"]), abs=1e-5)
    assert [c[2]["l2_std_twice"] for c in calls] == [False, True]
    student, teacher, _ = calls[0]
    once = original(student, teacher, "l2", div_std=True).loss
    twice = original(student, teacher, "l2", div_std=True, l2_std_twice=True).loss
    assert float(a["distill_loss"]) == pytest.approx(float(once), rel=1e-5)
    assert float(b["distill_loss"]) == pytest.approx(float(twice), rel=1e-4)
    assert float(once) != pytest.approx(float(twice), rel=1e-3)


@pytest.mark.parametrize("method", ["cot_sft", "no_cot_sft"])
def test_baseline_methods_train_the_teacher_sequence_only(make_model, method):
    model = make_model("gpt2", method=method)
    examples = examples_for(model, method=method)
    if method == "no_cot_sft":
        assert all(ex.cot_ids == [] for ex in examples)
    batch = batch_for(model, method=method)
    assert "student_input_ids" not in batch
    out = model(**batch)
    assert float(out["student_ce"]) == 0.0 and float(out["distill_loss"]) == 0.0
    assert float(out["loss"].detach()) == pytest.approx(float(out["teacher_ce"]))
    assert out["loss"].requires_grad


# --------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradients_reach_lora_and_projection_not_frozen_weights(make_model, arch):
    model = make_model(arch, loss=dict(distill_loss_div_std=True)).train()
    perturb_(model)
    model(**batch_for(model))["loss"].backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("lora_B" in name for name in trainable)
    assert any(name.startswith("prj.") for name in trainable)
    assert all("lora_" in name or name.startswith("prj.") for name in trainable), sorted(trainable)
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert any("embed" in name or "wte" in name for name in frozen)
    for name, param in frozen.items():
        assert param.grad is None, name


def test_full_finetuning_trains_everything(make_model):
    model = make_model("gpt2", use_lora=False).train()
    model(**batch_for(model))["loss"].backward()
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert params["prj.1.weight"].grad.abs().sum() > 0
    assert model.hf_model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_special_token_rows_train_only_when_asked(make_model):
    model = make_model("gpt2", train_special_token_embeddings=True).train()
    model(**batch_for(model))["loss"].backward()
    special = model.special_token_embeddings
    assert special.grad is not None and special.grad[0].abs().sum() > 0 and special.grad[1].abs().sum() > 0
    assert not model.hf_model.get_input_embeddings().weight.requires_grad
    assert make_model("gpt2").special_token_embeddings is None


def test_distillation_target_is_detached_in_forward(make_model, monkeypatch):
    import codi.model as model_module

    seen = []
    original = model_module.distillation_loss

    def spy(student, teacher, *args, **kwargs):
        seen.append(([s.requires_grad for s in student], [t.requires_grad for t in teacher]))
        return original(student, teacher, *args, **kwargs)

    monkeypatch.setattr(model_module, "distillation_loss", spy)
    model = make_model("gpt2").train()
    model(**batch_for(model))
    ((student_flags, teacher_flags),) = seen
    assert all(student_flags) and not any(teacher_flags)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradients_equal_a_reference_with_a_no_grad_teacher_target(make_model, arch):
    """The single teacher forward gives the same gradients as the reference's separate no-grad target."""
    loss = dict(distill_loss_div_std=True, distill_loss_factor=3.0)
    model = make_model(arch, loss=loss)  # eval mode: dropout off, as the equivalence requires
    perturb_(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(model(**batch_for(model))["loss"], params)
    reference = torch.autograd.grad(reference_losses(model, examples_for(model))["loss"], params)
    for mine, theirs in zip(ours, reference):
        assert torch.allclose(mine, theirs, rtol=1e-3, atol=1e-6)
    # A target that carried gradient would change them.
    leaky = torch.autograd.grad(
        reference_losses(model, examples_for(model), teacher_no_grad=False)["loss"],
        params,
        allow_unused=True,
    )
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(ours, leaky) if b is not None)


# --------------------------------------------------------------------------------------------------
# Padding: an example's results must not depend on the batch it is in (docs/method.md#losses, fix_attn_mask bug)


def _student_view(model: CODIModel, batch, row: int):
    """Latents of one row and its per-token student CE terms, via the public building blocks."""
    with torch.no_grad():
        prefix = model.encode_latents(
            batch["student_input_ids"], batch["student_attention_mask"], model.args.num_latent
        )
        latents = torch.stack([z[row] for z in prefix.latents])
        offset = 1 if prefix.pending is not None else 0
        out = model.decode_step(prefix, batch["decoder_input_ids"], batch["decoder_attention_mask"])
    length = int(batch["decoder_attention_mask"][row].sum())
    logits = out.logits[row, offset : offset + length]
    labels = batch["decoder_labels"][row, :length]
    terms = F.cross_entropy(logits[:-1].float(), labels[1:], reduction="none")
    return latents, terms


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_masked_results_do_not_depend_on_the_batch(make_model, arch):
    model = make_model(arch, loss=dict(distill_loss_div_std=True))
    perturb_(model)
    short, longer = RECORDS[0], [RECORDS[1], RECORDS[3]]
    alone = batch_for(model, [short])
    mixed = batch_for(model, [*longer, short])
    assert int(mixed["student_attention_mask"][2].sum()) < mixed["student_input_ids"].shape[1]  # padded
    latents_alone, ce_alone = _student_view(model, alone, 0)
    latents_mixed, ce_mixed = _student_view(model, mixed, 2)
    assert torch.allclose(latents_alone, latents_mixed, atol=1e-5)
    assert torch.allclose(ce_alone, ce_mixed, atol=1e-5)

    # The batch student CE is the token-weighted mean of the rows' own losses.
    with torch.no_grad():
        batch_ce = float(model(**mixed)["student_ce"])
        rows = [(float(model(**batch_for(model, [r]))["student_ce"]), r) for r in [*longer, short]]
    counts = [len(ex.decoder_input_ids) - 1 for ex in examples_for(model, [*longer, short])]
    weighted = sum(ce * n for (ce, _), n in zip(rows, counts)) / sum(counts)
    assert batch_ce == pytest.approx(weighted, abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reference_compat_results_depend_on_the_batch(make_model, arch):
    """The reference's unmasked latent steps attend to padding: the bug, demonstrated."""
    model = make_model(arch, reference_compat=True)
    perturb_(model)
    short, longer = RECORDS[0], [RECORDS[1], RECORDS[3]]
    latents_alone, ce_alone = _student_view(model, batch_for(model, [short]), 0)
    latents_mixed, ce_mixed = _student_view(model, batch_for(model, [*longer, short]), 2)
    assert not torch.allclose(latents_alone, latents_mixed, atol=1e-3)
    assert not torch.allclose(ce_alone, ce_mixed, atol=1e-3)


def test_fix_attn_mask_masks_the_decoder_step_of_padded_rows(make_model):
    """Under reference_compat, fix_attn_mask changes exactly the rows that have padding."""
    unmasked = make_model("gpt2", reference_compat=True)
    perturb_(unmasked)
    masked = make_model("gpt2", reference_compat=True, fix_attn_mask=True)
    masked.load_state_dict(unmasked.state_dict())
    batch = batch_for(unmasked, [RECORDS[3], RECORDS[0]])  # row 0 longest (no padding), row 1 padded
    for row, same in ((0, True), (1, False)):
        latents_a, ce_a = _student_view(unmasked, batch, row)
        latents_b, ce_b = _student_view(masked, batch, row)
        assert torch.equal(latents_a, latents_b)  # latent steps stay unmasked either way
        assert torch.allclose(ce_a, ce_b, atol=1e-6) == same


def test_latent_loop_feeds_exactly_num_latent(make_model):
    model = make_model("gpt2", num_latent=4)
    batch = batch_for(model, RECORDS[:2])
    with torch.no_grad():
        deferred = model.encode_latents(batch["student_input_ids"], batch["student_attention_mask"], 4)
        eager = model.encode_latents(
            batch["student_input_ids"], batch["student_attention_mask"], 4, keep_hidden=True, defer_last=False
        )
    question_len = batch["student_input_ids"].shape[1]
    assert len(deferred.latents) == 4 and deferred.pending is not None
    assert deferred.cache.get_seq_length() == question_len + 3  # the 4th is fed with the decoder
    assert eager.pending is None and eager.cache.get_seq_length() == question_len + 4
    assert len(eager.hidden) == 5  # after <bot> and after each latent
    for a, b in zip(deferred.latents, eager.latents):
        assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Save -> load


def _outputs(model: CODIModel, batch):
    with torch.no_grad():
        losses = model(**batch)
        prefix = model.encode_latents(batch["student_input_ids"], batch["student_attention_mask"], 2)
        logits = model.decode_step(prefix, batch["decoder_input_ids"], batch["decoder_attention_mask"]).logits
        teacher = model.teacher_forward(batch["teacher_input_ids"], batch["teacher_attention_mask"]).logits
    return losses, logits, teacher


def _assert_identical(a: CODIModel, b: CODIModel, batch):
    (losses_a, logits_a, teacher_a), (losses_b, logits_b, teacher_b) = _outputs(a, batch), _outputs(b, batch)
    assert torch.equal(logits_a, logits_b)
    assert torch.equal(teacher_a, teacher_b)
    for key in losses_a:
        assert torch.equal(losses_a[key], losses_b[key]), key


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("use_lora", [True, False])
def test_save_load_gives_identical_logits(make_model, tmp_path, arch, use_lora):
    model = make_model(arch, use_lora=use_lora, train_special_token_embeddings=use_lora)
    perturb_(model, trainable_only=use_lora)
    with torch.no_grad():  # the added <pad>/<bot>/<eot> rows must travel even when frozen
        model.hf_model.get_input_embeddings().weight[model.base_vocab_rows :].normal_()
    model.save_pretrained(str(tmp_path))
    loaded = CODIModel.from_pretrained(str(tmp_path))
    assert loaded.is_lora == use_lora
    assert (loaded.pad_id, loaded.bot_id, loaded.eot_id) == (model.pad_id, model.bot_id, model.eot_id)
    _assert_identical(model.eval(), loaded, batch_for(model))


def test_save_load_untied_llama_keeps_added_output_rows(tmp_path, tiny_llama):
    base = tmp_path / "untied"
    tokenizer = make_tokenizer("llama3")
    make_model("llama", len(tokenizer), tie_word_embeddings=False).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = CODIModel.from_base(CODIModelArguments(model_name_or_path=str(base), lora_r=4, prj_dim=8))
    perturb_(model)
    with torch.no_grad():
        model.hf_model.get_output_embeddings().weight[model.base_vocab_rows :].normal_()
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = CODIModel.from_pretrained(str(tmp_path / "ckpt"))
    _assert_identical(model.eval(), loaded, batch_for(model))


def test_load_weights_into_a_fresh_model_resumes_exactly(make_model, tmp_path):
    trained = make_model("llama")
    perturb_(trained)
    trained.save_pretrained(str(tmp_path))
    fresh = make_model("llama", seed=123)
    batch = batch_for(trained)
    assert not torch.equal(_outputs(fresh, batch)[1], _outputs(trained, batch)[1])
    fresh.load_weights(str(tmp_path))
    _assert_identical(trained, fresh, batch)


@pytest.mark.parametrize("use_lora", [True, False])
def test_load_weights_refuses_another_models_weights(make_model, tmp_path, use_lora):
    make_model("llama", use_lora=use_lora).save_pretrained(str(tmp_path))
    other = make_model("gpt2", use_lora=use_lora)
    with pytest.raises(ValueError, match="not in this model|do not match this model"):
        other.load_weights(str(tmp_path))


def test_from_pretrained_rejects_a_folder_without_codi_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="codi_config.json"):
        CODIModel.from_pretrained(str(tmp_path))


def test_question_keeps_bos_and_the_other_parts_do_not(make_model):
    model = make_model("llama")
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    (example,) = examples_for(model, RECORDS[:1])
    assert example.question_ids[0] == bos
    assert bos not in example.cot_ids and bos not in example.answer_ids
    assert example.teacher_input_ids.count(bos) == 2  # the BOS, and the EOS (same id) at the end
    assert example.student_input_ids[0] == bos


def test_missing_model_path_is_one_clear_error(tmp_path, capsys):
    from codi import cli
    from codi.io.hf import ModelLoadError

    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ModelLoadError, match="no_such_model"):
        CODIModel.from_base(CODIModelArguments(model_name_or_path=missing))
    assert cli.main(["train", "--model_name_or_path", missing, "--train_file", str(tmp_path / "t.txt")]) == 2
    assert "cannot load the tokenizer from" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Optional latent step supervision (not part of CODI)


def _reference_latent_step_ce(model: CODIModel, examples) -> torch.Tensor:
    """State at <bot> and after each latent, re-run from scratch per example, read by the LM head."""
    lm = model.hf_model
    total, count = 0.0, 0
    for ex in examples:
        seq = lm.get_input_embeddings()(torch.tensor([ex.student_input_ids]))
        states = []
        for _ in range(model.args.num_latent):
            last = lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1:]
            states.append(last[0, 0])
            seq = torch.cat([seq, model.prj(last)], dim=1)
        states.append(lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][0, -1])
        for state, target in zip(states, ex.step_value_ids):
            total = total - torch.log_softmax(lm.get_output_embeddings()(state).float(), -1)[target]
            count += 1
    return total / count


@pytest.mark.parametrize(("arch", "share_question"), [("gpt2", True), ("llama", True), ("gpt2", False)])
def test_latent_step_loss_matches_cache_free_reference(make_model, arch, share_question):
    loss = dict(latent_step_loss_factor=0.5)
    model = make_model(
        arch, loss=loss, share_question=share_question, num_latent=2
    )  # 3 states for records of 2 steps: all counted
    perturb_(model)
    dataset, _ = build_dataset(
        RECORDS, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id, step_targets=True
    )
    batch = CODICollator(model.pad_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        ours = model(**batch)
        expected = _reference_latent_step_ce(model, dataset.examples)
        plain = reference_losses(model, dataset.examples)["loss"]
    assert float(ours["latent_step_ce"]) == pytest.approx(float(expected), rel=1e-4)
    assert float(ours["loss"]) == pytest.approx(float(plain + 0.5 * expected), rel=1e-4)


def test_latent_step_loss_needs_step_targets_and_adds_gradient(make_model):
    model = make_model("gpt2", loss=dict(latent_step_loss_factor=1.0))
    with pytest.raises(ValueError, match="step_targets=True"):
        model(**batch_for(model))
    dataset, _ = build_dataset(
        RECORDS, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id, step_targets=True
    )
    batch = CODICollator(model.pad_id)([dataset[i] for i in range(len(dataset))])
    grads = {}
    for factor in (0.0, 1.0):
        model.zero_grad()
        loss = replace(model.objective.loss, latent_step_loss_factor=factor)
        model.with_settings(replace(model.objective, loss=loss))(**batch)["loss"].backward()
        grads[factor] = model.prj[1].weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1.0])  # the step term reaches the projection


def test_latent_step_loss_is_the_same_on_the_reference_compat_path_without_padding(make_model):
    # one example: no padding, so the reference's unmasked, non-deferred latent loop sees what ours sees
    values = {}
    for compat in (False, True):
        model = make_model("gpt2", loss=dict(latent_step_loss_factor=1.0), reference_compat=compat)
        perturb_(model)
        dataset, _ = build_dataset(
            RECORDS[:1], model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id, step_targets=True
        )
        with torch.no_grad():
            values[compat] = float(model(**CODICollator(model.pad_id)([dataset[0]]))["latent_step_ce"])
    assert values[True] == pytest.approx(values[False], rel=1e-5)
