"""Safe loading of mmengine checkpoints under torch >= 2.6 (``weights_only=True``).

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means
``weights_only=True``, and the unpickler refuses the few non-tensor objects mmengine writes
into its own checkpoints (the MessageHub's ``HistoryBuffer`` and the numpy arrays/scalars
inside it). Instead of switching the safety off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), we
allow-list exactly those globals. Anything else in a file is still refused, so an untrusted
checkpoint can never execute code.

Every checkpoint read goes through ONE loader, :func:`load_checkpoint_file`: local files
only (a ``scheme://`` path is refused before any network access: the project downloads
nothing, and ``torch.hub`` would unpickle a downloaded file in full), ``torch.load`` with
``weights_only=True`` and the allow-list above. :func:`install_checkpoint_loaders` (run by
``import mimiq_mm``) puts it behind mmengine's ``CheckpointLoader``, so ``load_from``,
``--resume``, ``init_cfg=Pretrained`` and ``load_checkpoint`` use it too, and every remote
scheme mmengine knows (http(s), s3, petrel, pavi, open-mmlab, torchvision, mmcls ...) is
refused.
"""
from __future__ import annotations

import functools
import os
import os.path as osp
import pickle
import re
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


#: ``scheme://...`` (also mmengine's ``open-mmlab:s3://...`` form): not a local file.
_URL_RE = re.compile(r'^[A-Za-z][A-Za-z0-9+.\-]*:(?:[A-Za-z0-9+.\-]+:)?//')


class RemoteCheckpointError(ValueError):
    """A checkpoint path is a URL: mimiq_mm reads checkpoints from local files only."""


def is_remote_path(path) -> bool:
    """True for ``http://``, ``s3://``, ``open-mmlab://``, ``open-mmlab:s3://`` ... paths."""
    return isinstance(path, str) and bool(_URL_RE.match(path.strip()))


def refuse_remote(path, what: str = 'checkpoint') -> None:
    """Raise :class:`RemoteCheckpointError` for a URL (before anything is downloaded)."""
    if is_remote_path(path):
        raise RemoteCheckpointError(
            f'{what}={path!r} is a URL; mimiq_mm loads checkpoints from local files only '
            '(nothing is downloaded, and a downloaded file would bypass the weights_only '
            'check that local files get). Download it yourself and pass the local path.')


def load_checkpoint_file(path, map_location='cpu', what: str = 'checkpoint'):
    """THE checkpoint reader of mimiq_mm: a local file, ``torch.load(weights_only=True)``
    with the mmengine allow-list (:func:`allow_mmengine_checkpoints`). A URL is refused
    (:class:`RemoteCheckpointError`), a missing file is a ``FileNotFoundError`` and an
    unreadable or unsafe one a ``RuntimeError``, each naming ``what`` and the path."""
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(path, str):
        raise TypeError(f'{what} must be a file path, got {type(path).__name__}')
    refuse_remote(path, what)
    local = osp.expanduser(path)
    if not osp.isfile(local):
        raise FileNotFoundError(f'{what}={path!r} does not exist (no such file).')
    allow_mmengine_checkpoints()
    try:
        return torch.load(local, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        first = (str(err).splitlines() or [''])[0][:300]
        raise RuntimeError(f'{what}={path!r} cannot be read as a weights-only torch checkpoint '
                           f'({type(err).__name__}: {first}). Is the file complete (not '
                           'truncated by an interrupted copy), and a checkpoint of tensors '
                           'and plain containers (mimiq_mm never unpickles arbitrary '
                           'objects)?') from err


def _load_from_mimiq_local(filename, map_location=None):
    """mmengine ``CheckpointLoader`` scheme for local files (prefix '').

    ``meta['config']`` is dropped: ``Runner.resume`` hands that text to
    ``Config.fromstring``, which EXECUTES it as a Python config file, so a weights-only-safe
    file could still run code through it (mmengine itself writes ``meta['cfg']``, never
    ``'config'``; only a check of the GPU count is lost)."""
    checkpoint = load_checkpoint_file(filename, map_location=map_location)
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if isinstance(meta, dict) and 'config' in meta:
        meta.pop('config')
        from mmengine.logging import print_log
        print_log(f"{filename}: ignoring meta['config'] (config text that mmengine's resume "
                  'would execute)', logger='current', level=30)
    return checkpoint


def _load_from_refused_remote(filename, map_location=None):
    """mmengine ``CheckpointLoader`` scheme for every remote prefix: refused."""
    refuse_remote(filename)
    # a prefix mmengine maps without '://' (none in 0.10): still never downloaded
    raise RemoteCheckpointError(f'checkpoint={filename!r}: remote checkpoints are refused')


#: remote schemes registered with mmengine's CheckpointLoader, besides the ones it knows
EXTRA_REMOTE_PREFIXES = (r'[A-Za-z][A-Za-z0-9+.\-]*:(?:[A-Za-z0-9+.\-]+:)?//', )


def install_checkpoint_loaders() -> bool:
    """Route every mmengine checkpoint read through :func:`load_checkpoint_file`: the local
    scheme ('') loads weights-only with the allow-list, every remote scheme (all prefixes
    mmengine registered, plus any ``scheme://``) raises :class:`RemoteCheckpointError`.
    Idempotent; True once installed."""
    from mmengine.runner.checkpoint import CheckpointLoader
    schemes = CheckpointLoader._schemes
    for prefix in list(schemes) + list(EXTRA_REMOTE_PREFIXES):
        loader = _load_from_mimiq_local if prefix == '' else _load_from_refused_remote
        if schemes.get(prefix) is not loader:
            CheckpointLoader.register_scheme(prefix, loader, force=True)
    if CheckpointLoader._schemes.get('') is not _load_from_mimiq_local:
        CheckpointLoader.register_scheme('', _load_from_mimiq_local, force=True)
    return True


def load_teacher_weights(model: nn.Module, path: str, cfg_key: str = 'teacher_checkpoint'):
    """Load a float checkpoint into ``model``, strictly, with errors that name the file."""
    if path is None:
        raise ValueError(f'{cfg_key} is not set. MimiQ needs the trained float model: pass '
                         f'`--cfg-options {cfg_key}=/path/to/float.pth` (the checkpoint of '
                         'the model in the config).')
    refuse_remote(path, cfg_key)
    if not osp.isfile(osp.expanduser(str(path))):
        raise FileNotFoundError(f'{cfg_key}={path!r} does not exist. Pass the float model '
                                f'checkpoint with `--cfg-options {cfg_key}=PATH`.')
    ckpt = load_checkpoint_file(path, map_location='cpu', what=cfg_key)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise ValueError(f'{cfg_key}={path!r} holds no state_dict')
    state = {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}
    from mimiq_mm.models.dinov2 import FROZEN_PRETRAINED_META, restore_frozen_pretrained
    frozen = ((ckpt.get('meta') or {}).get(FROZEN_PRETRAINED_META)
              if isinstance(ckpt, dict) else None)
    if frozen:  # a teacher shipped without its frozen pretrained backbone: put it back
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
