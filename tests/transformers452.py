"""The attention mask transformers 4.52.4 built for the first forward of a batch, re-implemented literally.

The CODI authors trained and evaluated on transformers 4.52.4 with sdpa on CUDA. Written from a reading
of the 4.52.4 wheel (tests only; the project never imports 4.52):
- src/transformers/models/llama/modeling_llama.py, `LlamaModel._update_causal_mask` and
  `LlamaModel._prepare_4d_causal_attention_mask_with_cache_position` (GPT-2's are marked "copied from
  LlamaModel" in src/transformers/models/gpt2/modeling_gpt2.py);
- src/transformers/modeling_attn_mask_utils.py, `AttentionMaskConverter._ignore_causal_mask_sdpa` and
  `AttentionMaskConverter._unmask_unattended`.
The steps and their order are those of that code, so that a mismatch with `codi.reference` shows.
"""

from __future__ import annotations

import torch


def unmask_unattended_452(expanded_mask: torch.Tensor, min_dtype: float) -> torch.Tensor:
    """`AttentionMaskConverter._unmask_unattended`: a row whose entries all equal `min_dtype` is
    multiplied by 0 (it then attends to everything); other rows are multiplied by 1."""
    if expanded_mask.dtype == torch.bool:
        raise ValueError("_unmask_unattended expects a float mask")
    fully_masked = torch.all(expanded_mask == min_dtype, dim=-1, keepdim=True)
    return expanded_mask.mul(~fully_masked)


def first_forward_mask_452(
    attention_mask: torch.Tensor, dtype: torch.dtype, device_type: str = "cuda"
) -> torch.Tensor | None:
    """What 4.52's `_update_causal_mask` handed to sdpa for a forward without a cache.

    attention_mask (B, L) of 0/1 -> None (no padding: sdpa's `is_causal` instead) or (B, 1, L, L).
    `device_type` "cuda" (also "xpu", "npu") applies `_unmask_unattended`; "cpu" does not.
    """
    batch_size, target_length = attention_mask.shape
    sequence_length = target_length  # no cache: the queries are the keys
    # _ignore_causal_mask_sdpa: a 2-D mask of ones with query length == key length -> no mask at all
    if torch.all(attention_mask == 1):
        return None
    # _prepare_4d_causal_attention_mask_with_cache_position
    cache_position = torch.arange(0, sequence_length)
    min_dtype = torch.finfo(dtype).min
    causal_mask = torch.full((sequence_length, target_length), fill_value=min_dtype, dtype=dtype)
    if sequence_length != 1:
        causal_mask = torch.triu(causal_mask, diagonal=1)
    causal_mask *= torch.arange(target_length) > cache_position.reshape(-1, 1)
    causal_mask = causal_mask[None, None, :, :].expand(batch_size, 1, -1, -1).clone()
    mask_length = attention_mask.shape[-1]
    summed = causal_mask[:, :, :, :mask_length] + attention_mask[:, None, None, :]
    causal_mask[:, :, :, :mask_length] = causal_mask[:, :, :, :mask_length].masked_fill(
        summed == 0, min_dtype
    )
    # back in _update_causal_mask: sdpa, a mask was given, the tensors on cuda/xpu/npu
    if device_type in ("cuda", "xpu", "npu"):
        causal_mask = unmask_unattended_452(causal_mask, min_dtype)
    return causal_mask
