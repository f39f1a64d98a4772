"""End to end on CPU: tools/train.py trains a float teacher from a plain mmdet config, then
a MimiQ run (synthesis hook -> calibration hook -> distillation) from the same tools;
tools/test.py scores it with mmdet's CocoMetric (bbox + segm) and mmseg's IoUMetric; an
interrupted-then-resumed run ends in exactly the state of a straight run."""
import copy
import importlib.util
import os.path as osp
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]



def _tool(name):
    spec = importlib.util.spec_from_file_location(f'mimiq_tool_{name}',
                                                  ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    from mimiq_mm.datasets.demo_data import DemoDataConfig, generate_demo_data
    root = tmp_path_factory.mktemp('demo')
    generate_demo_data(root, DemoDataConfig(seed=0, num_train=4, num_val=4, size=(64, 64)),
                       workers=1)
    return root


# ------------------------------------------------------------------ config builders
def _det_teacher_cfg(demo_root):
    from mimiq_mm.datasets.demo_data import COCO_CLASSES
    from mimiq_mm.testing import tiny_maskrcnn_swin_cfg, tiny_runtime_cfg
    cfg = tiny_maskrcnn_swin_cfg(num_classes=len(COCO_CLASSES))
    coco = str(demo_root / 'coco')
    meta = dict(classes=COCO_CLASSES)
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='PackDetInputs')]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                              'img_shape', 'scale_factor'))]
    cfg.train_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False,
        sampler=dict(type='InfiniteSampler', shuffle=False),
        dataset=dict(type='CocoDataset', data_root=coco, metainfo=meta,
                     ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                     filter_cfg=dict(filter_empty_gt=True, min_size=0),
                     pipeline=train_pipeline))
    cfg.val_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False, drop_last=False,
        sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(type='CocoDataset', data_root=coco, metainfo=meta, test_mode=True,
                     ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                     pipeline=test_pipeline))
    cfg.test_dataloader = copy.deepcopy(cfg.val_dataloader)
    cfg.val_evaluator = dict(type='CocoMetric', metric=['bbox', 'segm'], format_only=False,
                             ann_file=osp.join(coco, 'annotations', 'instances_val.json'))
    cfg.test_evaluator = copy.deepcopy(cfg.val_evaluator)
    return tiny_runtime_cfg(cfg, max_iters=2, ckpt_interval=2)


def _mimiq_cfg(teacher_cfg, teacher_ckpt, synth_root, max_iters, pack='PackDetInputs'):
    from mimiq_mm.testing import tiny_mimiq_cfg
    return tiny_mimiq_cfg(teacher_cfg, teacher_ckpt, synth_root, max_iters=max_iters,
                          num_images=2, batch_size=2, ckpt_interval=1, pack=pack)


def _dump(cfg, path):
    cfg.dump(str(path))
    return str(path)


def _student_state(path):
    state = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    return {k: v for k, v in state.items() if k.startswith('student.')}


