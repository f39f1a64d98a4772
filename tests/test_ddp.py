"""DDP rehearsal on CPU: tools/dist_train.sh (torchrun, 2 gloo ranks) runs the MimiQ
pipeline (synthesis hook -> calibration hook -> fine-tuning -> COCO val across ranks) on a
tiny Mask R-CNN Swin, then an interrupted run is resumed under DDP.

The CPU-only pieces (no-op ``torch.cuda.set_device``, a DDP wrapper without ``device_ids``)
live in tests/ddp_cpu_shim.py, imported through the config: tools/ and mimiq_mm run as on
a GPU machine.
"""
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MAX_ITERS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _cfg(tmp_path):
    from mimiq_mm.datasets.demo_data import COCO_CLASSES, DemoDataConfig, generate_demo_data
    from mimiq_mm.testing import build_model_from_cfg, tiny_maskrcnn_swin_cfg, tiny_mimiq_cfg
    demo = tmp_path / 'demo'
    generate_demo_data(demo, DemoDataConfig(seed=0, num_train=1, num_val=4, size=(64, 64)),
                       workers=1)
    coco = str(demo / 'coco')
    teacher = tiny_maskrcnn_swin_cfg(num_classes=len(COCO_CLASSES))
    torch.manual_seed(0)
    t_ckpt = tmp_path / 'teacher.pth'
    torch.save({'state_dict': build_model_from_cfg(teacher.model, 'mmdet').state_dict()},
               str(t_ckpt))

    # 4 batches of 1: each rank synthesizes 2 of them
    cfg = tiny_mimiq_cfg(teacher, t_ckpt, tmp_path / 'synthetic', max_iters=MAX_ITERS,
                         num_images=4, batch_size=1, extra_imports=['ddp_cpu_shim'])
    # Training keeps the RandomFlip of tiny_mimiq_cfg (the resume below must continue its
    # random stream); calibration observes the images unflipped, so that the merged
    # statistics can be checked against one process observing every image.
    calib = copy.deepcopy(cfg.train_dataloader)
    calib.dataset.pipeline = [t for t in calib.dataset.pipeline if t['type'] != 'RandomFlip']
    assert len(calib.dataset.pipeline) < len(cfg.train_dataloader.dataset.pipeline)
    for hook in cfg.custom_hooks:
        if hook['type'] == 'mimiq_mm.MimiQCalibrationHook':
            hook['dataloader'] = calib
    meta = dict(classes=COCO_CLASSES)
    cfg.val_dataloader = dict(
        batch_size=1, num_workers=0, persistent_workers=False, drop_last=False,
        sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(type='CocoDataset', data_root=coco, metainfo=meta, test_mode=True,
                     ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                     pipeline=[dict(type='LoadImageFromFile'),
                               dict(type='Resize', scale=(64, 64), keep_ratio=True),
                               dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                               dict(type='PackDetInputs',
                                    meta_keys=('img_id', 'img_path', 'ori_shape',
                                               'img_shape', 'scale_factor'))]))
    cfg.test_dataloader = copy.deepcopy(cfg.val_dataloader)
    cfg.val_evaluator = dict(type='CocoMetric', metric=['bbox', 'segm'],
                             ann_file=str(demo / 'coco' / 'annotations' / 'instances_val.json'))
    cfg.test_evaluator = copy.deepcopy(cfg.val_evaluator)
    cfg.train_cfg.val_interval = MAX_ITERS
    cfg.val_cfg = dict(type='ValLoop')
    cfg.test_cfg = dict(type='TestLoop')
    cfg.optim_wrapper.paramwise_cfg = dict(custom_keys={'.step': dict(lr_mult=10.0)})
    cfg.optim_wrapper.clip_grad = dict(max_norm=10.0)
    cfg.model_wrapper_cfg = dict(type='CPUDistributedDataParallel')
    cfg.custom_hooks.append(dict(type='DumpRankStateHook'))
    path = tmp_path / 'mimiq_ddp.py'
    cfg.dump(str(path))
    return str(path)


