"""Pure fake-quantization primitives.

Everything here is a function of its tensor arguments: no module state, no Python loops
over channels, no ``.item()``. Quantizer modules (``quantizers.py``) only call these.

Conventions
-----------
* ``scale`` / ``zero_point`` are float tensors. Per tensor they are 0-d (or 1 element);
  per channel they have one value per slice along ``axis`` and are broadcast.
* The affine fake-quant follows torch's exact order of operations
  (``torch.fake_quantize_per_tensor_affine``)::

      q  = round_half_even(x * (1 / scale)) + zero_point
      q  = clamp(q, quant_min, quant_max)
      x' = (q - zero_point) * scale

  so the results are bit-identical to torch for float32 inputs.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

MIN_BITS = 2
MAX_BITS = 8
# Smallest scale ever produced by ``choose_qparams``: avoids a division by zero for an
# all-zero tensor/channel.
SCALE_EPS = torch.finfo(torch.float32).eps
# LSQ: initial step = LSQ_INIT_FACTOR * mean|x| / sqrt(Qmax) (Esser et al., 2020).
LSQ_INIT_FACTOR = 2.0


def quant_range(bits: int, signed: bool) -> Tuple[int, int]:
    """Integer grid ``(quant_min, quant_max)`` of a ``bits``-bit signed/unsigned code."""
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f'bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits!r}')
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


class RoundSTE(torch.autograd.Function):
    """Round half to even in forward; straight-through (identity) gradient in backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        return grad_output


def round_ste(x: Tensor) -> Tensor:
    """``torch.round`` with a straight-through gradient (see :class:`RoundSTE`)."""
    return RoundSTE.apply(x)


def _broadcast(t: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """Shape a per-tensor (0-d / 1 element) or per-channel (C,) qparam to broadcast with x."""
    if axis is None:
        return t.reshape(()) if t.numel() == 1 else t
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def fake_quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                         quant_max: int, axis: Optional[int] = None,
                         ste: bool = True) -> Tensor:
    """Uniform affine quantize -> dequantize.

    Args:
        x: input.
        scale: positive step, 0-d for per tensor or ``(x.shape[axis],)`` per channel.
        zero_point: integer-valued float tensor, same shape as ``scale``.
        quant_min, quant_max: integer grid (see :func:`quant_range`).
        axis: channel axis for per-channel qparams, ``None`` for per tensor.
        ste: round with :class:`RoundSTE` (gradients flow to ``x`` and ``scale``, which is
            the LSQ gradient). With ``False`` plain ``torch.round`` (zero gradient).
    """
    scale = _broadcast(scale, x, axis)
    zero_point = _broadcast(zero_point, x, axis)
    inv_scale = 1.0 / scale
    rounded = round_ste(x * inv_scale) if ste else torch.round(x * inv_scale)
    q = clamp_inclusive(rounded + zero_point, quant_min, quant_max)
    return (q - zero_point) * scale


