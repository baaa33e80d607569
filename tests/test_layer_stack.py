"""codi's layer stack (`codi.layer_stack`) against transformers' forward, which stays the reference:
the same logits, hidden states, caches and gradients (fp32, 1e-5), with LoRA on its low-rank and on
its merged path, with dropout on (on the CPU the masks are peft's own draws), and through every
method's training forward and greedy decoding."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from conftest import batch_for
from peft import LoraConfig, get_peft_model
from test_coconut import coconut_model, records_for

from codi.layer_stack import LayerStack, StackCache
from codi.methods.coconut import CoconutArguments
from codi.methods.coconut.data import CoconutCollator, CoconutDataset, MarkerIds
from codi.testing import make_model as make_lm

TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _lm(arch: str, rank: int | None, dropout: float = 0.0):
    """A tiny LM (width 32); `rank` None: full fine-tuning; 4: the low-rank path; 64: the merged one."""
    lm = make_lm(arch, 100, hidden=32, layers=3, heads=4)
    if rank is not None:
        config = LoraConfig(
            r=rank,
            lora_alpha=16,
            lora_dropout=dropout,
            target_modules=TARGETS[arch],
            fan_in_fan_out=arch == "gpt2",
            init_lora_weights=False,  # B != 0: the adapters change the outputs
        )
        lm = _peft(lm, config)
    return lm.train()


def _peft(lm, config):
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(lm, config).get_base_model()


def _three_calls(run, lm):
    """A right-padded first call, then a left-padded continuation with position ids, then one token:
    (outputs at real positions, gradients of every trainable parameter)."""
    generator = torch.Generator().manual_seed(1)
    embeds = [torch.randn(3, length, 32, generator=generator) for length in (7, 3, 1)]
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 6:] = 0
    lm.zero_grad()
    torch.manual_seed(5)
    first = run(inputs_embeds=embeds[0], attention_mask=mask, use_cache=True, output_hidden_states=True)
    mask = torch.cat([mask, torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])], dim=1)
    positions = torch.tensor([[5, 5, 6], [6, 7, 8], [7, 7, 7]])
    second = run(
        inputs_embeds=embeds[1],
        attention_mask=mask,
        position_ids=positions,
        cache=first.cache,
        use_cache=True,
    )
    mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    third = run(
        inputs_embeds=embeds[2],
        attention_mask=mask,
        position_ids=positions[:, -1:] + 1,
        cache=second.cache,
        logits_to_keep=1,
        output_hidden_states=True,
    )
    real = mask[:, :7].bool()
    outputs = [first.logits[real], second.logits[:, 1:], third.logits]
    outputs += [state[real] for state in first.hidden_states] + list(third.hidden_states)
    sum((out.float() ** 2).mean() for out in outputs).backward()
    grads = {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}
    return [out.detach() for out in outputs], grads


def _close(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    """|a - b| <= 1e-5 of the tensor's scale (fp32 rounding of sums taken in another order)."""
    assert a.shape == b.shape, name
    error, scale = float((a - b).abs().max()), max(1.0, float(b.abs().max()))
    assert error <= 1e-5 * scale, f"{name}: max |diff| {error:.3g} at scale {scale:.3g}"


