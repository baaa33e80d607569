"""The training step's batched loss ops change no result.

`distillation_loss` computes every layer in one batch of ops (`gather_layer_positions`), and
`latent_step_ce` no longer asks the device whether any step label counts. Each is compared with the
straightforward per-layer computation it replaced, through a whole training forward and backward on
the same weights and batch: same loss components and same gradients of every trainable parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_for
from torch.utils._python_dispatch import TorchDispatchMode

import codi.model as model_module
from codi.losses import IGNORE_INDEX, DistillOutput, gather_positions, latent_step_ce, pointwise_distance

ATOL = 1e-5


class _Layers(list):
    def detach(self):
        return _Layers(layer.detach() for layer in self)


def _loop_gather(hidden_states, positions):
    """One index per layer, each with its own row index."""
    return _Layers(gather_positions(hidden, positions) for hidden in hidden_states)


def _loop_distillation(student_hidden, teacher_hidden, loss_type, div_std, l2_std_twice=False):
    """The per-layer loop: one distance (and one std) per layer, then the mean over layers."""
    losses = []
    for student, teacher in zip(student_hidden, teacher_hidden):
        teacher = teacher.detach().float()
        loss = pointwise_distance(student.float(), teacher, loss_type)
        if div_std:
            std = teacher.std()
            loss = loss / std
            if l2_std_twice and loss_type == "l2":
                loss = loss / std
        losses.append(loss)
    stacked = torch.stack(losses)
    return DistillOutput(loss=stacked.mean(), per_layer=stacked.detach())


def _any_label_ce(latent_logits, step_labels):
    """Step CE that checks on the host whether any label counts (one device sync)."""
    count = min(latent_logits.size(1), step_labels.size(1))
    logits = latent_logits[:, :count].float()
    labels = step_labels[:, :count]
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {key: float(value.detach()) for key, value in out.items()}, grads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    ("loss", "overrides"),
    [
        ({}, {}),
        ({"distill_loss_type": "l2", "distill_loss_div_std": True, "latent_step_loss_factor": 0.5}, {}),
        ({"distill_loss_type": "l1", "distill_loss_div_std": True}, {}),
        ({"distill_loss_type": "l2", "distill_loss_div_std": True}, {"reference_compat": True}),
    ],
)
def test_batched_losses_match_the_per_layer_loop(make_model, monkeypatch, arch, loss, overrides):
    model = make_model(arch, loss=loss, **overrides).train()
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; random adapters give every parameter a gradient
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    batch = batch_for(model, step_targets=loss.get("latent_step_loss_factor", 0) > 0)
    torch.manual_seed(1)
    fast_losses, fast_grads = _loss_and_grads(model, batch)
    monkeypatch.setattr(model_module, "gather_layer_positions", _loop_gather)
    monkeypatch.setattr(model_module, "distillation_loss", _loop_distillation)
    monkeypatch.setattr(model_module, "latent_step_ce", _any_label_ce)
    torch.manual_seed(1)
    loop_losses, loop_grads = _loss_and_grads(model, batch)
    assert fast_losses.keys() == loop_losses.keys()
    for key, value in loop_losses.items():
        assert fast_losses[key] == pytest.approx(value, abs=ATOL), key
    assert fast_grads.keys() == loop_grads.keys() and loop_grads
    for name, grad in loop_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=ATOL, rtol=1e-4, msg=name)


class _ScalarReads(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (`.item()`, `bool(tensor)`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("labels", [[[3, 5]], [[IGNORE_INDEX, IGNORE_INDEX]]])
def test_latent_step_ce_reads_nothing_back_and_matches(labels):
    logits = torch.randn(1, 3, 7, requires_grad=True)
    step_labels = torch.tensor(labels)
    with _ScalarReads() as reads:
        loss = latent_step_ce(logits, step_labels)
    assert reads.count == 0
    expected = _any_label_ce(logits, step_labels).detach()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)
    loss.backward()
    assert logits.grad is not None


def test_loss_terms_of_a_training_forward_read_nothing_back(make_model):
    """What remains are transformers' own checks (one per LM call, whether its padding mask is all
    ones); the CODI loss terms add none."""
    model = make_model("gpt2", loss={"latent_step_loss_factor": 0.5, "distill_loss_div_std": True})
    batch = batch_for(model, step_targets=True)
    calls = []
    handle = model.hf_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with _ScalarReads() as reads:
            model(**batch)
    finally:
        handle.remove()
    assert reads.count <= len(calls)


def test_trainer_steps_with_the_fused_adamw(tmp_path):
    """One kernel for every parameter: torch's per-parameter AdamW loop (its CPU default) dispatches
    ~10 ops per tensor, 4,262 per step for SmolLM2's LoRA layout (docs/speed.md)."""
    from transformers.training_args import OptimizerNames

    from codi.config import CODITrainingArguments

    assert CODITrainingArguments(output_dir=str(tmp_path)).optim == OptimizerNames.ADAMW_TORCH_FUSED
