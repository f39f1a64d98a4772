"""GPTQ weight rounding (mimiq_mm/quant/gptq.py) through calibration_mode."""
import copy

import pytest
import torch
from torch import nn

from mimiq_mm.quant import (QuantConfig, QuantLinear, QuantizerConfig, calibration_mode,
                            dequantize_, quantize_)
from mimiq_mm.quant.gptq import gptq_round, output_error
from mimiq_mm.quant.quantizers import Quantizer
from mimiq_mm.testing import tiny_timm_vit


def _correlated_inputs(n, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / dim ** 0.5
    return torch.randn(n, dim, generator=gen) @ mix * torch.linspace(0.2, 3.0, dim)


def _quantized_mlp(rounding, act_bits=8):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    cfg = QuantConfig(scope='all', keep_input_float=False, weight=dict(rounding=rounding),
                      act=dict(bits=act_bits))
    return mlp, quantize_(copy.deepcopy(mlp), cfg)


def test_gptq_round_lowers_the_output_error_and_stays_on_the_grid():
    x = _correlated_inputs(2048, 96)
    h = x.t() @ x
    w = torch.randn(48, 96)
    scale = w.abs().amax(1) / 7
    zp = torch.zeros(48)
    q = gptq_round(w, h, scale, zp, -8, 7)
    nearest = torch.clamp(torch.round(w / scale[:, None]), -8, 7) * scale[:, None]
    assert output_error(w, q, h) < 0.7 * output_error(w, nearest, h)
    codes = q / scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -8 and codes.round().max() <= 7


def test_calibration_with_gptq_beats_nearest_on_held_out_inputs():
    x = _correlated_inputs(1024, 64, seed=1)
    errors = {}
    for rounding in ('nearest', 'gptq'):
        mlp, student = _quantized_mlp(rounding)
        report = {}
        with torch.no_grad():
            with calibration_mode(student, report=report):
                student(x[:512])
            errors[rounding] = float(((student(x[512:]) - mlp(x[512:])) ** 2).mean())
        if rounding == 'gptq':  # every Linear, each with a lower in-sample output error
            assert sorted(report['gptq']) == ['0', '2']
            assert all(0 < r < 1 for r in report['gptq'].values())
            assert report['gptq_summary'].startswith('GPTQ rounded 2 layers')
        else:
            assert 'gptq' not in report
    assert errors['gptq'] < 0.9 * errors['nearest']


def test_gptq_weights_sit_on_their_grid_and_the_step_is_kept():
    x = _correlated_inputs(256, 64)
    _, student = _quantized_mlp('gptq')
    _, plain = _quantized_mlp('nearest')
    with torch.no_grad():
        for model in (student, plain):
            with calibration_mode(model):
                model(x)
    for layer, ref in zip(student.modules(), plain.modules()):
        if not isinstance(layer, QuantLinear):
            continue
        wq = layer.weight_quantizer
        # the grid is the MSE search's on the original weight, not a new one
        assert torch.equal(wq.scale, ref.weight_quantizer.scale)
        w_eff = layer.effective_weight().detach()
        assert torch.allclose(wq(w_eff), w_eff, atol=1e-6)
        before = wq.scale.clone()
        layer.sync_weight_qparams()  # a forward or an export: the range stays where it is
        assert torch.equal(wq.scale, before)


def test_gptq_runs_on_a_vit_with_rotated_inputs():
    torch.manual_seed(0)
    model = tiny_timm_vit().eval()
    student = quantize_(copy.deepcopy(model), QuantConfig(scope='all',
                                                         weight=dict(rounding='gptq')))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        with calibration_mode(student):
            student(x)
        out = student(x)
    assert torch.isfinite(out).all()
    rotated = [m for m in student.modules()
               if isinstance(m, QuantLinear) and m.input_rotation is not None]
    assert rotated
    for layer in rotated:
        w_eff = layer.effective_weight().detach()
        assert torch.allclose(layer.weight_quantizer(w_eff), w_eff, atol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(rounding='stochastic'), 'rounding'),
    (dict(rounding='gptq', kind='log2', lsq=False), 'uniform'),
])
def test_rounding_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizerConfig(**kwargs)


def test_dequantize_keeps_the_gptq_rounded_weights():
    """GPTQ is a weight update made by calibration (documented): dequantize_ gives the
    float modules back holding the rounded weights, not the original ones."""
    x = _correlated_inputs(256, 64)
    mlp, student = _quantized_mlp('gptq')
    with torch.no_grad(), calibration_mode(student):
        student(x)
    rounded = [m.weight.detach().clone() for m in student.modules()
               if isinstance(m, QuantLinear)]
    dequantize_(student)
    floats = [m for m in student.modules() if isinstance(m, nn.Linear)]
    assert not any(isinstance(m, QuantLinear) for m in student.modules())
    for layer, w, original in zip(floats, rounded, [m for m in mlp.modules()
                                                    if isinstance(m, nn.Linear)]):
        assert torch.equal(layer.weight, w)
        assert not torch.equal(layer.weight, original.weight)


def test_gptq_rounding_refused_for_activations():
    with pytest.raises(ValueError, match='weights only'):
        Quantizer(QuantizerConfig(rounding='gptq'))
    with pytest.raises(ValueError, match='weights only'):
        QuantConfig(act=dict(rounding='gptq', granularity='per_tensor'))
