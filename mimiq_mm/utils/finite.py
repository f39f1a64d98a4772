"""Checks that stop a run the moment a loss weight, a loss term or a gradient is not finite.

* :func:`check_loss_weights` — at build time (``MimiQDistiller.__init__``): every loss weight
  finite and >= 0, the KD temperature finite and > 0 (``temperature=0`` divides by zero,
  ``gamma=nan`` would silently drop HSAD since ``nan > 0`` is False).
* :func:`check_finite_losses` — every loss term of a training step (the distiller's
  ``parse_losses``, which mmengine calls with and without DDP) before the backward pass.
* :func:`grad_guard` — an optimizer step pre-hook (installed by
  :class:`mimiq_mm.engine.CheckpointGuardHook`): NaN / inf gradients stop the run before the
  step writes them into the weights.

Each error names the training iteration (1-based, as the log prints it) and the term or the
parameters, so no NaN checkpoint is ever written.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Mapping, Optional

import torch


class NonFiniteError(FloatingPointError):
    """A loss term or gradient of a training step is NaN or infinite."""


def current_iteration() -> Optional[int]:
    """The 1-based training iteration mmengine is running (its log's numbering), or None
    outside a Runner."""
    try:
        from mmengine.logging import MessageHub
        hub = MessageHub.get_current_instance()
        it = hub.get_info('iter')
    except Exception:  # no message hub: not inside a Runner
        return None
    return None if it is None else int(it) + 1


def _at() -> str:
    it = current_iteration()
    return f'at iteration {it}' if it is not None else 'in this training step'


def check_loss_weights(**weights) -> None:
    """ValueError unless every given weight is a finite real >= 0; ``temperature`` (when
    given) must be finite and > 0. Nested dicts (``kd_weights``) are checked per key."""
    for name, value in weights.items():
        if isinstance(value, Mapping):
            for key, item in value.items():
                check_loss_weights(**{f'{name}[{key!r}]': item})
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f'{name} must be a number, got {value!r}')
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f'{name}={value} is not finite; loss weights must be finite '
                             'numbers (>= 0)')
        if name == 'temperature':
            if value <= 0:
                raise ValueError(f'temperature={value} must be > 0 (the KD terms divide by '
                                 'it)')
        elif value < 0:
            raise ValueError(f'{name}={value} must be >= 0 (0 switches the term off)')


def check_finite_losses(losses: Mapping[str, object]) -> None:
    """NonFiniteError naming the iteration and every loss term that is NaN / inf."""
    bad = []
    for name, value in losses.items():
        if 'loss' not in name:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if torch.is_tensor(item) and item.is_floating_point() and \
                    not bool(torch.isfinite(item.detach()).all()):
                bad.append(f'{name}={item.detach().float().mean().item()}')
                break
    if bad:
        raise NonFiniteError(f'non-finite loss {_at()}: {", ".join(bad)}. The run is '
                             'stopped before this step updates the weights (no NaN '
                             'checkpoint is written); check the loss weights / temperature '
                             'and the learning rate.')


def grad_guard(names: Dict[int, str]) -> Callable:
    """A ``torch.optim.Optimizer`` step pre-hook raising NonFiniteError when a gradient is
    NaN / inf; ``names`` maps ``id(param)`` to its name for the message."""

    def hook(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group['params']
                  if p.grad is not None]
        if not params:
            return None
        device = params[0].grad.device
        finite = torch.stack([torch.isfinite(p.grad).all().to(device) for p in params])
        if bool(finite.all()):  # one device sync per step
            return None
        bad = [names.get(id(p), f'<param of shape {tuple(p.shape)}>')
               for p, ok in zip(params, finite.tolist()) if not ok]
        if bad:
            shown = bad[:5] + (['...'] if len(bad) > 5 else [])
            raise NonFiniteError(f'non-finite gradient {_at()} in {len(bad)} parameter(s): '
                                 f'{", ".join(shown)}. The run is stopped before the '
                                 'optimizer step (no NaN checkpoint is written); lower the '
                                 'learning rate or enable gradient clipping.')
        return None

    return hook
