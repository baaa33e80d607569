"""CODI: one causal LM that is both the chain-of-thought teacher and the latent-thought student.

The method, step by step (docs/method.md), and where each step lives:

    teacher pass     Q ++ CoT ++ A ++ [eos], CE on CoT and answer      teacher_forward, forward
    student prefix   Q ++ [bot], then num_latent latent thoughts:       encode_latents (the latent loop:
                     latent = prj(last hidden state), fed back as        _feed_latents)
                     the next input embedding
    student answer   [eot] ++ A ++ [eos] after the latents, CE          decode_step
    distillation     student vs. teacher hidden states (every layer)    forward -> losses.distillation_loss
                     at the token that predicts the answer value
    total loss       student CE + beta * distill + gamma * teacher CE   losses.combine_losses

`CODIModel` wraps any Hugging Face causal LM (optionally LoRA-wrapped by peft) plus the projection MLP,
and touches the LM only through public API (`get_input_embeddings`, `hidden_states`, `cache`). Loading
is in `codi.io.hf`, checkpoints in `codi.io.checkpoint`, decoding in `codi.inference.generate`.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import torch
import torch.nn as nn

from .config import CODIModelArguments
from .io.checkpoint import CheckpointMixin
from .io.hf import add_special_tokens, build_lm
from .latent import LatentPrefix, LatentTransform, build_projection
from .layer_stack import LayerStack, StackCache, build_stack
from .losses import (
    TrainingObjective,
    combine_losses,
    distillation_loss,
    gather_layer_positions,
    latent_step_ce,
    next_token_ce,
)
from .reference import ReferencePolicy, question_step_mask


class CODIModel(CheckpointMixin, nn.Module):
    """Teacher and student in one LM, plus the latent projection."""

    # The HF Trainer must divide the loss by the accumulation steps itself (see Trainer.training_step).
    accepts_loss_kwargs = False

    def __init__(
        self,
        lm: nn.Module,
        tokenizer,
        args: CODIModelArguments,
        base_vocab_rows: int,
        objective: TrainingObjective | None = None,
    ):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        hidden_size = self.hf_model.get_input_embeddings().weight.shape[1]
        if args.prj_dim is None:  # the default follows the model: its hidden size (codi.config)
            args = dataclasses.replace(args, prj_dim=hidden_size)
        self.args = args
        self.base_vocab_rows = base_vocab_rows
        self.objective = objective or TrainingObjective()
        self.policy = ReferencePolicy.from_flags(args.reference_compat, args.fix_attn_mask)
        self.pad_id, self.bot_id, self.eot_id = add_special_tokens(tokenizer)
        self.prj = build_projection(hidden_size, args)
        self.stack = build_stack(self.hf_model, args.layer_stack, args.compile_layers)
        self.special_token_embeddings = None
        if args.train_special_token_embeddings:
            rows = self.hf_model.get_input_embeddings().weight[[self.bot_id, self.eot_id]]
            self.special_token_embeddings = nn.Parameter(rows.detach().clone().float())

    @classmethod
    def from_base(cls, args: CODIModelArguments, objective: TrainingObjective | None = None) -> CODIModel:
        """A fresh CODI model on top of a pretrained causal LM (hub id, local directory or GGUF)."""
        tokenizer, lm, base_rows = build_lm(args)
        return cls(lm, tokenizer, args, base_rows, objective)

    def with_settings(
        self, objective: TrainingObjective | None = None, args: CODIModelArguments | None = None
    ) -> CODIModel:
        """A view sharing every weight with this model that trains or decodes under another objective or
        other model arguments (e.g. `reference_compat`): benchmarks and equivalence tests compare paths
        on the same weights without switching settings on a live model."""
        view = copy.copy(self)  # shallow: the same sub-modules and parameters
        if objective is not None:
            view.objective = objective
        if args is not None:
            view.args = args
            if (args.layer_stack, args.compile_layers) != (self.args.layer_stack, self.args.compile_layers):
                view.stack = build_stack(self.hf_model, args.layer_stack, args.compile_layers)
            view.policy = ReferencePolicy.from_flags(args.reference_compat, args.fix_attn_mask)
        return view

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (with LoRA layers injected when peft wraps it)."""
        get_base = getattr(self.lm, "get_base_model", None)
        return get_base() if callable(get_base) else self.lm

    @property
    def is_lora(self) -> bool:
        return hasattr(self.lm, "peft_config")

    # ----------------------------------------------------------------------------------------------
    # Building blocks shared by training, generation and probing

    @property
    def device(self) -> torch.device:
        return self.hf_model.get_input_embeddings().weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; the trainable `<bot>`/`<eot>` rows replace the frozen ones when enabled."""
        embeds = self.hf_model.get_input_embeddings()(input_ids)
        if self.special_token_embeddings is not None:
            special = self.special_token_embeddings.to(embeds.dtype)
            embeds = torch.where((input_ids == self.bot_id).unsqueeze(-1), special[0], embeds)
            embeds = torch.where((input_ids == self.eot_id).unsqueeze(-1), special[1], embeds)
        return embeds

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Latent thought from a last-layer state: prj(h), cast to the embedding dtype."""
        dtype = self.hf_model.get_input_embeddings().weight.dtype
        if isinstance(self.prj, nn.Identity):
            return hidden.to(dtype)
        return self.prj(hidden.to(self.prj[1].weight.dtype)).to(dtype)

    def _lm(self, cache, mask) -> nn.Module | LayerStack:
        """What runs the LM: codi's layer stack where it applies (docs/speed.md), else transformers'
        model, always under the reference policy (it reproduces transformers' own behaviour). A call
        continues on the kind of cache it was given (`cache` None: a new one)."""
        stack = self.stack
        if (
            stack is None
            or self.policy.is_reference
            or not stack.active
            or (mask is not None and mask.dim() != 2)
        ):
            return self.hf_model
        return stack if cache is None or isinstance(cache, StackCache) else self.hf_model

    def lm_step(
        self,
        embeds,
        mask,
        positions,
        cache,
        *,
        all_logits: bool = False,
        hidden_states: bool = True,
        last_logits_only: bool = False,
    ):
        """One forward of the LM over `embeds` (B, T, d) continuing `cache` (None: a new one), through
        codi's layer stack where it applies, else transformers' model (`_lm`).

        Logits: all positions, the last only (`last_logits_only`: the LM head is a large share of a
        decoding step), or none.
        """
        if last_logits_only:
            keep = 1
        else:
            keep = 0 if all_logits else torch.empty(0, dtype=torch.long, device=embeds.device)
        return self._lm(cache, mask)(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            output_hidden_states=hidden_states,
            logits_to_keep=keep,
        )

    def encode_latents(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_latent: int,
        keep_hidden: bool = False,
        defer_last: bool = True,
        keep_all_layers: bool = False,
        latent_transform: LatentTransform | None = None,
    ) -> LatentPrefix:
        """Run `Q ++ [bot]` (left-padded) and feed exactly `num_latent` latent thoughts.

        With `defer_last` (default mode only) the last latent is returned as `pending` and fed together
        with the decoder tokens, which saves one forward call. With `keep_hidden` (and not deferred)
        `prefix.hidden` holds num_latent + 1 states: after `<bot>` and after each latent. With
        the reference policy, its latents are fed as the reference feeds them, and the question step's
        pad rows are masked as transformers 4.52 on CUDA masked them (`codi.reference`).
        `keep_all_layers` (with `keep_hidden`) also fills `prefix.all_hidden` (logit lens).
        `latent_transform(step, latent)` replaces each projected latent (B, d) before it is fed
        (interventions, latent sampling); `step` counts from 0 (the latent made from `<bot>`).
        """
        positions = None
        if not self.policy.default_position_ids:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        embeds = self.embed(input_ids)
        step_mask = attention_mask
        # 4.52 with sdpa dropped the mask of an unpadded batch (is_causal): the 2-D mask reproduces that
        if self.policy.unmask_fully_masked_rows and not bool(attention_mask.all()):
            step_mask = question_step_mask(attention_mask, embeds.dtype)
        out = self.lm_step(embeds, step_mask, positions, None, all_logits=False)
        prefix = LatentPrefix(
            cache=out.cache,
            attention_mask=attention_mask,
            next_position=attention_mask.long().sum(-1),
            pending=None,
        )
        return self._feed_latents(
            prefix, out, num_latent, keep_hidden, defer_last, keep_all_layers, latent_transform
        )

    def encode_latents_after_question(
        self,
        question_cache,
        student_input_ids: torch.Tensor,
        student_attention_mask: torch.Tensor,
        num_latent: int,
        keep_hidden: bool = False,
    ) -> LatentPrefix:
        """Like `encode_latents` on the student's left-padded `Q ++ [bot]` (B, Lq + 1), but the question's
        keys/values come from `question_cache`, whose first Lq columns hold the same questions
        RIGHT-padded: the teacher's cache, since every teacher sequence starts with its question. The
        cache is cropped to Lq in place.

        Under causal attention the keys/values of a question do not depend on what follows it, and the
        positions (question 0..q-1, `<bot>` at q) and the attended set (masked pads) are those of
        `encode_latents`, so the result is the same up to float rounding, at the cost of one position per
        row instead of Lq + 1. Default policy only (not the reference's). Shapes only: no host sync.
        """
        if self.policy.is_reference:
            raise ValueError("encode_latents_after_question reproduces the default path only")
        question_columns = student_input_ids.shape[1] - 1
        lengths = student_attention_mask.long().sum(-1) - 1
        columns = torch.arange(question_columns, device=lengths.device).unsqueeze(0)
        question_mask = (columns < lengths.unsqueeze(1)).to(student_attention_mask.dtype)
        # `crop(-n)` drops the last n columns (transformers >= 5.24 semantics)
        question_cache.crop(-(question_cache.get_seq_length() - question_columns))
        mask = torch.cat([question_mask, question_mask.new_ones(question_mask.shape[0], 1)], dim=1)
        bot_ids = student_input_ids[:, -1:]
        out = self.lm_step(self.embed(bot_ids), mask, lengths.unsqueeze(1), question_cache, all_logits=False)
        prefix = LatentPrefix(cache=out.cache, attention_mask=mask, next_position=lengths + 1, pending=None)
        return self._feed_latents(prefix, out, num_latent, keep_hidden, True, False)

    def _feed_latents(
        self,
        prefix: LatentPrefix,
        out,
        num_latent: int,
        keep_hidden: bool,
        defer_last: bool,
        keep_all_layers: bool,
        latent_transform: LatentTransform | None = None,
    ) -> LatentPrefix:
        """The latent loop after `<bot>` (`out` is the LM output whose last position is `<bot>`)."""
        policy = self.policy
        defer = defer_last and not policy.separate_last_latent
        last_hidden = out.hidden_states[-1][:, -1]
        attention_mask = prefix.attention_mask
        ones = attention_mask.new_ones(attention_mask.shape[0], 1)
        for step in range(num_latent):
            if keep_hidden:
                _keep_state(prefix, out, keep_all_layers)
            latent = self.project(last_hidden)
            if latent_transform is not None:
                latent = latent_transform(step, latent)
            latent = latent.unsqueeze(1)
            prefix.latents.append(latent[:, 0])
            if defer and step == num_latent - 1:
                prefix.pending = latent
                break
            step_mask = torch.cat([prefix.attention_mask, ones], dim=1)
            out = self.lm_step(
                latent,
                None if policy.unmasked_latents else step_mask,
                None if policy.default_position_ids else prefix.next_position.unsqueeze(1),
                prefix.cache,
                all_logits=False,
            )
            prefix.cache, prefix.attention_mask = out.cache, step_mask
            prefix.next_position = prefix.next_position + 1
            last_hidden = out.hidden_states[-1][:, -1]
        else:
            if keep_hidden:
                _keep_state(prefix, out, keep_all_layers)
        return prefix

    def decode_step(
        self,
        prefix: LatentPrefix,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        hidden_states: bool = True,
        last_logits_only: bool = False,
    ):
        """Feed decoder tokens (B, T) after the prefix (and its pending latent); returns the LM output.

        When a latent was pending its output comes first, so decoder token t is at output index t+1
        (the `offset` in `forward`). The prefix is advanced in place. `last_logits_only`: logits of the last
        position only (greedy decoding needs no more).
        """
        embeds = self.embed(input_ids)
        mask = input_mask
        if prefix.pending is not None:
            embeds = torch.cat([prefix.pending, embeds], dim=1)
            mask = torch.cat([input_mask.new_ones(input_mask.shape[0], 1), input_mask], dim=1)
        full_mask = torch.cat([prefix.attention_mask, mask], dim=1)
        positions = None
        if not self.policy.default_position_ids:
            positions = prefix.next_position.unsqueeze(1) + (mask.long().cumsum(-1) - 1).clamp(min=0)
        step_mask = None if self.policy.unmasked_decoder else full_mask
        out = self.lm_step(
            embeds,
            step_mask,
            positions,
            prefix.cache,
            all_logits=True,
            hidden_states=hidden_states,
            last_logits_only=last_logits_only,
        )
        prefix.cache, prefix.attention_mask = out.cache, full_mask
        prefix.next_position = prefix.next_position + mask.long().sum(-1)
        prefix.pending = None
        return out

    # ----------------------------------------------------------------------------------------------
    # Training forward

    def teacher_forward(self, input_ids, attention_mask, use_cache: bool = False):
        """Teacher (CoT) forward; `use_cache` also returns its keys/values (to share the question)."""
        return self._lm(None, attention_mask)(
            inputs_embeds=self.embed(input_ids),
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=use_cache,
        )

    def forward(
        self,
        teacher_input_ids: torch.Tensor,
        teacher_attention_mask: torch.Tensor,
        teacher_labels: torch.Tensor,
        teacher_distill_pos: torch.Tensor,
        student_input_ids: torch.Tensor | None = None,
        student_attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_labels: torch.Tensor | None = None,
        decoder_distill_pos: torch.Tensor | None = None,
        latent_step_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss of one batch (see `CODICollator` for the layout); returns total and components."""
        objective = self.objective
        share = objective.share_question and objective.method == "codi" and not self.policy.is_reference
        # 1. teacher pass: CE on CoT and answer; its hidden states are the distillation targets
        teacher = self.teacher_forward(teacher_input_ids, teacher_attention_mask, use_cache=share)
        teacher_ce = next_token_ce(teacher.logits, teacher_labels)
        if objective.method != "codi":
            zero = teacher_ce.new_zeros(())  # the baselines train the teacher pass alone
            return {
                "loss": teacher_ce,
                "teacher_ce": teacher_ce.detach(),
                "student_ce": zero,
                "distill_loss": zero,
            }
        target_states = teacher.hidden_states
        if self.policy.second_teacher_forward:
            with torch.no_grad():
                target_states = self.teacher_forward(teacher_input_ids, teacher_attention_mask).hidden_states
        teacher_vectors = gather_layer_positions(target_states, teacher_distill_pos).detach()
        step_supervision = objective.loss.latent_step_loss_factor > 0
        if step_supervision and latent_step_labels is None:
            raise ValueError(
                "latent_step_loss_factor > 0 needs batches with latent_step_labels "
                "(build the dataset with step_targets=True)"
            )
        # 2. student prefix: Q ++ [bot] and the latent thoughts
        encode = partial(self.encode_latents_after_question, teacher.cache) if share else self.encode_latents
        prefix = encode(
            student_input_ids, student_attention_mask, self.args.num_latent, keep_hidden=step_supervision
        )
        # 3. student answer: [eot] ++ A ++ [eos] (after the pending last latent, when there is one)
        offset = 1 if prefix.pending is not None else 0
        student = self.decode_step(prefix, decoder_input_ids, decoder_attention_mask)
        student_ce = next_token_ce(student.logits[:, offset:], decoder_labels)
        latent_step = (
            self._latent_step_loss(prefix, student, offset, latent_step_labels) if step_supervision else None
        )
        # 4. distillation at the position that predicts the answer value, then the total
        student_vectors = gather_layer_positions(student.hidden_states, decoder_distill_pos + offset)
        loss = objective.loss
        distill = distillation_loss(
            student_vectors,
            teacher_vectors,
            loss.distill_loss_type,
            loss.distill_loss_div_std,
            l2_std_twice=self.policy.l2_divided_by_std_twice,
        )
        losses = combine_losses(
            student_ce,
            teacher_ce,
            distill.loss,
            loss.distill_loss_factor,
            loss.ref_loss_factor,
            latent_step,
            loss.latent_step_loss_factor,
        )
        outputs = {
            "loss": losses.total,
            "student_ce": student_ce,
            "teacher_ce": teacher_ce,
            "distill_loss": distill.loss,
        }
        if latent_step is not None:
            outputs["latent_step_ce"] = latent_step
        return {key: value if key == "loss" else value.detach() for key, value in outputs.items()}

    def _latent_step_loss(
        self, prefix: LatentPrefix, student, offset: int, labels: torch.Tensor
    ) -> torch.Tensor:
        """The optional step supervision (docs/method.md#step-supervision): the LM head on the states at
        <bot> and after each latent; the last one is the pending latent's output (offset 1) if any."""
        states = prefix.hidden + ([student.hidden_states[-1][:, 0]] if offset else [])
        head = self.hf_model.get_output_embeddings()
        return latent_step_ce(head(torch.stack(states, dim=1)), labels)

    # ----------------------------------------------------------------------------------------------
    # Inference

    def generate(self, questions, **kwargs):
        """Answer questions with latent reasoning (or `mode="cot"`); see `codi.inference.generate.generate`."""
        from .inference.generate import generate

        return generate(self, questions, **kwargs)


def _keep_state(prefix: LatentPrefix, out, all_layers: bool) -> None:
    """Record the last position's last-layer state of `out` (and every layer's, for the logit lens)."""
    prefix.hidden.append(out.hidden_states[-1][:, -1])
    if all_layers:
        prefix.all_hidden.append(tuple(h[:, -1] for h in out.hidden_states))
