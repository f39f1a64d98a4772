"""Issue 15, defects 2 and 3 (and the rough edges of the same guard): a checkpoint that does
not belong to the config is refused by every tool, naming both sides.

One tiny MimiQ segmentation run (W3: ``quant_cfg.{weight,act,attn_prob}.bits=3``, one
iteration) is trained with tools/train.py; then, under the config's default W4 recipe,
tools/test.py, tools/export.py and ``--resume`` must refuse it, as tools/test.py must refuse
a checkpoint of another architecture, a float file and an exported file. (The errors are
``mimiq_mm.engine.CheckpointMismatchError``, a RuntimeError.)"""
import copy
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
W3 = ['quant_cfg.weight.bits=3', 'quant_cfg.act.bits=3', 'quant_cfg.attn_prob.bits=3']


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'mimiq_tool_{name}_guard',
                                                  ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    from mimiq_mm.datasets.demo_data import (ADE_CLASSES, ADE_PALETTE, DemoDataConfig,
                                             generate_demo_data)
    from mimiq_mm.testing import (build_model_from_cfg, tiny_maskrcnn_swin_cfg, tiny_mimiq_cfg,
                                  tiny_runtime_cfg, tiny_upernet_swin_cfg)
    tmp = tmp_path_factory.mktemp('guard')
    demo = tmp / 'demo'
    generate_demo_data(demo, DemoDataConfig(seed=0, num_train=2, num_val=2, size=(64, 64)),
                       workers=1)
    cfg = tiny_upernet_swin_cfg(num_classes=len(ADE_CLASSES))
    ds = dict(type='BaseSegDataset', data_root=str(demo / 'ade'), img_suffix='.jpg',
              seg_map_suffix='.png', reduce_zero_label=True,
              metainfo=dict(classes=ADE_CLASSES, palette=ADE_PALETTE))
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', reduce_zero_label=True),
                dict(type='PackSegInputs')]
    cfg.test_dataloader = dict(
        batch_size=1, num_workers=0, persistent_workers=False,
        sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dict(**ds, test_mode=True, pipeline=pipeline,
                     data_prefix=dict(img_path='images/validation',
                                      seg_map_path='annotations/validation')))
    cfg.val_dataloader = copy.deepcopy(cfg.test_dataloader)
    cfg.test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
    cfg.val_evaluator = copy.deepcopy(cfg.test_evaluator)
    cfg.train_dataloader = copy.deepcopy(cfg.test_dataloader)
    cfg = tiny_runtime_cfg(cfg, max_iters=1, ckpt_interval=1)
    seg_file = tmp / 'seg_float.py'
    cfg.dump(str(seg_file))
    torch.manual_seed(0)
    teacher = tmp / 'teacher.pth'
    torch.save({'state_dict': build_model_from_cfg(cfg.model, 'mmseg').state_dict()},
               str(teacher))
    det = tmp / 'maskrcnn.pth'
    torch.save({'state_dict': build_model_from_cfg(tiny_maskrcnn_swin_cfg().model,
                                                   'mmdet').state_dict()}, str(det))
    m_cfg = tiny_mimiq_cfg(cfg, teacher, tmp / 'synthetic', max_iters=2, num_images=2,
                           batch_size=2, ckpt_interval=1, pack='PackSegInputs')
    m_cfg.model.feat_source = 'backbone'
    m_file = tmp / 'mimiq_seg.py'
    m_cfg.dump(str(m_file))
    work = tmp / 'w3'
    _tool('train').main([str(m_file), '--work-dir', str(work), '--cfg-options', *W3,
                         'train_cfg.max_iters=1'])
    ckpt = work / 'iter_1.pth'
    assert ckpt.is_file()
    return dict(tmp=tmp, seg_file=str(seg_file), m_file=str(m_file), teacher=str(teacher),
                det=str(det), work=work, ckpt=str(ckpt))