def _assert_close(ours, theirs):
    (out_a, grads_a), (out_b, grads_b) = ours, theirs
    assert len(out_a) == len(out_b)
    for index, (a, b) in enumerate(zip(out_a, out_b)):
        _close(a, b, f"output {index}")
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        _close(grads_a[name], grads_b[name], name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rank, dropout", [(None, 0.0), (4, 0.0), (4, 0.1), (64, 0.0), (64, 0.1)])
def test_stack_equals_transformers_values_caches_and_gradients(arch, rank, dropout):
    """Padding on both sides, per-row position ids, a cache continued twice, `logits_to_keep`; with
    dropout on, the same seed gives the same masks (the stack draws them as peft does on the CPU)."""
    lm = _lm(arch, rank, dropout)
    stack = LayerStack.build(lm)
    assert stack is not None and stack.active
    _assert_close(_three_calls(stack, lm), _three_calls(lm, lm))


def test_gpt2_with_all_its_dropouts_draws_as_transformers():
    """Pretrained GPT-2 trains with embedding, attention and residual dropout 0.1 besides LoRA's: the
    stack applies each where transformers does, in the same order, so the same seed gives the same
    outputs and gradients."""
    lm = _lm("gpt2", 4, 0.1)
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    stack = LayerStack.build(lm)
    _assert_close(_three_calls(stack, lm), _three_calls(lm, lm))


def test_repeated_key_value_heads_equal_grouped_attention(monkeypatch):
    """Where the fused kernel cannot group heads (CUDA with a mask), the stack repeats them: the same
    values and gradients as the grouped call (forced here on the CPU)."""
    import codi.layer_stack as layer_stack

    lm = _lm("llama", 4)
    stack = LayerStack.build(lm)
    assert stack.kv_heads != stack.heads
    grouped = _three_calls(stack, lm)
    monkeypatch.setattr(layer_stack, "gqa_kernel", lambda device_type, mask: False)
    _assert_close(_three_calls(stack, lm), grouped)


def test_stack_cache_crops_like_a_dynamic_cache():
    lm = _lm("llama", 4).eval()
    stack = LayerStack.build(lm)
    with torch.no_grad():
        ours = stack(inputs_embeds=torch.randn(2, 6, 32)).cache
    assert isinstance(ours, StackCache) and ours.get_seq_length() == 6
    ours.crop(-2)
    assert ours.get_seq_length() == 4 and all(k.shape[2] == 4 for k in ours.keys + ours.values)
    ours.crop(3)
    assert ours.get_seq_length() == 3


def test_what_the_stack_does_not_reproduce_goes_to_transformers(make_model):
    """Other architectures or adapter kinds: no stack. A 4-D mask, adapters in another dtype, a forward
    hook on the model or a layer (it must still fire), a re-classed or replaced layer (how FSDP and DeepSpeed ZeRO-3 gather sharded weights) or
    activation checkpointing: the call goes to transformers' model."""
    dora = _peft(
        make_lm("llama", 100, hidden=32, layers=1, heads=4),
        LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True),
    )
    assert LayerStack.build(dora) is None
    assert LayerStack.build(torch.nn.Linear(2, 2)) is None
    model = make_model("llama")
    assert model._lm(None, torch.ones(2, 1, 3, 3)) is model.hf_model
    assert model._lm(None, torch.ones(2, 3)) is model.stack
    assert model.with_settings(args=replace(model.args, layer_stack=False)).stack is None
    adapter = model.stack.layers[0].qkv.projections[0].lora.lora_A["default"]
    adapter.to(torch.float64)  # peft casts between dtypes; the stack does not
    assert not model.stack.active and model._lm(None, None) is model.hf_model
    adapter.to(torch.float32)
    assert model.stack.active
    with torch.no_grad():  # transformers keeps its own output-recording hooks on the layers after this
        model.hf_model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert model.stack.active  # ... which the stack does not bypass
    layer = model.hf_model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda module, args: None)  # as DeepSpeed ZeRO-3, FSDP2
    assert not model.stack.active and model._lm(None, None) is model.hf_model
    handle.remove()
    handle = model.hf_model.register_forward_hook(lambda module, args, output: None)  # a user's probe
    assert not model.stack.active
    handle.remove()
    layer.__class__ = type("FSDPLlamaDecoderLayer", (type(layer),), {})  # as fully_shard re-classes it
    assert not model.stack.active
    layer.__class__ = type(layer).__mro__[1]
    model.hf_model.model.layers[0] = torch.nn.Sequential(layer)  # as an FSDP1 wrapper replaces it
    assert not model.stack.active
    model.hf_model.model.layers[0] = layer
    assert model.stack.active
    model.hf_model.activation_checkpointing_enable()
    assert not model.stack.active and model._lm(None, None) is model.hf_model


def _loss_and_grads(model, batch, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**batch)
    out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {key: value.detach() for key, value in out.items()}, grads


