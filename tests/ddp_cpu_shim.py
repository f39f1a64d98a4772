"""Test-only shim: run tools/train.py under torchrun on a CPU-only machine (gloo).

Imported through a test config's ``custom_imports`` (``Config.fromfile`` imports it, i.e.
before the Runner initialises the process group). Nothing here is used on a GPU machine:

* mmengine's pytorch launcher calls ``torch.cuda.set_device(LOCAL_RANK)``, which raises
  without CUDA -> made a no-op, only when CUDA is unavailable;
* the Runner passes ``device_ids=[LOCAL_RANK]`` to any DDP wrapper, which torch rejects for
  a CPU module -> ``CPUDistributedDataParallel`` (select it with
  ``model_wrapper_cfg=dict(type='CPUDistributedDataParallel')``) drops them for CPU modules;
* ``DumpRankStateHook`` writes every rank's student ``state_dict`` after the last train
  iteration, where the CheckpointHook (priority VERY_LOW) saved it
  (``work_dir/rank{r}_student.pth``), so a test can compare the ranks and the checkpoint.
"""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import HOOKS, MODEL_WRAPPERS

if not torch.cuda.is_available():
    torch.cuda.set_device = lambda *args, **kwargs: None


@MODEL_WRAPPERS.register_module(force=True)
class CPUDistributedDataParallel(MMDistributedDataParallel):

    def __init__(self, module, device_ids=None, **kwargs):
        params = list(module.parameters())
        if params and params[0].device.type == 'cpu':
            device_ids = None
            kwargs.pop('output_device', None)
        super().__init__(module=module, device_ids=device_ids, **kwargs)


@HOOKS.register_module(force=True)
class DumpRankStateHook(Hook):
    priority = 'LOWEST'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        from mimiq_mm.models import unwrap_distiller
        if runner.iter + 1 != runner.max_iters:
            return
        student = unwrap_distiller(runner.model).student
        torch.save({k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
                   osp.join(runner.work_dir, f'rank{get_rank()}_student.pth'))
