"""Runner hook for benchmarks/bench_ddp.py: wall-clock times of the MimiQ phases of one
tools/train.py run (single process or torchrun), written by rank 0 to
``work_dir/phase_times.json``.

Imported through the benchmark config's ``custom_imports`` (benchmarks/ is put on
PYTHONPATH by bench_ddp.py). Two instances are registered: ``edge='start'`` with priority
HIGHEST (before the MimiQ hooks at a hook point) and ``edge='end'`` with priority LOWEST
(after them), so a phase is bracketed by the two:

    synthesis    before_build_train_dataloader (MimiQSynthesisHook, incl. its barrier)
    calibration  before_train (MimiQCalibrationHook, incl. the cross-rank merge/broadcast)
    fine-tuning  end of calibration -> last train iteration done (before the checkpoint)
    eval         before_val -> after_val_epoch (COCO metric gathered from all ranks)

CUDA is synchronised at every mark. Times are ``time.time()`` (comparable with the parent's
launch time passed in ``BENCH_LAUNCH_TIME``).
"""
import json
import os
import os.path as osp
import time

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

IMPORTED_AT = time.time()
_MARKS = {}
_INFO = {}


def _mark(name: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    _MARKS.setdefault(name, time.time())


@HOOKS.register_module(force=True)
class PhaseTimerHook(Hook):
    priority = 'NORMAL'

    def __init__(self, edge: str = 'start', out: str = 'phase_times.json'):
        if edge not in ('start', 'end'):
            raise ValueError(f"edge must be 'start' or 'end', got {edge!r}")
        self.start = edge == 'start'
        self.out = out

    def before_build_train_dataloader(self, runner, dataloader_cfg=None) -> None:
        _mark('synthesis_start' if self.start else 'synthesis_end')

    def before_train(self, runner) -> None:
        _mark('calibration_start' if self.start else 'calibration_end')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.start and runner.iter + 1 == runner.max_iters:
            _mark('finetune_end')

    def before_val(self, runner) -> None:
        if self.start:
            _mark('eval_start')

    def after_val_epoch(self, runner, metrics=None) -> None:
        if not self.start:
            _mark('eval_end')
            _INFO['metrics'] = {k: float(v) for k, v in (metrics or {}).items()
                                if isinstance(v, (int, float))}

    def after_run(self, runner) -> None:
        if self.start or get_rank() != 0:
            return
        _mark('run_end')
        launch = os.environ.get('BENCH_LAUNCH_TIME')
        record = dict(marks=dict(_MARKS), imported_at=IMPORTED_AT,
                      launch=float(launch) if launch else None,
                      world_size=get_world_size(),
                      device=(torch.cuda.get_device_name(0) if torch.cuda.is_available()
                              else 'cpu'),
                      torch=torch.__version__, **_INFO)
        with open(osp.join(runner.work_dir, self.out), 'w') as f:
            json.dump(record, f, indent=1)
