"""Coconut (Hao et al. 2024): continuous thoughts fed back as input embeddings, a stage curriculum.

`CoconutTrainer(model=..., args=CoconutConfig(...), train_dataset=...)` (`codi train --method coconut`); decoding: `CoconutModel.generate` (same outputs as
CODI's `codi.inference.generate.generate`); checkpoints: `CoconutModel.from_pretrained` (or `codi.load`, which picks it for a Coconut checkpoint).
"""

from .data import (
    CoconutCollator,
    CoconutDataset,
    CoconutRecord,
    MarkerIds,
    RecordIndices,
    loss_targets,
    stage_features,
    tokenize_records,
)
from .model import (
    CoconutModel,
    build_coconut_model,
    init_marker_embeddings,
    is_coconut_checkpoint,
)
from .schedule import CoconutArguments, record_stage, stage_for_epoch, stage_for_step, stage_plan
from .training import CoconutConfig, CoconutTrainer, CurriculumCallback, train_coconut

__all__ = [
    "CoconutArguments",
    "CoconutCollator",
    "CoconutConfig",
    "CoconutDataset",
    "CoconutModel",
    "CoconutRecord",
    "CoconutTrainer",
    "CurriculumCallback",
    "MarkerIds",
    "RecordIndices",
    "build_coconut_model",
    "init_marker_embeddings",
    "is_coconut_checkpoint",
    "loss_targets",
    "record_stage",
    "stage_features",
    "stage_for_epoch",
    "stage_for_step",
    "stage_plan",
    "tokenize_records",
    "train_coconut",
]