def _dist_train(cfg_file, work_dir, *extra):
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()),
               OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT / 'tests'), str(ROOT),
                                           os.environ.get('PYTHONPATH', '')]))
    env.pop('CUDA_VISIBLE_DEVICES', None)
    proc = subprocess.run(['bash', str(ROOT / 'tools' / 'dist_train.sh'), cfg_file, '2',
                           '--work-dir', str(work_dir), *extra],
                          cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _single_process_calibration(cfg_file, synth):
    """Observer state after calibrating in this process on every synthetic image."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope
    from torch.utils.data import DataLoader

    from mimiq_mm.datasets import SyntheticImageDataset
    from mimiq_mm.engine import MimiQCalibrationHook, apply_mimiq_fields
    from mimiq_mm.registry import MODELS
    cfg = apply_mimiq_fields(Config.fromfile(cfg_file, import_custom_modules=False))
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        calib = next(h for h in cfg.custom_hooks
                     if h['type'] == 'mimiq_mm.MimiQCalibrationHook')['dataloader']
        dataset = SyntheticImageDataset(data_root=str(synth), pipeline=calib.dataset.pipeline)
        loader = DataLoader(dataset, batch_size=1, collate_fn=pseudo_collate)
        MimiQCalibrationHook.calibrate(model, loader, len(dataset))
    return {k: v.detach().clone() for k, v in model.student.state_dict().items()}


def _load(path):
    return torch.load(str(path), map_location='cpu', weights_only=True)


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f'{what}: {len(diff)} tensors differ, e.g. {diff[:5]}'


def test_two_gloo_ranks_train_identical_students_and_resume(tmp_path):
    cfg_file = _cfg(tmp_path)
    work = tmp_path / 'straight'
    log = _dist_train(cfg_file, work)

    # synthesis: disjoint shards, one per rank, all batches present before training
    synth = tmp_path / 'synthetic'
    records = [json.loads(p.read_text()) for p in sorted((synth / 'batches').glob('*.json'))]
    assert sorted(r['batch_index'] for r in records) == [0, 1, 2, 3]
    assert {r['batch_index']: r['rank'] for r in records} == {0: 0, 1: 1, 2: 0, 3: 1}
    assert 'Calibrated' in log

    # both ranks end with bit-identical students: weights, LSQ steps, quantizer buffers
    r0, r1 = _load(work / 'rank0_student.pth'), _load(work / 'rank1_student.pth')
    _assert_same(r0, r1, 'rank 0 vs rank 1')
    steps = [k for k in r0 if k.endswith('.step')]
    assert steps and all(bool(r0[k[:-len('step')] + 'initialized']) for k in steps)
    assert any(k.endswith('observer.min_val') for k in r0)
    # ... and equal to what rank 0 saved
    saved = _load(work / f'iter_{MAX_ITERS}.pth')['state_dict']
    _assert_same({k[len('student.'):]: v for k, v in saved.items()
                  if k.startswith('student.')}, r0, 'checkpoint vs ranks')
    # the quantizers were trained, not only calibrated
    first = _load(work / 'iter_1.pth')['state_dict']
    assert any(not torch.equal(first[f'student.{k}'], r0[k]) for k in steps)

    # calibration merged the ranks' statistics: the activation observers hold what one
    # process observing all 4 synthetic images gets
    single = _single_process_calibration(cfg_file, synth)
    obs = [k for k in single if '.observer.' in k and 'weight_quantizer' not in k]
    assert obs
    for key in obs:
        assert torch.allclose(single[key].double(), r0[key].double(), rtol=1e-5,
                              atol=1e-6), key

    # COCO val across the 2 ranks ran at the last iteration
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log

    # interrupted at iteration 2, resumed under DDP -> the straight run's student
    work2 = tmp_path / 'resumed'
    _dist_train(cfg_file, work2, '--cfg-options', 'train_cfg.max_iters=2')
    log2 = _dist_train(cfg_file, work2, '--resume')
    assert 'skipping calibration' in log2
    resumed = _load(work2 / 'rank1_student.pth')
    for key in r0:
        assert torch.allclose(r0[key].float(), resumed[key].float(), rtol=0, atol=1e-6), key
