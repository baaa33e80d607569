"""Collation of CODI examples: padding (left for the questions, right for the rest) and masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..losses import IGNORE_INDEX


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    longest = max(len(sequence) for sequence in sequences)
    rows = []
    for sequence in sequences:
        padding = [value] * (longest - len(sequence))
        rows.append(padding + list(sequence) if side == "left" else list(sequence) + padding)
    return torch.tensor(rows, dtype=torch.long)


def attention_mask_for(sequences: Sequence[Sequence[int]], side: str) -> torch.Tensor:
    return pad_sequences([[1] * len(sequence) for sequence in sequences], 0, side)


@dataclass
class CODICollator:
    """Pads a list of features into a batch.

    Padding layout (why: the student appends latents and the decoder right after the question, so
    its question must end at the same column for every row):
      teacher_*  right-padded  (pad id / label -100 / mask 0 after the sequence)
      student_*  LEFT-padded   (Q ++ [bot] ends in the last column)
      decoder_*  right-padded  ([eot] ++ A ++ [eos] starts in the first column)
    Distillation positions are indices into the unpadded sequences, which right padding preserves.
      latent_step_labels  (only with step targets) right-padded with -100: (B, max steps, at least 1)
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        teacher = [feature["teacher_input_ids"] for feature in features]
        batch["teacher_input_ids"] = pad_sequences(teacher, self.pad_token_id, "right")
        batch["teacher_attention_mask"] = attention_mask_for(teacher, "right")
        batch["teacher_labels"] = pad_sequences(
            [f["teacher_labels"] for f in features], IGNORE_INDEX, "right"
        )
        batch["teacher_distill_pos"] = torch.tensor([f["teacher_distill_pos"] for f in features])
        if "student_input_ids" in features[0]:
            student = [feature["student_input_ids"] for feature in features]
            decoder = [feature["decoder_input_ids"] for feature in features]
            batch["student_input_ids"] = pad_sequences(student, self.pad_token_id, "left")
            batch["student_attention_mask"] = attention_mask_for(student, "left")
            batch["decoder_input_ids"] = pad_sequences(decoder, self.pad_token_id, "right")
            batch["decoder_attention_mask"] = attention_mask_for(decoder, "right")
            batch["decoder_labels"] = pad_sequences(decoder, IGNORE_INDEX, "right")
            batch["decoder_distill_pos"] = torch.tensor([f["decoder_distill_pos"] for f in features])
        if "step_value_ids" in features[0]:
            steps = [feature["step_value_ids"] for feature in features]
            batch["latent_step_labels"] = pad_sequences(steps + [[IGNORE_INDEX]], IGNORE_INDEX, "right")[:-1]
        return batch
