"""Issue 15, defects 4 and 5: a run never writes a NaN checkpoint and a kill during a save
always leaves a checkpoint to resume from.

* loss weights are validated when the distiller is built (``temperature=0``,
  ``kd_weight=inf``, ``gamma=nan`` ...);
* a non-finite loss term or gradient stops the run with an error naming the iteration and
  the term / parameter, before the step and before any checkpoint of it;
* checkpoints are written to a temporary name and renamed; the previous one is deleted only
  after the new one is complete (``max_keep_ckpts=1`` as in the demo configs).

The Runner-level tests go through :func:`mimiq_mm.engine.build_runner`, the shared start of
tools/train.py, tools/test.py and tools/demo.py, with a config saying ``type='CheckpointHook'``
exactly as the shipped configs do.
"""
import copy
import math
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import BaseDataset  # noqa: F401  (registry side effects)
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch import nn

import mimiq_mm  # noqa: F401


# ----------------------------------------------------------------------------- toy run
@MODELS.register_module(name='Issue15Toy', force=True)
class Toy(BaseModel):
    """Linear regression whose loss turns NaN from iteration ``nan_from`` (1-based) on."""

    def __init__(self, nan_from=0):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.extra = nn.Linear(4, 4)  # unused: frozen in the logging test
        self.nan_from = nan_from

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.lin(torch.stack(inputs)).squeeze(1)
        if mode != 'loss':
            return out
        loss = ((out - torch.stack(labels)) ** 2).mean()
        from mmengine.logging import MessageHub
        it = MessageHub.get_current_instance().get_info('iter')
        if self.nan_from and it is not None and it + 1 >= self.nan_from:
            loss = loss * float('nan')
        return dict(loss=loss)


@DATASETS.register_module(name='Issue15ToyData', force=True)
class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(4, generator=g), labels=torch.randn((), generator=g))


def _toy_cfg(work_dir, max_iters=4, interval=2, max_keep=1, nan_from=0, resume=False):
    return Config(dict(
        model=dict(type='Issue15Toy', nan_from=nan_from),
        work_dir=str(work_dir), experiment_name=f'toy_{osp.basename(str(work_dir))}',
        train_dataloader=dict(dataset=dict(type='Issue15ToyData'), batch_size=4,
                              num_workers=0, sampler=dict(type='InfiniteSampler',
                                                          shuffle=True)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False,
                                           interval=interval, max_keep_ckpts=max_keep),
                           logger=dict(type='LoggerHook', interval=1)),
        log_processor=dict(by_epoch=False),
        randomness=dict(seed=0), resume=resume))


def _params(path):
    return torch.load(str(path), map_location='cpu', weights_only=True)['state_dict']


# ----------------------------------------------------------------------------- defect 4
def test_nan_loss_stops_the_run_before_its_checkpoint(tmp_path):
    from mimiq_mm.engine import build_runner
    runner = build_runner(_toy_cfg(tmp_path / 'w', max_iters=5, interval=1, max_keep=-1,
                                   nan_from=3))
    # (NonFiniteError is a FloatingPointError)
    with pytest.raises(FloatingPointError, match='non-finite gradient at iteration 3'):
        runner.train()
    assert (tmp_path / 'w' / 'iter_2.pth').is_file()
    assert not (tmp_path / 'w' / 'iter_3.pth').exists()
    assert all(bool(torch.isfinite(v).all()) for v in _params(tmp_path / 'w' / 'iter_2.pth')
               .values())
    # the weights in memory were not touched by the NaN step either
    assert all(bool(torch.isfinite(p).all()) for p in runner.model.parameters())


def test_non_finite_parameters_are_never_saved():
    from mimiq_mm.engine import CheckpointGuardHook
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    runner = SimpleNamespace(model=model, iter=6)
    with pytest.raises(RuntimeError, match=r'iteration 7.*non-finite parameter.*weight'):
        CheckpointGuardHook().before_save_checkpoint(
            runner, dict(state_dict=model.state_dict(), meta={}))


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    from mimiq_mm.testing import build_model_from_cfg, tiny_upernet_swin_cfg
    cfg = tiny_upernet_swin_cfg()
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.manual_seed(0)
    torch.save({'state_dict': build_model_from_cfg(cfg.model, 'mmseg').state_dict()},
               str(path))
    return cfg.model, str(path)


def _distiller(teacher, **kwargs):
    from mimiq_mm.models import MimiQDistiller
    model_cfg, ckpt = teacher
    return MimiQDistiller(teacher=copy.deepcopy(model_cfg), teacher_checkpoint=ckpt,
                          quant_cfg=dict(weight=dict(bits=4), act=dict(bits=4),
                                         attn_prob=dict(bits=4)),
                          feat_source='backbone', **kwargs)


@pytest.mark.parametrize('kwargs,name', [
    (dict(temperature=0), 'temperature'),
    (dict(temperature=-1.0), 'temperature'),
    (dict(kd_weight=math.inf), 'kd_weight'),
    (dict(gamma=math.nan), 'gamma'),
    (dict(gamma=-1.0), 'gamma'),
    (dict(kd_weights=dict(seg=math.nan)), "kd_weights\\['seg'\\]"),
])
def test_loss_weights_are_validated_at_build(teacher, kwargs, name):
    with pytest.raises(ValueError, match=name):
        _distiller(teacher, **kwargs)


