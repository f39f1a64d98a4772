"""Deployable export: int4 packing, integer weights, and a rebuilt model with identical
outputs (also through tools/export.py on a MimiQ checkpoint)."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from mimiq_mm.export import (build_quantized_model, export_quantized, float_state_dict,
                             load_quantized_, pack_int4, serialized_size, unpack_int4)

ROOT = Path(__file__).resolve().parents[1]



@pytest.mark.parametrize('numel', [1, 2, 7, 64])
def test_pack_unpack_int4_roundtrip(numel):
    codes = torch.randint(0, 16, (numel, ), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, numel), codes)
    # layout: low nibble first
    if numel >= 2:
        assert int(packed[0]) == int(codes[0]) | (int(codes[1]) << 4)
    with pytest.raises(ValueError, match=r'\[0, 15\]'):
        pack_int4(torch.tensor([16], dtype=torch.uint8))


def _distiller(tmp_path, quant_cfg, task='seg'):
    from mimiq_mm.models import MimiQDistiller
    from mimiq_mm.testing import (build_model_from_cfg, tiny_maskrcnn_swin_cfg,
                                  tiny_upernet_swin_cfg)
    cfg = tiny_upernet_swin_cfg() if task == 'seg' else tiny_maskrcnn_swin_cfg()
    torch.manual_seed(0)
    teacher = build_model_from_cfg(cfg.model, 'mmseg' if task == 'seg' else 'mmdet')
    torch.save({'state_dict': teacher.state_dict()}, str(tmp_path / 't.pth'))
    model = MimiQDistiller(teacher=copy.deepcopy(cfg.model),
                           teacher_checkpoint=str(tmp_path / 't.pth'), quant_cfg=quant_cfg)
    return cfg, model


def _calibrate(model, x):
    from mimiq_mm.quant import calibration_mode
    with torch.no_grad(), calibration_mode(model.student):
        model.student.extract_feat(x)


@pytest.mark.parametrize('bits', [(4, 4), (2, 4), (6, 6)])
def test_export_roundtrip_identical_outputs(tmp_path, bits):
    w_bits, a_bits = bits
    quant_cfg = dict(weight=dict(bits=w_bits), act=dict(bits=a_bits),
                     attn_prob=dict(bits=a_bits))
    cfg, model = _distiller(tmp_path, quant_cfg)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _calibrate(model, x)
    # some fine-tuning-like change of the weights and the activation steps
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    path = tmp_path / 'q.pth'
    payload = export_quantized(model.student, str(path), teacher_cfg=cfg.model.to_dict(),
                               quant_cfg=quant_cfg, scope='mmseg')
    qweights = payload['quantized_weights']
    assert len(qweights) > 10
    for key, entry in qweights.items():
        assert key not in payload['state_dict']
        numel = 1
        for d in entry['shape']:
            numel *= d
        if w_bits <= 4:
            assert entry['packed'] and entry['codes'].dtype == torch.uint8
            assert entry['codes'].numel() == (numel + 1) // 2
            assert int(unpack_int4(entry['codes'], numel).max()) < 2 ** w_bits
        else:
            assert not entry['packed'] and entry['codes'].dtype == torch.int8
    # activation steps travel as they are
    assert any(k.endswith('input_quantizer.step') for k in payload['state_dict'])

    # rebuilt from the file alone: bit-identical features and logits
    rebuilt = build_quantized_model(str(path))
    with torch.no_grad():
        ref = model.student.extract_feat(x)
        out = rebuilt.extract_feat(x)
        assert all(torch.equal(a, b) for a, b in zip(ref, out))
        assert torch.equal(model.student.decode_head(ref), rebuilt.decode_head(out))
    # load into an existing quantized model works the same
    _, other = _distiller(tmp_path, quant_cfg)
    load_quantized_(other.student, str(path))
    other.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ref, other.student.extract_feat(x)))
    # smaller than the float weights
    if w_bits <= 4:
        assert path.stat().st_size < serialized_size(float_state_dict(model.student)) / 2


@pytest.mark.parametrize('observer', ['minmax', 'mse', 'lsq', 'percentile'])
def test_export_reproduces_the_student_whatever_the_weight_observer(observer):
    """The exported scales are used as they are: an MSE or LSQ-init range recomputed from
    the already-quantized weights would move them (by up to 20 % before the fix)."""
    from mimiq_mm.quant import QuantConfig, calibration_mode, quantize_
    from mimiq_mm.testing import tiny_timm_swin
    cfg = QuantConfig.from_dict(dict(weight=dict(bits=4, observer=observer)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    student = quantize_(tiny_timm_swin(img_size=32).eval(), cfg)
    with torch.no_grad():
        with calibration_mode(student):
            student(x)
        reference = student(x)
    torch.manual_seed(1)  # other initial weights: everything must come from the file
    fresh = quantize_(tiny_timm_swin(img_size=32).eval(), cfg)
    load_quantized_(fresh, export_quantized(student))
    with torch.no_grad():
        assert torch.equal(fresh(x), reference)


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_rebuilt_export_predicts_like_the_student(tmp_path, task):
    """The model rebuilt from the file's plain-dict config is a working detector / segmentor
    (mmdet reads ``train_cfg.rpn``, mmseg ``test_cfg.mode`` as attributes)."""
    from mmdet.structures import DetDataSample
    quant_cfg = dict(weight=dict(bits=4), act=dict(bits=4), attn_prob=dict(bits=4))
    cfg, model = _distiller(tmp_path, quant_cfg, task)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    _calibrate(model, x)
    model.eval()
    path = tmp_path / 'q.pth'
    export_quantized(model.student, str(path), teacher_cfg=cfg.model.to_dict(),
                     quant_cfg=quant_cfg, scope='mmdet' if task == 'det' else 'mmseg')
    rebuilt = build_quantized_model(str(path))
    meta = dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64),
                batch_input_shape=(64, 64), scale_factor=(1.0, 1.0))
    with torch.no_grad():
        if task == 'det':
            ref, out = (m.predict(x, [DetDataSample(metainfo=meta)], rescale=False)[0]
                        for m in (model.student, rebuilt))
            assert len(ref.pred_instances) > 0  # 70 boxes from this random teacher
            assert torch.equal(ref.pred_instances.bboxes, out.pred_instances.bboxes)
            assert torch.equal(ref.pred_instances.scores, out.pred_instances.scores)
            assert torch.equal(ref.pred_instances.masks, out.pred_instances.masks)
        else:
            ref, out = (m.predict(x)[0] for m in (model.student, rebuilt))
            assert ref.seg_logits.data.shape == (4, 64, 64)
            assert torch.equal(ref.seg_logits.data, out.seg_logits.data)
            assert torch.equal(ref.pred_sem_seg.data, out.pred_sem_seg.data)


def test_tools_export_on_a_mimiq_checkpoint(tmp_path, capsys):
    from mmengine.config import Config
    quant_cfg = dict(weight=dict(bits=4), act=dict(bits=4), attn_prob=dict(bits=4))
    cfg, model = _distiller(tmp_path, quant_cfg)
    _calibrate(model, torch.randn(1, 3, 64, 64))
    ckpt = tmp_path / 'mimiq.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, str(ckpt))
    mimiq_cfg = Config(dict(
        default_scope='mmseg', teacher_checkpoint=str(tmp_path / 't.pth'),
        quant_cfg=quant_cfg,
        model=dict(type='mimiq_mm.MimiQDistiller', teacher=cfg.model.to_dict())))
    mimiq_cfg.dump(str(tmp_path / 'cfg.py'))
    spec = importlib.util.spec_from_file_location('mimiq_tool_export',
                                                  ROOT / 'tools' / 'export.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'deploy.pth'
    result = tool.main([str(tmp_path / 'cfg.py'), str(ckpt), '--out', str(out), '--verify'])
    text = capsys.readouterr().out
    assert 'identical: True' in text and 'smaller' in text
    assert result['quantized_bytes'] < result['float_bytes']
    # weights_only loading of the deployable file
    torch.load(str(out), map_location='cpu', weights_only=True)