def test_test_and_export_refuse_a_checkpoint_of_another_recipe(setup):
    test, export = _tool('test'), _tool('export')
    tmp = setup['tmp']
    # W3 checkpoint under the (default W4) config: error naming both bit widths
    with pytest.raises(RuntimeError,
                       match=r"checkpoint .*weight\.bits=3.*config .*weight\.bits=4"):
        test.main([setup['m_file'], setup['ckpt'], '--work-dir', str(tmp / 'eval_w4')])
    with pytest.raises(RuntimeError, match=r'weight\.bits=3.*weight\.bits=4'):
        export.main([setup['m_file'], setup['ckpt'], '--out', str(tmp / 'w4.pth')])
    assert not (tmp / 'w4.pth').exists()
    # the same file under its own recipe is evaluated and exported
    metrics = test.main([setup['m_file'], setup['ckpt'], '--work-dir', str(tmp / 'eval_w3'),
                         '--cfg-options', *W3])
    assert 0.0 <= metrics['mIoU'] <= 100.0
    out = export.main([setup['m_file'], setup['ckpt'], '--out', str(tmp / 'w3.pth'),
                       '--cfg-options', *W3])
    assert out['num_quantized'] > 0
    # a checkpoint written before the recipe was recorded in meta['mimiq']: the config
    # text mmengine stores (meta['cfg']) is read as literals, never executed
    old = torch.load(setup['ckpt'], map_location='cpu', weights_only=True)
    old['meta'].pop('mimiq')
    assert 'bits=3' in old['meta']['cfg']
    torch.save(old, str(tmp / 'legacy.pth'))
    with pytest.raises(RuntimeError, match=r'weight\.bits=3.*weight\.bits=4'):
        test.main([setup['m_file'], str(tmp / 'legacy.pth'), '--work-dir',
                   str(tmp / 'eval_legacy')])


def test_test_refuses_a_checkpoint_of_another_model(setup):
    """The UperNet config with a Mask R-CNN checkpoint used to print missing keys and score
    an mIoU of the randomly initialised rest."""
    test = _tool('test')
    with pytest.raises(RuntimeError,
                       match=r"maskrcnn\.pth.*does not match the model.*missing keys"):
        test.main([setup['seg_file'], setup['det'], '--work-dir',
                   str(setup['tmp'] / 'eval_det')])
    # its own float checkpoint is still evaluated by the plain config
    metrics = test.main([setup['seg_file'], setup['teacher'], '--work-dir',
                         str(setup['tmp'] / 'eval_float')])
    assert 'mIoU' in metrics


def test_test_names_float_and_exported_files(setup):
    test, export = _tool('test'), _tool('export')
    tmp = setup['tmp']
    with pytest.raises(RuntimeError, match='float model checkpoint'):
        test.main([setup['m_file'], setup['teacher'], '--work-dir', str(tmp / 'e_float')])
    exported = tmp / 'exported.pth'
    export.main([setup['m_file'], setup['ckpt'], '--out', str(exported), '--cfg-options', *W3])
    with pytest.raises(RuntimeError, match='exported deployable checkpoint'):
        test.main([setup['m_file'], str(exported), '--work-dir', str(tmp / 'e_exp'),
                   '--cfg-options', *W3])


def test_resume_refuses_a_changed_recipe(setup):
    """Resuming the W3 run with the plain ``--resume`` under the W4 config used to continue
    at W4 and write a checkpoint mixing both."""
    train = _tool('train')
    work = setup['tmp'] / 'resume_w4'
    shutil.copytree(setup['work'], work)
    with pytest.raises(RuntimeError, match=r'weight\.bits=3.*weight\.bits=4'):
        train.main([setup['m_file'], '--work-dir', str(work), '--resume'])
    assert not (work / 'iter_2.pth').exists()
    # the same recipe resumes and finishes the run
    train.main([setup['m_file'], '--work-dir', str(work), '--resume', '--cfg-options', *W3])
    assert (work / 'iter_2.pth').is_file()
    # a float teacher file is no training state: a clear error, not KeyError 'message_hub'
    with pytest.raises(RuntimeError, match='float model checkpoint'):
        train.main([setup['m_file'], '--work-dir', str(setup['tmp'] / 'resume_float'),
                    '--resume', setup['teacher']])
