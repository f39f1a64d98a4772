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


# ---------------------------------------------------------------------------------------
# MimiQDistiller on tiny real models
# ---------------------------------------------------------------------------------------
import copy  # noqa: E402


def _save_teacher(model_cfg, scope, path):
    from mimiq_mm.testing import build_model_from_cfg
    torch.manual_seed(0)
    model = build_model_from_cfg(model_cfg, scope)
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, str(path))
    return model


def _det_batch(num_images=2, size=64):
    from mmdet.structures import DetDataSample
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 255, (3, size, size), generator=g).float()
              for _ in range(num_images)]
    samples = []
    for i in range(num_images):
        s = DetDataSample()
        s.set_metainfo(dict(img_id=i, img_shape=(size, size), ori_shape=(size, size),
                            scale_factor=(1.0, 1.0)))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def _seg_batch(num_images=2, size=64):
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 255, (3, size, size), generator=g).float()
              for _ in range(num_images)]
    samples = []
    for i in range(num_images):
        s = SegDataSample()
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size)))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def _build_distiller(model_cfg, ckpt, scope='backbone', **kwargs):
    from mimiq_mm.models import MimiQDistiller
    # nearest weight rounding: with fake-quant off the student must equal the teacher (the
    # default GPTQ rounding writes its rounded weights into the student at calibration)
    quant = kwargs.pop('quant_cfg', None) or dict(weight=dict(bits=4, rounding='nearest'),
                                                  act=dict(bits=4), attn_prob=dict(bits=4),
                                                  scope=scope)
    return MimiQDistiller(teacher=copy.deepcopy(model_cfg), teacher_checkpoint=str(ckpt),
                          quant_cfg=quant, **kwargs)


def _calibrate(distiller, batch):
    from mimiq_mm.engine import MimiQCalibrationHook
    MimiQCalibrationHook.calibrate(distiller, [batch], 1)