# ------------------------------------------------------------------ tests
def test_detection_train_resume_test(demo_root, tmp_path):
    train, test = _tool('train'), _tool('test')
    # 1. float teacher from a plain mmdet config
    t_cfg = _det_teacher_cfg(demo_root)
    t_file = _dump(t_cfg, tmp_path / 'teacher_cfg.py')
    train.main([t_file, '--work-dir', str(tmp_path / 'teacher')])
    t_ckpt = tmp_path / 'teacher' / 'iter_2.pth'
    assert t_ckpt.is_file()

    # 2. MimiQ, straight to iteration 2 (synthesis happens on first use)
    synth = tmp_path / 'synthetic'
    m_file = _dump(_mimiq_cfg(t_cfg, t_ckpt, synth, max_iters=2), tmp_path / 'mimiq.py')
    train.main([m_file, '--work-dir', str(tmp_path / 'straight')])
    assert (synth / 'manifest.json').is_file()
    assert len(list((synth / 'batches').glob('batch_*.json'))) == 1
    straight = _student_state(tmp_path / 'straight' / 'iter_2.pth')
    steps = [k for k in straight if k.endswith('.step')]
    assert steps and all(bool(straight[k.rsplit('.', 1)[0] + '.initialized'])
                         for k in steps)

    # 3. interrupted at 1, resumed to 2 -> identical student, quantizers included
    work = str(tmp_path / 'resumed')
    train.main([m_file, '--work-dir', work, '--cfg-options', 'train_cfg.max_iters=1'])
    train.main([m_file, '--work-dir', work, '--resume'])
    resumed = _student_state(osp.join(work, 'iter_2.pth'))
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.allclose(straight[key].float(), resumed[key].float(), rtol=0,
                              atol=1e-6), key
    # the run actually trained the quantizers (resume did not just recalibrate)
    first = _student_state(osp.join(work, 'iter_1.pth'))
    assert any(not torch.equal(first[k], straight[k]) for k in steps)

    # 3b. a truncated image in the finished set is regenerated before training, not
    # handed to the data pipeline (whose loader would fail on it)
    image = synth / 'images' / '000001.png'
    original = image.read_bytes()
    image.write_bytes(original[:40])
    train.main([m_file, '--work-dir', str(tmp_path / 'repaired'), '--cfg-options',
                'train_cfg.max_iters=1'])
    assert image.read_bytes() == original
    assert (tmp_path / 'repaired' / 'iter_1.pth').is_file()

    # 4. evaluation of the student with CocoMetric (bbox + segm), teacher side by side
    metrics = test.main([m_file, str(tmp_path / 'straight' / 'iter_2.pth'), '--work-dir',
                         str(tmp_path / 'eval'), '--eval-teacher'])
    for key in ('coco/bbox_mAP', 'coco/segm_mAP', 'teacher/coco/bbox_mAP',
                'teacher/coco/segm_mAP'):
        assert key in metrics, sorted(metrics)
        assert 0.0 <= metrics[key] <= 1.0 or metrics[key] == -1.0
    # without --eval-teacher the teacher's file is not read (a config dumped into a work
    # dir may name one that no longer exists)
    alone = test.main([m_file, str(tmp_path / 'straight' / 'iter_2.pth'), '--work-dir',
                       str(tmp_path / 'eval_alone'), '--cfg-options',
                       f'teacher_checkpoint={tmp_path / "gone.pth"}'])
    assert alone['coco/bbox_mAP'] == metrics['coco/bbox_mAP']
    # the plain teacher config through the same tool
    t_metrics = test.main([t_file, str(t_ckpt), '--work-dir', str(tmp_path / 'eval_t')])
    assert 'coco/bbox_mAP' in t_metrics and 'coco/segm_mAP' in t_metrics
    # same teacher weights, so the teacher scores agree
    assert t_metrics['coco/bbox_mAP'] == pytest.approx(metrics['teacher/coco/bbox_mAP'])

    # 5. the finished synthetic set is not reused with another teacher checkpoint
    other = torch.load(t_ckpt, map_location='cpu', weights_only=True)
    first_key = next(k for k, v in other['state_dict'].items() if v.is_floating_point())
    other['state_dict'][first_key] = other['state_dict'][first_key] + 1e-3
    torch.save(other, tmp_path / 'other_teacher.pth')
    with pytest.raises(ValueError, match='teacher_weights'):
        train.main([m_file, '--work-dir', str(tmp_path / 'other'), '--cfg-options',
                    f'teacher_checkpoint={tmp_path / "other_teacher.pth"}'])
    # a missing teacher checkpoint is a clear error naming the config key
    with pytest.raises(FileNotFoundError, match='teacher_checkpoint=.*missing.pth'):
        train.main([m_file, '--work-dir', str(tmp_path / 'bad'), '--cfg-options',
                    f'teacher_checkpoint={tmp_path / "missing.pth"}'])


