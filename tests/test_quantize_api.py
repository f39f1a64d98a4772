"""quantize_ / calibration_mode / set_quant_state / dequantize_ on real (tiny) mmdet, mmseg and
timm models, QuantConfig validation, and a calibrated state_dict reloaded in a fresh process.

Tolerance: with fake-quant disabled, a quantized model must reproduce the float model up to
``atol = rtol = 1e-5`` (the attention adapters compute the same math explicitly, so results
may differ from the library kernels by float rounding only).
"""
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from mimiq_mm.attention import adapt_attention_, find_attention_modules
from mimiq_mm.quant import (MatMul, QuantConfig, QuantConv2d, QuantLinear, QuantMatMul,
                            Quantizer, calibration_mode, count_quant_modules, dequantize_,
                            lsq_parameters, quant_modules, quant_state, quantize_, quantizers,
                            set_quant_state)
from mimiq_mm.testing import build_tiny_model, tiny_timm_swin, tiny_timm_vit

REPO = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-5, rtol=1e-5)



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _img(size=32, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=_gen(seed))


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    raise TypeError(type(out))


def _assert_all_close(a, b, **tol):
    fa, fb = _flatten(a), _flatten(b)
    assert len(fa) == len(fb) and fa
    for x, y in zip(fa, fb):
        torch.testing.assert_close(x, y, **tol)


# ----------------------------------------------------------------------------- models
def _det(model, x):
    feats = model.extract_feat(x)
    return list(feats) + _flatten(model.rpn_head(feats))


def _seg(model, x):
    return model(x, mode='tensor')


def _timm(model, x):
    return model(x)


MODELS = {
    'maskrcnn_swin': (lambda: build_tiny_model('maskrcnn_swin'), _det, 64),
    'upernet_swin': (lambda: build_tiny_model('upernet_swin'), _seg, 64),
    'upernet_vit': (lambda: build_tiny_model('upernet_vit'), _seg, 64),
    'timm_vit': (lambda: tiny_timm_vit(img_size=32), _timm, 32),
    'timm_swin': (lambda: tiny_timm_swin(img_size=32), _timm, 32),
}


def _build(name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name][0]().eval()
    return model


def _float_leaf_counts(scope: nn.Module):
    # after adaptation (nn.MultiheadAttention's packed in-projection becomes a Linear)
    adapt_attention_(scope)
    n_lin_conv = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in scope.modules())
    n_attn = len(find_attention_modules(scope))
    return n_lin_conv, n_attn


@pytest.mark.parametrize('name', sorted(MODELS))
def test_disabled_quantization_leaves_outputs_unchanged_and_counts(name):
    model = _build(name)
    _, run, size = MODELS[name]
    x = _img(size)
    scope = model.backbone if hasattr(model, 'backbone') else model
    n_lin_conv, n_attn = _float_leaf_counts(scope)
    assert n_attn > 0
    with torch.no_grad():
        ref = run(model, x)
    quantize_(model, QuantConfig())
    counts = count_quant_modules(scope)
    # every Linear/Conv of the backbone and both products of every attention block
    assert counts['QuantLinear'] + counts['QuantConv2d'] == n_lin_conv
    assert counts['QuantMatMul'] == 2 * n_attn
    assert len(list(quant_modules(scope))) == sum(counts.values())
    for attn in find_attention_modules(scope).values():
        assert isinstance(attn.qk_matmul, QuantMatMul) and attn.qk_matmul.role == 'qk'
        assert isinstance(attn.av_matmul, QuantMatMul) and attn.av_matmul.role == 'av'
    remaining = [n for n, m in scope.named_modules()
                 if type(m) in (nn.Linear, nn.Conv2d, MatMul)]
    assert remaining == []
    set_quant_state(model, weight=False, act=False)
    with torch.no_grad():
        out = run(model, x)
    _assert_all_close(out, ref, **TOL)


def test_uncalibrated_model_raises_with_instructions():
    model = quantize_(_build('timm_vit'))
    with pytest.raises(RuntimeError, match='not calibrated: run it under calibration_mode'):
        model(_img())


