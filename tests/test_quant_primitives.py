"""Pure fake-quant primitives against torch's reference ops (atol=0) and their gradients."""
import math

import pytest
import torch

from mimiq_mm.quant.primitives import (RoundSTE, choose_qparams, fake_quantize_affine,
                                       fake_quantize_affine_fused, fake_quantize_log,
                                       lsq_fake_quantize, lsq_fake_quantize_reference,
                                       lsq_grad_scale, lsq_init_step, quant_range, round_ste,
                                       scale_grad, tensor_min_max)

BITS = list(range(2, 9))


def _data(seed=0, shape=(16, 37)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0
    x[0, 0] = 40.0  # an outlier, so that clamping is exercised with clipped ranges
    return x


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('signed', [True, False])
def test_per_tensor_matches_torch_exactly(bits, symmetric, signed):
    x = _data(bits)
    qmin, qmax = quant_range(bits, signed)
    lo, hi = tensor_min_max(x)
    for shrink in (1.0, 0.3):  # exact range and a clipped one
        scale, zp = choose_qparams(lo * shrink, hi * shrink, qmin, qmax, symmetric)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), qmin, qmax)
        out = fake_quantize_affine(x, scale, zp, qmin, qmax)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('axis', [0, 1])
def test_per_channel_matches_torch_exactly(bits, symmetric, axis):
    x = _data(10 + bits, shape=(6, 5, 3, 3))
    qmin, qmax = quant_range(bits, signed=symmetric)
    lo, hi = tensor_min_max(x, axis)
    assert lo.shape == (x.shape[axis],)
    scale, zp = choose_qparams(lo * 0.7, hi * 0.7, qmin, qmax, symmetric)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), axis, qmin, qmax)
    out = fake_quantize_affine(x, scale, zp, qmin, qmax, axis=axis)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_quant_range_and_bad_bits():
    assert quant_range(4, signed=True) == (-8, 7)
    assert quant_range(4, signed=False) == (0, 15)
    assert quant_range(8, signed=True) == (-128, 127)
    with pytest.raises(ValueError, match=r'bits must be in \[2, 8\]'):
        quant_range(9, signed=True)
    with pytest.raises(ValueError, match='bits must be in'):
        quant_range(1, signed=False)


def test_round_ste_is_half_to_even_with_identity_gradient():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0]
    (y * torch.arange(6.0)).sum().backward()
    assert x.grad.tolist() == list(range(6))
    assert RoundSTE.apply is not None and round_ste.__name__ == 'round_ste'


