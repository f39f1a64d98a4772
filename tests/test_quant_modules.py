"""Observers, quantizer modules, QuantLinear / QuantConv2d / QuantMatMul, LayerNorm reparam."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimiq_mm.quant import (MatMul, QuantConfig, QuantConv2d, QuantizerConfig, QuantLinear,
                            QuantMatMul, Quantizer)
from mimiq_mm.quant.observers import (EMAObserver, MeanAbsObserver, MinMaxObserver,
                                      MSEObserver, PercentileObserver)
from mimiq_mm.quant.primitives import fake_quantize_affine, fake_quantize_log
from mimiq_mm.quant.reparam import (NormLinearPair, find_reparam_pairs, pairs_for,
                                    register_reparam_block, reparam_layernorm_linear_)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- observers
def test_minmax_observer_per_tensor_and_per_channel():
    obs = MinMaxObserver()
    obs(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    obs(torch.tensor([[-4.0, 1.0]]))
    lo, hi = obs.compute_range()
    assert (lo.item(), hi.item()) == (-4.0, 3.0)
    assert obs.num_batches.item() == 2

    per_ch = MinMaxObserver(ch_axis=0, num_channels=2)
    per_ch(torch.tensor([[1.0, -2.0, 5.0], [3.0, 0.5, -1.0]]))
    lo, hi = per_ch.compute_range()
    assert lo.tolist() == [-2.0, -1.0] and hi.tolist() == [5.0, 3.0]
    per_ch.reset()
    assert not per_ch.has_data()


def test_percentile_observer_clips_outliers():
    x = torch.arange(10000, dtype=torch.float32)
    obs = PercentileObserver(percentile=99.0)
    obs(x)
    lo, hi = obs.compute_range()
    assert lo.item() == pytest.approx(100.0, abs=1.0)
    assert hi.item() == pytest.approx(9899.0, abs=1.0)
    obs(x * 3)  # averaged over batches
    assert obs.compute_range()[1].item() == pytest.approx(2 * 9899.0, abs=2.0)
    assert obs.max_val.item() == 29997.0  # true max still tracked


def test_ema_observer():
    obs = EMAObserver(momentum=0.5)
    obs(torch.tensor([0.0, 4.0]))
    obs(torch.tensor([-2.0, 8.0]))
    lo, hi = obs.compute_range()
    assert (lo.item(), hi.item()) == (-1.0, 6.0)


def test_mse_observer_clips_an_outlier_and_beats_minmax():
    x = torch.randn(20000, generator=_gen(1))
    x[0] = 60.0
    obs = MSEObserver(bits=4, symmetric=True, signedness='signed', norm=2.0, steps=40)
    obs(x)
    lo, hi = obs.compute_range()
    assert hi.item() < 20.0

    def err(top):
        scale = torch.tensor(top / 7)
        return (fake_quantize_affine(x, scale, torch.tensor(0.0), -8, 7) - x).pow(2).sum()
    assert err(max(abs(lo.item()), hi.item())) < err(60.0)


def test_mean_abs_observer_per_channel():
    obs = MeanAbsObserver(ch_axis=-1, num_channels=2)
    obs(torch.tensor([[1.0, -4.0], [-3.0, 2.0]]))
    torch.testing.assert_close(obs.mean_abs(), torch.tensor([2.0, 3.0]))
    obs.scale_channels_(torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(obs.mean_abs(), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(obs.max_val, torch.tensor([1.0 / 2, 2.0 / 3]))


# ----------------------------------------------------------------------------- quantizer
def test_uncalibrated_quantizer_raises_and_disabled_passes_through():
    q = Quantizer(QuantizerConfig())
    q.name = 'backbone.layer.input_quantizer'
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match='backbone.layer.input_quantizer is enabled but not '
                                           'calibrated.*calibration_mode'):
        q(x)
    q.fake_quant_enabled = False
    assert q(x) is x


def test_activation_quantizer_lsq_init_and_auto_signedness():
    x = torch.randn(64, 16, generator=_gen(2))
    q = Quantizer(QuantizerConfig(bits=4))
    q.calibrate_from(x)
    assert isinstance(q.step, nn.Parameter) and q.quant_min_max == (-8, 7)
    torch.testing.assert_close(q.step.detach(), 2 * x.abs().mean() / math.sqrt(7))
    ref = torch.fake_quantize_per_tensor_affine(x, q.step.detach(), 0, -8, 7)
    torch.testing.assert_close(q(x), ref, atol=0, rtol=0)

    pos = x.abs()
    qu = Quantizer(QuantizerConfig(bits=4))
    qu.calibrate_from(pos)
    assert qu.quant_min_max == (0, 15) and bool(qu.unsigned)
    torch.testing.assert_close(qu.step.detach(), 2 * pos.abs().mean() / math.sqrt(15))


@pytest.mark.parametrize('observer', ['minmax', 'percentile', 'ema', 'mse'])
def test_activation_quantizer_observers_asymmetric(observer):
    x = torch.randn(32, 16, generator=_gen(3)) + 1.0
    cfg = QuantizerConfig(bits=6, symmetric=False, observer=observer, lsq=False)
    q = Quantizer(cfg)
    q.calibrate_from(x)
    lo, hi = q.observer.compute_range()
    assert q.quant_min_max == (0, 63)
    ref = torch.fake_quantize_per_tensor_affine(x, q.scale, int(q.zero_point), 0, 63)
    torch.testing.assert_close(q(x), ref, atol=0, rtol=0)
    assert (q(x) - x).abs().max() < (hi - lo) / 63 * 4


def test_weight_quantizer_per_channel_matches_torch():
    w = torch.randn(6, 5, 3, 3, generator=_gen(4))
    q = Quantizer(QuantConfig().weight.replace(observer='minmax'), ch_axis=0, num_channels=6,
                  is_weight=True)
    q.calibrate_from(w)
    torch.testing.assert_close(q.scale, w.abs().amax(dim=(1, 2, 3)) / 7)
    ref = torch.fake_quantize_per_channel_affine(w, q.scale, torch.zeros(6, dtype=torch.int32),
                                                 0, -8, 7)
    torch.testing.assert_close(q(w), ref, atol=0, rtol=0)


def test_log2_attn_prob_quantizer():
    probs = torch.softmax(torch.randn(2, 3, 9, 9, generator=_gen(5)), dim=-1)
    q = Quantizer(QuantizerConfig(kind='log2', lsq=False, observer='minmax'))
    q.calibrate_from(probs)
    assert bool(q.unsigned)
    torch.testing.assert_close(q(probs), fake_quantize_log(probs, probs.max(), 4),
                               atol=0, rtol=0)


def test_quantizer_state_dict_roundtrip_restores_calibration():
    x = torch.randn(16, 8, generator=_gen(6)).abs()
    q = Quantizer(QuantizerConfig())
    q.calibrate_from(x)
    fresh = Quantizer(QuantizerConfig())
    assert not fresh.is_initialized
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_initialized and bool(fresh.unsigned)
    torch.testing.assert_close(fresh(x), q(x), atol=0, rtol=0)
    assert {'step', 'zero_point', 'initialized', 'unsigned', 'observer.abs_sum'} <= set(
        q.state_dict())


# ----------------------------------------------------------------------------- modules
def test_quant_linear_roundtrip_keeps_parameters_and_quantizes():
    lin = nn.Linear(8, 5)
    ql = QuantLinear.from_float(lin, QuantConfig(act=dict(granularity='per_tensor')))
    assert ql.weight is lin.weight and ql.bias is lin.bias
    assert isinstance(ql, nn.Linear) and isinstance(ql.weight_quantizer, Quantizer)
    x = torch.randn(3, 8, generator=_gen(7))
    ql.weight_quantizer.calibrate_from(ql.weight)
    ql.input_quantizer.calibrate_from(x)
    w_ref = torch.fake_quantize_per_channel_affine(
        lin.weight.detach(), ql.weight_quantizer.scale, torch.zeros(5, dtype=torch.int32), 0,
        -8, 7)
    x_ref = torch.fake_quantize_per_tensor_affine(x, ql.input_quantizer.step.detach(), 0, -8, 7)
    torch.testing.assert_close(ql(x), F.linear(x_ref, w_ref, lin.bias), atol=0, rtol=0)
    back = ql.to_float()
    assert back is lin and type(back) is nn.Linear
    assert back.weight is ql.weight and back.bias is ql.bias


def test_quant_conv_roundtrip_and_float_input():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode='reflect', bias=False)
    qc = QuantConv2d.from_float(conv, QuantConfig(), keep_input_float=True)
    assert qc.input_quantizer is None and qc.weight is conv.weight and qc.bias is None
    x = torch.randn(1, 3, 9, 9, generator=_gen(8))
    qc.weight_quantizer.fake_quant_enabled = False
    torch.testing.assert_close(qc(x), conv(x), atol=0, rtol=0)
    qc.weight_quantizer.fake_quant_enabled = True
    qc.weight_quantizer.calibrate_from(qc.weight)
    w_ref = qc.weight_quantizer(conv.weight)
    torch.testing.assert_close(qc(x), conv._conv_forward(x, w_ref, None), atol=0, rtol=0)
    assert qc.to_float() is conv and conv.weight is qc.weight
    with pytest.raises(TypeError, match='expects a Conv2d'):
        QuantConv2d.from_float(nn.Linear(2, 2), QuantConfig())


def test_quant_matmul_quantizes_both_inputs_av_uses_attn_prob_config():
    cfg = QuantConfig(attn_prob=dict(kind='log2', lsq=False, observer='minmax'),
                      rotate_inputs=False)
    mm = QuantMatMul.from_float(MatMul(), cfg, role='av')
    assert mm.a_quantizer.cfg.kind == 'log2' and mm.b_quantizer.cfg.kind == 'uniform'
    qk = QuantMatMul.from_float(MatMul(), cfg, role='qk')
    assert qk.a_quantizer.cfg == cfg.act
    probs = torch.softmax(torch.randn(2, 2, 5, 5, generator=_gen(9)), -1)
    v = torch.randn(2, 2, 5, 4, generator=_gen(10))
    mm.a_quantizer.calibrate_from(probs)
    mm.b_quantizer.calibrate_from(v)
    expected = torch.matmul(mm.a_quantizer(probs), mm.b_quantizer(v))
    torch.testing.assert_close(mm(probs, v), expected, atol=0, rtol=0)
    assert not torch.equal(mm.a_quantizer(probs), probs)
    assert not torch.equal(mm.b_quantizer(v), v)
    assert type(mm.to_float()) is MatMul
    with pytest.raises(ValueError, match=r"role='x' is not valid; choose one of"):
        QuantMatMul(cfg, role='x')


def test_lsq_gradients_reach_step_with_scaled_magnitude():
    lin = nn.Linear(8, 4)
    ql = QuantLinear.from_float(lin, QuantConfig())
    x = torch.randn(32, 8, generator=_gen(11))
    ql.weight_quantizer.calibrate_from(ql.weight)
    ql.input_quantizer.calibrate_from(x)
    ql(x).pow(2).sum().backward()
    step = ql.input_quantizer.step
    assert step.grad is not None and torch.isfinite(step.grad) and step.grad != 0
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- reparam
class _ToyBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc_a = nn.Linear(dim, 6)
        self.fc_b = nn.Linear(dim, 3)

    def forward(self, x):
        y = self.norm(x)
        return torch.cat([self.fc_a(y), self.fc_b(y)], -1)


def test_reparam_registry_and_fold_keep_function():
    register_reparam_block(_ToyBlock, [NormLinearPair('norm', ('fc_a', 'fc_b'))])
    block = _ToyBlock()
    with torch.no_grad():
        block.norm.weight.normal_(generator=_gen(12))
        block.norm.bias.normal_(generator=_gen(13))
    x = torch.randn(4, 8, generator=_gen(14))
    ref = block(x)
    (pair,) = list(find_reparam_pairs(nn.Sequential(block)))
    assert pair.norm_name == '0.norm' and pair.linear_names == ('0.fc_a', '0.fc_b')
    factor = torch.rand(8, generator=_gen(15)) * 50 + 0.1
    reparam_layernorm_linear_(pair.norm, pair.linears, factor)
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
    # the LayerNorm output is now divided per channel by the factor
    torch.testing.assert_close(block.norm(x) * factor, F.layer_norm(
        x, (8,)) * (block.norm.weight * factor) + block.norm.bias * factor)
    with pytest.raises(ValueError, match='NormLinearPair'):
        register_reparam_block(_ToyBlock, [('norm', 'fc_a')])
    assert pairs_for(nn.ReLU()) == ()


def _set_big_norm_channels(norm: nn.Module, seed: int) -> None:
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=_gen(seed)) + 0.5)
        norm.weight[:2] *= 60.0  # the few huge post-LayerNorm channels
        norm.bias.normal_(generator=_gen(seed + 1))


def _random_factor(n, seed):
    return torch.rand(n, generator=_gen(seed)) * 30 + 0.05


def test_reparam_keeps_timm_vit_and_swin_blocks():
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    # float64 so that "the same function" can be checked tightly despite the huge channels
    vit = Block(dim=32, num_heads=2).eval().double()
    swin = SwinTransformerBlock(dim=32, input_resolution=(6, 6), num_heads=2, window_size=4,
                                shift_size=2).eval().double()
    for block, x in ((vit, torch.randn(2, 10, 32, generator=_gen(20), dtype=torch.float64)),
                     (swin, torch.randn(2, 6, 6, 32, generator=_gen(21), dtype=torch.float64))):
        pairs = list(find_reparam_pairs(block))
        assert [p.linear_names for p in pairs] == [('attn.qkv',), ('mlp.fc1',)]
        for i, p in enumerate(pairs):
            _set_big_norm_channels(p.norm, 30 + i)
        ref = block(x)
        for i, p in enumerate(pairs):
            reparam_layernorm_linear_(p.norm, p.linears, _random_factor(32, 40 + i))
        torch.testing.assert_close(block(x), ref, rtol=1e-9, atol=1e-9)


def test_reparam_keeps_mmdet_swin_block_with_padding():
    from mmdet.models.backbones.swin import SwinBlock

    block = SwinBlock(embed_dims=32, num_heads=2, feedforward_channels=64, window_size=4,
                      shift=True).eval().double()
    pairs = list(find_reparam_pairs(block))
    assert [p.linear_names for p in pairs] == [('attn.w_msa.qkv',), ('ffn.layers.0.0',)]
    for i, p in enumerate(pairs):
        _set_big_norm_channels(p.norm, 50 + i)
    hw = (6, 7)  # not a multiple of the window: ShiftWindowMSA pads the LayerNorm output
    x = torch.randn(2, hw[0] * hw[1], 32, generator=_gen(22), dtype=torch.float64)
    ref = block(x, hw)
    for i, p in enumerate(pairs):
        reparam_layernorm_linear_(p.norm, p.linears, _random_factor(32, 60 + i))
    torch.testing.assert_close(block(x, hw), ref, rtol=1e-9, atol=1e-9)


def test_per_channel_activation_quantizers_for_linear_and_conv():
    cfg = QuantConfig(act=dict(granularity='per_channel', observer='minmax', lsq=False,
                               symmetric=False))
    ql = QuantLinear.from_float(nn.Linear(4, 3), cfg)
    x = torch.randn(6, 4, generator=_gen(30)) * torch.tensor([1.0, 10.0, 0.1, 3.0])
    ql.input_quantizer.calibrate_from(x)
    assert ql.input_quantizer.scale.shape == (4,)
    ref = torch.fake_quantize_per_channel_affine(
        x, ql.input_quantizer.scale, ql.input_quantizer.zero_point.int(), 1, 0, 15)
    torch.testing.assert_close(ql.input_quantizer(x), ref, atol=0, rtol=0)
    qc = QuantConv2d.from_float(nn.Conv2d(4, 2, 1), cfg)
    xc = torch.randn(2, 4, 3, 3, generator=_gen(31))
    qc.input_quantizer.calibrate_from(xc)
    assert qc.input_quantizer.scale.shape == (4,) and qc.input_quantizer.ch_axis == 1
    with pytest.raises(ValueError, match="QuantMatMul supports act.granularity 'per_tensor' or 'per_token'"):
        QuantMatMul(cfg)


def test_weight_range_follows_the_weight_after_in_place_updates():
    """Fine-tuning moves weights past their calibration-time range: a min-max weight
    quantizer must follow (no clipping), and stay put while the weight does not change."""
    from mimiq_mm.quant import QuantConfig, QuantLinear
    torch.manual_seed(0)
    lin = QuantLinear.from_float(nn.Linear(8, 4), QuantConfig(weight=dict(observer='minmax')),
                                 keep_input_float=True)
    lin.weight_quantizer.calibrate_from(lin.weight)
    x = torch.randn(3, 8)
    lin(x)
    scale_before = lin.weight_quantizer.scale.clone()
    lin(x)
    assert torch.equal(lin.weight_quantizer.scale, scale_before)  # unchanged weight
    with torch.no_grad():
        lin.weight.mul_(3.0)  # what an optimizer step does: an in-place update
    out = lin(x)
    assert torch.allclose(lin.weight_quantizer.scale, 3 * scale_before)
    wq = lin.weight_quantizer(lin.weight)
    # the largest weight of every row is representable again (not clipped to the old range)
    assert torch.allclose(wq.abs().amax(dim=1), lin.weight.abs().amax(dim=1), rtol=1e-6)
    assert torch.allclose(out, torch.nn.functional.linear(x, wq, lin.bias))


def test_rotated_inputs_keep_the_float_function():
    """x Wᵀ = (x R)(W R)ᵀ, q·kᵀ = (q R)(k R)ᵀ and attn·v = (attn·(v R)) Rᵀ: with the
    quantizers off, rotated layers compute the float result; with them on, the quantizers
    see the rotated tensors."""
    from mimiq_mm.quant import QuantConfig, QuantLinear, set_quant_state
    from mimiq_mm.quant.rotation import InputRotation
    torch.manual_seed(0)
    rot = InputRotation(96)
    m = torch.randn(5, 96)
    torch.testing.assert_close(rot.inverse(rot(m)), m, atol=1e-5, rtol=0)
    torch.testing.assert_close(rot(torch.eye(96)) @ rot(torch.eye(96)).t(), torch.eye(96),
                               atol=1e-5, rtol=0)
    float_lin = nn.Linear(96, 7)
    x = torch.randn(3, 4, 96)
    lin = QuantLinear.from_float(float_lin, QuantConfig(), rotate_input=True)
    assert lin.input_rotation is not None
    set_quant_state(lin, weight=False, act=False)
    torch.testing.assert_close(lin(x), F.linear(x, float_lin.weight, float_lin.bias),
                               atol=1e-5, rtol=1e-5)
    for role, (a, b) in (('qk', (torch.randn(2, 3, 5, 24), torch.randn(2, 3, 24, 6))),
                         ('av', (torch.softmax(torch.randn(2, 3, 5, 6), -1),
                                 torch.randn(2, 3, 6, 24)))):
        mm = QuantMatMul.from_float(MatMul(), QuantConfig(), role=role)
        assert mm.rotate
        set_quant_state(mm, weight=False, act=False)
        torch.testing.assert_close(mm(a, b), a @ b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='Linear layers only'):
        QuantConv2d.from_float(nn.Conv2d(3, 4, 3), QuantConfig(), rotate_input=True)


# ----------------------------------------------------------------------------- per-token
PER_TOKEN = QuantizerConfig(bits=4, granularity='per_token', observer='minmax', lsq=True)


def test_per_token_quantizer_steps_follow_each_row_absmax():
    q = Quantizer(PER_TOKEN)
    x = torch.randn(3, 5, 16, generator=_gen(40)) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    assert q.calibrate_from(x) and float(q.step) == 1.0  # min-max: clipping ratio 1
    y = q(x)
    step = x.abs().amax(-1, keepdim=True) / 7
    ref = torch.clamp(torch.round(x / step), -8, 7) * step
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    # every row keeps its own resolution, whatever the scale of the others
    for i in range(3):
        err = (y[i] - x[i]).abs().max() / x[i].abs().max()
        assert err <= 0.5 / 7 + 1e-6
    # a new input at run time gets new steps: nothing depends on the calibration data
    x2 = x * 1000
    torch.testing.assert_close(q(x2), ref * 1000, rtol=1e-5, atol=1e-4)


def test_per_token_ratio_is_learnt_and_input_gradient_is_straight_through():
    q = Quantizer(PER_TOKEN)
    x = torch.randn(4, 32, generator=_gen(41), requires_grad=True)
    q.calibrate_from(x.detach())
    (q(x) - 2 * x.detach()).pow(2).sum().backward()
    assert q.step.grad is not None and float(q.step.grad.abs()) > 0
    torch.testing.assert_close(x.grad.abs() > 0, torch.ones_like(x.grad, dtype=torch.bool))


def test_per_token_mse_observer_picks_a_clipping_ratio():
    cfg = PER_TOKEN.replace(observer='mse', mse_steps=11)
    q = Quantizer(cfg)
    # heavy-tailed rows (cubed Gaussians): clipping the tail lowers the error of the rest
    x = torch.randn(64, 256, generator=_gen(42)) ** 3
    q.calibrate_from(x)
    ratio = float(q.step)
    assert 0.5 <= ratio < 1.0
    err = {}
    for r in (ratio, 1.0):
        with torch.no_grad():
            q.step.fill_(r)
            err[r] = float((q(x) - x).pow(2).sum())
    assert err[ratio] < err[1.0]


def test_per_token_axes_of_linear_conv_and_matmul_factor_out_of_the_product():
    cfg = QuantConfig(act=dict(granularity='per_token', center=False), rotate_inputs=False)
    ql = QuantLinear.from_float(nn.Linear(16, 4), cfg)
    qc = QuantConv2d.from_float(nn.Conv2d(6, 4, 1), cfg)
    qm = QuantMatMul(cfg, role='qk')
    assert ql.input_quantizer.token_axis == -1 and qc.input_quantizer.token_axis == 1
    assert (qm.a_quantizer.token_axis, qm.b_quantizer.token_axis) == (-1, -2)
    # b of a matmul: one step per column (over the reduction axis -2)
    b = torch.randn(2, 8, 5, generator=_gen(43)) * torch.linspace(0.1, 10, 5)
    qm.b_quantizer.calibrate_from(b)
    out = qm.b_quantizer(b)
    step = b.abs().amax(-2, keepdim=True) / 7
    torch.testing.assert_close(out, torch.clamp(torch.round(b / step), -8, 7) * step)
    with pytest.raises(ValueError, match="'per_token' is for activations"):
        Quantizer(PER_TOKEN, ch_axis=0, num_channels=4, is_weight=True)


def test_per_token_unsigned_input_uses_the_whole_unsigned_grid():
    q = Quantizer(PER_TOKEN)
    x = torch.rand(6, 20, generator=_gen(44)) * 5  # non-negative: 'auto' -> unsigned
    q.calibrate_from(x)
    assert bool(q.unsigned) and q.quant_min_max == (0, 15)
    step = x.amax(-1, keepdim=True) / 15
    torch.testing.assert_close(q(x), torch.clamp(torch.round(x / step), 0, 15) * step)


def test_rotation_dense_path_is_the_factored_orthogonal_matrix():
    from mimiq_mm.quant.rotation import DENSE_MAX_DIM, InputRotation
    small, wide = InputRotation(48), InputRotation(DENSE_MAX_DIM + 128)
    assert small.dense is not None and wide.dense is None
    x = torch.randn(7, 3, 48, generator=_gen(50))
    ref = InputRotation._factored(x, small.signs, small.odd, small.hadamard)
    torch.testing.assert_close(small(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.inverse(small(x)), x, atol=1e-5, rtol=1e-5)
    eye = torch.eye(48)
    torch.testing.assert_close(small(eye) @ small(eye).t(), eye, atol=1e-5, rtol=0)
    xw = torch.randn(4, wide.dim, generator=_gen(51))
    torch.testing.assert_close(wide.inverse(wide(xw)), xw, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- centring
CENTRED = QuantizerConfig(granularity='per_token', observer='minmax', lsq=True, center=True)


def test_centred_quantizer_shifts_by_the_calibrated_channel_mean():
    # rows that share a large per-channel offset (a LayerNorm output of a pretrained ViT)
    mean = torch.linspace(-6.0, 30.0, 16)
    x = torch.randn(4, 50, 16, generator=_gen(60)) + mean
    centred, plain = Quantizer(CENTRED), Quantizer(CENTRED.replace(center=False))
    for q in (centred, plain):
        q.calibrate_from(x)
    torch.testing.assert_close(centred.offset, x.mean(dim=(0, 1)), rtol=1e-5, atol=1e-5)
    assert plain.offset.numel() == 0 and plain.center_observer is None
    # Q(x - m) + m, with the per-token step of x - m
    xc = x - centred.offset
    step = xc.abs().amax(-1, keepdim=True) / 7
    ref = torch.clamp(torch.round(xc / step), -8, 7) * step + centred.offset
    torch.testing.assert_close(centred(x), ref, rtol=1e-5, atol=1e-5)
    err_c, err_p = ((q(x) - x).pow(2).mean() for q in (centred, plain))
    assert err_c < 0.05 * err_p  # the grid covers the spread, not the offset
    # a non-negative input is centred onto a signed grid
    pos = Quantizer(CENTRED)
    pos.calibrate_from(torch.rand(8, 16, generator=_gen(61)) * 3)
    assert not bool(pos.unsigned) and pos.quant_min_max == (-8, 7)


def test_centred_matmul_operands_are_shifted_per_head_and_channel():
    cfg = QuantConfig(act=dict(center=True), rotate_inputs=False)
    qk, av = QuantMatMul(cfg, role='qk'), QuantMatMul(cfg, role='av')
    g = _gen(62)
    q = torch.randn(2, 3, 10, 8, generator=g) + torch.arange(3.0).view(3, 1, 1) * 4
    kt = torch.randn(2, 3, 8, 12, generator=g) + 5.0
    attn = torch.softmax(torch.randn(2, 3, 10, 12, generator=g), -1)
    v = torch.randn(2, 3, 12, 8, generator=g) - 3.0
    with torch.no_grad():
        for m in (qk, av):
            for quantizer in (m.a_quantizer, m.b_quantizer):
                quantizer.observing = True
        qk(q, kt), av(attn, v)
        for m in (qk, av):
            for quantizer in (m.a_quantizer, m.b_quantizer):
                quantizer.observing = False
                quantizer.compute_qparams()
    assert tuple(qk.a_quantizer.offset.shape) == (3, 1, 8)    # q: per head, per channel
    assert tuple(qk.b_quantizer.offset.shape) == (3, 8, 1)    # kᵀ: channels on axis -2
    assert tuple(av.b_quantizer.offset.shape) == (3, 1, 8)    # v
    assert av.a_quantizer.offset.numel() == 0                # log2 probabilities: not centred
    torch.testing.assert_close(qk.a_quantizer.offset, q.mean(dim=(0, 2)).unsqueeze(1))
    # a 3-d operand (heads folded into the batch) is shifted per channel only
    flat = Quantizer(CENTRED, center_axis=-1, head_axis=-3)
    flat.calibrate_from(q.reshape(6, 10, 8))
    assert tuple(flat.offset.shape) == (8,)


def test_centred_state_dict_loads_into_a_fresh_model_and_old_checkpoints_load():
    cfg = QuantConfig(act=dict(center=True), rotate_inputs=False)
    x = torch.randn(6, 5, 16, generator=_gen(63)) + 3.0
    src, dst = (QuantLinear.from_float(nn.Linear(16, 4), cfg) for _ in range(2))
    src.input_quantizer.calibrate_from(x)
    src.weight_quantizer.calibrate_from(src.effective_weight())
    state = src.state_dict()
    assert tuple(state['input_quantizer.offset'].shape) == (16,)
    assert dst.input_quantizer.offset.numel() == 0  # sized from data: empty until then
    dst.load_state_dict(state)
    torch.testing.assert_close(dst(x), src(x))
    # a checkpoint from before centring (no offset, no mean): loads, and does not shift
    old = {k: v for k, v in state.items() if 'offset' not in k and 'center_observer' not in k}
    dst.load_state_dict(old, strict=False)
    assert dst.input_quantizer.offset.numel() == 0


def test_center_config_errors():
    with pytest.raises(ValueError, match="center=True needs granularity='per_token'"):
        QuantizerConfig(granularity='per_tensor', center=True)
    with pytest.raises(ValueError, match="center=True shifts the input"):
        QuantizerConfig(granularity='per_token', observer='minmax', signedness='unsigned',
                        center=True)
    # moving the centred default to a static grid turns centring off (it goes with the
    # run-time step); naming center keeps the explicit choice (and its error)
    assert QuantConfig(act=dict(center=True)).act.center
    assert not QuantConfig(act=dict(center=True)).act.replace(granularity='per_tensor',
                                                              observer='mse').center
    with pytest.raises(ValueError, match="needs granularity='per_token'"):
        QuantConfig(act=dict(granularity='per_tensor', center=True))
