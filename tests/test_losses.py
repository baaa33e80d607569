"""codi.losses against values computed by hand (docs/method.md#losses)."""

from __future__ import annotations

import math

import pytest
import torch

from codi.data.dataset import IGNORE_INDEX
from codi.losses import (
    combine_losses,
    distillation_loss,
    gather_positions,
    latent_step_ce,
    next_token_ce,
    pointwise_distance,
)

# Differences chosen to hit both branches of smooth-L1 (|d| < 1 and |d| >= 1) and a zero.
TEACHER = torch.tensor([[1.0, 3.0], [1.0, 3.0]])
DIFF = torch.tensor([[0.5, 2.0], [-3.0, 0.0]])
STUDENT = TEACHER + DIFF
# smooth-L1 (beta 1): 0.5*0.5^2=0.125, 2-0.5=1.5, 3-0.5=2.5, 0 -> mean 4.125/4
SMOOTH_L1 = 4.125 / 4
L1 = (0.5 + 2.0 + 3.0 + 0.0) / 4
L2 = (0.25 + 4.0 + 9.0 + 0.0) / 4
# Unbiased std of the teacher entries {1, 3, 1, 3}: mean 2, squared deviations 4 * 1, / (4 - 1).
TEACHER_STD = math.sqrt(4.0 / 3.0)


@pytest.mark.parametrize(("loss_type", "expected"), [("smooth_l1", SMOOTH_L1), ("l1", L1), ("l2", L2)])
def test_pointwise_distance_by_hand(loss_type, expected):
    assert pointwise_distance(STUDENT, TEACHER, loss_type).item() == pytest.approx(expected, abs=1e-7)


def test_pointwise_distance_unknown_type():
    with pytest.raises(ValueError, match="smooth_l1 \\| l1 \\| l2"):
        pointwise_distance(STUDENT, TEACHER, "huber")


@pytest.mark.parametrize(("loss_type", "expected"), [("smooth_l1", SMOOTH_L1), ("l1", L1), ("l2", L2)])
def test_distillation_averages_layers_and_divides_by_teacher_std(loss_type, expected):
    # Layer 2 has the same differences around a teacher with a different spread (std of {0, 4, 0, 4}).
    teacher2 = torch.tensor([[0.0, 4.0], [0.0, 4.0]])
    std2 = math.sqrt(4 * 4.0 / 3.0)
    student = [STUDENT, teacher2 + DIFF]
    teacher = [TEACHER, teacher2]

    plain = distillation_loss(student, teacher, loss_type, div_std=False)
    assert plain.loss.item() == pytest.approx(expected, abs=1e-6)  # mean of two equal layers
    assert plain.per_layer.tolist() == pytest.approx([expected, expected], abs=1e-6)

    divided = distillation_loss(student, teacher, loss_type, div_std=True)
    assert divided.per_layer.tolist() == pytest.approx([expected / TEACHER_STD, expected / std2], abs=1e-6)
    assert divided.loss.item() == pytest.approx((expected / TEACHER_STD + expected / std2) / 2, abs=1e-6)


def test_l2_std_twice_reproduces_the_reference_bug_only_for_l2():
    twice = distillation_loss([STUDENT], [TEACHER], "l2", div_std=True, l2_std_twice=True)
    assert twice.loss.item() == pytest.approx(L2 / TEACHER_STD**2, abs=1e-6)
    once = distillation_loss([STUDENT], [TEACHER], "smooth_l1", div_std=True, l2_std_twice=True)
    assert once.loss.item() == pytest.approx(SMOOTH_L1 / TEACHER_STD, abs=1e-6)
    # Without div_std there is nothing to divide twice.
    none = distillation_loss([STUDENT], [TEACHER], "l2", div_std=False, l2_std_twice=True)
    assert none.loss.item() == pytest.approx(L2, abs=1e-6)


def test_distillation_layer_count_mismatch():
    with pytest.raises(ValueError, match="2 student layers but 1 teacher"):
        distillation_loss([STUDENT, STUDENT], [TEACHER])