def clamp_inclusive(q: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """``torch.clamp`` whose gradient is 1 on the closed interval ``[quant_min, quant_max]``
    (torch.clamp gives 0 at the bounds; torch's fake-quant and LSQ count them as inside)."""
    inside = (q >= quant_min) & (q <= quant_max)
    return torch.where(inside, q, q.detach().clamp(quant_min, quant_max))


def lsq_grad_scale(numel: int, quant_max: int) -> float:
    """LSQ gradient scale ``1 / sqrt(N * Qmax)`` (N = elements quantized per step value)."""
    return 1.0 / math.sqrt(max(int(numel), 1) * max(int(quant_max), 1))


def scale_grad(t: Tensor, factor: float) -> Tensor:
    """Identity in forward; multiplies the gradient reaching ``t`` by ``factor``."""
    scaled = t * factor
    return (t - scaled).detach() + scaled


def _lsq_factor(x: Tensor, step: Tensor, quant_max: int, grad_factor: Optional[float]) -> float:
    if grad_factor is not None:
        return grad_factor
    return lsq_grad_scale(x.numel() // max(step.numel(), 1), quant_max)


def lsq_fake_quantize_reference(x: Tensor, step: Tensor, zero_point: Tensor, quant_min: int,
                                quant_max: int, axis: Optional[int] = None,
                                grad_factor: Optional[float] = None) -> Tensor:
    """LSQ fake-quant written with :class:`RoundSTE`: :func:`fake_quantize_affine` with a
    learnable ``step`` whose gradient is scaled by ``grad_factor`` (default
    ``1/sqrt(N*Qmax)``, N = elements per step value)."""
    factor = _lsq_factor(x, step, quant_max, grad_factor)
    return fake_quantize_affine(x, scale_grad(step, factor), zero_point, quant_min,
                                quant_max, axis=axis, ste=True)


def _fused_ok(x: Tensor) -> bool:
    return x.dtype == torch.float32


def lsq_fake_quantize(x: Tensor, step: Tensor, zero_point: Tensor, quant_min: int,
                      quant_max: int, axis: Optional[int] = None,
                      grad_factor: Optional[float] = None) -> Tensor:
    """LSQ fake-quant (same values and gradients as :func:`lsq_fake_quantize_reference`).

    Per tensor and float32 it runs torch's fused learnable fake-quant kernel (one pass
    forward, one backward, straight-through rounding built in), about 2x cheaper than the
    composite on CPU; otherwise the reference. ``zero_point`` gets no gradient.
    """
    factor = _lsq_factor(x, step, quant_max, grad_factor)
    # torch's per-channel learnable kernel differs from fake_quantize_per_channel_affine by
    # an ulp, so per-channel steps keep the (exact) reference.
    if axis is not None or not _fused_ok(x):
        return lsq_fake_quantize_reference(x, step, zero_point, quant_min, quant_max, axis,
                                           factor)
    return torch._fake_quantize_learnable_per_tensor_affine(
        x, step.reshape(1), zero_point.detach().to(torch.float32).reshape(1), quant_min,
        quant_max, factor)


def fake_quantize_affine_fused(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                               quant_max: int, axis: Optional[int] = None) -> Tensor:
    """:func:`fake_quantize_affine` with a fixed scale (straight-through gradient to ``x``
    only) through torch's fused kernels for float32; the reference otherwise."""
    if not _fused_ok(x):
        return fake_quantize_affine(x, scale.detach(), zero_point, quant_min, quant_max, axis)
    zp = zero_point.detach().to(torch.int32)
    scale = scale.detach().to(torch.float32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()),
                                                     quant_min, quant_max)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), quant_min,
                                                  quant_max)


def fake_quantize_log(x: Tensor, scale: Tensor, bits: int, levels_per_octave: int = 1) -> Tensor:
    """Logarithmic fake-quant for non-negative inputs such as softmax probabilities.

    Codes ``q = round(-levels_per_octave * log2(x / scale))`` in ``[0, 2**bits - 2]`` stand for
    ``scale * 2**(-q / levels_per_octave)``; the last code ``2**bits - 1`` stands for 0 (used
    for every x below the smallest level). ``levels_per_octave=1`` is log2,
    ``2`` is log-sqrt2. Rounding is :class:`RoundSTE`, which makes ``d x'/d x = x'/x``.
    """
    max_code = 2 ** bits - 2
    tiny = torch.finfo(x.dtype).tiny
    ratio = torch.clamp(x, min=tiny) / scale
    code = round_ste(-levels_per_octave * torch.log2(ratio))
    # clip with where, not clamp: torch.clamp passes no gradient at its bounds, and code 0
    # holds the LARGEST probabilities of every row (x within half a level of the scale)
    code_c = torch.where(code < 0, torch.zeros_like(code),
                         torch.where(code > max_code, torch.full_like(code, max_code), code))
    dequant = scale * torch.exp2(-code_c / levels_per_octave)
    return torch.where(code > max_code, torch.zeros_like(dequant), dequant)