def test_first_layer_keeps_float_input_and_overrides():
    model = _build('maskrcnn_swin')
    cfg = QuantConfig.from_dict(dict(
        scope='backbone',
        overrides={'backbone.patch_embed.*': {'weight': {'bits': 8}},
                   'backbone.stages.3.blocks.1.ffn.*': None}))
    quantize_(model, cfg, filter_fn=lambda m, fqn: fqn != 'backbone.stages.0.downsample.reduction')
    proj = model.backbone.patch_embed.projection
    assert isinstance(proj, QuantConv2d) and proj.input_quantizer is None
    assert proj.weight_quantizer.cfg.bits == 8
    blocks = model.backbone.stages
    assert isinstance(blocks[0].blocks[0].ffn.layers[0][0], QuantLinear)
    assert blocks[0].blocks[0].ffn.layers[0][0].input_quantizer.cfg.bits == 4
    assert type(blocks[3].blocks[1].ffn.layers[0][0]).__name__ == 'Linear'
    assert not isinstance(blocks[0].downsample.reduction, QuantLinear)
    # scope 'backbone': the neck and heads stay float
    assert not any(isinstance(m, QuantConv2d) for m in model.neck.modules())
    # keep_input_float=False quantizes the first layer's input too
    other = quantize_(_build('timm_vit'), QuantConfig(keep_input_float=False))
    assert other.patch_embed.proj.input_quantizer is not None


def test_scope_all_quantizes_neck_and_heads():
    model = quantize_(_build('upernet_swin'), dict(scope='all'))
    assert isinstance(model.decode_head.conv_seg, QuantConv2d)
    assert any(isinstance(m, QuantConv2d) for m in model.decode_head.modules())


def test_calibration_mode_restores_state_on_error():
    model = quantize_(_build('timm_vit'))
    set_quant_state(model, act=False)
    with pytest.raises(ValueError, match='boom'):
        with calibration_mode(model):
            model(_img())
            raise ValueError('boom')
    for _, q in quantizers(model):
        assert not q.observing and not q.is_initialized
        assert q.fake_quant_enabled is q.is_weight


def _calibrate(model, run, size, batches=2):
    with torch.no_grad(), calibration_mode(model):
        for i in range(batches):
            run(model, _img(size, seed=100 + i))


def test_w4a4_loss_finite_and_grads_reach_lsq_steps():
    model = quantize_(_build('timm_vit'))
    _calibrate(model, _timm, 32)
    assert all(q.is_initialized for _, q in quantizers(model))
    steps = dict((n, p) for n, p in model.named_parameters() if n.endswith('.step'))
    assert len(steps) == len(list(lsq_parameters(model))) > 0
    model.train()
    x = _img(seed=7)
    logits = model(x)
    with quant_state(model, weight=False, act=False):
        float_logits = model(x)
    assert not torch.allclose(logits, float_logits)
    loss = nn.functional.cross_entropy(logits, torch.tensor([1, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in steps.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert sum(float(p.grad.abs().sum() > 0) for p in steps.values()) > 0.9 * len(steps)
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_mmseg_w4a4_training_loss_finite_with_log2_attn_prob():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    model = _build('upernet_swin')
    quantize_(model, dict(attn_prob=dict(kind='log2', lsq=False, observer='minmax')))
    _calibrate(model, _seg, 64)
    assert all(m.av_matmul.a_quantizer.cfg.kind == 'log2'
               for m in find_attention_modules(model.backbone).values())
    model.train()
    samples = []
    for i in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64),
                                        pad_shape=(64, 64)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 4, (1, 64, 64), generator=_gen(i)))
        samples.append(s)
    losses = model(_img(64), samples, mode='loss')
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(loss)
    loss.backward()
    steps = [p for p in lsq_parameters(model.backbone)]
    assert steps and all(p.grad is not None and torch.isfinite(p.grad).all() for p in steps)


def test_dequantize_restores_float_modules_and_outputs():
    model = _build('upernet_vit')
    x = _img(64)
    params = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = _seg(model, x)
    quantize_(model, dict(weight=dict(rounding='nearest')))  # GPTQ would move the weights
    _calibrate(model, _seg, 64, batches=1)
    dequantize_(model)
    assert count_quant_modules(model) == {'QuantLinear': 0, 'QuantConv2d': 0, 'QuantMatMul': 0}
    assert not any(isinstance(m, (Quantizer, MatMul)) for m in model.modules())
    for n, p in model.named_parameters():
        assert params[n] is p
    with torch.no_grad():
        _assert_all_close(_seg(model, x), ref, **TOL)


