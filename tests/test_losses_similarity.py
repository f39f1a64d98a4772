"""L_sim (inter-head SSIM), its SSIM matrix, and the L2 TV prior against plain references."""
import math
from dataclasses import dataclass

import pytest
import torch

from mimiq_mm.losses.attention_similarity import (SSIM_C1, SSIM_C2, attention_ssim_matrix,
                                                  inter_head_similarity_loss,
                                                  mean_inter_head_ssim)
from mimiq_mm.losses.tv import total_variation_l2


@dataclass
class _Rec:
    logits: torch.Tensor
    num_prefix_tokens: int = 0


def _loop_ssim(a, b):
    """Global-statistics SSIM of two 1-D maps, written out with Python loops."""
    n = len(a)
    mu_a = sum(a) / n
    mu_b = sum(b) / n
    var_a = sum((v - mu_a) ** 2 for v in a) / n
    var_b = sum((v - mu_b) ** 2 for v in b) / n
    cov = sum((u - mu_a) * (v - mu_b) for u, v in zip(a, b)) / n
    return ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
            / ((mu_a ** 2 + mu_b ** 2 + SSIM_C1) * (var_a + var_b + SSIM_C2)))


def _loop_normalise(row):
    low, high = min(row), max(row)
    return [(v - low) / (high - low) for v in row]


def _loop_loss(records):
    layer_losses = []
    for rec in records:
        p = rec.num_prefix_tokens
        logits = rec.logits[:, :, p:, p:].tolist()
        terms = []
        for per_b in logits:
            heads = len(per_b)
            for q in range(len(per_b[0])):
                for i in range(heads):
                    for j in range(i + 1, heads):
                        s = _loop_ssim(_loop_normalise(per_b[i][q]), _loop_normalise(per_b[j][q]))
                        terms.append(1 - s ** 2)
        layer_losses.append(sum(terms) / len(terms))
    return sum(layer_losses) / len(layer_losses)


def test_lsim_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    records = [_Rec(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64) * 3),
               _Rec(torch.randn(1, 4, 7, 7, generator=g, dtype=torch.float64), 1),
               _Rec(torch.randn(3, 2, 4, 6, generator=g, dtype=torch.float64))]
    got = inter_head_similarity_loss(records)
    assert got.item() == pytest.approx(_loop_loss(records), rel=1e-5, abs=1e-6)


def test_lsim_chunked_equals_unchunked_with_gradients():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 4, 9, 9, generator=g)
    x1 = base.clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    full = inter_head_similarity_loss([x1])
    chunked = inter_head_similarity_loss([x2], max_chunk_elements=2 * 4 * 9 * 2)
    torch.testing.assert_close(full, chunked)
    full.backward()
    chunked.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_lsim_zero_for_identical_heads_positive_otherwise():
    g = torch.Generator().manual_seed(2)
    one_head = torch.randn(2, 1, 6, 6, generator=g)
    same = one_head.expand(2, 4, 6, 6).contiguous()
    # affine transforms of a row (positive scale) do not change its min-max normalisation
    same[:, 1] = same[:, 1] * 3.0 + 2.0
    assert inter_head_similarity_loss([same]).item() == pytest.approx(0.0, abs=1e-6)
    different = torch.randn(2, 4, 6, 6, generator=g)
    assert inter_head_similarity_loss([different]).item() > 0.05


def test_lsim_drops_prefix_tokens_and_has_gradient():
    g = torch.Generator().manual_seed(3)
    body = torch.randn(1, 1, 4, 4, generator=g).expand(1, 3, 4, 4)
    logits = torch.randn(1, 3, 5, 5, generator=g)
    logits[:, :, 1:, 1:] = body
    assert inter_head_similarity_loss([_Rec(logits, 1)]).item() == pytest.approx(0, abs=1e-6)
    assert inter_head_similarity_loss([_Rec(logits, 0)]).item() > 0
    x = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    inter_head_similarity_loss([x]).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ssim_matrix_shape_symmetry_and_report():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    m = attention_ssim_matrix(logits, num_prefix_tokens=1)
    assert m.shape == (2, 5, 3, 3)
    torch.testing.assert_close(m, m.transpose(-1, -2))
    torch.testing.assert_close(torch.diagonal(m, dim1=-2, dim2=-1), torch.ones(2, 5, 3))
    iu = torch.triu_indices(3, 3, 1)
    assert mean_inter_head_ssim([_Rec(logits, 1)]) == pytest.approx(
        m[..., iu[0], iu[1]].mean().item(), rel=1e-6)


def test_lsim_errors():
    with pytest.raises(ValueError, match='AttentionRecorder'):
        inter_head_similarity_loss([])
    with pytest.raises(ValueError, match='at least 2'):
        inter_head_similarity_loss([torch.randn(1, 1, 3, 3)])
    with pytest.raises(ValueError, match=r'\(B, H, Nq, Nk\)'):
        inter_head_similarity_loss([torch.randn(3, 3, 3)])


def test_tv_matches_hand_computation():
    x = torch.tensor([[[[0., 1.], [3., 7.]]]])
    # horizontal: 1, 4 -> ||.|| = sqrt(17); vertical: 3, 6 -> sqrt(45)
    # down-right: 7 -> 7; down-left: 3 - 1 = 2 -> 2; diagonals weighted 1/sqrt(2)
    expected = math.sqrt(17) + math.sqrt(45) + (7 + 2) / math.sqrt(2)
    assert total_variation_l2(x).item() == pytest.approx(expected, rel=1e-6)
    expected_mean = (1 + 16) / 2 + (9 + 36) / 2 + (49 + 4) / math.sqrt(2)
    assert total_variation_l2(x, reduction='mean').item() == pytest.approx(expected_mean, rel=1e-6)
    assert total_variation_l2(torch.full((2, 3, 5, 4), 0.3)).item() == 0
    with pytest.raises(ValueError, match='reduction'):
        total_variation_l2(x, reduction='sum')


def test_lsim_masked_keys_map_to_zero_and_stay_finite():
    """Swin's -100 shift mask and -inf masks: masked keys are 0 and do not set the row min."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:3, 3:] = True
    mask[3:, :3] = True
    reference = logits.clone()
    visible_min = logits.masked_fill(mask, float('inf')).amin(-1, keepdim=True)
    reference = torch.where(mask, visible_min.expand_as(reference), reference)
    expected = _loop_loss([_Rec(reference)])
    for fill in (-100.0, float('-inf')):
        masked = (logits + torch.zeros_like(logits).masked_fill(mask, fill)).requires_grad_(True)
        loss = inter_head_similarity_loss([masked])
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        loss.backward()
        assert torch.isfinite(masked.grad).all()