def _reduce_dims(x: Tensor, axis: Optional[int]) -> Tuple[int, ...]:
    if axis is None:
        return tuple(range(x.dim()))
    axis = axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def tensor_min_max(x: Tensor, axis: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Min and max of ``x`` over everything (``axis=None``) or per slice along ``axis``."""
    dims = _reduce_dims(x, axis)
    return torch.amin(x, dim=dims), torch.amax(x, dim=dims)


def choose_qparams(min_val: Tensor, max_val: Tensor, quant_min: int, quant_max: int,
                   symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Scale and zero point covering ``[min_val, max_val]`` (elementwise, any shape).

    * symmetric, signed grid: ``scale = max|.| / quant_max``, zero point 0 (the most
      negative code is left for clipping, the extreme value is represented exactly);
    * symmetric, unsigned grid (non-negative data): ``scale = max / quant_max``, zero point 0;
    * asymmetric: the range is widened to contain 0, ``scale = (max - min) / (qmax - qmin)``,
      ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``.
    """
    min_val = torch.clamp(min_val.float(), max=0.0) if not symmetric else min_val.float()
    max_val = torch.clamp(max_val.float(), min=0.0) if not symmetric else max_val.float()
    if symmetric:
        if quant_min < 0:
            bound = torch.maximum(min_val.abs(), max_val.abs())
        else:
            bound = torch.clamp(max_val, min=0.0)
        scale = torch.clamp(bound / quant_max, min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((max_val - min_val) / (quant_max - quant_min), min=SCALE_EPS)
    zero_point = torch.clamp(quant_min - torch.round(min_val / scale), quant_min, quant_max)
    return scale, zero_point


def lsq_init_step(mean_abs: Tensor, quant_max: int) -> Tensor:
    """LSQ initial step ``2 * mean|x| / sqrt(Qmax)``."""
    return torch.clamp(LSQ_INIT_FACTOR * mean_abs.float() / math.sqrt(quant_max), min=SCALE_EPS)


def choose_log_scale(max_val: Tensor) -> Tensor:
    """Scale of :func:`fake_quantize_log`: the largest value maps to code 0."""
    return torch.clamp(max_val.float(), min=SCALE_EPS)


def quantization_error(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                       quant_max: int, axis: Optional[int], norm: float) -> Tensor:
    """``sum |x - fq(x)|^norm`` per tensor (0-d) or per channel along ``axis``."""
    err = (x - fake_quantize_affine(x, scale, zero_point, quant_min, quant_max, axis,
                                    ste=False)).abs().pow(norm)
    return err.sum(dim=_reduce_dims(x, axis))


def fake_quantize_per_token(x: Tensor, ratio: Tensor, quant_min: int, quant_max: int,
                            axis: int = -1, learn_ratio: bool = False) -> Tensor:
    """Dynamic symmetric fake-quant with one step per vector along ``axis``:
    ``step = ratio * max|x| / quant_max`` over that axis (``quant_min = 0``: the max of a
    non-negative input). The step is computed at run time, so it needs no calibrated range;
    ``ratio`` (a clipping ratio, 0-d) is the only parameter. Straight-through rounding; the
    absmax passes no gradient; ``ratio`` gets the LSQ gradient when ``learn_ratio``
    (scaled by ``1/sqrt(N*Qmax)``, N = elements of x)."""
    amax = x.detach().abs().amax(dim=axis, keepdim=True)
    if learn_ratio:
        ratio = scale_grad(ratio, lsq_grad_scale(x.numel(), quant_max))
    else:
        ratio = ratio.detach()
    step = torch.clamp(amax * (ratio / quant_max), min=SCALE_EPS)
    return clamp_inclusive(round_ste(x / step), quant_min, quant_max) * step