def test_second_quantize_with_another_config_is_refused():
    model = tiny_timm_vit(img_size=32)
    quantize_(model)                                   # W4A4
    counts = count_quant_modules(model)
    quantize_(model, QuantConfig())                    # the same config again: a no-op
    assert count_quant_modules(model) == counts
    for other, match in ((dict(weight=dict(bits=8), act=dict(bits=8)), 'weight 4 bits'),
                         (dict(act=dict(bits=8)), 'activations 4 bits')):
        with pytest.raises(ValueError, match=match) as info:
            quantize_(model, other)
        assert 'dequantize_(model)' in str(info.value)
    assert {q.cfg.bits for _, q in quantizers(model) if q.is_weight} == {4}
    dequantize_(model)                                 # the documented way to change it
    quantize_(model, dict(weight=dict(bits=8), act=dict(bits=8)))
    assert {q.cfg.bits for _, q in quantizers(model) if q.is_weight} == {8}


@pytest.mark.parametrize('name', ['upernet_swin', 'upernet_vit'])
def test_reparam_at_calibration_keeps_float_function(name):
    model = _build(name)
    _, run, size = MODELS[name]
    # make a few post-LayerNorm channels huge, as in trained ViTs
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.LayerNorm)]
    with torch.no_grad():
        for m in norms:
            m.weight[:2] = 50.0
    x = _img(size, seed=3)
    with torch.no_grad():
        ref = run(model, x)
    # nearest weight rounding: GPTQ would change the other Linear weights at calibration
    quantize_(model, QuantConfig(reparam=True, act=dict(granularity='per_tensor'),
                                 weight=dict(rounding='nearest')))
    before = {n: m.weight.detach().clone() for n, m in model.backbone.named_modules()
              if isinstance(m, nn.LayerNorm)}
    observed = [q for _, q in quantizers(model) if q.observe_channels]
    assert observed
    _calibrate(model, run, size, batches=1)
    changed = [n for n, m in model.backbone.named_modules()
               if isinstance(m, nn.LayerNorm) and not torch.equal(before[n], m.weight)]
    # norm1 and norm2 of every block are folded
    n_blocks = len(find_attention_modules(model.backbone))
    assert len(changed) == 2 * n_blocks
    with torch.no_grad(), quant_state(model, weight=False, act=False):
        _assert_all_close(run(model, x), ref, atol=1e-4, rtol=1e-4)
    # the folded range is far below the huge channels' magnitude
    for q in observed:
        assert q.is_initialized and q.step.abs() < 50.0


@pytest.mark.parametrize('name', ['maskrcnn_swin', 'upernet_vit', 'timm_vit'])
def test_smooth_folds_into_layernorm_and_linear_keeping_float_function(name):
    model = _build(name)
    _, run, size = MODELS[name]
    scope = model.backbone if hasattr(model, 'backbone') else model
    norms = [m for m in scope.modules() if isinstance(m, nn.LayerNorm)]
    with torch.no_grad():
        for m in norms:
            m.weight[:2] = 50.0  # the few huge post-LayerNorm channels of trained ViTs
    x = _img(size, seed=4)
    with torch.no_grad():
        ref = run(model, x)
    before = {n: m.weight.detach().clone() for n, m in scope.named_modules()
              if isinstance(m, nn.LayerNorm)}
    # everything float except qkv of the first block (filter_fn): only that pair is folded
    adapt_attention_(scope)  # nn.MultiheadAttention's packed in-projection becomes a Linear
    first = next(iter(find_attention_modules(scope)))
    qkv = [n for n, m in scope.named_modules() if isinstance(m, nn.Linear)
           and n.startswith(first) and ('qkv' in n or 'in_proj' in n)]
    assert len(qkv) == 1
    prefix = 'backbone.' if hasattr(model, 'backbone') else ''
    quantize_(model, QuantConfig(smooth=0.5), filter_fn=lambda m, fqn: fqn == prefix + qkv[0])
    changed = [n for n, m in scope.named_modules()
               if isinstance(m, nn.LayerNorm) and not torch.equal(before[n], m.weight)]
    assert len(changed) == 1 and changed[0].startswith(first.split('.attn')[0] + '.')
    big = scope.get_submodule(changed[0]).weight.detach()
    assert big[:2].abs().max() < 50.0 / 2  # the huge channels gave part of their range
    with torch.no_grad(), quant_state(model, weight=False, act=False):
        _assert_all_close(run(model, x), ref, atol=1e-4, rtol=1e-4)
    # every pair when every Linear is quantized
    model = _build(name)
    quantize_(model, QuantConfig(smooth=0.5))
    scope = model.backbone if hasattr(model, 'backbone') else model
    n_blocks = len(find_attention_modules(scope))
    fresh = _build(name)
    fresh_norms = {n: m for n, m in (fresh.backbone if hasattr(fresh, 'backbone') else fresh)
                   .named_modules() if isinstance(m, nn.LayerNorm)}
    changed = [n for n, m in scope.named_modules() if isinstance(m, nn.LayerNorm)
               and not torch.equal(m.weight, fresh_norms[n].weight)]
    assert len(changed) == 2 * n_blocks


