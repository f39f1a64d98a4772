"""Config helpers shared by tools/train.py and tools/test.py."""
import copy
import logging
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


def follow_max_iters(cfg, parsed_iters):
    """Make ``--cfg-options max_iters=N`` change the schedule (in place), as
    :func:`follow_synthetic_root` does for the synthetic set: the configs copy the
    variable into ``train_cfg.max_iters``, ``train_cfg.val_interval`` (N + 1),
    ``default_hooks.checkpoint.interval`` and the schedulers' ``end`` when the file is
    parsed; every such value still equal to the parsed one follows the new N (a value
    overridden explicitly is left alone)."""
    new = cfg.get('max_iters', None)
    if parsed_iters is None or new is None or new == parsed_iters:
        return cfg
    train_cfg = cfg.get('train_cfg', None)
    if isinstance(train_cfg, dict):
        if train_cfg.get('max_iters') == parsed_iters:
            train_cfg['max_iters'] = new
        if train_cfg.get('val_interval') == parsed_iters + 1:
            train_cfg['val_interval'] = new + 1
    ckpt = (cfg.get('default_hooks', None) or {}).get('checkpoint', None)
    if isinstance(ckpt, dict) and ckpt.get('interval') == parsed_iters:
        ckpt['interval'] = new
    schedulers = cfg.get('param_scheduler', None)
    for sched in schedulers if isinstance(schedulers, (list, tuple)) else [schedulers]:
        if isinstance(sched, dict) and sched.get('end') == parsed_iters:
            sched['end'] = new
            if sched.get('T_max') == parsed_iters - sched.get('begin', 0):
                sched['T_max'] = new - sched.get('begin', 0)
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


GUARD_HOOK = 'mimiq_mm.CheckpointGuardHook'
ATOMIC_CHECKPOINT_HOOK = 'mimiq_mm.AtomicCheckpointHook'
_PLAIN_CHECKPOINT_HOOKS = ('CheckpointHook', 'mmengine.CheckpointHook')


def install_guards(cfg):
    """In place: add :class:`~mimiq_mm.engine.CheckpointGuardHook` to ``custom_hooks`` and
    make the checkpoint hook an :class:`~mimiq_mm.engine.AtomicCheckpointHook` (same
    arguments; a config's ``type='CheckpointHook'`` or mmengine's default one). A checkpoint
    hook of another type, or one switched off (None), is left alone."""
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(isinstance(h, dict) and h.get('type') in (GUARD_HOOK, 'CheckpointGuardHook')
               for h in hooks):
        hooks.append(dict(type=GUARD_HOOK))
    cfg.custom_hooks = hooks
    default_hooks = cfg.get('default_hooks', None)
    if default_hooks is None:
        cfg.default_hooks = dict(checkpoint=dict(type=ATOMIC_CHECKPOINT_HOOK, interval=1))
    elif 'checkpoint' not in default_hooks:
        default_hooks['checkpoint'] = dict(type=ATOMIC_CHECKPOINT_HOOK, interval=1)
    else:
        ckpt = default_hooks['checkpoint']
        if isinstance(ckpt, dict) and ckpt.get('type', 'CheckpointHook') in \
                _PLAIN_CHECKPOINT_HOOKS:
            ckpt['type'] = ATOMIC_CHECKPOINT_HOOK
    return cfg


#: Where the data a config needs comes from, by path fragment: the command that makes it.
INPUT_HINTS = (
    ('data/demo/', '`python tools/make_demo_data.py --out data/demo` (= `make demo-data`; '
                   '`make demo` writes only data/demo_val)'),
    ('data/demo_val/', '`python tools/demo.py` (= `make demo`)'),
)


def _is_local(path: str) -> bool:
    return '://' not in path


def _join(root: str, path: str) -> str:
    import os.path as osp
    return path if (osp.isabs(path) or not root) else osp.join(root, path)


