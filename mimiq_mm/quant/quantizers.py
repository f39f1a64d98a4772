"""Quantizer modules. All state lives in buffers / parameters:

* ``step`` (``nn.Parameter``, LSQ) or ``scale`` (buffer): the quantization step;
* ``zero_point`` (buffer), ``initialized`` and ``unsigned`` (bool buffers);
* the observer's statistics (child module ``observer``).

Run-time switches (``fake_quant_enabled``, ``observing``) are plain attributes: they are
modes, not state, and are toggled with ``set_quant_state`` / ``calibration_mode``.
``initialized`` / ``unsigned`` are mirrored in Python attributes (kept in sync when set and
when loaded from a state_dict) so that forward never reads a tensor back (no device sync).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .config import QuantizerConfig
from .observers import (ChannelMeanObserver, PerTokenMSEObserver, build_observer,
                        size_from_state_dict_)
from .primitives import (choose_log_scale, choose_qparams, fake_quantize_affine_fused,
                         fake_quantize_log, fake_quantize_per_token,
                         lsq_fake_quantize, lsq_init_step, quant_range)

LOG_LEVELS_PER_OCTAVE = {'log2': 1, 'log_sqrt2': 2}


class NotCalibratedError(RuntimeError):
    """Raised by an enabled quantizer whose ranges were never calibrated."""


class Quantizer(nn.Module):
    """Fake-quantizer for one tensor.

    Args:
        cfg: the :class:`QuantizerConfig`.
        ch_axis: channel axis when ``cfg.granularity == 'per_channel'``.
        num_channels: size of that axis (weights: output channels).
        observe_channels: for a per-tensor quantizer, collect per-channel statistics along
            the last axis (``num_channels`` of them). Used by the LayerNorm reparam, which
            rescales them before the per-tensor range is chosen.
        is_weight: quantizes a weight (toggled by ``set_quant_state(weight=...)``).
        token_axis: for ``cfg.granularity == 'per_token'``, the axis the scale is computed
            over (the reduction axis of the product that consumes the input: -1 for a
            Linear input or the first matmul operand, 1 for a Conv2d input, -2 for the
            second matmul operand), so that the scales factor out of the integer product.
            The quantizer's one parameter (``step``) is then the clipping ratio of the
            absmax, not a step.
        center_axis, head_axis: for ``cfg.center``, the (negative) channel axis of the
            input and, for inputs of 4+ dimensions, its head axis: the calibrated mean
            ``offset`` is per (head,) channel, and the quantizer computes
            ``Q(x - offset) + offset``.
    """

    def __init__(self, cfg: QuantizerConfig, ch_axis: Optional[int] = None,
                 num_channels: Optional[int] = None, observe_channels: bool = False,
                 is_weight: bool = False, token_axis: int = -1, center_axis: int = -1,
                 head_axis: Optional[int] = None):
        super().__init__()
        if not isinstance(cfg, QuantizerConfig):
            raise ValueError(f'cfg must be a QuantizerConfig, got {type(cfg).__name__}')
        per_channel = cfg.granularity == 'per_channel'
        self.per_token = cfg.granularity == 'per_token'
        if self.per_token and (is_weight or observe_channels):
            raise ValueError("granularity='per_token' is for activations (a weight is "
                             "quantized per_channel or per_tensor; the LayerNorm reparam needs "
                             "per_tensor inputs)")
        if cfg.rounding != 'nearest' and not is_weight:
            raise ValueError(f"rounding={cfg.rounding!r} applies to weights only; an "
                             "activation quantizer rounds to the nearest grid point (set it in "
                             "QuantConfig.weight)")
        self.token_axis = int(token_axis)
        if per_channel and (ch_axis is None or not num_channels):
            raise ValueError('a per-channel quantizer needs ch_axis and num_channels')
        if observe_channels and (per_channel or not num_channels):
            raise ValueError('observe_channels needs a per-tensor quantizer and num_channels')
        self.cfg = cfg
        self.is_weight = is_weight
        self.ch_axis = ch_axis if per_channel else None
        self.observe_channels = observe_channels
        obs_axis = self.ch_axis if per_channel else (-1 if observe_channels else None)
        self.observer = build_observer(cfg, obs_axis, num_channels if obs_axis is not None
                                       else None, token_axis=self.token_axis)
        shape = (int(num_channels),) if per_channel else ()
        if cfg.lsq:
            self.step = nn.Parameter(torch.ones(shape))
        else:
            self.register_buffer('scale', torch.ones(shape))
        self.register_buffer('zero_point', torch.zeros(shape))
        self.register_buffer('initialized', torch.zeros((), dtype=torch.bool))
        self.register_buffer('unsigned', torch.tensor(cfg.signedness == 'unsigned'))
        # the per-channel shift of a centred quantizer: empty until calibrated (or when not
        # centred); its shape comes from the calibration data or the loaded state_dict
        self.register_buffer('offset', torch.zeros(0))
        self.center_observer = (ChannelMeanObserver(center_axis, head_axis) if cfg.center
                                else None)
        self._initialized = False
        self._unsigned = cfg.signedness == 'unsigned'
        self.fake_quant_enabled = True
        self.observing = False
        self.name = ''  # fully-qualified name, set by quantize_ (for error messages)

    # --- grid -------------------------------------------------------------------------
    @property
    def quant_min_max(self):
        signed = self.cfg.symmetric and not self._unsigned
        return quant_range(self.cfg.bits, signed)

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    def _qparam(self) -> Tensor:
        return self.step if self.cfg.lsq else self.scale

    # --- state_dict mirror --------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before centring has no offset: no shift
        state_dict.setdefault(prefix + 'offset', torch.zeros(0))
        size_from_state_dict_(self, 'offset', state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)
        self._unsigned = bool(self.unsigned)

    def reset_calibration(self) -> None:
        self.observer.reset()
        if self.center_observer is not None:
            self.center_observer.reset()
        self.offset = torch.zeros(0, device=self.offset.device)
        self.initialized.fill_(False)
        self._initialized = False

    # --- calibration --------------------------------------------------------------------
    @torch.no_grad()
    def rescale_observed_channels_(self, factor: Tensor) -> None:
        """The observed input will be divided by ``factor`` per channel (LayerNorm reparam)."""
        self.observer.scale_channels_(factor)

    @torch.no_grad()
    def compute_qparams(self) -> bool:
        """Set step/scale and zero point from the observer. Returns False (and leaves the
        quantizer uninitialised) when the observer saw no data."""
        obs = self.observer
        if not obs.has_data():
            return False
        reduce = self.observe_channels
        lo, hi = obs.compute_range()
        true_min = obs.min_val
        if reduce:
            lo, hi, true_min = lo.min(), hi.max(), true_min.min()
        if self.cfg.signedness == 'auto':
            self._unsigned = bool((true_min >= 0).all())
        else:
            self._unsigned = self.cfg.signedness == 'unsigned'
        offset = torch.zeros(0, device=self.offset.device)
        if self.center_observer is not None and self.center_observer.has_data():
            offset = self.center_observer.mean().to(self.offset.device)
            self._unsigned = False  # x - mean takes both signs
        self.offset = offset
        self.unsigned.fill_(self._unsigned)
        qmin, qmax = self.quant_min_max
        if self.per_token:  # the clipping ratio of the per-token absmax
            scale = (obs.best_ratio() if isinstance(obs, PerTokenMSEObserver)
                     else torch.ones((), device=hi.device))
            zero_point = torch.zeros_like(scale)
        elif self.cfg.kind != 'uniform':
            scale = choose_log_scale(hi)
            zero_point = torch.zeros_like(scale)
        elif self.cfg.observer == 'lsq':
            mean_abs = obs.mean_abs()
            if reduce:
                mean_abs = mean_abs.mean()
            scale = lsq_init_step(mean_abs, qmax)
            zero_point = torch.zeros_like(scale)
            if not self.cfg.symmetric:
                zero_point = torch.clamp(qmin - torch.round(lo.clamp(max=0) / scale),
                                         qmin, qmax)
        else:
            scale, zero_point = choose_qparams(lo, hi, qmin, qmax, self.cfg.symmetric)
        self._qparam().data.copy_(scale.reshape(self._qparam().shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.initialized.fill_(True)
        self._initialized = True
        return True

    @torch.no_grad()
    def calibrate_from(self, x: Tensor) -> bool:
        """Reset the observer, observe ``x`` once and compute the qparams (weights)."""
        self.observer.reset()
        self.observer(x)
        if self.center_observer is not None:
            self.center_observer.reset()
            self.center_observer(x)
        return self.compute_qparams()

    @torch.no_grad()
    def follow_weight_(self, w: Tensor) -> bool:
        """Move a calibrated weight range along with the weight, cheaply: the per-channel
        step is rescaled by how much the channel's absmax moved, so the clipping ratio that
        calibration chose (the MSE search, ``observer='mse'``) is kept without searching
        again at every fine-tuning step. Min-max ranges are recomputed exactly (the same
        thing); returns False when the quantizer was never calibrated."""
        if not self._initialized:
            return self.calibrate_from(w)
        if self.cfg.observer == 'minmax' or self.cfg.lsq:
            return self.calibrate_from(w)
        obs = self.observer
        old = torch.maximum(obs.max_val.abs(), obs.min_val.abs())
        obs.set_min_max_(w)  # min / max only: no new MSE search at every fine-tuning step
        new = torch.maximum(obs.max_val.abs(), obs.min_val.abs())
        factor = torch.where(old > 0, new / old.clamp(min=torch.finfo(old.dtype).tiny),
                             torch.ones_like(old))
        param = self._qparam()
        param.data.mul_(factor.reshape(param.shape).to(param.dtype))
        return True

    @torch.no_grad()
    def rebase_weight_statistics_(self, w: Tensor) -> None:
        """Take ``w`` as the weight the calibrated range belongs to, keeping the step: the
        observer's min / max are re-read from ``w`` (a weight that GPTQ moved onto the grid;
        :meth:`follow_weight_` later rescales relative to them)."""
        self.observer.set_min_max_(w)

    # --- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observer(x)
            if self.center_observer is not None:
                self.center_observer(x)
            return x
        if not self.fake_quant_enabled:
            return x
        if not self._initialized:
            raise NotCalibratedError(
                f'quantizer {self.name or type(self).__name__} is enabled but not calibrated: '
                'run it under calibration_mode(model) on calibration data first (from '
                'mimiq_mm.quant import calibration_mode), load a calibrated state_dict, or '
                'disable fake-quant with set_quant_state(model, weight=False, act=False)')
        if self.offset.numel():
            offset = self.offset.to(x.dtype)
            return self._fake_quant(x - offset) + offset
        return self._fake_quant(x)

    def _fake_quant(self, x: Tensor) -> Tensor:
        qparam = self._qparam()
        if qparam.dtype != x.dtype:
            qparam = qparam.to(x.dtype)
        if self.cfg.kind != 'uniform':
            return fake_quantize_log(x, qparam, self.cfg.bits,
                                     LOG_LEVELS_PER_OCTAVE[self.cfg.kind])
        qmin, qmax = self.quant_min_max
        if self.per_token:
            return fake_quantize_per_token(x, qparam, qmin, qmax, self.token_axis,
                                           learn_ratio=self.cfg.lsq)
        zero_point = self.zero_point.to(x.dtype)
        if self.cfg.lsq:
            return lsq_fake_quantize(x, qparam, zero_point, qmin, qmax, axis=self.ch_axis)
        return fake_quantize_affine_fused(x, qparam, zero_point, qmin, qmax, axis=self.ch_axis)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f'{c.kind} {c.bits}b {c.granularity} sym={c.symmetric} lsq={c.lsq} '
                f'observer={c.observer} initialized={self._initialized} '
                f'unsigned={self._unsigned} enabled={self.fake_quant_enabled}'
                + (f' centred={tuple(self.offset.shape)}' if self.cfg.center else ''))