def _seg_batch(num=2, size=64):
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 255, (3, size, size), generator=g).float() for _ in range(num)]
    samples = []
    for _ in range(num):
        s = SegDataSample()
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size)))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _at_iteration(it):
    from mmengine.logging import MessageHub
    MessageHub.get_current_instance().update_info('iter', it)


def test_non_finite_loss_term_is_named_before_the_step(teacher, monkeypatch):
    from mmengine.optim import OptimWrapper

    from mimiq_mm.engine import MimiQCalibrationHook
    model = _distiller(teacher)
    batch = _seg_batch()
    MimiQCalibrationHook.calibrate(model, [copy.deepcopy(batch)], 1)
    real_loss = model.loss

    def diverged(*args, **kwargs):  # one term overflows, as a diverging run's would
        losses = real_loss(*args, **kwargs)
        losses['loss_kd_feat'] = losses['loss_kd_feat'] * math.inf
        return losses

    monkeypatch.setattr(model, 'loss', diverged)
    params = [p for p in model.parameters() if p.requires_grad]
    wrapper = OptimWrapper(torch.optim.AdamW(params, lr=1e-3))
    before = _trainable(model)
    _at_iteration(6)
    with pytest.raises(FloatingPointError, match=r'loss at iteration 7.*loss_kd_feat=inf'):
        model.train_step(copy.deepcopy(batch), wrapper)
    after = _trainable(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_gradient_is_named_before_the_step(teacher):
    from mmengine.optim import OptimWrapper

    from mimiq_mm.engine import CheckpointGuardHook, MimiQCalibrationHook
    from mimiq_mm.utils.finite import NonFiniteError
    model = _distiller(teacher)
    batch = _seg_batch()
    MimiQCalibrationHook.calibrate(model, [copy.deepcopy(batch)], 1)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    param.register_hook(lambda g: g * math.inf)  # finite loss, overflowing gradient
    wrapper = OptimWrapper(torch.optim.AdamW([p for p in model.parameters()
                                              if p.requires_grad], lr=1e-3))
    guard = CheckpointGuardHook()
    guard.before_train(SimpleNamespace(optim_wrapper=wrapper, model=model))
    before = _trainable(model)
    _at_iteration(11)
    with pytest.raises(NonFiniteError, match=rf'gradient at iteration 12.*{name}'):
        model.train_step(copy.deepcopy(batch), wrapper)
    after = _trainable(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- defect 5
class _Killed(BaseException):
    """The process dying in the middle of writing a checkpoint."""


def test_kill_during_checkpoint_save_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    import mmengine.runner.runner as mm_runner

    from mimiq_mm.engine import build_runner
    real_save = mm_runner.save_checkpoint
    calls = []

    def dying_save(checkpoint, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the save of iter_4: half a file, then the kill
            real_save(checkpoint, filename, *args, **kwargs)
            with open(filename, 'rb') as f:
                data = f.read()
            with open(filename, 'wb') as f:
                f.write(data[:len(data) // 2])
            raise _Killed()
        return real_save(checkpoint, filename, *args, **kwargs)

    work = tmp_path / 'w'
    monkeypatch.setattr(mm_runner, 'save_checkpoint', dying_save)
    with pytest.raises(_Killed):
        build_runner(_toy_cfg(work, max_iters=6, interval=2, max_keep=1)).train()
    monkeypatch.setattr(mm_runner, 'save_checkpoint', real_save)
    # last_checkpoint names a complete file: the previous one was not deleted first
    latest = (work / 'last_checkpoint').read_text().strip()
    assert osp.basename(latest) == 'iter_2.pth'
    assert osp.isfile(latest), 'the checkpoint last_checkpoint names was deleted'
    assert _params(latest)
    assert not (work / 'iter_4.pth').exists()  # no truncated file under a final name
    # --resume continues from it (and clears the half-written leftover)
    runner = build_runner(_toy_cfg(work, max_iters=6, interval=2, max_keep=1, resume=True))
    runner.train()
    assert runner.iter == 6
    assert (work / 'iter_6.pth').is_file() and not (work / 'iter_2.pth').exists()
    assert not list(work.glob('.*.partial'))
    assert osp.basename((work / 'last_checkpoint').read_text().strip()) == 'iter_6.pth'


# ----------------------------------------------------------------------------- rough edges
def test_backbone_without_attention_gets_an_actionable_message():
    """A ResNet-like backbone used to be told to 'call adapt_attention_ first'."""
    from mimiq_mm.attention import AttentionRecorder
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(RuntimeError, match=r'no attention module at all.*model\.gamma=0'):
        AttentionRecorder(cnn)


def test_frozen_parameter_warnings_become_one_line(tmp_path):
    import logging

    from mimiq_mm.engine import build_runner
    cfg = _toy_cfg(tmp_path / 'w')
    cfg.optim_wrapper.paramwise_cfg = dict(custom_keys={'lin': dict(lr_mult=1.0)})
    runner = build_runner(cfg)
    for p in runner.model.extra.parameters():
        p.requires_grad_(False)
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Catch()
    runner.logger.addHandler(handler)
    try:
        runner.build_optim_wrapper(copy.deepcopy(cfg.optim_wrapper))
    finally:
        runner.logger.removeHandler(handler)
    frozen = [m for m in seen if 'requires_grad=False' in m]
    assert len(frozen) == 1, seen  # 2 frozen parameters (extra.weight, .bias), 1 line
    assert 'not given to the optimizer' in frozen[0]