def _missing_inputs(cfg, mode: str):
    """[(config key, path, 'file' | 'folder')] of what a ``mode`` ('train' / 'test') run
    reads and does not exist: the datasets' ``ann_file`` / ``data_root`` / ``data_prefix``
    folders and the evaluators' ``ann_file``. The synthetic train set is made by the run."""
    import os.path as osp
    pairs = []
    if mode == 'train':
        pairs.append(('train_dataloader', None))
        if cfg.get('val_cfg', None) and cfg.get('val_dataloader', None) and \
                cfg.get('val_evaluator', None):
            pairs.append(('val_dataloader', 'val_evaluator'))
    else:
        pairs.append(('test_dataloader', 'test_evaluator'))
    missing = []
    for loader_key, eval_key in pairs:
        for depth, ds in enumerate(nested_datasets(cfg.get(loader_key, None))):
            key = f'{loader_key}' + '.dataset' * (depth + 1)
            if 'SyntheticImageDataset' in str(ds.get('type', '')) or ds.get('lazy_init'):
                continue
            root = ds.get('data_root', None) or ''
            if not isinstance(root, str) or not _is_local(root):
                continue
            ann = ds.get('ann_file', None) or ''
            if isinstance(ann, str) and ann and _is_local(ann):
                path = _join(root, ann)
                if not osp.isfile(path):
                    missing.append((f'{key}.ann_file', path, 'file'))
                    continue
            if root and not osp.isdir(root):
                missing.append((f'{key}.data_root', root, 'folder'))
                continue
            prefix = ds.get('data_prefix', None)
            if isinstance(prefix, dict):
                for name, sub in prefix.items():
                    if isinstance(sub, str) and sub and _is_local(sub) and \
                            not osp.isdir(_join(root, sub)):
                        missing.append((f'{key}.data_prefix.{name}', _join(root, sub),
                                        'folder'))
        evaluators = cfg.get(eval_key, None) if eval_key else None
        evaluators = evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]
        for i, ev in enumerate(evaluators):
            ann = ev.get('ann_file', None) if isinstance(ev, dict) else None
            if isinstance(ann, str) and ann and _is_local(ann) and not osp.isfile(ann):
                where = eval_key if len(evaluators) == 1 else f'{eval_key}[{i}]'
                missing.append((f'{where}.ann_file', ann, 'file'))
    return missing


def check_run_inputs(cfg, mode: str) -> None:
    """FileNotFoundError listing every input file / folder a ``mode`` ('train' or 'test')
    run of ``cfg`` would read but that does not exist, and for each the command that makes
    it (demo data) or the config key to point elsewhere. Called by tools/train.py and
    tools/test.py before anything long (synthesis, calibration) starts."""
    if mode not in ('train', 'test'):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    missing = _missing_inputs(cfg, mode)
    if not missing:
        return
    lines = []
    for key, path, kind in missing:
        norm = path.replace('\\', '/')
        hint = next((h for frag, h in INPUT_HINTS if frag in norm + '/'), None)
        how = f'make it with {hint}' if hint else f'point {key} at your data with ' \
            f'--cfg-options {key}=...'
        lines.append(f'  {key}: {kind} {path!r} does not exist; {how}')
    raise FileNotFoundError(f'this {mode} run needs inputs that are missing (checked before '
                            'synthesis / training start):\n' + '\n'.join(lines))


def build_runner(cfg):
    """``Runner.from_cfg(cfg)`` (or ``RUNNERS.build`` with ``runner_type``) after importing
    every mimiq_mm module a config may name, with the checkpoint guards installed
    (:func:`install_guards`: strict, recipe-checked loading; crash-safe saving; no NaN
    checkpoint)."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    import mimiq_mm.datasets  # noqa: F401
    import mimiq_mm.engine  # noqa: F401
    import mimiq_mm.models  # noqa: F401
    install_guards(cfg)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    logger = getattr(runner, 'logger', None)
    if isinstance(logger, logging.Logger):
        logger.addFilter(FrozenParamsLogFilter())
    return runner


class FrozenParamsLogFilter(logging.Filter):
    """mmengine's optimizer constructor warns once per parameter with
    ``requires_grad=False`` (dozens per MimiQ run: everything outside ``train_scope`` is
    frozen on purpose). The first such message becomes one INFO line saying so; the rest are
    dropped."""
    MARK = 'is skipped since its requires_grad=False'

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.MARK not in message:
            return True
        self.count += 1
        if self.count > 1:
            return False
        first = message.split(' is skipped', 1)[0]
        record.msg = (f'parameters with requires_grad=False (e.g. {first}: frozen, outside '
                      'model.train_scope) are not given to the optimizer; not listed one by '
                      'one')
        record.args = ()
        record.levelno, record.levelname = logging.INFO, 'INFO'
        return True


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
