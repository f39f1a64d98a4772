"""HSAD / task-KD losses and the MimiQDistiller on tiny real mmdet/mmseg models (CPU)."""
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from mimiq_mm.losses.hsad import contrast_structure, hsad_layer_loss, hsad_loss
from mimiq_mm.losses.task_kd import (feature_kd_loss, kl_div_with_temperature,
                                     roi_bbox_kd_loss, roi_mask_kd_loss, rpn_kd_loss,
                                     sigmoid_kd_loss)


@dataclass
class _Rec:  # same fields as mimiq_mm.attention.AttentionRecord
    name: str
    logits: Optional[torch.Tensor]
    output: torch.Tensor
    num_prefix_tokens: int = 0
    grid: Optional[tuple] = None


def _plain_hsad_layer(t, s, c2=0.03 ** 2):
    """Loop-based reference: per (sample, head, channel) over tokens, population stats."""
    bsz, heads, n, d = t.shape
    vals = []
    for b in range(bsz):
        for h in range(heads):
            for c in range(d):
                x = [float(v) for v in t[b, h, :, c]]
                y = [float(v) for v in s[b, h, :, c]]
                mx, my = sum(x) / n, sum(y) / n
                vx = sum((a - mx) ** 2 for a in x) / n
                vy = sum((a - my) ** 2 for a in y) / n
                cov = sum((a - mx) * (b_ - my) for a, b_ in zip(x, y)) / n
                vals.append((2 * cov + c2) / (vx + vy + c2))
    return 1.0 - sum(vals) / len(vals)


def test_hsad_matches_plain_implementation():
    g = torch.Generator().manual_seed(0)
    t1, s1 = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    # ViT-like layer with one class token that must be dropped
    t2, s2 = torch.randn(1, 2, 6, 3, generator=g), torch.randn(1, 2, 6, 3, generator=g)
    teacher = [_Rec('a', None, t1), _Rec('b', None, t2, num_prefix_tokens=1)]
    student = [_Rec('a', None, s1), _Rec('b', None, s2, num_prefix_tokens=1)]
    expected = (_plain_hsad_layer(t1, s1) + _plain_hsad_layer(t2[:, :, 1:], s2[:, :, 1:])) / 2
    got = hsad_loss(teacher, student)
    assert math.isclose(float(got), expected, rel_tol=1e-5, abs_tol=1e-6)
    # alternatives
    mse = hsad_loss(teacher, student, kind='mse')
    ref_mse = (torch.mean((t1 - s1) ** 2) + torch.mean((t2[:, :, 1:] - s2[:, :, 1:]) ** 2)) / 2
    assert torch.allclose(mse, ref_mse)
    l1 = hsad_loss(teacher, student, kind='l1')
    ref_l1 = ((t1 - s1).abs().mean() + (t2[:, :, 1:] - s2[:, :, 1:]).abs().mean()) / 2
    assert torch.allclose(l1, ref_l1)


def test_hsad_zero_for_identical_and_gradient_flows_to_student_only():
    t = torch.randn(4, 2, 49, 8)
    recs = [_Rec('layer', None, t)]
    assert float(hsad_loss(recs, [_Rec('layer', None, t.clone())])) == pytest.approx(0, abs=1e-6)
    s = (t + 0.5 * torch.randn_like(t)).requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    loss = hsad_loss([_Rec('layer', None, tt)], [_Rec('layer', None, s)])
    assert float(loss) > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert tt.grad is None
    # contrast-structure ignores a shift of the student map, but not a change of contrast
    cs = contrast_structure(t, t + 1, dim=2, c2=0.0)
    assert torch.allclose(cs, torch.ones_like(cs), atol=1e-5)
    cs = contrast_structure(t, 3 * t, dim=2, c2=0.0)
    assert torch.allclose(cs, torch.full_like(cs, 0.6), atol=1e-5)


def test_hsad_errors():
    t = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match='kind'):
        hsad_loss([_Rec('a', None, t)], [_Rec('a', None, t)], kind='cosine')
    with pytest.raises(ValueError, match='unmatched'):
        hsad_loss([_Rec('a', None, t)], [_Rec('b', None, t)])
    with pytest.raises(ValueError, match='No attention records'):
        hsad_loss([], [])
    with pytest.raises(ValueError, match='shape'):
        hsad_layer_loss(t, torch.randn(1, 2, 5, 3))


def test_task_kd_losses_zero_when_equal_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    f = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    assert float(feature_kd_loss(f, [x.clone() for x in f])) == 0
    assert float(feature_kd_loss(f, [x + 1 for x in f], kind='norm_mse')) > 0
    seg = torch.randn(2, 5, 8, 8, generator=g)
    assert float(kl_div_with_temperature(seg, seg.clone(), 2.0)) == pytest.approx(0, abs=1e-6)
    # per-pixel KL with T: compare against torch's kl_div
    s = torch.randn(2, 5, 8, 8, generator=g)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.softmax(seg / 2, 1),
                                     reduction='none').sum(1).mean() * 4
    assert torch.allclose(kl_div_with_temperature(seg, s, 2.0), ref, atol=1e-6)
    logit = torch.randn(10, generator=g)
    assert float(sigmoid_kd_loss(logit, logit.clone())) == pytest.approx(0, abs=1e-6)
    assert float(sigmoid_kd_loss(logit, logit + 1)) > 0
    cls = [torch.randn(1, 3, 4, 4, generator=g)]
    reg = [torch.randn(1, 12, 4, 4, generator=g)]
    lc, lr = rpn_kd_loss(cls, reg, [c.clone() for c in cls], [r.clone() for r in reg])
    assert float(lc) == pytest.approx(0, abs=1e-6) and float(lr) == 0
    lc, lr = rpn_kd_loss(cls, reg, [c + 1 for c in cls], [r + 1 for r in reg])
    assert float(lc) > 0 and float(lr) > 0
    rc, rr = torch.randn(6, 4, generator=g), torch.randn(6, 12, generator=g)
    bc, br = roi_bbox_kd_loss(rc, rr, rc + torch.randn(6, 4, generator=g), rr + 1)
    assert float(bc) > 0 and float(br) > 0
    masks = torch.randn(6, 3, 7, 7, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert float(roi_mask_kd_loss(masks, masks.clone(), labels)) == pytest.approx(0, abs=1e-6)
    assert float(roi_mask_kd_loss(masks, masks - 1, labels)) > 0
