"""Safe loading of mmengine checkpoints under torch >= 2.6 (``weights_only=True``).

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means
``weights_only=True``, and the unpickler refuses the few non-tensor objects mmengine writes
into its own checkpoints (the MessageHub's ``HistoryBuffer`` and the numpy arrays/scalars
inside it). Instead of switching the safety off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), we
allow-list exactly those globals. Anything else in a file is still refused, so an untrusted
checkpoint can never execute code.
"""
from __future__ import annotations

import functools
import os.path as osp
import pickle
from typing import List

import numpy as np
import torch
from torch import nn


def _numpy_globals() -> List[object]:
    """numpy objects that appear when an ndarray / numpy scalar / dtype is pickled."""
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore
    items: List[object] = [_reconstruct, scalar, np.ndarray, np.dtype]
    # numpy >= 1.25 pickles dtypes by their concrete class (np.dtypes.Float64DType, ...)
    dtypes_mod = getattr(np, 'dtypes', None)
    if dtypes_mod is not None:
        for name in dir(dtypes_mod):
            obj = getattr(dtypes_mod, name)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                items.append(obj)
    return items


#: statistics methods every HistoryBuffer instance registers (others come from
#: ``@HistoryBuffer.statistics_method`` and live in ``HistoryBuffer._statistics_methods``).
_BUILTIN_STATISTICS = frozenset({'min', 'max', 'mean', 'current'})


def _history_buffer_method(owner, name):
    """A ``getattr`` restricted to what mmengine pickles: ``HistoryBuffer``'s statistics
    methods (``HistoryBuffer.__getstate__`` stores ``{'min': HistoryBuffer.min, ...}``,
    which pickle writes as ``getattr(HistoryBuffer, 'min')``).

    It stands in for ``builtins.getattr`` inside the weights-only unpickler only; a real
    ``getattr`` there would let a crafted file walk from any allowed class to ``__globals__``
    and ``eval``.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    allowed = _BUILTIN_STATISTICS.union(HistoryBuffer._statistics_methods)
    if owner is HistoryBuffer and isinstance(name, str) and name in allowed:
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({owner!r}, {name!r}) while loading a checkpoint: only '
        f'HistoryBuffer statistics methods are allowed')


def mmengine_checkpoint_globals() -> List[object]:
    """The globals mmengine (0.10.x) pickles into Runner checkpoints."""
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer, (_history_buffer_method, 'builtins.getattr'), *_numpy_globals()]


@functools.lru_cache(maxsize=None)
def allow_mmengine_checkpoints() -> bool:
    """Register :func:`mmengine_checkpoint_globals` with torch's weights-only unpickler.

    Idempotent; a no-op (returns False) on torch versions without ``add_safe_globals``,
    which load with full pickle anyway.
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:
        return False
    add(mmengine_checkpoint_globals())
    return True


def load_teacher_weights(model: nn.Module, path: str, cfg_key: str = 'teacher_checkpoint'):
    """Load a float checkpoint into ``model``, strictly, with errors that name the file."""
    from mmengine.runner.checkpoint import _load_checkpoint
    if path is None:
        raise ValueError(f'{cfg_key} is not set. MimiQ needs the trained float model: pass '
                         f'`--cfg-options {cfg_key}=/path/to/float.pth` (the checkpoint of '
                         'the model in the config).')
    if not (path.startswith(('http://', 'https://', 's3://')) or osp.isfile(path)):
        raise FileNotFoundError(f'{cfg_key}={path!r} does not exist. Pass the float model '
                                f'checkpoint with `--cfg-options {cfg_key}=PATH`.')
    try:
        ckpt = _load_checkpoint(path, map_location='cpu')
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise RuntimeError(f'{cfg_key}={path!r} cannot be read as a torch checkpoint '
                           f'({type(err).__name__}: {str(err).splitlines()[0][:200]}). Is the '
                           'file complete (not truncated by an interrupted copy)?') from err
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise ValueError(f'{cfg_key}={path!r} holds no state_dict')
    state = {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}
    frozen = (ckpt.get('meta') or {}).get('frozen_pretrained') if isinstance(ckpt, dict) else None
    if frozen:  # a teacher shipped without its frozen pretrained backbone: put it back
        from mimiq_mm.models.dinov2 import restore_frozen_pretrained
        state = restore_frozen_pretrained(state, frozen)
    if state and all(k.startswith('student.') for k in state
                     if not k.startswith('data_preprocessor.')):
        raise ValueError(f'{cfg_key}={path!r} is a MimiQ (quantized student) checkpoint, not '
                         'a float model. Pass the float teacher checkpoint instead.')
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(f'{k}: checkpoint {tuple(state[k].shape)} vs model '
                        f'{tuple(own[k].shape)}' for k in own
                        if k in state and hasattr(state[k], 'shape')
                        and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or mismatched:
        def _head(items):
            return f'{items[:6]}{" ..." if len(items) > 6 else ""} ({len(items)})'
        raise RuntimeError(
            f'{cfg_key}={path!r} does not match the teacher model of this config '
            f'(model.teacher): missing keys {_head(missing)}, unexpected keys '
            f'{_head(unexpected)}, shape mismatches {_head(mismatched)}. Use the checkpoint '
            'trained with exactly this model config.')
    model.load_state_dict(state, strict=True)
    return ckpt
