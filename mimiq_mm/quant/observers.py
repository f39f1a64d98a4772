"""Range observers: collect statistics of a tensor during calibration (all in buffers).

Every observer keeps the true running ``min_val`` / ``max_val`` (used to decide signedness)
and exposes ``compute_range() -> (lo, hi)``, the range its method recommends. With
``ch_axis`` set the statistics are per slice along that axis (``num_channels`` of them,
known at construction so that ``load_state_dict`` never meets a shape mismatch).
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .primitives import (choose_qparams, fake_quantize_per_token, quant_range,
                         quantization_error)

# Cap on the elements examined per batch by the percentile / MSE observers (a strided
# subsample beyond it): keeps calibration cheap on 800x1216 feature maps.
MAX_OBSERVER_SAMPLES = 2 ** 22
# Smallest clipping ratio tried by the MSE observer (of the batch min/max).
MSE_MIN_RATIO = 0.05
PERCENT = 100.0


def _as_rows(x: Tensor, ch_axis: Optional[int]) -> Tensor:
    """(C, M) view of x (C = 1 per tensor)."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


def _subsample(rows: Tensor, max_samples: int = MAX_OBSERVER_SAMPLES) -> Tensor:
    cols = max(1, max_samples // rows.shape[0])
    if rows.shape[1] <= cols:
        return rows
    stride = math.ceil(rows.shape[1] / cols)
    return rows[:, ::stride]


class Observer(nn.Module):
    """Base class: running min/max; subclasses add their own statistics."""

    def __init__(self, ch_axis: Optional[int] = None, num_channels: Optional[int] = None):
        super().__init__()
        if ch_axis is not None and not num_channels:
            raise ValueError('a per-channel observer needs num_channels')
        self.ch_axis = ch_axis
        shape = () if ch_axis is None else (int(num_channels),)
        self.register_buffer('min_val', torch.full(shape, math.inf))
        self.register_buffer('max_val', torch.full(shape, -math.inf))
        self.register_buffer('num_batches', torch.zeros((), dtype=torch.long))

    def reset(self) -> None:
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)
        self.num_batches.zero_()

    def has_data(self) -> bool:
        return bool(self.num_batches > 0)

    def _rows_min_max(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(C, M) rows of ``x`` and their min / max (0-d per tensor)."""
        rows = _as_rows(x.detach().float(), self.ch_axis)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.ch_axis is None:
            lo, hi = lo[0], hi[0]
        return rows, lo, hi

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        rows, lo, hi = self._rows_min_max(x)
        self._update(rows, lo, hi)
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)
        self.num_batches += 1
        return x

    def _update(self, rows: Tensor, lo: Tensor, hi: Tensor) -> None:
        """Hook for subclasses (called before min/max and num_batches are updated)."""

    @torch.no_grad()
    def set_min_max_(self, x: Tensor) -> None:
        """Replace the running min / max by those of ``x`` alone, leaving the method's own
        statistics (e.g. the MSE search's) as they are: what a weight range that follows
        its weight needs, without searching again."""
        _, lo, hi = self._rows_min_max(x)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)

    def compute_range(self) -> Tuple[Tensor, Tensor]:
        return self.min_val.clone(), self.max_val.clone()

    def mean_abs(self) -> Tensor:
        raise NotImplementedError(f'{type(self).__name__} does not track mean|x|')

    @torch.no_grad()
    def scale_channels_(self, factor: Tensor) -> None:
        """Divide every per-channel statistic by ``factor`` (> 0), i.e. describe x / factor."""
        for name, buf in self.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dim() == 1:
                buf.div_(factor.to(buf))


class MinMaxObserver(Observer):
    """Range = running min / max."""


class EMAObserver(Observer):
    """Range = exponential moving average of the per-batch min / max."""

    def __init__(self, momentum: float, ch_axis=None, num_channels=None):
        super().__init__(ch_axis, num_channels)
        self.momentum = float(momentum)
        self.register_buffer('ema_lo', torch.zeros_like(self.min_val))
        self.register_buffer('ema_hi', torch.zeros_like(self.max_val))

    def _update(self, rows, lo, hi):
        if self.num_batches == 0:
            self.ema_lo.copy_(lo)
            self.ema_hi.copy_(hi)
        else:
            self.ema_lo.lerp_(lo, self.momentum)
            self.ema_hi.lerp_(hi, self.momentum)

    def compute_range(self):
        return self.ema_lo.clone(), self.ema_hi.clone()


class _AveragedRangeObserver(Observer):
    """Range = mean over batches of a per-batch (lo, hi) estimate."""

    def __init__(self, ch_axis=None, num_channels=None):
        super().__init__(ch_axis, num_channels)
        self.register_buffer('sum_lo', torch.zeros_like(self.min_val))
        self.register_buffer('sum_hi', torch.zeros_like(self.max_val))

    def reset(self):
        super().reset()
        self.sum_lo.zero_()
        self.sum_hi.zero_()

    def _batch_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _update(self, rows, lo, hi):
        blo, bhi = self._batch_range(_subsample(rows), lo, hi)
        self.sum_lo += blo
        self.sum_hi += bhi

    def compute_range(self):
        n = self.num_batches.clamp(min=1).to(self.sum_lo)
        return self.sum_lo / n, self.sum_hi / n


class PercentileObserver(_AveragedRangeObserver):
    """Range = batch-averaged ``(100 - p)``-th and ``p``-th percentiles."""

    def __init__(self, percentile: float, ch_axis=None, num_channels=None):
        super().__init__(ch_axis, num_channels)
        self.percentile = float(percentile)

    def _batch_range(self, rows, lo, hi):
        m = rows.shape[1]
        k_hi = min(m, max(1, math.ceil(self.percentile / PERCENT * m)))
        k_lo = min(m, max(1, math.floor((1.0 - self.percentile / PERCENT) * m) + 1))
        blo = rows.kthvalue(k_lo, dim=1).values
        bhi = rows.kthvalue(k_hi, dim=1).values
        if self.ch_axis is None:
            blo, bhi = blo[0], bhi[0]
        return blo, bhi


class MSEObserver(_AveragedRangeObserver):
    """Range = per batch, the clipping ratio of (min, max) with the smallest Lp
    fake-quant error at the target bit width; averaged over batches."""

    def __init__(self, bits: int, symmetric: bool, signedness: str, norm: float, steps: int,
                 ch_axis=None, num_channels=None):
        super().__init__(ch_axis, num_channels)
        self.bits, self.symmetric, self.signedness = int(bits), bool(symmetric), signedness
        self.norm, self.steps = float(norm), int(steps)

    def _batch_range(self, rows, lo, hi):
        lo_r, hi_r = rows.amin(dim=1), rows.amax(dim=1)
        if self.signedness == 'auto':
            unsigned = bool((lo_r >= 0).all())
        else:
            unsigned = self.signedness == 'unsigned'
        qmin, qmax = quant_range(self.bits, signed=self.symmetric and not unsigned)
        best_err = torch.full_like(lo_r, math.inf)
        best_lo, best_hi = lo_r.clone(), hi_r.clone()
        for ratio in torch.linspace(MSE_MIN_RATIO, 1.0, self.steps).tolist():
            c_lo, c_hi = lo_r * ratio, hi_r * ratio
            scale, zp = choose_qparams(c_lo, c_hi, qmin, qmax, self.symmetric)
            err = quantization_error(rows, scale, zp, qmin, qmax, axis=0, norm=self.norm)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        if self.ch_axis is None:
            best_lo, best_hi = best_lo[0], best_hi[0]
        return best_lo, best_hi


# Clipping ratios of the per-token absmax tried by PerTokenMSEObserver: a row's own absmax
# already tracks it, so only mild clipping is searched.
PER_TOKEN_MIN_RATIO = 0.5


def token_rows(x: Tensor, axis: int) -> Tensor:
    """(tokens, K) view of ``x`` with the reduction axis ``axis`` last."""
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


class PerTokenMSEObserver(Observer):
    """Clipping ratio ``r`` of a dynamic per-token quantizer (step of a row =
    ``r * absmax(row) / qmax``) with the smallest Lp error summed over all calibration
    batches; min/max kept as usual (signedness)."""

    def __init__(self, bits: int, signedness: str, norm: float, steps: int, axis: int = -1):
        super().__init__()
        self.bits, self.signedness, self.norm, self.axis = int(bits), signedness, float(norm), \
            int(axis)
        self.register_buffer('ratios', torch.linspace(PER_TOKEN_MIN_RATIO, 1.0, int(steps)))
        self.register_buffer('err_sum', torch.zeros(int(steps), dtype=torch.float64))

    def reset(self):
        super().reset()
        self.err_sum.zero_()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        rows = token_rows(x.detach().float(), self.axis)
        stride = max(1, math.ceil(rows.numel() / MAX_OBSERVER_SAMPLES))
        rows = rows[::stride]
        unsigned = (self.signedness == 'unsigned'
                    or (self.signedness == 'auto' and bool(rows.min() >= 0)))
        qmin, qmax = quant_range(self.bits, signed=not unsigned)
        for i, ratio in enumerate(self.ratios):
            err = fake_quantize_per_token(rows, ratio, qmin, qmax, axis=-1).sub_(rows)
            self.err_sum[i] += err.abs_().pow_(self.norm).sum(dtype=torch.float64)
        return super().forward(x)

    def best_ratio(self) -> Tensor:
        return self.ratios[int(torch.argmin(self.err_sum))].clone()


class MeanAbsObserver(Observer):
    """Tracks mean|x| (for the LSQ initial step 2*mean|x|/sqrt(Qmax)) besides min/max."""

    def __init__(self, ch_axis=None, num_channels=None):
        super().__init__(ch_axis, num_channels)
        self.register_buffer('abs_sum', torch.zeros_like(self.min_val, dtype=torch.float64))
        self.register_buffer('count', torch.zeros((), dtype=torch.float64))

    def reset(self):
        super().reset()
        self.abs_sum.zero_()
        self.count.zero_()

    def _update(self, rows, lo, hi):
        s = rows.abs().sum(dim=1, dtype=torch.float64)
        self.abs_sum += s[0] if self.ch_axis is None else s
        self.count += rows.shape[1]

    def mean_abs(self) -> Tensor:
        return (self.abs_sum / self.count.clamp(min=1)).float()


def size_from_state_dict_(module: nn.Module, name: str, state_dict, prefix: str) -> None:
    """Give ``module``'s buffer ``name``, whose shape comes from data (empty until then),
    the shape it has in ``state_dict`` before that is loaded into it."""
    loaded = state_dict.get(prefix + name)
    own = getattr(module, name)
    if loaded is not None and loaded.shape != own.shape:
        setattr(module, name, torch.zeros_like(loaded, device=own.device))


class ChannelMeanObserver(nn.Module):
    """Running mean of a tensor over every axis except its channel axis (and, for a tensor of
    4 or more dimensions, its head axis): the shift a centred quantizer subtracts
    (``QuantizerConfig.center``). Axes are negative (counted from the end), so the mean has
    the shape of the trailing axes from the first kept one on: ``(C,)`` for a Linear input,
    ``(C, 1, 1)`` for a Conv2d input, ``(heads, 1, d)`` for q. That shape is known only
    when the first batch arrives (a matmul operand's head count and width are not known at
    construction); ``load_state_dict`` takes it from the checkpoint."""

    def __init__(self, channel_axis: int = -1, head_axis: Optional[int] = None):
        super().__init__()
        if channel_axis >= 0 or (head_axis is not None and head_axis >= 0):
            raise ValueError('ChannelMeanObserver axes are counted from the end (negative)')
        self.channel_axis = int(channel_axis)
        self.head_axis = None if head_axis is None else int(head_axis)
        self.register_buffer('ch_sum', torch.zeros(0, dtype=torch.float64))
        self.register_buffer('count', torch.zeros((), dtype=torch.float64))

    def reset(self) -> None:
        self.ch_sum = torch.zeros(0, dtype=torch.float64, device=self.count.device)
        self.count.zero_()

    def has_data(self) -> bool:
        return bool(self.count > 0)

    def _kept(self, ndim: int) -> Tuple[int, ...]:
        axes = {self.channel_axis}
        if self.head_axis is not None and ndim >= 4:
            axes.add(self.head_axis)
        if min(axes) < -ndim:
            raise ValueError(f'a channel mean over axes {sorted(axes)} needs an input of at '
                             f'least {-min(axes)} dimensions, got {ndim}')
        return tuple(sorted(a + ndim for a in axes))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        kept = self._kept(x.dim())
        dims = [d for d in range(x.dim()) if d not in kept]
        s = x.detach().sum(dim=dims, keepdim=True, dtype=torch.float64)
        s = s.reshape(s.shape[kept[0]:])
        if self.ch_sum.numel() == 0:
            self.ch_sum = s
        elif self.ch_sum.shape != s.shape:
            raise ValueError(f'channel mean of shape {tuple(self.ch_sum.shape)} met an input '
                             f'whose kept axes have shape {tuple(s.shape)}')
        else:
            self.ch_sum += s
        self.count += x.numel() // s.numel()
        return x

    def mean(self) -> Tensor:
        return (self.ch_sum / self.count.clamp(min=1)).float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        size_from_state_dict_(self, 'ch_sum', state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def build_observer(cfg, ch_axis: Optional[int] = None, num_channels: Optional[int] = None,
                   token_axis: int = -1) -> Observer:
    """Observer named by ``cfg.observer`` (a :class:`QuantizerConfig`); ``token_axis`` is
    the reduction axis of a per-token quantizer."""
    kw = dict(ch_axis=ch_axis, num_channels=num_channels)
    if cfg.granularity == 'per_token':
        if cfg.observer == 'mse':
            return PerTokenMSEObserver(cfg.bits, cfg.signedness, cfg.mse_norm, cfg.mse_steps,
                                       axis=token_axis)
        return MinMaxObserver()
    if cfg.observer == 'minmax':
        return MinMaxObserver(**kw)
    if cfg.observer == 'ema':
        return EMAObserver(cfg.ema_momentum, **kw)
    if cfg.observer == 'percentile':
        return PercentileObserver(cfg.percentile, **kw)
    if cfg.observer == 'mse':
        return MSEObserver(cfg.bits, cfg.symmetric, cfg.signedness, cfg.mse_norm,
                           cfg.mse_steps, **kw)
    if cfg.observer == 'lsq':
        return MeanAbsObserver(**kw)
    raise ValueError(f'unknown observer {cfg.observer!r}')