def _check_losses(distiller, batch, expected_keys):
    from mimiq_mm.quant import set_quant_state
    _calibrate(distiller, batch)
    data = distiller.data_preprocessor(copy.deepcopy(batch), True)
    losses = distiller.loss(**data)
    assert set(expected_keys) <= set(losses), sorted(losses)
    total = sum(losses.values())
    assert torch.isfinite(total) and float(total) > 0
    total.backward()
    student_grads = [p.grad for p in distiller.student.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    # the teacher is invisible to the optimizer and the checkpoints
    own = {id(p) for p in distiller.parameters()}
    assert not own & {id(p) for p in distiller.teacher.parameters()}
    assert all(k.startswith(('student.', 'data_preprocessor.'))
               for k in distiller.state_dict())
    # fake-quant off -> the student IS the teacher: every term vanishes
    set_quant_state(distiller.student, weight=False, act=False)
    distiller.student.eval()
    with torch.no_grad():
        zero = distiller.loss(**distiller.data_preprocessor(copy.deepcopy(batch), True))
    for key, value in zero.items():
        assert abs(float(value)) < 1e-4, (key, float(value))
    return losses


@pytest.mark.parametrize('scope', ['backbone', 'all'])
def test_distiller_mask_rcnn_losses_and_predict(tmp_path, scope):
    from mimiq_mm.quant import QuantLinear
    from mimiq_mm.testing import tiny_maskrcnn_swin_cfg
    cfg = tiny_maskrcnn_swin_cfg()
    _save_teacher(cfg.model, 'mmdet', tmp_path / 't.pth')
    d = _build_distiller(cfg.model, tmp_path / 't.pth', scope=scope, eval_teacher=True)
    heads_quantized = any(isinstance(m, QuantLinear) for m in d.student.roi_head.modules())
    assert heads_quantized == (scope == 'all')
    assert d.task == 'two_stage'
    batch = _det_batch()
    _check_losses(d, batch, ['loss_hsad', 'loss_kd_feat', 'loss_kd_rpn_cls', 'loss_kd_rpn_reg',
                             'loss_kd_roi_cls', 'loss_kd_roi_reg', 'loss_kd_roi_mask'])
    d.eval()
    with torch.no_grad():
        out = d.val_step(copy.deepcopy(batch))
    assert len(out) == 2 and 'pred_instances' in out[0]
    assert 'teacher_pred_instances' in out[0]


@pytest.mark.parametrize('train_scope', ['quantized', 'all', 'steps', 'layers', 'weights'])
def test_distiller_train_scope(tmp_path, train_scope):
    """'quantized' (default): fine-tuning updates the backbone (the quantization scope)
    only; the float neck and heads keep the teacher's weights. 'all': everything trains.
    'steps': only the learnt quantizer steps of the backbone. 'layers': the backbone's
    quantized layers (their weights, biases and steps), not its LayerNorms or position
    tables. 'weights': the backbone without the steps."""
    from mimiq_mm.testing import tiny_maskrcnn_swin_cfg
    cfg = tiny_maskrcnn_swin_cfg()
    _save_teacher(cfg.model, 'mmdet', tmp_path / 't.pth')
    kwargs = {} if train_scope == 'quantized' else dict(train_scope=train_scope)
    d = _build_distiller(cfg.model, tmp_path / 't.pth', **kwargs)
    assert d.train_scope == train_scope
    batch = _det_batch()
    _calibrate(d, batch)
    losses = d.loss(**d.data_preprocessor(copy.deepcopy(batch), True))
    sum(losses.values()).backward()
    from mimiq_mm.quant import quant_modules
    quantized = {n for n, _ in quant_modules(d.student)}
    if train_scope == 'layers':   # something in the backbone stays frozen: norms, tables
        frozen = [n for n, p in d.student.named_parameters()
                  if n.startswith('backbone.') and not p.requires_grad]
        assert any('norm' in n for n in frozen), frozen
    for name, p in d.student.named_parameters():
        in_scope = name.startswith('backbone.')
        if train_scope == 'steps':
            in_scope = in_scope and name.endswith('.step')
        if train_scope == 'weights':
            in_scope = in_scope and not name.endswith('.step')
        if train_scope == 'layers':
            owner = d.student.get_submodule(name.rsplit('.', 1)[0])
            in_scope = in_scope and any(name.startswith(q + '.') for q in quantized)
            assert not (in_scope and isinstance(owner, torch.nn.LayerNorm)), name
        assert p.requires_grad == (in_scope or train_scope == 'all'), name
        if not p.requires_grad:
            assert p.grad is None, name
    grads = {n: p.grad for n, p in d.student.named_parameters() if p.grad is not None}
    assert any(n.startswith('backbone.') and g.abs().sum() > 0 for n, g in grads.items())
    assert any(n.startswith('backbone.') and n.endswith('.step') for n in grads) == \
        (train_scope != 'weights')
    assert any(n.startswith('neck.') for n in grads) == (train_scope == 'all')
    assert any(n.endswith('.weight') for n in grads) == (train_scope != 'steps')
    assert all(not p.requires_grad for p in d.teacher.parameters())


def test_distiller_train_scope_error(tmp_path):
    from mimiq_mm.testing import tiny_maskrcnn_swin_cfg
    cfg = tiny_maskrcnn_swin_cfg()
    _save_teacher(cfg.model, 'mmdet', tmp_path / 't.pth')
    with pytest.raises(ValueError, match="train_scope='heads' is not valid"):
        _build_distiller(cfg.model, tmp_path / 't.pth', train_scope='heads')
    # no learnt steps anywhere: 'steps' would train nothing
    fixed = dict(weight=dict(bits=4), act=dict(bits=4, observer='minmax', lsq=False),
                 attn_prob=dict(bits=4, observer='minmax', lsq=False), scope='backbone')
    with pytest.raises(ValueError, match='leaves nothing to fine-tune'):
        _build_distiller(cfg.model, tmp_path / 't.pth', train_scope='steps', quant_cfg=fixed)


def test_distiller_cascade_mask_rcnn(tmp_path):
    from mimiq_mm.testing import load_upstream_config, strip_pretrained, tiny_maskrcnn_swin_cfg
    cfg = load_upstream_config('mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py')
    tiny = tiny_maskrcnn_swin_cfg()
    m = cfg.model
    m.backbone = tiny.model.backbone
    m.neck = tiny.model.neck
    m.rpn_head.update(in_channels=32, feat_channels=32)
    m.roi_head.bbox_roi_extractor.update(out_channels=32)
    for head in m.roi_head.bbox_head:
        head.update(in_channels=32, fc_out_channels=32, num_classes=3)
    m.roi_head.mask_roi_extractor.update(out_channels=32)
    m.roi_head.mask_head.update(in_channels=32, conv_out_channels=32, num_classes=3)
    m.train_cfg.rpn_proposal.update(nms_pre=100, max_per_img=50)
    m.test_cfg.rpn.update(nms_pre=100, max_per_img=50)
    strip_pretrained(m)
    _save_teacher(m, 'mmdet', tmp_path / 'c.pth')
    d = _build_distiller(m, tmp_path / 'c.pth', max_kd_rois=20)
    _check_losses(d, _det_batch(), ['loss_hsad', 'loss_kd_rpn_cls', 'loss_kd_roi_cls',
                                    'loss_kd_roi_reg', 'loss_kd_roi_mask'])


@pytest.mark.parametrize('name', ['upernet_swin', 'upernet_vit'])
def test_distiller_upernet(tmp_path, name):
    from mimiq_mm.testing import TINY_CONFIGS
    cfg = TINY_CONFIGS[name]()
    _save_teacher(cfg.model, 'mmseg', tmp_path / 't.pth')
    d = _build_distiller(cfg.model, tmp_path / 't.pth', feat_source='backbone')
    assert d.task == 'segmentor'
    _check_losses(d, _seg_batch(), ['loss_hsad', 'loss_kd_feat', 'loss_kd_seg',
                                    'loss_kd_seg_aux'])


def test_teacher_checkpoint_errors(tmp_path):
    from mimiq_mm.testing import tiny_upernet_swin_cfg
    cfg = tiny_upernet_swin_cfg()
    with pytest.raises(FileNotFoundError, match='teacher_checkpoint=.*nope.pth'):
        _build_distiller(cfg.model, tmp_path / 'nope.pth')
    from mimiq_mm.models import MimiQDistiller
    with pytest.raises(ValueError, match='teacher_checkpoint is not set'):
        MimiQDistiller(teacher=copy.deepcopy(cfg.model), teacher_checkpoint=None)
    # a checkpoint of a different architecture (other number of classes)
    other = tiny_upernet_swin_cfg(num_classes=7)
    _save_teacher(other.model, 'mmseg', tmp_path / 'other.pth')
    with pytest.raises(RuntimeError, match=r'other.pth.*does not match.*shape mismatches'):
        _build_distiller(cfg.model, tmp_path / 'other.pth')
    # a MimiQ (student) checkpoint passed as the teacher
    d = _build_distiller(other.model, tmp_path / 'other.pth')
    torch.save({'state_dict': d.state_dict()}, str(tmp_path / 'mimiq.pth'))
    with pytest.raises(ValueError, match='mimiq.pth.*quantized student.*float teacher'):
        _build_distiller(other.model, tmp_path / 'mimiq.pth')
    # missing keys
    model = _save_teacher(cfg.model, 'mmseg', tmp_path / 'ok.pth')
    state = model.state_dict()
    state.pop(next(iter(state)))
    torch.save({'state_dict': state}, str(tmp_path / 'partial.pth'))
    with pytest.raises(RuntimeError, match='missing keys'):
        _build_distiller(cfg.model, tmp_path / 'partial.pth')
