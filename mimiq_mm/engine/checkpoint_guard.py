"""What a checkpoint must satisfy before a run uses it, and how checkpoints are written.

One guard for every tool (tools/train.py ``load_from`` / ``--resume``, tools/test.py,
tools/export.py, tools/demo.py): :func:`check_checkpoint_matches` refuses a checkpoint whose
keys / shapes differ from the model (strict), a MimiQ checkpoint whose quantization recipe
(``QuantConfig``: bit widths, observers, grids, scope ...) differs from the config's, an
exported or float file where a MimiQ checkpoint is expected, and (resume) a file that holds
no training state. :class:`CheckpointGuardHook` applies it to the Runner
(``after_load_checkpoint``, before mmengine loads anything), records the recipe in every
checkpoint it saves (``meta['mimiq']``) and refuses to save non-finite parameters.
:class:`AtomicCheckpointHook` replaces mmengine's ``CheckpointHook``: a checkpoint is
written to a temporary name and renamed, ``last_checkpoint`` is replaced atomically, and the
previous checkpoint is removed only after the new one is complete.
:func:`mimiq_mm.engine.build_runner` installs both, so configs keep ``type='CheckpointHook'``.
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import math
import os
import os.path as osp
from typing import Dict, Optional

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log

from mimiq_mm.registry import HOOKS

#: Version of ``meta['mimiq']`` written into checkpoints.
META_KEY = 'mimiq'
META_VERSION = 1
EXPORT_FORMAT_PREFIX = 'mimiq_mm.quantized/'


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not belong to the model / recipe of the config."""


# ----------------------------------------------------------------------------- recipes
def _flat(value, prefix: str = '') -> Dict[str, object]:
    out: Dict[str, object] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(_flat(item, f'{prefix}{key}.'))
        return out
    if isinstance(value, (bool, int, float, str)) or value is None:
        out[prefix[:-1]] = value
    else:
        out[prefix[:-1]] = repr(value)
    return out


def recipe_of(quant_config) -> Dict[str, object]:
    """``{'weight.bits': 4, 'act.observer': 'minmax', ...}`` of a ``QuantConfig`` (or a
    dict of its fields), normalised through ``QuantConfig.from_dict`` (defaults filled in)."""
    from mimiq_mm.quant import QuantConfig
    qc = QuantConfig.from_dict(quant_config)
    return _flat(dataclasses.asdict(qc))


class _Unsafe(Exception):
    pass


_NAMED_CONSTANTS = {'True': True, 'False': False, 'None': None, 'inf': math.inf,
                    'nan': math.nan}


def _literal(node):
    """Value of a config-text expression made only of literals and ``dict(k=v, ...)``;
    anything else raises :class:`_Unsafe`. Nothing is executed."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Unsafe('**')
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id == 'dict' and not node.args:
        if any(kw.arg is None for kw in node.keywords):
            raise _Unsafe('**')
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    raise _Unsafe(type(node).__name__)


def quant_cfg_from_config_text(text: str) -> Optional[dict]:
    """``model.quant_cfg`` (else the top-level ``quant_cfg``) of a config's text as mmengine
    stores it in ``meta['cfg']``, parsed with :mod:`ast` and read as literals only (the text
    comes from a data file: it is never executed). None when absent or not literal."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, TypeError):
        return None
    found = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        value = node.value
        if name == 'model' and isinstance(value, ast.Call):
            for kw in value.keywords:
                if kw.arg == 'quant_cfg':
                    found['model'] = kw.value
        elif name == 'model' and isinstance(value, ast.Dict):
            for k, v in zip(value.keys, value.values):
                if isinstance(k, ast.Constant) and k.value == 'quant_cfg':
                    found['model'] = v
        elif name == 'quant_cfg':
            found['top'] = value
    for key in ('model', 'top'):
        if key in found:
            try:
                value = _literal(found[key])
            except _Unsafe:
                return None
            return value if isinstance(value, dict) or value is None else None
    return None


