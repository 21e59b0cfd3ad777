"""The training losses against their definitions (ASL paper / official code, CE with smoothing)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ramcli_train import losses


def approx(v):
    return pytest.approx(v, rel=1e-5)


def _asl_by_hand(x: float, y: int, gamma_neg=7.0, clip=0.05) -> float:
    p = 1 / (1 + math.exp(-x))
    if y == 1:
        return -math.log(max(p, 1e-8))
    q = min(1 - p + clip, 1.0)
    return -math.log(max(q, 1e-8)) * (1 - q) ** gamma_neg


def test_asl_matches_the_formula_element_by_element_and_is_summed():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    expected = sum(_asl_by_hand(logits[i, j].item(), int(targets[i, j])) for i in range(2) for j in range(3))
    assert losses.asymmetric_loss(logits, targets).item() == approx(expected)
    doubled = losses.asymmetric_loss(torch.cat([logits, logits]), torch.cat([targets, targets]))
    assert doubled.item() == approx(2 * expected)


def test_asl_clip_discards_easy_negatives_and_focusing_weight_has_no_gradient():
    x = torch.tensor([[-4.0]], requires_grad=True)  # p = 0.018 < clip: no loss, no gradient
    losses.asymmetric_loss(x, torch.zeros(1, 1)).backward()
    assert x.grad.item() == 0.0
    x = torch.tensor([[1.0]], requires_grad=True)
    losses.asymmetric_loss(x, torch.zeros(1, 1)).backward()
    p = torch.sigmoid(torch.tensor(1.0))
    q = 1 - p + 0.05
    # d/dx of -log(q) * w with w held constant: w * p(1-p)/q
    assert x.grad.item() == approx(((1 - q) ** 7 * p * (1 - p) / q).item())


def test_lm_loss_ignores_masked_positions_and_smooths():
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 10]])
    base = losses.lm_loss(logits, targets)
    changed = logits.clone()
    changed[0, 0] += 100.0  # a prompt / padding position
    assert losses.lm_loss(changed, targets).item() == approx(base.item())
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep], label_smoothing=0.1)
    assert base.item() == approx(manual.item())
    assert base.item() > F.cross_entropy(logits[keep], targets[keep]).item() - 1.0


def test_official_weighting_rescales_the_tag_loss_to_the_lm_loss():
    tag = torch.tensor(300.0, requires_grad=True)
    lm = torch.tensor(3.0, requires_grad=True)
    dis = torch.tensor(0.5, requires_grad=True)
    total = losses.combine({"tag": tag, "lm": lm, "dis": dis})
    assert total.item() == approx(3.0 + 3.0 + 0.5)
    total.backward()
    assert tag.grad.item() == approx(3.0 / 300.0)  # 1 / (tag/lm)
    assert lm.grad.item() == 1.0 and dis.grad.item() == 1.0
    plus = losses.combine({"tag": torch.tensor(10.0), "dis": torch.tensor(1.0), "align": torch.tensor(2.0)})
    assert plus.item() == 13.0


def test_alignment_loss_takes_the_diagonal_as_positives():
    good = torch.full((3, 3), -5.0).fill_diagonal_(5.0)
    bad = torch.full((3, 3), 5.0).fill_diagonal_(-5.0)
    assert losses.alignment_loss(good) < 0.1 < losses.alignment_loss(bad)


def test_distillation_is_mean_absolute_error():
    a, b = torch.zeros(2, 512), torch.ones(2, 512) * 0.5
    assert losses.distillation_loss(a, b).item() == approx(0.5)


def test_pooled_tag_loss_is_summed_bce_of_the_dot_products_and_added_by_combine():
    pooled = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    class_embeds = torch.tensor([[3.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logits = [[3.0, 0.0, 1.0], [0.0, -2.0, 2.0]]
    by_hand = sum(-math.log(1 / (1 + math.exp(-x))) if y else -math.log(1 - 1 / (1 + math.exp(-x)))
                  for row, ys in zip(logits, targets.tolist()) for x, y in zip(row, ys))
    assert losses.pooled_tag_loss(pooled, class_embeds, targets).item() == approx(by_hand)
    total = losses.combine({"tag": torch.tensor(10.0), "pooled_tag": torch.tensor(4.0)})
    assert total.item() == 14.0
