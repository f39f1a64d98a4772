"""AttentionRecorder: recorded logits / outputs equal an independent computation from the
module's weights, one record per call, names / grids / prefix tokens, nothing left behind.
Whole tiny real models (mmdet Mask R-CNN Swin, mmseg UperNet Swin / ViT, timm ViT / Swin):
every backbone attention block is adapted, records once per call, outputs unchanged."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimiq_mm.attention import (AttentionAdapter, AttentionRecord, AttentionRecorder,
                                adapt_attention_, find_attention_modules, is_adapted,
                                register_adapter, restore_attention_)
from mimiq_mm.attention.adapter import _SINKS
from mimiq_mm.testing import randomize_parameters_

ATOL = 1e-5  # fp32



def _no_hooks_left(model: nn.Module) -> bool:
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or \
                getattr(m, '_forward_hooks_with_kwargs', None):
            return False
    return not _SINKS


# --- independent reference computations (einsum over the module's weights) ----------------


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, num_heads, c // num_heads)  # (B, N, H, d)


def _reference_window(module, x, mask, window):
    """Swin window attention from the weights; relative index rebuilt from coordinates."""
    heads = module.num_heads
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).chunk(3, dim=-1)
    q, k, v = (_heads(t, heads) for t in (q, k, v))
    logits = torch.einsum('bnhd,bmhd->bhnm', q, k) * module.scale
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww),
                                        indexing='ij')).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    index = (rel[0] + wh - 1) * (2 * ww - 1) + rel[1] + ww - 1
    logits = logits + module.relative_position_bias_table[index].permute(2, 0, 1)
    if mask is not None:
        logits = logits + mask.repeat(x.shape[0] // mask.shape[0], 1, 1)[:, None]
    out = torch.einsum('bhnm,bmhd->bhnd', logits.softmax(-1), v)
    return logits, out


def _reference_timm_vit(module, x):
    heads = module.num_heads
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).chunk(3, dim=-1)
    q, k, v = (_heads(t, heads).transpose(1, 2) for t in (q, k, v))
    q, k = module.q_norm(q), module.k_norm(k)
    logits = torch.einsum('bhnd,bhmd->bhnm', q, k) * q.shape[-1]**-0.5
    return logits, torch.einsum('bhnm,bhmd->bhnd', logits.softmax(-1), v)


def _reference_mha(module, query, key, value):
    """batch-first inputs; packed weight split by rows."""
    w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    heads = module.num_heads
    q = _heads(F.linear(query, w_q, b_q), heads)
    k = _heads(F.linear(key, w_k, b_k), heads)
    v = _heads(F.linear(value, w_v, b_v), heads)
    logits = torch.einsum('bnhd,bmhd->bhnm', q, k) / q.shape[-1]**0.5
    return logits, torch.einsum('bhnm,bmhd->bhnd', logits.softmax(-1), v)


# --- records equal the reference ------------------------------------------------------------


@pytest.mark.parametrize('family', ['mmdet', 'mmseg', 'timm'])
def test_window_records_equal_reference(family):
    from mmdet.models.backbones.swin import WindowMSA as MMDetWindowMSA
    from mmseg.models.backbones.swin import WindowMSA as MMSegWindowMSA
    from timm.models.swin_transformer import WindowAttention
    build = {
        'mmdet': lambda: MMDetWindowMSA(24, 3, (2, 3)),
        'mmseg': lambda: MMSegWindowMSA(24, 3, (2, 3)),
        'timm': lambda: WindowAttention(24, 3, window_size=(2, 3)),
    }[family]
    module = adapt_attention_(randomize_parameters_(build()).eval())
    x = torch.randn(4, 6, 24)  # batch 2, 2 windows of 2x3
    mask = torch.zeros(2, 6, 6)
    mask[1, :3, 3:] = mask[1, 3:, :3] = -100.0
    with AttentionRecorder(module) as rec:
        module(x, mask)
        module(x)
    assert [r.name for r in rec.records] == ['', '']
    ref_logits, ref_out = _reference_window(module, x, mask, (2, 3))
    record = rec.records[0]
    assert record.logits.shape == (4, 3, 6, 6) and record.output.shape == (4, 3, 6, 8)
    torch.testing.assert_close(record.logits, ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(record.output, ref_out, atol=ATOL, rtol=0)
    assert record.grid == (2, 3) and record.num_prefix_tokens == 0
    torch.testing.assert_close(rec.records[1].logits,
                               _reference_window(module, x, None, (2, 3))[0], atol=ATOL, rtol=0)
    assert _no_hooks_left(module)


def test_timm_vit_attention_records_equal_reference():
    from timm.layers import Attention
    module = randomize_parameters_(Attention(32, num_heads=4, qkv_bias=True, qk_norm=True,
                                   norm_layer=nn.LayerNorm)).eval()
    adapt_attention_(module, num_prefix_tokens=1)
    x = torch.randn(2, 5, 32)
    with AttentionRecorder(module) as rec:
        module(x)
    logits, out = _reference_timm_vit(module, x)
    (record, ) = rec.records
    torch.testing.assert_close(record.logits, logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(record.output, out, atol=ATOL, rtol=0)
    assert record.num_prefix_tokens == 1 and record.grid is None  # no patch_embed to read


@pytest.mark.parametrize('batch_first', [True, False])
def test_multihead_attention_records_equal_reference(batch_first):
    module = randomize_parameters_(nn.MultiheadAttention(32, 4, batch_first=batch_first)).eval()
    model = nn.ModuleDict(dict(attn=module))
    adapt_attention_(model)
    query, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    prep = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    with AttentionRecorder(model) as rec:
        module(prep(query), prep(query), prep(query))
        module(prep(query), prep(memory), prep(memory))  # cross-attention
    self_rec, cross_rec = rec.records
    assert self_rec.name == cross_rec.name == 'attn'
    for record, key in ((self_rec, query), (cross_rec, memory)):
        logits, out = _reference_mha(module, query, key, key)
        assert record.logits.shape == (2, 4, 5, key.shape[1])
        torch.testing.assert_close(record.logits, logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(record.output, out, atol=ATOL, rtol=0)


# --- recorder mechanics ---------------------------------------------------------------------


def _two_layer_vit_like():
    from timm.layers import Attention
    model = nn.Sequential(Attention(16, 2), nn.LayerNorm(16), Attention(16, 2))
    return adapt_attention_(model)


def test_records_keep_graph_unless_detached():
    model = _two_layer_vit_like()
    x = torch.randn(1, 4, 16)
    with AttentionRecorder(model) as rec:
        model(x)
    assert [r.name for r in rec.records] == ['0', '2']
    assert all(isinstance(r, AttentionRecord) for r in rec.records)
    rec.records[0].output.sum().backward()
    assert model[0].qkv.weight.grad is not None
    with AttentionRecorder(model, detach=True) as rec:
        model(x)
    assert not any(r.logits.requires_grad or r.output.requires_grad for r in rec.records)


def test_names_filter_by_name_and_unknown_names():
    model = _two_layer_vit_like()
    x = torch.randn(1, 4, 16)
    with AttentionRecorder(model, names=['2']) as rec:
        model(x)
        model(x)
    assert [r.name for r in rec.records] == ['2', '2']
    assert list(rec.by_name()) == ['2'] and len(rec.by_name()['2']) == 2
    with AttentionRecorder(model) as rec:
        model[2](x)
    assert {k: len(v) for k, v in rec.by_name().items()} == {'0': 0, '2': 1}
    with pytest.raises(KeyError, match=r"valid names: \['0', '2'\]"):
        AttentionRecorder(model, names=['1'])
    with pytest.raises(TypeError, match="names=\\['0'\\]"):
        AttentionRecorder(model, names='0')


def test_recorder_needs_adapted_model():
    from timm.layers import Attention
    with pytest.raises(RuntimeError, match='adapt_attention_'):
        AttentionRecorder(nn.Sequential(Attention(16, 2)))


def test_nothing_left_behind_even_on_exception():
    from mimiq_mm.testing import tiny_timm_vit
    model = adapt_attention_(tiny_timm_vit()).eval()
    x = torch.randn(1, 3, 32, 32)
    assert _no_hooks_left(model)
    with pytest.raises(ValueError, match='boom'):
        with AttentionRecorder(model) as rec:
            model(x)
            assert _SINKS and not _no_hooks_left(model)  # active while inside
            raise ValueError('boom')
    assert rec.records and _no_hooks_left(model)
    n = len(rec.records)
    model(x)  # no recorder: nothing recorded
    assert len(rec.records) == n


def test_teacher_and_student_recorders_are_separate():
    teacher = _two_layer_vit_like()
    student = copy.deepcopy(teacher)
    x = torch.randn(1, 4, 16)
    with AttentionRecorder(teacher) as t_rec, AttentionRecorder(student) as s_rec:
        teacher(x)
        student(x)
        student(x)
    assert len(t_rec.records) == 2 and len(s_rec.records) == 4
    with AttentionRecorder(teacher) as a, AttentionRecorder(teacher, names=['0']) as b:
        teacher(x)
    assert len(a.records) == 2 and len(b.records) == 1
    assert _no_hooks_left(teacher) and _no_hooks_left(student)


# --- whole tiny real models ---------------------------------------------------------------


def _backbone_attention_names(backbone, prefix='backbone.'):
    return [prefix + n for n, m in backbone.named_modules() if is_adapted(m)]


def _check_model(model, run, expected_classes, num_attention, prefix_tokens, grid):
    """adapt, then: outputs unchanged, each attention module records once per call."""
    model.eval()
    with torch.no_grad():
        before = run(model)
    original = {n: type(m) for n, m in find_attention_modules(model).items()}
    keys = list(model.state_dict())
    adapt_attention_(model)
    attention = find_attention_modules(model)
    assert len(attention) == num_attention
    assert all(is_adapted(m) for m in attention.values())
    assert {c.__name__ for c in original.values()} == expected_classes
    with torch.no_grad(), AttentionRecorder(model) as rec:
        after = run(model)
    assert _no_hooks_left(model)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    counts = {name: len(records) for name, records in rec.by_name().items()}
    assert counts == dict.fromkeys(attention, 1)
    assert [r.name for r in rec.records] == list(attention)  # call order = model order
    assert {r.num_prefix_tokens for r in rec.records} == {prefix_tokens}
    if grid is not None:
        assert rec.records[0].grid == grid
    restored = restore_attention_(copy.deepcopy(model))
    assert {n: type(m) for n, m in find_attention_modules(restored).items()} == original
    assert list(restored.state_dict()) == keys
    return rec


def test_mmdet_mask_rcnn_swin():
    from mimiq_mm.testing import build_tiny_model
    model = build_tiny_model('maskrcnn_swin')
    x = torch.randn(1, 3, 60, 92)  # non-square, not a multiple of window*patch: padding

    def run(m):
        feats = m.backbone(x)
        return list(feats) + list(m.neck(feats))

    rec = _check_model(model, run, {'WindowMSA'}, 8, 0, (7, 7))
    # stage 1: 15x23 tokens padded to 21x28 -> 3x4 windows of 7x7 = 12 windows, 2 heads
    assert rec.records[0].logits.shape == (12, 2, 49, 49)
    assert all(r.name.startswith('backbone.stages.') for r in rec.records)
    # the shifted block saw the -100 mask
    assert rec.records[1].logits.min() < -50 and rec.records[0].logits.min() > -50


def test_mmseg_upernet_swin():
    from mimiq_mm.testing import build_tiny_model
    model = build_tiny_model('upernet_swin')
    x = torch.randn(1, 3, 56, 72)
    _check_model(model, lambda m: list(m.extract_feat(x)), {'WindowMSA'}, 8, 0, (7, 7))


def test_mmseg_upernet_vit():
    from mimiq_mm.testing import build_tiny_model
    model = build_tiny_model('upernet_vit')
    x = torch.randn(1, 3, 48, 80)  # 3x5 patches of 16
    rec = _check_model(model, lambda m: list(m.extract_feat(x)), {'MultiheadAttention'}, 4, 1,
                       (3, 5))
    assert rec.records[0].logits.shape[-2:] == (16, 16)  # cls + 15 patches


@pytest.mark.parametrize('with_cls_token', [True, False])
def test_mmseg_vit_prefix_tokens_and_override(with_cls_token):
    from mmseg.models.backbones import VisionTransformer
    backbone = VisionTransformer(img_size=(32, 32), patch_size=8, embed_dims=32, num_layers=1,
                                 num_heads=2, with_cls_token=with_cls_token, out_indices=-1,
                                 init_cfg=None)
    adapt_attention_(backbone)
    x = torch.randn(1, 3, 24, 40)  # 3x5 patches
    with AttentionRecorder(backbone) as rec:
        backbone(x)
    (record, ) = rec.records
    assert record.name == 'layers.0.attn.attn'
    assert record.num_prefix_tokens == int(with_cls_token)
    assert record.logits.shape[-1] == 15 + int(with_cls_token) and record.grid == (3, 5)
    adapt_attention_(backbone, num_prefix_tokens=3)  # explicit value wins (re-adapt: no-op)
    with AttentionRecorder(backbone) as rec:
        backbone(x)
    assert rec.records[0].num_prefix_tokens == 3 and rec.records[0].grid is None  # 3+15 != N


def test_timm_vit():
    from mimiq_mm.testing import tiny_timm_vit
    model = tiny_timm_vit()
    x = torch.randn(2, 3, 32, 32)
    depth = len(model.blocks)
    grid = tuple(model.patch_embed.grid_size)
    rec = _check_model(model, lambda m: [m(x)], {'Attention'}, depth, model.num_prefix_tokens,
                       grid)
    assert rec.records[0].logits.shape[-1] == model.num_prefix_tokens + grid[0] * grid[1]


def test_timm_swin():
    from mimiq_mm.testing import tiny_timm_swin
    model = tiny_timm_swin()
    x = torch.randn(1, 3, 32, 32)
    _check_model(model, lambda m: [m(x)], {'WindowAttention'}, 4, 0, (4, 4))


# --- docs/custom_backbone.md example ----------------------------------------------------


def test_custom_backbone_doc_example():
    """The worked example of docs/custom_backbone.md, verbatim in spirit."""

    class MyAttention(nn.Module):

        def __init__(self, dim=32, num_heads=4):
            super().__init__()
            self.num_heads, self.scale = num_heads, (dim // num_heads)**-0.5
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))

    model = nn.Sequential(MyAttention(), nn.GELU(), MyAttention()).eval()
    with pytest.raises(Exception, match=r'@register_adapter\(MyAttention\)'):
        adapt_attention_(model)

    @register_adapter(MyAttention)
    class MyAttentionAdapter(AttentionAdapter):

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            logits = self.qk_matmul(q * self.scale, k.transpose(-2, -1))  # (B, H, N, N)
            out = self.av_matmul(logits.softmax(dim=-1), v)  # (B, H, N, d)
            self.record_attention(logits, out)
            return self.proj(out.transpose(1, 2).reshape(B, N, C))

    x = torch.randn(2, 6, 32)
    expected = model(x)
    adapt_attention_(model, require=True)
    assert isinstance(model[0], MyAttention) and is_adapted(model[0])
    with AttentionRecorder(model) as rec:
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    assert [r.name for r in rec.records] == ['0', '2']
    assert rec.records[0].logits.shape == (2, 4, 6, 6)

    # ... and quantize_ quantizes both products of the user's attention, recorder unchanged
    from mimiq_mm.quant import QuantMatMul, calibration_mode, quantize_
    quantize_(model)
    assert isinstance(model[0].qk_matmul, QuantMatMul)
    assert isinstance(model[0].av_matmul, QuantMatMul)
    with calibration_mode(model):
        model(x)
    with AttentionRecorder(model) as rec:
        model(x)
    assert [r.name for r in rec.records] == ['0', '2']
    assert torch.isfinite(rec.records[1].output).all()
