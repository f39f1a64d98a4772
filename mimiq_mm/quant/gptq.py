"""Error-compensating weight rounding (GPTQ, Frantar et al. 2023) for ``QuantLinear``.

Rounding every weight to its nearest grid point minimises the error of each weight alone;
what matters is the layer's output ``x Wᵀ``. GPTQ rounds the columns (input channels) of
``W`` one at a time and moves the not-yet-rounded columns to cancel the output error of
each rounding, using the second moment of the layer inputs ``H = Σ xᵀx`` (gathered on the
calibration images: synthetic ones, data-free). The grid itself (the per-channel step that
calibration chose, e.g. the MSE clipping search) is not changed: only which grid point each
weight goes to. The result is written back into the float weight, which then lies exactly on
the grid, so the student, its checkpoints and its export see nothing new.

Used by :func:`mimiq_mm.quant.calibration_mode` for layers whose weight quantizer has
``rounding='gptq'``: it gathers ``H`` from the (rotated) float inputs of each such layer
during the calibration block, in the same pass as the activation observers, and rounds
after the weight ranges are set.
"""
import math
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

from .primitives import fake_quantize_affine

#: relative damping added to the diagonal of H (fraction of its mean diagonal)
GPTQ_DAMP = 0.01
#: columns rounded together before the rest of the matrix is updated (lazy batch updates)
GPTQ_BLOCK = 128
_MAX_DAMP_TRIES = 4


class InputMoments:
    """Running ``H = Σ xᵀx`` (float32) and row count of one layer's inputs."""

    def __init__(self, dim: int, device):
        self.h = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.numel():
            self.h.addmm_(x.t(), x)
            self.rows += x.shape[0]


def _round(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Nearest rounding of ``w`` (out x k) on the weight quantizer's grid (per output channel:
    ``scale`` of shape (out,); per tensor: 0-d)."""
    axis = 0 if scale.dim() == 1 else None
    return fake_quantize_affine(w, scale, zero_point, qmin, qmax, axis=axis, ste=False)


@torch.no_grad()
def gptq_round(weight: Tensor, h: Tensor, scale: Tensor, zero_point: Tensor, qmin: int,
               qmax: int, damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK,
               act_order: bool = True) -> Optional[Tensor]:
    """GPTQ-rounded copy of ``weight`` (out x in) on the grid ``(scale, zero_point, qmin,
    qmax)`` (per output channel: shape (out,), or scalars), for inputs with second moment
    ``h`` (in x in). Returns None when ``h`` cannot be factorised even with more damping."""
    w = weight.detach().float().clone()
    in_ch = w.shape[1]
    scale, zero_point = scale.detach().float(), zero_point.detach().float()
    h = h.detach().float().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:  # round the channels with the largest input energy first
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    mean_diag = float(torch.diagonal(h).mean())
    hinv = None
    for attempt in range(_MAX_DAMP_TRIES):
        hd = h + torch.eye(in_ch, device=h.device) * (damp * (10 ** attempt) * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                break
            hinv = None
    if hinv is None:
        return None
    q = torch.empty_like(w)
    for i1 in range(0, in_ch, block):
        i2 = min(i1 + block, in_ch)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i:i + 1]
            qcol = _round(col, scale, zero_point, qmin, qmax)
            q[:, i1 + i:i1 + i + 1] = qcol
            err = (col - qcol) / hinv1[i, i]
            w1[:, i:] -= err @ hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(weight.dtype)


def output_error(weight: Tensor, q: Tensor, h: Tensor) -> float:
    """``trace((W - Q) H (W - Q)ᵀ)``: the summed squared output error of ``x Qᵀ`` against
    ``x Wᵀ`` over the inputs whose second moment is ``h``."""
    d = (weight.float() - q.float())
    return float((d @ h.float() * d).sum())


@torch.no_grad()
def apply_gptq_(layers: Dict, moments: Dict) -> Dict[str, float]:
    """Round each ``QuantLinear`` of ``layers`` ({module: name}) with its ``moments``.

    The weight quantizer must be calibrated (its step is the grid). Returns {name: relative
    output error of GPTQ over nearest rounding}; a layer whose ``H`` cannot be factorised
    keeps nearest rounding (with a warning)."""
    ratios = {}
    failed = []
    for module, name in layers.items():
        stats = moments.get(module)
        if stats is None or stats.rows == 0:
            continue
        wq = module.weight_quantizer
        qmin, qmax = wq.quant_min_max
        w_eff = module.effective_weight().detach()
        scale = wq._qparam().detach()
        zp = wq.zero_point.detach()
        q = gptq_round(w_eff, stats.h, scale, zp, qmin, qmax)
        if q is None:
            failed.append(name)
            continue
        nearest = _round(w_eff.float(), scale.float(), zp.float(), qmin, qmax)
        base = output_error(w_eff, nearest, stats.h)
        ratios[name] = output_error(w_eff, q, stats.h) / base if base > 0 else 1.0
        module.weight.copy_(module.weight_from_effective(q).to(module.weight.dtype))
        wq.rebase_weight_statistics_(module.effective_weight().detach())
        module.mark_weight_qparams_current()
    if failed:
        warnings.warn(f'GPTQ could not factorise the input moments of {len(failed)} layer(s) '
                      f'(kept nearest rounding): {failed[:5]}', RuntimeWarning)
    return ratios


def summarize(ratios: Dict[str, float]) -> str:
    if not ratios:
        return 'GPTQ rounded no layer'
    vals = sorted(ratios.values())
    geo = math.exp(sum(math.log(max(v, 1e-12)) for v in vals) / len(vals))
    return (f'GPTQ rounded {len(vals)} layers: output error x{geo:.3f} of nearest rounding '
            f'(geometric mean; worst x{vals[-1]:.3f})')