def test_segmentation_train_test_miou(demo_root, tmp_path):
    from mimiq_mm.datasets.demo_data import ADE_CLASSES, ADE_PALETTE
    from mimiq_mm.testing import tiny_runtime_cfg, tiny_upernet_swin_cfg
    train, test = _tool('train'), _tool('test')
    cfg = tiny_upernet_swin_cfg(num_classes=len(ADE_CLASSES))
    ade = str(demo_root / 'ade')
    ds = dict(type='BaseSegDataset', data_root=ade, img_suffix='.jpg', seg_map_suffix='.png',
              reduce_zero_label=True, metainfo=dict(classes=ADE_CLASSES, palette=ADE_PALETTE))
    cfg.train_dataloader = dict(
        batch_size=2, num_workers=0, persistent_workers=False,
        sampler=dict(type='InfiniteSampler', shuffle=False),
        dataset=dict(**ds, data_prefix=dict(img_path='images/training',
                                            seg_map_path='annotations/training'),
                     pipeline=[dict(type='LoadImageFromFile'),
                               dict(type='LoadAnnotations', reduce_zero_label=True),
                               dict(type='PackSegInputs')]))
    cfg.val_dataloader = dict(
        batch_size=1, num_workers=0, persistent_workers=False,
        sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(**ds, test_mode=True,
                     data_prefix=dict(img_path='images/validation',
                                      seg_map_path='annotations/validation'),
                     pipeline=[dict(type='LoadImageFromFile'),
                               dict(type='LoadAnnotations', reduce_zero_label=True),
                               dict(type='PackSegInputs')]))
    cfg.test_dataloader = copy.deepcopy(cfg.val_dataloader)
    cfg.val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
    cfg.test_evaluator = copy.deepcopy(cfg.val_evaluator)
    cfg = tiny_runtime_cfg(cfg, max_iters=2, ckpt_interval=2)
    # (plain-config training through tools/train.py is covered by the detection test)
    from mimiq_mm.testing import build_model_from_cfg
    torch.manual_seed(0)
    t_ckpt = tmp_path / 'teacher.pth'
    torch.save({'state_dict': build_model_from_cfg(cfg.model, 'mmseg').state_dict()},
               str(t_ckpt))

    m_cfg = _mimiq_cfg(cfg, t_ckpt, tmp_path / 'synthetic', max_iters=2, pack='PackSegInputs')
    m_cfg.model.feat_source = 'backbone'
    m_file = _dump(m_cfg, tmp_path / 'mimiq_seg.py')
    train.main([m_file, '--work-dir', str(tmp_path / 'mimiq'),
                '--cfg-options', 'quant_cfg.act.bits=3'])
    ckpt = tmp_path / 'mimiq' / 'iter_2.pth'
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    assert any(k.endswith('input_quantizer.step') for k in state)
    # evaluated under the recipe it was trained with (the config's default A4 is refused:
    # tests/test_checkpoint_guard.py)
    metrics = test.main([m_file, str(ckpt), '--work-dir', str(tmp_path / 'eval'),
                         '--out', str(tmp_path / 'preds.pkl'),
                         '--cfg-options', 'quant_cfg.act.bits=3'])
    assert 'mIoU' in metrics and 0.0 <= metrics['mIoU'] <= 100.0
    assert (tmp_path / 'preds.pkl').is_file()


MIMIQ_CONFIGS = ['maskrcnn_swin_w4a4', 'maskrcnn_swin_w6a6', 'maskrcnn_swin_w3a3',
                 'maskrcnn_swin_w2a4', 'maskrcnn_swin-s_w4a4', 'cascade_maskrcnn_swin_w4a4',
                 'upernet_swin_w4a4', 'upernet_vit-b_w4a4']


@pytest.mark.parametrize('name', MIMIQ_CONFIGS)
def test_shipped_configs_offline_and_overridable(name):
    from mimiq_mm.quant import QuantConfig
    train = _tool('train')
    path = str(ROOT / 'configs' / 'mimiq' / f'{name}.py')
    args = train.parse_args([path, '--cfg-options', 'teacher_checkpoint=/ckpt/float.pth',
                             'quant_cfg.act.bits=3', 'synthesis.num_images=8'])
    cfg = train.build_cfg(args)
    assert cfg.model.type == 'mimiq_mm.MimiQDistiller'
    assert cfg.model.teacher_checkpoint == '/ckpt/float.pth'
    assert cfg.model.quant_cfg.act.bits == 3
    qcfg = QuantConfig.from_dict(cfg.model.quant_cfg)
    expected_w = {'w6a6': 6, 'w3a3': 3, 'w2a4': 2}.get(name.rsplit('_', 1)[-1], 4)
    assert qcfg.weight.bits == expected_w and qcfg.act.bits == 3
    assert cfg.train_dataloader.dataset.type == 'mimiq_mm.SyntheticImageDataset'
    assert cfg.train_cfg.type == 'mimiq_mm.MimiQIterBasedTrainLoop'
    hooks = [h['type'] for h in cfg.custom_hooks]
    assert 'mimiq_mm.MimiQSynthesisHook' in hooks and 'mimiq_mm.MimiQCalibrationHook' in hooks
    # offline-safe: no URL anywhere in the model, no pretrained file for the teacher
    text = str(cfg.model.to_dict())
    assert 'http' not in text and 'Pretrained' not in text
    assert cfg.model.teacher.get('pretrained') is None
    # the synthetic set's folder moves with the top-level variable; an explicit data_root
    # override wins
    args = train.parse_args([path, '--cfg-options', 'synthetic_root=/elsewhere/set'])
    assert train.build_cfg(args).train_dataloader.dataset.data_root == '/elsewhere/set'
    args = train.parse_args([path, '--cfg-options', 'synthetic_root=/elsewhere/set',
                             'train_dataloader.dataset.data_root=/explicit'])
    assert train.build_cfg(args).train_dataloader.dataset.data_root == '/explicit'