def test_fake_quant_ste_gradient_passes_inside_range_only():
    scale, zp = torch.tensor(0.5), torch.tensor(0.0)
    x = torch.tensor([-10.0, -1.2, 0.1, 1.3, 3.4, 10.0], requires_grad=True)
    fake_quantize_affine(x, scale, zp, -8, 7).sum().backward()
    # representable range is [-4, 3.5]; clamped values get no gradient, 3.4 -> code 7
    # (the top of the grid) is inside, as in torch's fake-quant backward
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    x_ref = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x_ref, 0.5, 0, -8, 7).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_choose_qparams_ranges():
    lo, hi = torch.tensor([-2.0, 0.0, 0.0]), torch.tensor([1.0, 3.0, 0.0])
    scale, zp = choose_qparams(lo, hi, -8, 7, symmetric=True)
    torch.testing.assert_close(scale[:2], torch.tensor([2.0 / 7, 3.0 / 7]))
    assert scale[2] > 0  # all-zero channel: epsilon, no division by zero
    assert zp.abs().sum() == 0
    # the extreme value of a symmetric range is represented exactly
    x = torch.tensor([3.0, -3.0])
    out = fake_quantize_affine(x, scale[1], zp[1], -8, 7)
    torch.testing.assert_close(out, x)
    # unsigned symmetric: [0, max] on [0, 15]
    s_u, z_u = choose_qparams(torch.tensor(0.5), torch.tensor(3.0), 0, 15, symmetric=True)
    torch.testing.assert_close(s_u, torch.tensor(3.0 / 15))
    assert z_u == 0
    # asymmetric: min and max map to the grid ends, 0 is exact
    s_a, z_a = choose_qparams(torch.tensor(-1.0), torch.tensor(2.0), 0, 15, symmetric=False)
    torch.testing.assert_close(s_a, torch.tensor(0.2))
    assert z_a == 5
    assert fake_quantize_affine(torch.tensor(0.0), s_a, z_a, 0, 15) == 0


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_lsq_step_gradient_matches_torch_learnable_op(bits):
    x = _data(bits, shape=(4, 50))
    qmin, qmax = quant_range(bits, signed=True)
    g = lsq_grad_scale(x.numel(), qmax)
    step = torch.tensor([0.3], requires_grad=True)
    out = lsq_fake_quantize_reference(x, step, torch.tensor(0.0), qmin, qmax)
    w = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    (out * w).sum().backward()

    ref_scale = torch.tensor([0.3], requires_grad=True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(
        x, ref_scale, torch.tensor([0.0]), qmin, qmax, g)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(step.grad, ref_scale.grad, rtol=1e-4, atol=1e-6)


def test_lsq_gradient_scale_is_one_over_sqrt_n_qmax():
    x = _data(3, shape=(8, 25))
    qmin, qmax = quant_range(4, signed=True)
    zp = torch.tensor(0.0)
    plain = torch.tensor(0.4, requires_grad=True)
    fake_quantize_affine(x, plain, zp, qmin, qmax).sum().backward()
    lsq = torch.tensor(0.4, requires_grad=True)
    lsq_fake_quantize_reference(x, lsq, zp, qmin, qmax).sum().backward()
    expected = 1.0 / math.sqrt(x.numel() * qmax)
    assert lsq_grad_scale(x.numel(), qmax) == pytest.approx(expected)
    assert plain.grad.abs() > 0
    torch.testing.assert_close(lsq.grad, plain.grad * expected)
    # the forward value is unchanged by the gradient scaling
    torch.testing.assert_close(scale_grad(torch.tensor(2.0), 0.1), torch.tensor(2.0))


def test_lsq_per_channel_gradient_uses_elements_per_channel():
    x = _data(4, shape=(3, 40))
    qmin, qmax = quant_range(4, signed=True)
    step = torch.full((3,), 0.5, requires_grad=True)
    lsq_fake_quantize_reference(x, step, torch.zeros(3), qmin, qmax, axis=0).sum().backward()
    ref_scale = torch.full((3,), 0.5, requires_grad=True)
    torch._fake_quantize_learnable_per_channel_affine(
        x, ref_scale, torch.zeros(3), 0, qmin, qmax,
        lsq_grad_scale(x.shape[1], qmax)).sum().backward()
    torch.testing.assert_close(step.grad, ref_scale.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('axis', [None, 0])
@pytest.mark.parametrize('signed', [True, False])
def test_fused_paths_equal_reference(axis, signed):
    x = _data(5, shape=(4, 30)).requires_grad_(True)
    qmin, qmax = quant_range(4, signed)
    shape = () if axis is None else (4,)
    zp = torch.full(shape, 0.0 if signed else 3.0)
    w = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    grads = []
    for fn in (lsq_fake_quantize, lsq_fake_quantize_reference):
        step = torch.full(shape, 0.35, requires_grad=True)
        x.grad = None
        out = fn(x, step, zp, qmin, qmax, axis=axis)
        (out * w).sum().backward()
        grads.append((out.detach(), x.grad.clone(), step.grad.clone()))
    (o1, gx1, gs1), (o2, gx2, gs2) = grads
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    torch.testing.assert_close(gx1, gx2, atol=1e-7, rtol=1e-6)  # inv_scale*scale != 1 in fp
    torch.testing.assert_close(gs1, gs2, rtol=1e-4, atol=1e-6)
    # fixed-scale fused path
    scale = torch.full(shape, 0.35)
    x.grad = None
    fused = fake_quantize_affine_fused(x, scale, zp, qmin, qmax, axis=axis)
    fused.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = fake_quantize_affine(x_ref, scale, zp, qmin, qmax, axis=axis)
    ref.sum().backward()
    torch.testing.assert_close(fused, ref, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)
    # non-float32 inputs fall back to the reference
    half = fake_quantize_affine_fused(x.detach().double(), scale.double(), zp.double(), qmin,
                                      qmax, axis=axis)
    torch.testing.assert_close(half.float(), ref, atol=0, rtol=0)


def test_lsq_init_step():
    x = torch.tensor([1.0, -3.0, 2.0, 0.0])
    step = lsq_init_step(x.abs().mean(), 7)
    torch.testing.assert_close(step, torch.tensor(2.0 * 1.5 / math.sqrt(7)))


def test_log2_quantizer_levels():
    x = torch.tensor([1.0, 0.5, 0.25, 0.3, 0.7, 0.0, 2.0 ** -14, 2.0 ** -15, 2.0 ** -20])
    out = fake_quantize_log(x, torch.tensor(1.0), bits=4)
    expected = [1.0, 0.5, 0.25, 0.25, 0.5, 0.0, 2.0 ** -14, 0.0, 0.0]
    assert out.tolist() == expected
    # log-sqrt2: half-octave levels
    out2 = fake_quantize_log(torch.tensor([0.3, 0.7, 1.0]), torch.tensor(1.0), bits=4,
                             levels_per_octave=2)
    torch.testing.assert_close(out2, torch.tensor([2 ** -1.5, 2 ** -0.5, 1.0]))
    # values above the scale saturate at the scale
    assert fake_quantize_log(torch.tensor([3.0]), torch.tensor(0.5), bits=3).item() == 0.5


def test_log2_quantizer_keeps_small_probabilities_that_uniform_zeroes():
    probs = torch.softmax(torch.randn(4, 49, 49, generator=torch.Generator().manual_seed(0)),
                          dim=-1)
    scale, zp = choose_qparams(probs.min(), probs.max(), 0, 15, symmetric=True)
    uniform = fake_quantize_affine(probs, scale, zp, 0, 15)
    log = fake_quantize_log(probs, probs.max(), bits=4)
    assert (log == 0).float().mean() < (uniform == 0).float().mean()


def test_log2_quantizer_gradient_flows_through_ste():
    x = torch.tensor([0.3, 0.6], requires_grad=True)
    out = fake_quantize_log(x, torch.tensor(1.0), bits=4)
    out.sum().backward()
    # d out / d x = out / x for the log-domain straight-through estimator
    torch.testing.assert_close(x.grad, (out / x).detach())


def test_parse_bit_widths():
    from mimiq_mm.quant import parse_bit_widths
    assert parse_bit_widths('W4A4') == (4, 4)
    assert parse_bit_widths('w2a4') == (2, 4)
    assert parse_bit_widths(' W6A6 ') == (6, 6)
    for bad, words in (('W4', 'look like W4A4'), ('4/4', 'look like W4A4'),
                       ('W1A4', 'weight bits 1'), ('W4A9', 'activation bits 9'),
                       ('W16A16', 'weight bits 16')):
        with pytest.raises(ValueError, match=words):
            parse_bit_widths(bad)


def test_log_quantizer_passes_gradient_to_the_largest_probabilities():
    """Code 0 (the probabilities within half a level of the scale, the largest of each row)
    must get the log quantizer's gradient x'/x; only inputs above the scale are clipped."""
    from mimiq_mm.quant.primitives import fake_quantize_log
    x = torch.tensor([0.2, 0.1, 0.3], requires_grad=True)
    y = fake_quantize_log(x, torch.tensor(0.21), 4)
    y.sum().backward()
    expected = (y / x).detach()
    expected[2] = 0.0  # 0.3 > scale: clipped to the scale
    torch.testing.assert_close(x.grad, expected)
    assert x.grad[0] > 0
