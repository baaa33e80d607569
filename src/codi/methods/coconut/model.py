"""Coconut's model (Hao et al. 2024, facebookresearch/coconut `coconut.py`) on the CODI model's pieces.

A continuous thought is the last-layer hidden state of the previous position, fed back as the next
input embedding, without projection (a CODI model with `use_prj=False`). Training runs

    question <bot> (left-padded) -> n thoughts, one forward each with the KV cache -> <eot> steps answer

and takes the mean next-token cross-entropy over the remaining steps and the answer (labels -100 on
the question, the markers and the thoughts). Rows of a batch may have different numbers of thoughts:
a row's extra thought steps are masked (attended by nothing, position ids not advanced), which makes
it the same computation as the reference's per-row sequences. Inference is `codi.inference.generate.generate`:
question <bot>, n thoughts, <eot>, greedy decoding, batched with the KV cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch
import torch.nn as nn

from ...io.checkpoint import CONFIG_NAME
from ...io.checkpoint_checks import read_settings
from ...losses import next_token_ce
from ...model import CODIModel
from .schedule import CoconutArguments

logger = logging.getLogger(__name__)

COCONUT_CONFIG_NAME = "coconut_config.json"
PAUSE_TOKEN = "<pause>"


def is_coconut_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COCONUT_CONFIG_NAME))


class CoconutModel(CODIModel):
    """A CODI model (no projection) with Coconut's training forward and its ablations' decoding."""

    def __init__(self, lm: nn.Module, tokenizer, args, base_vocab_rows: int, objective=None):
        super().__init__(lm, tokenizer, args, base_vocab_rows, objective)
        self.coconut = CoconutArguments()
        self.pause_id: int | None = None

    # ----------------------------------------------------------------------------------------------
    # Construction, saving, loading

    def configure(self, settings: CoconutArguments) -> CoconutModel:
        """Apply Coconut's settings: no projection (a CoT-SFT checkpoint carries an unused one), the
        inference thought count as the default, and the `<pause>` token for pause-as-thought."""
        self.coconut = settings
        self.prj = nn.Identity()
        latents = settings.inference_latents
        self.args = dataclasses.replace(self.args, use_prj=False, num_latent=latents)
        if settings.pause_as_thought:
            self.pause_id = self._add_pause_token()
        return self

    def _add_pause_token(self) -> int:
        if PAUSE_TOKEN not in self.tokenizer.get_vocab():
            self.tokenizer.add_tokens([PAUSE_TOKEN], special_tokens=True)
        embeddings = self.hf_model.get_input_embeddings()
        if len(self.tokenizer) > embeddings.weight.shape[0]:
            trainable = embeddings.weight.requires_grad
            self.hf_model.resize_token_embeddings(len(self.tokenizer))
            # resizing builds new (trainable) matrices; under LoRA the embeddings must stay frozen,
            # since only the added rows are saved
            for module in (self.hf_model.get_input_embeddings(), self.hf_model.get_output_embeddings()):
                if module is not None:
                    module.weight.requires_grad_(trainable)
        return self.tokenizer.convert_tokens_to_ids(PAUSE_TOKEN)

    def _save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """The CODI checkpoint folder plus `coconut_config.json` (the settings, for decoding), written
        before `codi_config.json`, which completes the folder."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, COCONUT_CONFIG_NAME), "w") as handle:
            json.dump({"format": "coconut", "settings": self.coconut.to_dict()}, handle, indent=2)
        super()._save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def _load_folder(cls, path: str, *args, **overrides) -> CoconutModel:
        """A Coconut checkpoint folder, or any CODI-format checkpoint (e.g. CoT-SFT) to start Coconut from
        (then call `configure`); `from_pretrained` (folder or hub id) comes here with the local folder."""
        settings = None
        if is_coconut_checkpoint(path):  # read before the model is built: a bad file fails at once
            settings = read_settings(os.path.join(path, COCONUT_CONFIG_NAME), CoconutArguments)
        model = super()._load_folder(path, *args, **overrides)
        if settings is not None:
            model.configure(settings)
            latents = {
                key: overrides[key] for key in ("num_latent", "inf_latent_iterations") if key in overrides
            }
            if latents:  # e.g. `codi eval --num_latent N` (inf_latent_iterations: the same)
                model.args = dataclasses.replace(model.args, **latents)
        return model.eval()

    # ----------------------------------------------------------------------------------------------
    # Training forward

    def continuous_logits(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        num_latent: torch.Tensor,
        suffix_ids: torch.Tensor,
        suffix_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, S, V) at the suffix positions of question <bot> [thoughts] suffix.

        prefix_*: (B, P) left-padded question + <bot>; num_latent: (B,) thoughts per row;
        suffix_*: (B, S) right-padded `<eot> steps answer`. Row i's thought j (< num_latent[i]) is the
        last hidden state at the position before it. The last thought is fed with the suffix in one
        call (it needs no state after it).
        """
        positions = (prefix_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.lm_step(self.embed(prefix_ids), prefix_mask, positions, None, all_logits=False)
        cache, mask, next_position = out.cache, prefix_mask, prefix_mask.long().sum(-1)
        hidden = out.hidden_states[-1][:, -1]
        steps = int(num_latent.max()) if num_latent.numel() else 0
        pending = pending_mask = None
        for step in range(steps):
            latent = self.project(hidden).unsqueeze(1)
            # rows with fewer thoughts: this step is padding, attended by nothing, at no new position
            active = (num_latent > step).to(mask.dtype).unsqueeze(1)
            if step == steps - 1:
                pending, pending_mask = latent, active
                break
            mask = torch.cat([mask, active], dim=1)
            out = self.lm_step(latent, mask, next_position.unsqueeze(1), cache, all_logits=False)
            cache, next_position = out.cache, next_position + active[:, 0].long()
            hidden = out.hidden_states[-1][:, -1]
        embeds, step_mask = self.embed(suffix_ids), suffix_mask
        if pending is not None:
            embeds = torch.cat([pending, embeds], dim=1)
            step_mask = torch.cat([pending_mask, suffix_mask], dim=1)
        positions = next_position.unsqueeze(1) + (step_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.lm_step(
            embeds,
            torch.cat([mask, step_mask], dim=1),
            positions,
            cache,
            all_logits=True,
            hidden_states=False,
        )
        return out.logits[:, 0 if pending is None else 1 :]

    def forward(
        self,
        labels: torch.Tensor,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        num_latent: torch.Tensor | None = None,
        suffix_ids: torch.Tensor | None = None,
        suffix_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mean next-token CE of a `CoconutCollator` batch (continuous thoughts, or token sequences for
        the pause-as-thought and w/o-thought ablations: one plain LM forward)."""
        if prefix_ids is not None:
            logits = self.continuous_logits(prefix_ids, prefix_mask, num_latent, suffix_ids, suffix_mask)
        else:
            lm = self._lm(None, attention_mask)
            logits = lm(
                inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, use_cache=False
            ).logits
        return {"loss": next_token_ce(logits, labels)}

    # ----------------------------------------------------------------------------------------------
    # Inference

    def encode_latents(self, input_ids, attention_mask, num_latent, *args, latent_transform=None, **kwargs):
        """CODI's latent loop; pause as thought feeds the `<pause>` embedding at every thought position
        (any `latent_transform` then applies to it), so `codi.inference.generate.generate` decodes it too."""
        if self.coconut.variant == "pause":
            pause_ids = torch.tensor([[self.pause_id]], device=input_ids.device)
            user_transform = latent_transform

            def latent_transform(step: int, latent: torch.Tensor) -> torch.Tensor:
                fed = self.embed(pause_ids)[:, 0].to(latent.dtype).expand_as(latent)
                return user_transform(step, fed) if user_transform is not None else fed

        return super().encode_latents(
            input_ids, attention_mask, num_latent, *args, latent_transform=latent_transform, **kwargs
        )

    def generate(self, questions, *, mode: str = "latent", **kwargs):
        """`codi.inference.generate.generate`; w/o thought decodes from the question alone (it was trained without
        markers or thoughts), whatever `mode` asks."""
        from ...inference.generate import generate

        if mode == "latent" and self.coconut.variant == "no_thoughts":
            kwargs.pop("num_latent", None)
            kwargs.pop("feed_answer_prompt", None)
            kwargs.pop("latent_transform", None)
            return generate(self, questions, mode="cot", **kwargs)
        return generate(self, questions, mode=mode, **kwargs)