def test_real_swin_t_mask_rcnn_config_builds(tmp_path):
    """The full-size W4A4 Mask R-CNN Swin-T distiller builds offline (student quantized,
    teacher outside the parameters)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mimiq_mm.engine import apply_mimiq_fields
    from mimiq_mm.quant import quantizers
    from mimiq_mm.registry import MODELS
    cfg = Config.fromfile(str(ROOT / 'configs' / 'mimiq' / 'maskrcnn_swin_w4a4.py'))
    apply_mimiq_fields(cfg)
    init_default_scope('mmdet')
    model_cfg = cfg.model.copy()
    with pytest.raises(ValueError, match='teacher_checkpoint is not set'):
        MODELS.build(copy.deepcopy(model_cfg))
    model_cfg.load_teacher = False
    model = MODELS.build(model_cfg)
    assert len(list(quantizers(model.student))) > 100
    assert not {id(p) for p in model.parameters()} & {id(p) for p in model.teacher.parameters()}
    assert type(model.data_preprocessor).__name__ == 'DetDataPreprocessor'


def test_keep_best_hook_holds_images_out_and_keeps_the_better_student(demo_root, tmp_path):
    """MimiQKeepBestHook: the last synthetic images are not trained on; a fine-tuning that
    raises their distillation loss (lr far too high) ends with the calibrated student, in
    memory and in the final checkpoint; keep_best.json records both losses."""
    import json
    train = _tool('train')
    t_cfg = _det_teacher_cfg(demo_root)
    t_file = _dump(t_cfg, tmp_path / 'teacher_cfg.py')
    train.main([t_file, '--work-dir', str(tmp_path / 'teacher')])
    from mimiq_mm.testing import tiny_mimiq_cfg
    cfg = tiny_mimiq_cfg(t_cfg, tmp_path / 'teacher' / 'iter_2.pth', tmp_path / 'synthetic',
                         max_iters=3, num_images=8, batch_size=2, ckpt_interval=3)
    cfg.custom_hooks.append(dict(type='mimiq_mm.MimiQKeepBestHook', holdout_images=2))
    cfg.optim_wrapper.optimizer.lr = 10.0  # wrecks the student
    m_file = _dump(cfg, tmp_path / 'mimiq.py')
    work = tmp_path / 'run'
    runner = train.main([m_file, '--work-dir', str(work)])
    record = json.loads((work / 'keep_best.json').read_text())
    assert record['heldout_images'] == 2
    assert record['heldout_finetuned'] > record['heldout_ptq']
    assert record['kept'] == 'ptq'
    # the students' agreement with the teacher is recorded (null when the 2-iteration
    # teacher predicts nothing confident); the loss decided, as configured
    assert record['criterion'] == 'loss' and record['decided_by'] == 'loss'
    for key in ('heldout_ptq_agreement', 'heldout_finetuned_agreement'):
        assert record[key] is None or 0.0 <= record[key] <= 1.0
    assert isinstance(record['agreement'], str) and 'not computed' not in record['agreement']
    # the terms (HSAD, feature and head KD) are recorded for both students and add up
    for key in ('ptq', 'finetuned'):
        terms = record[f'heldout_{key}_terms']
        assert len(terms) >= 2 and all(name.startswith('loss') for name in terms)
        assert sum(terms.values()) == pytest.approx(record[f'heldout_{key}'], rel=1e-6)
    ptq = torch.load(work / 'ptq_student.pth', weights_only=True)
    final = _student_state(work / 'iter_3.pth')
    assert all(torch.equal(final['student.' + k], v) for k, v in ptq.items())
    if runner is not None:  # the train dataset left the held-out images out
        assert len(runner.train_dataloader.dataset) == 6
        # and so did calibration, whose loader is built from runner.cfg.train_dataloader
        from mimiq_mm.engine.config_utils import nested_datasets
        calib_ds = list(nested_datasets(runner.cfg.train_dataloader))[-1]
        assert calib_ds['max_images'] == 6
