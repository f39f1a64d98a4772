"""Issue 15, defect 7 (and the ``max_iters`` rough edge): the demo config's documented train
command, after ``make demo`` (which writes only data/demo_val), used to synthesize for minutes
and then die on data/demo/coco/annotations/instances_val.json with no hint. Inputs are now
checked before the long stages, naming the command that makes them."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / 'configs' / 'mimiq' / 'demo_maskrcnn_swin_w4a4.py')


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'mimiq_tool_{name}_inputs',
                                                  ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_train_command_without_demo_data_fails_first_with_the_command(tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # a checkout after `make demo`: no data/demo
    (tmp_path / 'data' / 'demo_val').mkdir(parents=True)
    train = _tool('train')
    synthetic = tmp_path / 'syn'
    teacher = ROOT / 'checkpoints' / 'demo' / 'maskrcnn_swin_demo.pth'
    with pytest.raises(FileNotFoundError) as info:
        train.main([DEMO_CFG, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                    f'teacher_checkpoint={teacher}', f'synthetic_root={synthetic}',
                    'synthesis.num_images=2', 'synthesis.batch_size=2',
                    'synthesis.iterations=1', 'synthesis.image_size=(32,32)',
                    'synthesis.figures=False', 'synthesis.progress=False'])
    message = str(info.value)
    assert 'instances_val.json' in message
    assert 'tools/make_demo_data.py --out data/demo' in message
    assert 'val_dataloader.dataset.ann_file' in message
    assert not synthetic.exists(), 'synthesis started before the inputs were checked'


def test_test_inputs_are_checked_too(tmp_path):
    from mmengine.config import Config

    from mimiq_mm.engine import check_run_inputs
    cfg = Config.fromfile(DEMO_CFG)
    cfg.test_dataloader.dataset.data_root = str(tmp_path / 'nowhere') + '/'
    cfg.test_evaluator.ann_file = str(tmp_path / 'nowhere' / 'ann.json')
    with pytest.raises(FileNotFoundError) as info:
        check_run_inputs(cfg, 'test')
    message = str(info.value)
    assert 'test_dataloader.dataset.ann_file' in message and 'test_evaluator.ann_file' in message
    assert '--cfg-options test_dataloader.dataset.ann_file=' in message
    # present inputs pass
    ann = tmp_path / 'coco' / 'annotations'
    ann.mkdir(parents=True)
    (ann / 'instances_val.json').write_text('{}')
    (tmp_path / 'coco' / 'val').mkdir()
    cfg.test_dataloader.dataset.data_root = str(tmp_path / 'coco') + '/'
    cfg.test_evaluator.ann_file = str(ann / 'instances_val.json')
    check_run_inputs(cfg, 'test')


def test_max_iters_override_reaches_the_schedule():
    train = _tool('train')
    cfg = train.build_cfg(train.parse_args([DEMO_CFG, '--cfg-options', 'max_iters=3']))
    assert cfg.train_cfg.max_iters == 3
    assert cfg.train_cfg.val_interval == 4
    assert cfg.default_hooks.checkpoint.interval == 3
    assert cfg.param_scheduler[-1].end == 3
    # an explicit train_cfg.max_iters still wins
    cfg = train.build_cfg(train.parse_args([DEMO_CFG, '--cfg-options', 'max_iters=3',
                                            'train_cfg.max_iters=5']))
    assert cfg.train_cfg.max_iters == 5