def checkpoint_recipe(checkpoint) -> Optional[Dict[str, object]]:
    """The quantization recipe a MimiQ checkpoint was trained with: ``meta['mimiq']``
    (written by :class:`CheckpointGuardHook`), else read from the config text mmengine
    stores in ``meta['cfg']``; None when it cannot be told."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        return None
    mimiq = meta.get(META_KEY)
    if isinstance(mimiq, dict) and isinstance(mimiq.get('recipe'), dict):
        return dict(mimiq['recipe'])
    text = meta.get('cfg')
    if isinstance(text, str):
        quant_cfg = quant_cfg_from_config_text(text)
        if quant_cfg is not None:
            try:
                return recipe_of(quant_cfg)
            except (ValueError, TypeError):
                return None
    return None


def _describe(recipe: Dict[str, object], keys) -> str:
    return ', '.join(f'{k}={recipe.get(k)!r}' for k in keys)


# ----------------------------------------------------------------------------- the guard
def _state_of(checkpoint):
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('state_dict'), dict):
        return checkpoint['state_dict']
    return checkpoint if isinstance(checkpoint, dict) else None


def _head(items, n=5):
    items = list(items)
    return f'{items[:n]}{" ..." if len(items) > n else ""} ({len(items)})'


def check_checkpoint_matches(checkpoint, model, source: str = 'the checkpoint', *,
                             resume: bool = False) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` fits ``model``: same
    keys and shapes (strict; a leading ``module.`` is ignored), and for a
    :class:`~mimiq_mm.models.MimiQDistiller` the same quantization recipe. ``resume``: the
    file must also hold a training state (``meta`` with the iteration, ``message_hub``).
    Every message names ``source`` and what the config has instead."""
    from mmengine.model import is_model_wrapper

    from mimiq_mm.models import MimiQDistiller
    if is_model_wrapper(model):
        model = model.module
    distiller = model if isinstance(model, MimiQDistiller) else None
    if isinstance(checkpoint, dict) and str(checkpoint.get('format', '')).startswith(
            EXPORT_FORMAT_PREFIX):
        raise CheckpointMismatchError(
            f'{source} is an exported deployable checkpoint ({checkpoint["format"]}, '
            'tools/export.py output), not a training checkpoint: rebuild it with '
            'mimiq_mm.export.build_quantized_model(path); tools/test.py, --resume and '
            'load_from need the iter_N.pth of tools/train.py.')
    state = _state_of(checkpoint)
    if state is None:
        raise CheckpointMismatchError(f'{source} holds no state_dict')
    state = {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}
    own = model.state_dict()
    if distiller is not None and state and not any(k.startswith('student.') for k in state):
        raise CheckpointMismatchError(
            f'{source} is a float model checkpoint (no student.* keys), not a MimiQ '
            'checkpoint: pass it as teacher_checkpoint=... to train, or evaluate it with '
            "the float model's own config (e.g. configs/demo/*.py).")
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                    for k in own if k in state and hasattr(state[k], 'shape')
                    and hasattr(own[k], 'shape')
                    and tuple(state[k].shape) != tuple(own[k].shape)
                    # an empty 1-d buffer is sized from data (a centred quantizer's offset
                    # before calibration): it takes the checkpoint's shape when loaded
                    and tuple(own[k].shape) != (0,))
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f'{source} does not match the model of this config: missing keys '
            f'{_head(missing)}, unexpected keys {_head(unexpected)}, shape mismatches '
            f'{_head(shapes)}. Use the checkpoint made with exactly this config.')
    if distiller is not None:
        saved = checkpoint_recipe(checkpoint)
        wanted = recipe_of(distiller.quant_config)
        if saved is None:
            print_log(f'{source}: its quantization recipe is not recorded; it cannot be '
                      'checked against the config.', logger='current', level=30)
        else:
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            if diff:
                raise CheckpointMismatchError(
                    f'{source} was made with another quantization recipe than this config: '
                    f'checkpoint {_describe(saved, diff)}; config {_describe(wanted, diff)}. '
                    'Use the config (e.g. --cfg-options quant_cfg.weight.bits=...) the '
                    'checkpoint was trained with, or train a new one in a new work dir.')
    if resume:
        meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
        if not isinstance(meta, dict) or 'iter' not in meta or 'message_hub' not in checkpoint:
            raise CheckpointMismatchError(
                f'{source} holds no training state (meta.iter / message_hub): it is not a '
                'checkpoint of tools/train.py, so it cannot be resumed. A float model goes '
                'to teacher_checkpoint=...; to start from weights without resuming use '
                'load_from=... .')


def check_finite_parameters(model, state: dict, source: str) -> None:
    """Raise RuntimeError when a parameter about to be saved is NaN / inf."""
    from mmengine.model import is_model_wrapper
    if is_model_wrapper(model):
        model = model.module
    bad = []
    for name, _ in model.named_parameters():
        value = state.get(name)
        if torch.is_tensor(value) and value.is_floating_point() and \
                not bool(torch.isfinite(value).all()):
            bad.append(name)
    if bad:
        raise RuntimeError(f'refusing to write {source}: non-finite parameter(s) '
                           f'{_head(bad)}; the run diverged (lower the lr, check the loss '
                           'weights) and no checkpoint of it was written.')


