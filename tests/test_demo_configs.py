"""The demo teacher configs: they inherit the upstream mmdet/mmseg Swin configs, download
nothing, stay under the 25 MB checkpoint budget, and train + validate end to end (mmengine
Runner, real CocoMetric / IoUMetric) on a tiny generated demo set, on CPU."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mimiq_mm.datasets.demo_data import (ADE_CLASSES, ADE_PALETTE, COCO_CLASSES, COCO_PALETTE,
                                         DemoDataConfig, generate_demo_data)

REPO = Path(__file__).resolve().parents[1]
MASKRCNN = REPO / 'configs/demo/maskrcnn_swin_demo.py'
UPERNET = REPO / 'configs/demo/upernet_swin_demo.py'
MAX_CHECKPOINT_BYTES = 25 * 10**6
TINY = DemoDataConfig(seed=1, num_train=4, num_val=2, size=(96, 96))


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo_cfg') / 'data'
    generate_demo_data(out, TINY, workers=1)
    return out


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _init_cfgs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ('init_cfg', 'pretrained'):
                yield value
            yield from _init_cfgs(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _init_cfgs(value)


@pytest.mark.parametrize('path', [MASKRCNN, UPERNET], ids=['maskrcnn', 'upernet'])
def test_config_inherits_upstream_and_downloads_nothing(path):
    text = path.read_text()
    assert "_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']" in text or \
        ("_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_"
         "ade20k-512x512.py']") in text
    cfg = Config.fromfile(str(path))
    assert [s for s in _strings(cfg.to_dict()) if '://' in s] == []
    model = cfg.model.to_dict()
    assert [c for c in _init_cfgs(model) if c is not None and
            'Pretrained' in str(c)] == []
    assert cfg.model.backbone.depths == [2, 2, 2, 2]
    assert cfg.model.backbone.num_heads == [2, 4, 8, 16]
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.default_hooks.checkpoint.save_optimizer is False
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        assert loader.dataset.data_root.startswith('data/demo/')
    if path == MASKRCNN:
        assert cfg.train_dataloader.dataset.metainfo.classes == COCO_CLASSES
        assert [tuple(c) for c in cfg.train_dataloader.dataset.metainfo.palette] == COCO_PALETTE
        assert cfg.model.roi_head.bbox_head.num_classes == len(COCO_CLASSES)
        assert cfg.model.roi_head.mask_head.num_classes == len(COCO_CLASSES)
        assert set(cfg.val_evaluator.metric) == {'bbox', 'segm'}
    else:
        assert cfg.train_dataloader.dataset.metainfo.classes == ADE_CLASSES
        assert [tuple(c) for c in cfg.train_dataloader.dataset.metainfo.palette] == ADE_PALETTE
        assert cfg.model.decode_head.num_classes == len(ADE_CLASSES)
        assert cfg.model.auxiliary_head.num_classes == len(ADE_CLASSES)
        assert cfg.val_evaluator.type == 'IoUMetric'


def _point_at_tiny_set(cfg, data_root: Path, work_dir: Path):
    """Overrides for a CPU run on TINY: data root, image scale, batch size, no workers."""
    size = TINY.size
    cfg.work_dir = str(work_dir)
    cfg.default_hooks.logger.interval = 1
    cfg.log_level = 'WARNING'
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg[name]
        loader.batch_size = 2
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.dataset.data_root = str(data_root)
        for transform in loader.dataset.pipeline:
            if transform.type in ('Resize', 'RandomResize'):
                transform.scale = size
            if transform.type == 'RandomCrop':
                transform.crop_size = size
    return cfg


def _is_number(value) -> bool:
    return isinstance(value, (float, np.floating)) and math.isfinite(float(value))


@pytest.fixture
def fast_config_text(monkeypatch):
    """The Runner formats its config with yapf (for the log, the dump and every checkpoint's
    meta): seconds per call on this CPU. Unformatted text is enough for these tests."""
    monkeypatch.setattr(Config, 'pretty_text', property(lambda cfg: repr(cfg.to_dict())))


def _run(cfg):
    """Train (no validation inside), then one validation pass; returns what was seen."""
    runner = Runner.from_cfg(cfg)
    runner.train()
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    metrics = runner.val()
    model = runner.model
    num_params = sum(p.numel() for p in model.parameters())
    checkpoints = sorted(Path(cfg.work_dir).glob('*.pth'))
    return losses, metrics, num_params, checkpoints


def _check_checkpoint(checkpoints, num_params):
    assert len(checkpoints) == 1
    # Weights only (no optimizer state): about 4 bytes per fp32 parameter, within budget.
    assert num_params * 4 <= MAX_CHECKPOINT_BYTES
    size = checkpoints[0].stat().st_size
    assert num_params * 4 <= size <= MAX_CHECKPOINT_BYTES
    state = torch.load(checkpoints[0], map_location='cpu', weights_only=False)
    assert 'optimizer' not in state and 'state_dict' in state


def test_maskrcnn_demo_trains_and_evaluates(tiny_set, tmp_path, fast_config_text):
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(str(MASKRCNN))
    _point_at_tiny_set(cfg, tiny_set / 'coco', tmp_path / 'work')
    ann = str(tiny_set / 'coco/annotations/instances_val.json')
    cfg.val_evaluator.ann_file = ann
    cfg.test_evaluator.ann_file = ann
    cfg.train_cfg.max_epochs = 1
    cfg.train_cfg.val_interval = 100
    cfg.default_hooks.checkpoint.interval = 1

    losses, metrics, num_params, checkpoints = _run(cfg)

    assert len(losses) == math.ceil(TINY.num_train / 2)
    assert all(math.isfinite(v) for v in losses)
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert _is_number(metrics[key]), (key, metrics)
    _check_checkpoint(checkpoints, num_params)


def test_upernet_demo_trains_and_evaluates(tiny_set, tmp_path, fast_config_text):
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(str(UPERNET))
    _point_at_tiny_set(cfg, tiny_set / 'ade', tmp_path / 'work')
    cfg.model.data_preprocessor.size = TINY.size
    cfg.train_cfg.max_iters = 2
    cfg.train_cfg.val_interval = 100
    cfg.default_hooks.checkpoint.interval = 2

    losses, metrics, num_params, checkpoints = _run(cfg)

    assert len(losses) == 2
    assert all(math.isfinite(v) for v in losses)
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert _is_number(metrics[key]), (key, metrics)
    assert 0.0 <= metrics['mIoU'] <= 100.0
    _check_checkpoint(checkpoints, num_params)