def _assert_paths_equal(model, batch):
    transformers_path = model.with_settings(args=replace(model.args, layer_stack=False))
    assert model.stack is not None and transformers_path.stack is None
    (losses_a, grads_a), (losses_b, grads_b) = (
        _loss_and_grads(model, batch),
        _loss_and_grads(transformers_path, batch),
    )
    assert losses_a.keys() == losses_b.keys()
    for key in losses_a:
        _close(losses_a[key], losses_b[key], key)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        _close(grads_a[name], grads_b[name], name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "overrides, share",
    [({}, True), ({}, False), ({"lora_r": 64}, True), ({"use_lora": False}, True)],
)
def test_codi_training_forward_is_the_same_on_the_stack(make_model, arch, overrides, share):
    """Every loss component and the gradient of every trainable parameter, in training mode (LoRA
    dropout 0.1, the same seed), with step supervision on."""
    model = make_model(arch, share_question=share, loss={"latent_step_loss_factor": 1.0}, **overrides).train()
    _assert_paths_equal(model, batch_for(model, step_targets=True))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_autocast_training_forward_is_close_on_the_stack(make_model, arch):
    """As the Trainer's `--bf16` runs it: fp32 weights under bf16 autocast, LoRA dropout on, the same
    seed. Both paths compute in bf16, so they agree to bf16 rounding (measured: losses within 1.4e-3,
    gradients within 1.1e-3 of their scale), not to fp32's."""
    model = make_model(arch, lora_dropout=0.2, loss={"latent_step_loss_factor": 1.0}).train()
    with torch.no_grad():  # LoRA B starts at zero (then A gets no gradient): random adapters
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    batch = batch_for(model, step_targets=True)
    transformers_path = model.with_settings(args=replace(model.args, layer_stack=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (losses_a, grads_a), (losses_b, grads_b) = (
            _loss_and_grads(model, batch),
            _loss_and_grads(transformers_path, batch),
        )
    for key in losses_b:
        assert float(losses_a[key]) == pytest.approx(float(losses_b[key]), rel=5e-3, abs=1e-4), key
    assert grads_a.keys() == grads_b.keys() and grads_b
    for name in grads_b:
        assert grads_a[name].dtype == torch.float32, name
        scale = max(1.0, float(grads_b[name].abs().max()))
        assert float((grads_a[name] - grads_b[name]).abs().max()) <= 5e-3 * scale, name


def test_a_training_forward_on_the_stack_reads_nothing_back(make_model):
    """No host-device sync: not in the mask (transformers checks once per call whether it is all
    ones), not in the losses."""
    from test_step_ops import _ScalarReads

    model = make_model("llama", loss={"latent_step_loss_factor": 0.5, "distill_loss_div_std": True})
    batch = batch_for(model, step_targets=True)
    with _ScalarReads() as reads:
        model(**batch)
    assert reads.count == 0


@pytest.mark.parametrize("method", ["cot_sft", "no_cot"])
def test_teacher_only_methods_are_the_same_on_the_stack(make_model, method):
    model = make_model("llama", method=method).train()
    _assert_paths_equal(model, batch_for(model, method=method))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_coconut_training_forward_is_the_same_on_the_stack(tiny_dirs, arch):
    """In float64: this test model's large weights (std 0.3) amplify fp32 rounding through the thoughts
    to ~3e-5 of the gradients' scale; in float64 the two paths agree to ~1e-14."""
    settings = CoconutArguments(c_thought=2, max_latent_stage=3, pad_latent_to_max=False)
    model = coconut_model(tiny_dirs[arch], settings).train().double()
    dataset = CoconutDataset(
        records_for(model), settings, MarkerIds(model.bot_id, model.eot_id, model.pause_id)
    )
    stages = [0, 2, 1, 4]
    dataset.stage_of = lambda index: stages[index]
    _assert_paths_equal(model, CoconutCollator(model.pad_id)([dataset[i] for i in range(len(stages))]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["latent", "cot"])
def test_greedy_tokens_are_the_same_on_the_stack(make_model, arch, mode):
    model = make_model(arch)
    transformers_path = model.with_settings(args=replace(model.args, layer_stack=False))
    questions = ["Tom has 3 apples and buys 4 more. How many?", "2 + 2 = ?", "What is 6 times 7?"]
    settings = dict(mode=mode, max_new_tokens=12, fast_decoding="off")
    ours, theirs = model.generate(questions, **settings), transformers_path.generate(questions, **settings)
    assert [out.token_ids for out in ours] == [out.token_ids for out in theirs]
