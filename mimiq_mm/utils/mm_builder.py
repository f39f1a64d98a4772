"""Building OpenMMLab task models from their configs, offline.

One place for what the distiller, the synthesis teacher, the exporter and the tests need:
build an mmdet / mmseg model config in the right registry scope, and clean a config of
everything that could download weights (``pretrained=`` / ``init_cfg``) or needs a process
group (SyncBN).
"""
import copy
import importlib
from typing import Optional, Sequence

from mmengine.config import ConfigDict
from mmengine.registry import DefaultScope
from torch import nn


def strip_pretrained(model_cfg):
    """Set every ``pretrained=`` / ``init_cfg`` in a (nested) config to None, in place:
    weights come from a checkpoint file, never from a download."""
    if isinstance(model_cfg, dict):
        for key in ('pretrained', 'init_cfg'):
            if key in model_cfg:
                model_cfg[key] = None
        for value in model_cfg.values():
            strip_pretrained(value)
    elif isinstance(model_cfg, (list, tuple)):
        for value in model_cfg:
            strip_pretrained(value)
    return model_cfg


def replace_sync_bn(model_cfg):
    """SyncBN -> BN in a (nested) config, in place (single-process runs and CPU)."""
    if isinstance(model_cfg, dict):
        if model_cfg.get('type') == 'SyncBN':
            model_cfg['type'] = 'BN'
        for value in model_cfg.values():
            replace_sync_bn(value)
    elif isinstance(model_cfg, (list, tuple)):
        for value in model_cfg:
            replace_sync_bn(value)
    return model_cfg


def _scope_of(type_name) -> Optional[str]:
    if isinstance(type_name, str) and '.' in type_name:
        return type_name.split('.', 1)[0]
    return None


def build_task_model(cfg: dict, scope: Optional[str] = None,
                     allowed_scopes: Optional[Sequence[str]] = None) -> nn.Module:
    """Build an mmdet / mmseg model config inside the right registry scope.

    ``scope`` is, in order: the argument, a ``_scope_`` key / ``'mmdet.'`` prefix in the
    config, the current default scope (``default_scope`` of the run), then ``mmdet`` and
    ``mmseg`` tried in turn. ``allowed_scopes``: when given (a config read from a data file,
    e.g. an export), a candidate scope outside it is an error, never imported.
    """
    # ConfigDict: mmdet / mmseg read nested settings as attributes (``train_cfg.rpn``,
    # ``test_cfg.mode``), which plain dicts (a config saved with an export) do not have.
    cfg = ConfigDict(copy.deepcopy(dict(cfg)))
    candidates = [scope, cfg.pop('_scope_', None), _scope_of(cfg.get('type'))]
    if allowed_scopes is not None:  # the config's own scopes: refused, never imported
        bad = [c for c in candidates if c and c not in allowed_scopes]
        if bad:
            raise ValueError(f'model scope {bad[0]!r} is not one of {tuple(allowed_scopes)}; '
                             'refusing to import a package chosen by a data file')
    current = DefaultScope.get_current_instance()
    if current is not None:
        candidates.append(current.scope_name)
    candidates += ['mmdet', 'mmseg']
    tried = []
    for cand in candidates:
        if not cand or cand in tried or cand == 'mimiq_mm':
            continue
        if allowed_scopes is not None and cand not in allowed_scopes:
            continue  # e.g. the caller's default scope
        tried.append(cand)
        try:
            __import__(f'{cand}.models')  # registers the library's modules
            registry = importlib.import_module(f'{cand}.registry').MODELS
        except (ImportError, AttributeError):
            continue
        with DefaultScope.overwrite_default_scope(cand):
            if registry.get(cfg['type']) is None:
                continue
            return registry.build(cfg)
    raise KeyError(f"model type {cfg.get('type')!r} of the teacher config is not registered "
                   f'in any of the scopes {tried}; set teacher._scope_ (e.g. "mmdet") or '
                   'import the package that registers it (custom_imports).')
