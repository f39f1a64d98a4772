"""Config helpers shared by tools/train.py and tools/test.py."""
import copy
from typing import Iterator

DISTILLER_TYPES = ('MimiQDistiller', 'mimiq_mm.MimiQDistiller')
#: Top-level config fields copied into ``model`` of a MimiQ config (so that
#: ``--cfg-options teacher_checkpoint=... quant_cfg.act.bits=3`` reach the distiller).
TOP_LEVEL_MODEL_FIELDS = ('teacher_checkpoint', 'quant_cfg')


def is_mimiq_config(cfg) -> bool:
    model = cfg.get('model', None)
    return isinstance(model, dict) and model.get('type') in DISTILLER_TYPES


def apply_mimiq_fields(cfg):
    """Copy the top-level ``teacher_checkpoint`` / ``quant_cfg`` into ``cfg.model`` (in
    place) for MimiQ configs; other configs are returned untouched."""
    if not is_mimiq_config(cfg):
        return cfg
    for key in TOP_LEVEL_MODEL_FIELDS:
        if key in cfg:
            old = cfg.model.get(key, None)
            if old is not None and _plain(old) != _plain(cfg[key]):
                from mmengine.logging import print_log
                print_log(f'top-level `{key}` ({_plain(cfg[key])}) overrides model.{key} '
                          f'({_plain(old)}); change the top-level field, e.g. '
                          f'--cfg-options {key}=...', logger='current', level=30)
            cfg.model[key] = copy.deepcopy(cfg[key])
    return cfg


def follow_synthetic_root(cfg, parsed_root):
    """Make ``--cfg-options synthetic_root=DIR`` move the synthetic train set (in place).

    The configs write ``data_root=synthetic_root`` into ``train_dataloader``: the value is
    copied when the file is parsed, so overriding the variable alone would change nothing.
    ``parsed_root`` is ``synthetic_root`` as the file set it; when the merged config holds
    another one, every train dataset whose ``data_root`` was still the parsed value follows
    it (a ``data_root`` overridden explicitly is left alone)."""
    new_root = cfg.get('synthetic_root', None)
    if parsed_root is None or new_root is None or new_root == parsed_root:
        return cfg
    for dataset in nested_datasets(cfg.get('train_dataloader', None)):
        if dataset.get('data_root') == parsed_root:
            dataset['data_root'] = new_root
    return cfg


def nested_datasets(dataloader_cfg) -> Iterator[dict]:
    """The dataset configs of a dataloader config, outermost first (``RepeatDataset`` &
    co. wrap the real one under ``dataset``)."""
    dataset = dataloader_cfg.get('dataset', None) if isinstance(dataloader_cfg, dict) else None
    while isinstance(dataset, dict):
        yield dataset
        dataset = dataset.get('dataset', None)


def _plain(value):
    return value.to_dict() if hasattr(value, 'to_dict') else value


def wrap_teacher_metrics(evaluator_cfg):
    """``evaluator`` -> ``[evaluator..., TeacherMetric(evaluator)...]``."""
    metrics = evaluator_cfg if isinstance(evaluator_cfg, (list, tuple)) else [evaluator_cfg]
    metrics = [copy.deepcopy(m) for m in metrics]
    return metrics + [dict(type='mimiq_mm.TeacherMetric', metric=copy.deepcopy(m))
                      for m in metrics]


def build_runner(cfg):
    """``Runner.from_cfg(cfg)`` (or ``RUNNERS.build`` with ``runner_type``) after importing
    every mimiq_mm module a config may name."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    import mimiq_mm.datasets  # noqa: F401
    import mimiq_mm.engine  # noqa: F401
    import mimiq_mm.models  # noqa: F401
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


#: Set by :func:`close_distributed` once this process has destroyed its process group.
_closed_process_group = False


def close_distributed() -> None:
    """Destroy the default process group after a successful run (tools/train.py, test.py),
    as the torch.distributed documentation asks of every process: mmengine never does, and
    torch then warns. Not called on an exception: destroying a group while other ranks may
    still be in a collective can hang. See :func:`exit_after_distributed_run` for what this
    does NOT prevent.
    """
    global _closed_process_group
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _closed_process_group = True


def exit_after_distributed_run(code: int = 0) -> None:
    """End a command-line process that ran distributed, without interpreter finalization.

    Only the ``if __name__ == '__main__'`` blocks of tools/train.py and tools/test.py call
    this, after ``main()`` returned (everything the run produces is written by then). It
    does nothing unless :func:`close_distributed` destroyed a process group in this process.

    Why: once a ``DistributedDataParallel`` model has run a backward, the gloo process
    group stays referenced after ``destroy_process_group()`` (its threads keep running), and
    is only torn down while the interpreter shuts down, where torch sometimes aborts the
    process with "terminate called without an active exception" (SIGABRT). torchrun then
    reports the whole successful run as failed. Measured with a 2-rank gloo script
    (torchrun; 5 DDP steps, barrier, destroy_process_group, exit; torch 2.14.1, 2-core CPU
    machine): 19 aborts in 100 launches; ending the processes with ``os._exit(0)`` as here:
    0 in 100 (40 launches each in turn, then 60 interleaved pairs). The logs are flushed and
    closed first; nothing is lost.
    """
    if not _closed_process_group:
        return
    import logging
    import os
    import sys
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed / broken stream must not turn success into failure
            pass
    os._exit(code)
