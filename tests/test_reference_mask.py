"""reference_compat's question step masks its left-pad rows as transformers 4.52 with sdpa on CUDA did
(the authors' stack): a fully masked query row attends to every position of its row."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import RECORDS, batch_for
from transformers452 import first_forward_mask_452

from codi.reference import ReferencePolicy, question_step_mask


def _left_padded(lengths: list[int], width: int) -> torch.Tensor:
    return torch.stack([torch.arange(width) >= width - length for length in lengths]).long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_equals_the_452_cuda_rule_on_random_padding(dtype):
    generator = torch.Generator().manual_seed(0)
    compared = 0
    for _ in range(60):
        batch, width = (int(v) for v in torch.randint(1, 8, (2,), generator=generator))
        lengths = torch.randint(1, width + 1, (batch,), generator=generator).tolist()
        left = _left_padded(lengths, width)
        holes = (torch.rand(batch, width, generator=generator) < 0.6).long()  # pads anywhere, even all
        for mask in (left, left.flip(-1), holes):
            expected = first_forward_mask_452(mask, dtype)
            got = question_step_mask(mask, dtype)
            assert got.dtype == dtype and got.shape == (batch, 1, width, width)
            if expected is None:  # nothing padded: 4.52 passed no mask, and the model keeps the 2-D one
                assert bool(mask.all())
                continue
            assert torch.equal(got, expected), (mask, got, expected)
            compared += 1
    assert compared > 100


def test_a_left_pad_row_attends_to_every_position():
    low = torch.finfo(torch.float32).min
    rows = question_step_mask(_left_padded([2], 4), torch.float32)[0, 0]
    assert rows.tolist() == [[0.0] * 4, [0.0] * 4, [low, low, 0.0, low], [low, low, 0.0, 0.0]]
    # 4.52 on CPU did not apply the rule (its pad rows then averaged every position)
    cpu = first_forward_mask_452(_left_padded([2], 4), torch.float32, device_type="cpu")[0, 0]
    assert cpu[:2].eq(low).all() and torch.equal(cpu[2:], rows[2:])


def _capture_first_call(model):
    """Forward hook on the LM (a hooked model runs on transformers' forward, not codi's layer stack):
    the first call's attention mask and hidden states."""
    seen = {}

    def hook(module, args, kwargs, output):
        if not seen:
            seen["mask"] = kwargs["attention_mask"]
            seen["hidden"] = output.hidden_states
        return output

    return seen, model.hf_model.register_forward_hook(hook, with_kwargs=True)


def _question_step(model, records=RECORDS):
    batch = batch_for(model, records)
    seen, handle = _capture_first_call(model)
    with torch.no_grad():
        model.encode_latents(batch["student_input_ids"], batch["student_attention_mask"], 2)
    handle.remove()
    return batch, seen


def test_compat_question_step_receives_the_452_cuda_mask(make_model):
    compat = make_model("gpt2", reference_compat=True)
    assert compat.policy.unmask_fully_masked_rows
    batch, seen = _question_step(compat)
    expected = first_forward_mask_452(batch["student_attention_mask"], torch.float32)
    assert expected is not None and seen["mask"].dim() == 4
    assert torch.equal(seen["mask"], expected)
    # an unpadded batch: 4.52 passed no mask (sdpa's is_causal); the 2-D mask means the same here
    batch, seen = _question_step(compat, RECORDS[:1])
    assert seen["mask"] is batch["student_attention_mask"]
    # the default path is untouched: the 2-D padding mask, as before
    default = make_model("gpt2")
    assert not default.policy.unmask_fully_masked_rows
    batch, seen = _question_step(default)
    assert seen["mask"] is batch["student_attention_mask"]
    assert ReferencePolicy.from_flags(True, fix_attn_mask=True).unmask_fully_masked_rows


def _redraw(model, std: float = 0.5):
    """Large weights: attention far from uniform, so that the attention rules tell apart."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, std, generator=generator)
    return model


def test_pad_row_attends_to_every_position_of_its_row(make_model):
    """Layer 1 of a pad row, computed by hand with attention over ALL positions of the row (eager GPT-2)."""
    model = _redraw(make_model("gpt2", reference_compat=True, attn_implementation="eager"))
    batch, seen = _question_step(model)
    mask = batch["student_attention_mask"]
    row = int(mask.sum(-1).argmin())  # the shortest question: the most pads
    pads = int((mask[row] == 0).sum())
    assert pads >= 2
    block = model.hf_model.transformer.h[0]
    x = seen["hidden"][0][row]  # (L, d): embeddings + positions
    attn = block.attn
    with torch.no_grad():
        q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=-1)
        heads = lambda t: t.view(t.shape[0], attn.num_heads, attn.head_dim).transpose(0, 1)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(-1, -2) * attn.scaling  # (H, L, L)

        def layer_one(weights):
            mixed = (weights @ v).transpose(0, 1).reshape(x.shape[0], -1)
            h = x + attn.c_proj(mixed)
            return h + block.mlp(block.ln_2(h))

        every_position = layer_one(scores.softmax(-1))
        uniform = layer_one(torch.full_like(scores, 1.0 / x.shape[0]))  # 4.52 on CPU
    got = seen["hidden"][1][row]
    torch.testing.assert_close(got[:pads], every_position[:pads], rtol=1e-5, atol=1e-5)
    assert (got[:pads] - uniform[:pads]).abs().max() > 1e-2  # the rules differ on these weights
    # rows with a token keep causal + padding attention
    length = x.shape[0]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & mask[row].bool()
    causal = scores.masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(got[pads:], layer_one(causal.softmax(-1))[pads:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sdpa_and_eager_take_the_4d_mask_alike(make_model, arch):
    """transformers 5 passes the prepared 4-D mask through to both kernels: the same latents (which
    attend to the pad rows' keys and values) from sdpa and eager, far from those without the rule."""

    def latents(model):
        batch = batch_for(model)
        with torch.no_grad():
            prefix = model.encode_latents(batch["student_input_ids"], batch["student_attention_mask"], 3)
        return torch.stack(prefix.latents)

    sdpa, eager = (
        _redraw(make_model(arch, reference_compat=True, attn_implementation=kernel))
        for kernel in ("sdpa", "eager")
    )
    with_rule = latents(sdpa)
    # large weights amplify rounding: |latent| ~ 3, kernels differ by ~3e-4, the rules by ~0.3-3
    torch.testing.assert_close(with_rule, latents(eager), rtol=1e-3, atol=2e-3)
    without = copy.copy(sdpa)
    without.policy = replace(sdpa.policy, unmask_fully_masked_rows=False)
    assert (with_rule - latents(without)).abs().max() > 0.1
