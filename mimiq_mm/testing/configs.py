"""Small MimiQ run configs for tests (tools/train.py, tools/dist_train.sh on CPU)."""
from __future__ import annotations

import copy
from typing import Sequence

from mmengine.config import Config


def tiny_runtime_cfg(cfg: Config, max_iters: int, ckpt_interval: int) -> Config:
    """CPU training schedule of a test run, in place: ``max_iters`` AdamW (lr 1e-4)
    iterations, no scheduler, checkpoints every ``ckpt_interval`` iterations, seed 0, gloo
    when distributed."""
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=10000)
    cfg.param_scheduler = None
    cfg.optim_wrapper = dict(type='OptimWrapper',
                             optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.0))
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                        interval=ckpt_interval)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.log_processor = dict(by_epoch=False)
    cfg.randomness = dict(seed=0)
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'),
                       dist_cfg=dict(backend='gloo'))
    cfg.pop('auto_scale_lr', None)
    return cfg


def tiny_mimiq_cfg(teacher_cfg: Config, teacher_checkpoint: str, synthetic_root: str, *,
                   max_iters: int, num_images: int, batch_size: int, ckpt_interval: int = 1,
                   calib_batches: int = 2, pack: str = 'PackDetInputs',
                   flip: bool = True, extra_imports: Sequence[str] = ()) -> Config:
    """A MimiQ fine-tuning config around a (tiny) float teacher config: W4A4 student,
    ``num_images`` 64x64 synthetic images of one iteration (made by MimiQSynthesisHook on
    first use), calibration on ``calib_batches`` batches, ``max_iters`` AdamW iterations on
    the CPU with checkpoints every ``ckpt_interval`` iterations, gloo when distributed.
    ``flip``: a ``RandomFlip`` in the train pipeline, as in the shipped configs (it draws
    from the global numpy RNG, which a resumed run must find where a straight run had it).
    The teacher config's val/test settings are kept."""
    cfg = copy.deepcopy(teacher_cfg)
    cfg.custom_imports = dict(imports=['mimiq_mm.models', 'mimiq_mm.engine',
                                       'mimiq_mm.datasets', *extra_imports],
                              allow_failed_imports=False)
    cfg.teacher_checkpoint = str(teacher_checkpoint)
    cfg.quant_cfg = dict(weight=dict(bits=4), act=dict(bits=4), attn_prob=dict(bits=4))
    cfg.model = dict(type='mimiq_mm.MimiQDistiller', teacher=teacher_cfg.model,
                     teacher_checkpoint=None, quant_cfg=None, gamma=10.0)
    cfg.synthesis = dict(method='mimiq', num_images=num_images, batch_size=batch_size,
                         iterations=1, image_size=(64, 64), seed=0, device='cpu',
                         figures=False, progress=False)
    cfg.train_dataloader = dict(
        batch_size=batch_size, num_workers=0, persistent_workers=False,
        sampler=dict(type='InfiniteSampler', shuffle=True, seed=0),
        dataset=dict(type='mimiq_mm.SyntheticImageDataset', data_root=str(synthetic_root),
                     pipeline=[dict(type='LoadImageFromFile'),
                               *([dict(type='RandomFlip', prob=0.5)] if flip else []),
                               dict(type=pack)]))
    tiny_runtime_cfg(cfg, max_iters, ckpt_interval)
    cfg.train_cfg.type = 'mimiq_mm.MimiQIterBasedTrainLoop'
    cfg.custom_hooks = [dict(type='mimiq_mm.MimiQSynthesisHook'),
                        dict(type='mimiq_mm.MimiQCalibrationHook', num_batches=calib_batches)]
    return cfg