def test_distillation_target_carries_no_gradient():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)  # a caller that forgot to detach
    distillation_loss([student], [teacher], "l2", div_std=True).loss.backward()
    assert teacher.grad is None
    # d/ds mean((s - t)^2) / std = 2 (s - t) / (n * std), with std a constant
    assert torch.allclose(student.grad, 2 * DIFF / (4 * TEACHER_STD), atol=1e-6)


def test_next_token_ce_is_normalised_over_counted_tokens_of_the_batch():
    # V = 2. Logits [log 3, 0] give p = (3/4, 1/4); logits [0, 0] give p = (1/2, 1/2).
    a, b = [math.log(3.0), 0.0], [0.0, 0.0]
    logits = torch.tensor([[a, b, a, b], [b, a, b, b]])
    labels = torch.tensor(
        [
            [IGNORE_INDEX, 1, 0, IGNORE_INDEX],  # position t predicts labels[t+1]
            [IGNORE_INDEX, 0, 1, 1],
        ]
    )
    # Row 0: t=0 (a) -> 1: -log 1/4; t=1 (b) -> 0: log 2; t=2 (a) -> ignored.
    # Row 1: t=0 (b) -> 0: log 2; t=1 (a) -> 1: -log 1/4; t=2 (b) -> 1: log 2.
    terms = [math.log(4), math.log(2), math.log(2), math.log(4), math.log(2)]
    expected = sum(terms) / len(terms)  # one mean over 5 tokens, not a mean of row means
    assert next_token_ce(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    row_means = ((math.log(4) + math.log(2)) / 2 + (2 * math.log(2) + math.log(4)) / 3) / 2
    assert expected != pytest.approx(row_means)


def test_next_token_ce_upcasts_half_precision_logits():
    logits = torch.zeros(1, 3, 5, dtype=torch.bfloat16)
    loss = next_token_ce(logits, torch.tensor([[0, 1, 2]]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(5), abs=1e-6)


def test_gather_positions_takes_each_rows_own_position():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    picked = gather_positions(hidden, torch.tensor([2, 0]))
    assert picked.tolist() == [[4.0, 5.0], [6.0, 7.0]]


def test_combine_losses_total_with_factors():
    s, t, d = torch.tensor(1.5), torch.tensor(0.25), torch.tensor(0.125)
    out = combine_losses(s, t, d, distill_loss_factor=20.0, ref_loss_factor=0.5)
    assert out.total.item() == pytest.approx(1.5 + 20 * 0.125 + 0.5 * 0.25)
    assert (out.student_ce, out.teacher_ce, out.distill) == (1.5, 0.25, 0.125)
    default = combine_losses(s, t, d)
    assert default.total.item() == pytest.approx(1.5 + 0.125 + 0.25)
    with_step = combine_losses(s, t, d, latent_step=torch.tensor(2.0), latent_step_loss_factor=0.5)
    assert with_step.total.item() == pytest.approx(1.5 + 0.125 + 0.25 + 0.5 * 2.0)
    assert with_step.latent_step == 2.0


def test_latent_step_ce_pairs_state_k_with_step_k_by_hand():
    # 2 rows, 3 latent states over a vocabulary of 2; row 0 has 2 steps, row 1 has 4 (the 4th has no
    # state to pair with and is not counted), row 1's 2nd step is padding.
    logits = torch.tensor(
        [
            [[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]],
            [[0.0, math.log(3.0)], [9.0, 9.0], [0.0, 0.0]],
        ]
    )
    labels = torch.tensor([[0, 0, IGNORE_INDEX, IGNORE_INDEX], [1, IGNORE_INDEX, 0, 1]])
    # counted pairs: (0,0)->label 0: -log(1/2); (0,1)->0: -log(3/4); (1,0)->1: -log(3/4); (1,2)->0: -log(1/2)
    expected = (2 * math.log(2.0) + 2 * -math.log(0.75)) / 4
    assert latent_step_ce(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_latent_step_ce_without_any_counted_step_is_zero_and_keeps_the_graph():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = latent_step_ce(logits, torch.full((2, 1), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not logits.grad.any()
