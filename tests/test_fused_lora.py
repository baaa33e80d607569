"""The fused LoRA linear (`codi.fused_lora`) computes what peft's `lora.Linear` computes.

Layer level: outputs bitwise equal and gradients equal to peft's layer, with and without dropout
(the same RNG draws: the generator ends in the same state), on `nn.Linear` and GPT-2 `Conv1D` bases;
the hand-written backward passes `gradcheck` in float64. Model level: the CODI loss components and the
gradient of every trainable parameter are the same with fused and plain peft layers, dropout on or off.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import batch_for
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from codi import CODIModelArguments, fused_lora, runs
from codi.fused_lora import FusedLoraFunction, FusedLoraLinear, fuse_lora_layers

ATOL = 1e-5


class _Block(nn.Module):
    def __init__(self, conv1d: bool, bias: bool) -> None:
        super().__init__()
        self.proj = Conv1D(12, 10) if conv1d else nn.Linear(10, 12, bias=bias)


def _peft_block(conv1d: bool, bias: bool, dropout: float) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], fan_in_fan_out=conv1d
    )
    model = get_peft_model(_Block(conv1d, bias), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    return model


def _run(model, x: torch.Tensor, seed: int):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model.base_model.model.proj(x)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, torch.rand(3)


@pytest.mark.parametrize(("conv1d", "bias"), [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_layer_matches_peft(conv1d, bias, dropout):
    model = _peft_block(conv1d, bias, dropout).train()
    layer = model.base_model.model.proj
    x = torch.randn(3, 5, 10)
    x[0, 0, :4] = 0.0  # zeros in the input: the mask, not the dropped values, must carry the gradient
    plain = _run(model, x, seed=7)
    assert fuse_lora_layers(model) == 1 and type(layer) is FusedLoraLinear
    fused = _run(model, x, seed=7)
    assert torch.equal(fused[0], plain[0])  # same ops, same mask: bitwise
    torch.testing.assert_close(fused[1], plain[1], atol=ATOL, rtol=1e-5)
    assert fused[2].keys() == plain[2].keys() and len(plain[2]) == 2
    for name, grad in plain[2].items():
        torch.testing.assert_close(fused[2][name], grad, atol=ATOL, rtol=1e-5, msg=name)
    assert torch.equal(fused[3], plain[3])  # the RNG stream is left where peft leaves it
    assert fuse_lora_layers(model, enabled=False) == 1 and type(layer) is LoraLinear


def test_unusual_cases_fall_back_to_peft():
    model = _peft_block(conv1d=False, bias=True, dropout=0.0)
    fuse_lora_layers(model)
    layer = model.base_model.model.proj
    x = torch.randn(2, 3, 10)
    assert layer._fused_args(x, (), {}) is not None
    assert layer._fused_args(x.transpose(0, 1), (), {}) is None  # non-contiguous
    assert layer._fused_args(x.double(), (), {}) is None  # dtype differs from the weights
    layer.base_layer.weight.requires_grad_(True)
    assert layer._fused_args(x, (), {}) is None  # trainable base: peft's graph gives its gradient
    layer.base_layer.weight.requires_grad_(False)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dropout", ["none", "cpu_noise", "native_mask"])
def test_function_gradcheck_float64(conv1d, dropout, monkeypatch):
    """The hand-written backward, dropout included: the seed is reset before each call so gradcheck's
    repeated evaluations see one mask. `native_mask` runs the CUDA path's `native_dropout` on the CPU."""
    if dropout == "native_mask":
        monkeypatch.setattr(fused_lora, "_FUSED_DROPOUT_DEVICES", ("cpu",))
    p = 0.0 if dropout == "none" else 0.4
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    weight = rand(6, 5) if conv1d else rand(5, 6)
    inputs = (rand(2, 3, 6, grad=True), weight, rand(5), rand(3, 6, grad=True), rand(5, 3, grad=True))

    def fused(*tensors):
        torch.manual_seed(5)
        return FusedLoraFunction.apply(*tensors, 0.7, p, conv1d, None)

    assert torch.autograd.gradcheck(fused, inputs)


def _losses_and_grads(model, batch, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out["loss"].backward()
    losses = {key: float(value.detach()) for key, value in out.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_codi_losses_and_gradients_match_plain_peft(make_model, arch, dropout):
    # transformers' forward: the path that calls the LoRA layers (codi's layer stack reads their weights)
    model = make_model(arch, lora_dropout=dropout, layer_stack=False)
    with torch.no_grad():  # LoRA B starts at zero (then A gets no gradient): random adapters
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.train()
    batch = batch_for(model)
    layers = sum(type(m) is FusedLoraLinear for m in model.modules())
    assert layers > 0 and not any(type(m) is LoraLinear for m in model.modules())  # fused by default
    fused_losses, fused_grads = _losses_and_grads(model, batch, seed=3)
    assert fuse_lora_layers(model, enabled=False) == layers
    plain_losses, plain_grads = _losses_and_grads(model, batch, seed=3)
    assert fused_losses.keys() == plain_losses.keys()
    for key, value in plain_losses.items():
        assert fused_losses[key] == pytest.approx(value, abs=ATOL), key
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=ATOL, rtol=1e-4, msg=name)


def test_setting_off_builds_plain_peft_with_the_same_state_dict(make_model):
    fused, plain = make_model("llama"), make_model("llama", fused_lora=False)
    assert not any(type(m) is FusedLoraLinear for m in plain.modules())
    assert any(type(m) is LoraLinear for m in plain.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_autocast_matches_plain_peft(make_model, arch):
    """As the Trainer's `--bf16` runs it: fp32 weights under bf16 autocast, dropout on. The forward runs
    the same bf16 ops (same losses); the backward may round a few bf16 reductions differently."""
    model = make_model(arch, lora_dropout=0.2, layer_stack=False)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.train()
    batch = batch_for(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_losses, fused_grads = _losses_and_grads(model, batch, seed=3)
        fuse_lora_layers(model, enabled=False)
        plain_losses, plain_grads = _losses_and_grads(model, batch, seed=3)
    for key, value in plain_losses.items():
        assert fused_losses[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-3, rtol=2e-2, msg=name)


def test_setting_does_not_change_the_run_signature():
    """Same results either way: a run saved before the setting existed, or with it off, resumes."""
    args = SimpleNamespace(**{name: None for name in runs._DATA_FIELDS + runs._TRAINING_FIELDS})
    on, off = CODIModelArguments(fused_lora=True), CODIModelArguments(fused_lora=False)
    assert runs.run_signature(on, args, args) == runs.run_signature(off, args, args)
    assert "fused_lora" not in runs.run_signature(on, args, args)["model"]