def _runner_source(runner) -> str:
    path = getattr(runner, '_load_from', None)
    if path is None and getattr(runner, '_resume', False):
        from mmengine.runner import find_latest_checkpoint
        path = find_latest_checkpoint(runner.work_dir)
    return f'checkpoint {path!r}' if path else 'the checkpoint'


def _optimizers(optim_wrapper):
    from mmengine.optim import OptimWrapperDict
    if isinstance(optim_wrapper, OptimWrapperDict):
        return [w.optimizer for w in optim_wrapper.values()]
    optimizer = getattr(optim_wrapper, 'optimizer', None)
    return [optimizer] if optimizer is not None else []


@HOOKS.register_module()
class CheckpointGuardHook(Hook):
    """Installed by :func:`mimiq_mm.engine.build_runner` for every run.

    * ``after_load_checkpoint`` (load_from, --resume, tools/test.py): :func:`check_checkpoint_matches`
      before mmengine loads anything into the model;
    * ``before_train``: a step pre-hook on the optimizer that stops the run when a gradient
      is NaN / inf (naming the iteration and the parameters), before the step spoils the
      weights (AMP's loss scaler handles its own overflows: no check there);
    * ``before_save_checkpoint``: records the quantization recipe in ``meta['mimiq']`` and
      refuses to write non-finite parameters.
    """
    priority = 'VERY_HIGH'

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        check_checkpoint_matches(checkpoint, runner.model, _runner_source(runner),
                                 resume=bool(getattr(runner, '_resume', False)))

    def before_train(self, runner) -> None:
        from mmengine.optim import AmpOptimWrapper
        from mimiq_mm.utils.finite import grad_guard
        wrapper = runner.optim_wrapper
        if isinstance(wrapper, AmpOptimWrapper):
            return
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        names = {id(p): n for n, p in model.named_parameters()}
        self._handles = [opt.register_step_pre_hook(grad_guard(names))
                         for opt in _optimizers(wrapper)]

    def after_train(self, runner) -> None:
        for handle in getattr(self, '_handles', []):
            handle.remove()
        self._handles = []

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        from mimiq_mm.models import unwrap_distiller
        check_finite_parameters(runner.model, checkpoint.get('state_dict', {}),
                                f'the checkpoint of iteration {runner.iter + 1}')
        distiller = unwrap_distiller(runner.model)
        if distiller is not None:
            checkpoint.setdefault('meta', {})[META_KEY] = dict(
                version=META_VERSION, recipe=recipe_of(distiller.quant_config))


# ----------------------------------------------------------------------------- saving
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


TMP_SUFFIX = '.partial'


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` with crash-safe saving (local folders): the checkpoint
    is written as ``.iter_N.pth.partial`` and renamed to ``iter_N.pth`` once complete,
    ``last_checkpoint`` is then replaced atomically, and only after that are checkpoints
    beyond ``max_keep_ckpts`` deleted. A kill at any moment leaves ``last_checkpoint``
    naming a complete file. Other storage backends fall back to mmengine's behaviour."""

    def _is_local(self) -> bool:
        from mmengine.fileio.backends import LocalBackend
        return self.file_client_args is None and isinstance(
            getattr(self, 'file_backend', None), LocalBackend)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if self._is_local() and is_main_process():
            for leftover in glob.glob(osp.join(self.out_dir, f'.*{TMP_SUFFIX}')):
                os.remove(leftover)  # a save that was killed before its rename

    def _save_checkpoint_with_step(self, runner, step, meta):
        if not self._is_local():
            return super()._save_checkpoint_with_step(runner, step, meta)
        outdated = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids
                                            and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = osp.join(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        partial = f'.{filename}{TMP_SUFFIX}'
        runner.save_checkpoint(self.out_dir, partial, save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args,
                               **self.args)
        if not is_main_process():
            return
        tmp_path = osp.join(self.out_dir, partial)
        with open(tmp_path, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, self.last_ckpt)
        _fsync_dir(self.out_dir)
        _atomic_write_text(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
        for old in outdated:  # only now that the new checkpoint is complete and named
            path = osp.join(self.out_dir, self.filename_tmpl.format(old))
            if old != step and osp.isfile(path):
                os.remove(path)