def init_marker_embeddings(model: CoconutModel, text: str) -> None:
    """Set the `<bot>`, `<eot>` (and `<pause>`) rows of the input and output embeddings to the mean
    row of `text`'s tokens: the reference starts its new tokens from '<<' ("it helps stabilise")."""
    source_ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not source_ids:
        raise ValueError(f"init_markers_from {text!r} has no tokens in this tokenizer")
    targets = [model.bot_id, model.eot_id] + ([model.pause_id] if model.pause_id is not None else [])
    if model.is_lora and min(targets) < model.base_vocab_rows:
        # under LoRA only rows added to the base vocabulary are saved: an edited base row would be lost
        logger.warning("init_markers_from skipped: marker ids %s lie inside the base vocabulary", targets)
        return
    matrices = [model.hf_model.get_input_embeddings().weight]
    output = model.hf_model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with torch.no_grad():
        for matrix in matrices:
            matrix[targets] = matrix[source_ids].mean(0).expand(len(targets), -1)
        if model.special_token_embeddings is not None:
            model.special_token_embeddings.copy_(matrices[0][[model.bot_id, model.eot_id]].float())


def build_coconut_model(model_args, settings: CoconutArguments) -> tuple[CoconutModel, bool]:
    """The model to train and whether it continues a Coconut checkpoint.

    `model_name_or_path` may be a base LM (hub id / directory) or a CODI-format checkpoint, e.g. the
    CoT-SFT model that is Coconut's stage 0; a checkpoint brings its own model arguments.
    """
    path = model_args.model_name_or_path
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        logger.info("coconut: starting from the checkpoint %s (its own model arguments apply)", path)
        model = CoconutModel.from_pretrained(path)
        continuing = is_coconut_checkpoint(path)
    else:
        model = CoconutModel.from_base(dataclasses.replace(model_args, use_prj=False))
        continuing = False
    model.configure(settings)
    if settings.init_markers_from and not continuing and settings.variant != "no_thoughts":
        init_marker_embeddings(model, settings.init_markers_from)
    return model.train(), continuing