def test_smooth_factor_moves_range_from_activation_to_weights():
    from mimiq_mm.quant.reparam import smooth_factor
    norm, lin = nn.LayerNorm(8), nn.Linear(8, 4)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.weight[0] = 64.0
        norm.bias.zero_()
        lin.weight.fill_(0.5)
    assert torch.equal(smooth_factor(norm, [lin], 0.0), torch.ones(8))
    half, full = smooth_factor(norm, [lin], 0.5), smooth_factor(norm, [lin], 1.0)
    # geometric mean 1; the huge channel gets sqrt(64) = 8 times the others at alpha 0.5
    for f in (half, full):
        torch.testing.assert_close(f.log().mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(half[0] / half[1], torch.tensor(8.0))
    torch.testing.assert_close(full[0] / full[1], torch.tensor(64.0))
    with pytest.raises(ValueError, match='elementwise_affine=False'):
        smooth_factor(nn.LayerNorm(8, elementwise_affine=False), [lin], 0.5)


FRESH_SCRIPT = textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    from mimiq_mm.quant import QuantConfig, quantize_
    from mimiq_mm.testing import tiny_timm_swin, tiny_timm_vit
    path = sys.argv[1]
    saved = torch.load(path, weights_only=False)
    for name, build in (('vit', tiny_timm_vit), ('swin', tiny_timm_swin)):
        torch.manual_seed(123)  # different init: everything must come from the state_dict
        model = quantize_(build(img_size=32).eval(), QuantConfig.from_dict(saved['cfg']))
        model.load_state_dict(saved[name + '_state'], strict=True)
        with torch.no_grad():
            out = model(saved['x'])
        ref = saved[name + '_out']
        assert torch.equal(out, ref), (name, (out - ref).abs().max())
    print('FRESH-OK')
''')


@pytest.mark.parametrize('cfg', [
    dict(reparam=True, attn_prob=dict(kind='log2', lsq=False, observer='minmax'),
         act=dict(observer='percentile', percentile=99.9, granularity='per_tensor')),
    dict(act=dict(observer='mse')),  # per-token (the default grid) with a searched ratio
], ids=['reparam_percentile', 'per_token_mse'])
def test_calibrated_state_dict_reproduces_outputs_in_fresh_process(tmp_path, cfg):
    saved = {'cfg': cfg, 'x': _img(32, seed=11)}
    for name, build in (('vit', tiny_timm_vit), ('swin', tiny_timm_swin)):
        torch.manual_seed(0)
        model = quantize_(build(img_size=32).eval(), QuantConfig.from_dict(cfg))
        _calibrate(model, _timm, 32)
        with torch.no_grad():
            saved[name + '_out'] = model(saved['x'])
        saved[name + '_state'] = model.state_dict()
    path = tmp_path / 'calibrated.pth'
    torch.save(saved, path)
    python = REPO / '.venv' / 'bin' / 'python'
    proc = subprocess.run([str(python if python.exists() else sys.executable), '-c',
                           FRESH_SCRIPT, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'FRESH-OK' in proc.stdout


# ----------------------------------------------------------------------------- config
def test_config_defaults_are_the_one_recipe():
    """MIMIQ.md's W4/A4 layout with the range estimators and rotation chosen on the real
    (DINOv2) and demo teachers (benchmarks/results/real_backbone/)."""
    cfg = QuantConfig()
    assert (cfg.weight.bits, cfg.weight.granularity, cfg.weight.symmetric,
            cfg.weight.observer, cfg.weight.lsq) == (4, 'per_channel', True, 'mse', False)
    assert cfg.weight.rounding == 'gptq' and cfg.act.rounding == 'nearest'
    assert (cfg.act.bits, cfg.act.granularity, cfg.act.observer, cfg.act.lsq) == (
        4, 'per_token', 'minmax', True)
    assert (cfg.attn_prob.bits, cfg.attn_prob.kind, cfg.attn_prob.lsq) == (4, 'log2', False)
    assert cfg.rotate_inputs and not cfg.reparam
    assert cfg.quantize_attention and cfg.keep_input_float and cfg.scope == 'backbone'
    # a partial dict changes fields of the default, the rest of the recipe stays
    assert QuantConfig.from_dict(dict(attn_prob=dict(bits=3))).attn_prob.kind == 'log2'
    with pytest.raises(Exception, match='cannot assign'):
        cfg.scope = 'all'


def test_config_from_dict_and_overrides():
    cfg = QuantConfig.from_dict(dict(type='QuantConfig', weight=dict(bits=8),
                                     act=dict(observer='mse'), scope='all',
                                     overrides={'a.*': None, 'a.b': {'act': {'bits': 8}},
                                                'c': {'keep_input_float': False}}))
    assert cfg.weight.bits == 8 and cfg.weight.granularity == 'per_channel'
    assert cfg.act.observer == 'mse' and cfg.act.lsq
    assert cfg.for_module('a.x') is None
    assert cfg.for_module('zzz') is cfg
    assert cfg.for_module('c').keep_input_float is False
    assert cfg.overrides_dict()['a.b'] == {'act': {'bits': 8}}
    assert QuantConfig.from_dict(None) == QuantConfig()


@pytest.mark.parametrize('d, match', [
    (dict(scope='neck'), r"scope='neck' is not valid; choose one of \['backbone', 'all'\]"),
    (dict(weight=dict(bits=1)), r'bits=1 is not valid; choose one of \[2, 3, 4, 5, 6, 7, 8\]'),
    (dict(act=dict(granularity='per_row')), r"choose one of \['per_tensor', 'per_channel', 'per_token'\]"),
    (dict(act=dict(observer='hist')), r"observer='hist' is not valid; choose one of \['minmax'"),
    (dict(attn_prob=dict(kind='log3')), r"kind='log3' is not valid; choose one of"),
    (dict(act=dict(kind='log2')), r'set lsq=False'),
    (dict(attn_prob=dict(kind='uniform', lsq=False, observer='x')), r"observer='x'"),
    (dict(wbits=4), r"unknown QuantConfig field\(s\) \['wbits'\]; valid fields are"),
    (dict(act=dict(bitz=4)), r"unknown QuantizerConfig field\(s\) \['bitz'\]"),
    (dict(overrides={'x': {'weights': {}}}), r"unknown key\(s\) \['weights'\]; valid keys"),
    (dict(overrides={'x': {'act': {'bits': 12}}}), r'bits=12 is not valid'),
    (dict(reparam='yes'), r"reparam='yes' is not valid; choose one of \[True, False\]"),
    (dict(act=dict(percentile=30)), r'percentile=30 is not valid'),
    (dict(act=dict(observer='percentile')), r"per_token' sets its clipping ratio with observer"),
    (dict(act=dict(symmetric=False)), r"per_token' supports symmetric=True only"),
    (dict(reparam=True), r"reparam=True .* needs act.granularity='per_tensor'"),
    (dict(smooth=1.5), r'smooth must be a migration exponent in \[0, 1\]'),
    (dict(smooth=True), r'smooth must be a migration exponent'),
    (dict(weight=dict(granularity='per_token')), r"'per_token' is for activations"),
])
def test_config_validation_errors(d, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict(d)


def test_quantize_accepts_only_configs():
    with pytest.raises(ValueError, match='config must be a QuantConfig'):
        quantize_(nn.Sequential(nn.Linear(2, 2)), config=4)


class _HeadFirst(nn.Module):
    """Registers its head before its stem: registration order is not call order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.stem = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.head(self.stem(x).mean(dim=(2, 3)))


def test_network_input_layer_is_checked_at_calibration():
    model = quantize_(_HeadFirst())
    assert model.head.input_quantizer is None and model.stem.input_quantizer is not None
    with pytest.warns(RuntimeWarning, match=r"first quantized layer to run was 'stem'.*"
                                            r"input_layer='stem'"):
        with calibration_mode(model):
            model(_img(8))
    fixed = quantize_(_HeadFirst(), QuantConfig(input_layer='stem'))
    assert fixed.stem.input_quantizer is None and fixed.head.input_quantizer is not None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with calibration_mode(fixed):
            fixed(_img(8))
    assert torch.isfinite(fixed(_img(8))).all()
    with pytest.raises(ValueError, match=r"input_layer='steam' is not a Conv2d/Linear"):
        quantize_(_HeadFirst(), QuantConfig(input_layer='steam'))


def test_quantizer_state_follows_the_model_device():
    """A model already moved to an accelerator gets its quantizer buffers there too (here the
    'meta' device stands in for CUDA: same code path, no GPU needed)."""
    from mimiq_mm.testing import tiny_timm_vit
    model = tiny_timm_vit().to('meta')
    quantize_(model, QuantConfig())
    devices = {t.device.type for t in itertools.chain(model.parameters(), model.buffers())}
    assert devices == {'meta'}
