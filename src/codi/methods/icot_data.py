"""iCoT-SI data: CoT tokens removed from collated teacher batches (see `codi.methods.icot`).

The removal happens per batch, in the training process (not in data-loader workers), so that the count
of the current step and the seeded offsets apply to every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.dataset import IGNORE_INDEX, CODICollator, CODIDataset


def drop_cot_tokens(
    ids: list[int], labels: list[int], cot_start: int, cot_length: int, count: float, side: str = "left"
) -> tuple[list[int], list[int], int]:
    """Remove min(count, cot_length) CoT tokens from one teacher sequence `Q ++ CoT ++ A ++ eos`
    (`cot_start` = len(Q)): the first ones (side "left") or the last ones ("right").

    Returns the shorter ids and labels and the number of tokens removed.
    """
    removed = int(min(count, cot_length))
    low = cot_start if side == "left" else cot_start + cot_length - removed
    high = low + removed
    return ids[:low] + ids[high:], labels[:low] + labels[high:], removed


def remove_from_batch(batch: dict, counts: torch.Tensor, side: str, pad_id: int) -> tuple[dict, bool]:
    """`drop_cot_tokens` on every row of a collated ICoT batch (see `ICoTCollator`).

    counts: (B,) tokens to remove per row (float; inf = all). Returns the batch re-padded on the right
    without the `cot_*` keys, and whether every row lost its whole CoT.
    """
    lengths = batch["teacher_attention_mask"].sum(-1).tolist()
    ids_rows = batch["teacher_input_ids"].tolist()
    label_rows = batch["teacher_labels"].tolist()
    starts, cot_lengths = batch["cot_start"].tolist(), batch["cot_length"].tolist()
    new_ids, new_labels, removed = [], [], []
    for row, length in enumerate(lengths):
        ids, labels, count = drop_cot_tokens(
            ids_rows[row][:length],
            label_rows[row][:length],
            starts[row],
            cot_lengths[row],
            float(counts[row]),
            side,
        )
        new_ids.append(ids)
        new_labels.append(labels)
        removed.append(count)
    out = {key: value for key, value in batch.items() if not key.startswith(("teacher_", "cot_"))}
    out.update(_pad_teacher(new_ids, new_labels, pad_id, batch["teacher_input_ids"].device))
    distill_pos = batch["teacher_distill_pos"]
    out["teacher_distill_pos"] = distill_pos - torch.tensor(removed, device=distill_pos.device)
    return out, all(count == total for count, total in zip(removed, cot_lengths))


def _pad_teacher(ids: list[list[int]], labels: list[list[int]], pad_id: int, device) -> dict:
    longest = max(len(row) for row in ids)
    pad = [longest - len(row) for row in ids]
    return {
        "teacher_input_ids": torch.tensor([r + [pad_id] * p for r, p in zip(ids, pad)], device=device),
        "teacher_attention_mask": torch.tensor(
            [[1] * len(r) + [0] * p for r, p in zip(ids, pad)], device=device
        ),
        "teacher_labels": torch.tensor([r + [IGNORE_INDEX] * p for r, p in zip(labels, pad)], device=device),
    }


def drop_long_rows(batch: dict, max_len: int) -> dict:
    """Rows longer than `max_len` leave the batch (the shortest row stays if all are too long), and the
    columns only padding is left in are cut."""
    lengths = batch["teacher_attention_mask"].sum(-1)
    keep = lengths <= max_len
    if bool(keep.all()):
        return batch
    if not bool(keep.any()):
        keep = lengths == lengths.min()
        keep &= keep.cumsum(0) == 1  # one row
    width = int(lengths[keep].max())
    return {
        key: (value[keep][:, :width] if key.startswith("teacher_") and value.dim() == 2 else value[keep])
        for key, value in batch.items()
    }


class ICoTDataset(CODIDataset):
    """CoT-SFT examples whose features also say where each CoT starts and how long it is."""

    def __init__(self, examples):
        super().__init__(examples, method="cot_sft")

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        features = example.as_features("cot_sft")
        features["cot_start"] = len(example.question_ids)
        features["cot_length"] = len(example.cot_ids)
        return features


@dataclass
class ICoTCollator(CODICollator):
    """`CODICollator` plus `cot_start` and `cot_length` (B,) for the removal, which happens per batch."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        batch["cot_start"] = torch.tensor([feature["cot_start"] for feature in features])
        batch["cot_length"] = torch.tensor([feature["cot_length"] for feature in features])
        return batch
