"""Quantizable modules. ``MatMul`` is the float product that attention adapters route
q·kᵀ and attn·v through; ``quantize_`` swaps it for ``QuantMatMul``."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .quantizers import Quantizer
from .rotation import InputRotation, shared_rotation


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so that quantize_ can find and replace it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


def _make_input_quantizer(cfg, keep_float: bool, num_channels: int, channel_axis: int,
                          observe_channels: bool = False) -> Optional[Quantizer]:
    if keep_float:
        return None
    # a centred input is shifted per channel: axis -1 of a Linear input, -3 of an NCHW one
    center_axis = -1 if channel_axis == -1 else -3
    if cfg.act.granularity == 'per_channel':
        return Quantizer(cfg.act, ch_axis=channel_axis, num_channels=num_channels,
                         center_axis=center_axis)
    if cfg.act.granularity == 'per_token':  # one step per token: over the input channels
        return Quantizer(cfg.act, token_axis=channel_axis, center_axis=center_axis)
    return Quantizer(cfg.act, num_channels=num_channels, observe_channels=observe_channels,
                     center_axis=center_axis)


def _make_weight_quantizer(cfg, weight: torch.Tensor) -> Quantizer:
    return Quantizer(cfg.weight, ch_axis=0, num_channels=weight.shape[0], is_weight=True)


# Attributes every nn.Module has (parameter/buffer/hook dicts...): never copied by from_float.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {'training'}


class _QuantWeightMixin:
    """Shared by QuantLinear / QuantConv2d: swap in and out keeping the same Parameters."""

    _float_module: nn.Module
    #: set by quantize_ on the layer that sees the network input (its input stays float)
    is_network_input = False

    @classmethod
    def from_float(cls, module: nn.Module, cfg: Optional[QuantConfig] = None,
                   keep_input_float: bool = False,
                   observe_input_channels: bool = False, rotate_input: bool = False):
        """Quantized twin of ``module`` sharing its ``weight`` / ``bias`` Parameters.

        Args:
            module: the float layer (its class is kept for :meth:`to_float`).
            cfg: a :class:`QuantConfig` (``cfg.weight`` and ``cfg.act`` are used).
            keep_input_float: leave the input unquantized (``quantize_`` sets it for the
                layer that sees the network input when ``cfg.keep_input_float``).
            observe_input_channels: collect per-channel input statistics (LayerNorm reparam).
            rotate_input: quantize ``x R`` and ``W R`` (orthogonal ``R``, same float output;
                :mod:`mimiq_mm.quant.rotation`); Linear only.
        """
        float_base = cls._float_base
        if not isinstance(module, float_base):
            raise TypeError(f'{cls.__name__}.from_float expects a {float_base.__name__}, got '
                            f'{type(module).__name__}')
        cfg = QuantConfig() if cfg is None else cfg
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key, value in vars(module).items():
            if key not in _MODULE_INTERNALS:
                object.__setattr__(new, key, value)
        new.training = module.training
        new.weight = module.weight
        new.bias = module.bias
        object.__setattr__(new, '_float_module', module)
        new.weight_quantizer = _make_weight_quantizer(cfg, module.weight)
        new.input_quantizer = _make_input_quantizer(
            cfg, bool(keep_input_float), new._in_channels(), new._INPUT_CHANNEL_AXIS,
            observe_input_channels)
        if rotate_input and not isinstance(module, nn.Linear):
            raise ValueError('rotate_input is supported for Linear layers only')
        # ``InputRotation`` of the input (and of the weight's input axis) or None
        new.input_rotation = (InputRotation(new._in_channels()).to(module.weight.device)
                              if rotate_input else None)
        return new

    def to_float(self) -> nn.Module:
        """The original float module, holding this module's (same) Parameters."""
        module = self._float_module
        module.weight = self.weight
        module.bias = self.bias
        module.train(self.training)
        return module

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def effective_weight(self) -> torch.Tensor:
        """The weight as the weight quantizer sees it: ``W``, or ``W R`` when the input is
        rotated (the same float product with the rotated input)."""
        if self.input_rotation is None:
            return self.weight
        return self.input_rotation(self.weight)

    def weight_from_effective(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`effective_weight` (loading exported integer weights)."""
        return w if self.input_rotation is None else self.input_rotation.inverse(w)

    @torch.no_grad()
    def sync_weight_qparams(self) -> None:
        """Bring a range-based (non-LSQ) weight quantizer up to date with the weight.

        Its per-channel range is a function of the weight, so it follows the weight whenever
        it changed in place (an optimizer step, a state_dict load) since the last time
        (``Quantizer.follow_weight_``: min-max recomputed, an MSE-searched range rescaled
        with the channel's absmax); otherwise fine-tuning would clip every weight that grows
        past its calibration-time range. Tracked by the Parameter's version counter: free while the weight stays the
        same (evaluation). Called by forward and by the exporter.
        """
        wq = self.weight_quantizer
        if wq.is_initialized and not wq.cfg.lsq:
            if self.weight._version != getattr(self, '_weight_version', None):
                wq.follow_weight_(self.effective_weight().detach())
                self._weight_version = self.weight._version

    def mark_weight_qparams_current(self) -> None:
        """Take the weight quantizer's state as up to date with the weight as it is now
        (after loading an export: its weights were decoded with exactly that scale, and a
        range recomputed from already-quantized weights by an MSE or LSQ-init rule would
        differ)."""
        self._weight_version = self.weight._version

    def _quant_weight(self) -> torch.Tensor:
        self.sync_weight_qparams()
        return self.weight_quantizer(self.effective_weight())


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight (per output channel) and input."""

    _float_base = nn.Linear
    _INPUT_CHANNEL_AXIS = -1

    def _in_channels(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self._quant_weight(), self.bias)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight (per output channel) and input."""

    _float_base = nn.Conv2d
    _INPUT_CHANNEL_AXIS = 1

    def _in_channels(self) -> int:
        return self.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self._quant_weight(), self.bias)


MATMUL_ROLES = ('qk', 'av', 'generic')


class QuantMatMul(MatMul):
    """``MatMul`` with BOTH inputs fake-quantized, each by its own quantizer.

    Role 'av' (attn·v): the first input is post-softmax probabilities -> ``cfg.attn_prob``
    (may be a log2 quantizer); the second (v) -> ``cfg.act``. Roles 'qk' / 'generic': both
    inputs -> ``cfg.act``.
    """

    def __init__(self, cfg: Optional[QuantConfig] = None, role: str = 'generic'):
        super().__init__()
        if role not in MATMUL_ROLES:
            raise ValueError(f'role={role!r} is not valid; choose one of {list(MATMUL_ROLES)}')
        cfg = QuantConfig() if cfg is None else cfg
        for name in ('act', 'attn_prob'):
            if getattr(cfg, name).granularity == 'per_channel':
                raise ValueError(f"QuantMatMul supports {name}.granularity 'per_tensor' or "
                                 f"'per_token' (the channel count of a matmul input is not "
                                 f"known); set one for the attention products, e.g. with "
                                 f"overrides={{'*_matmul': {{'{name}': "
                                 f"{{'granularity': 'per_tensor'}}}}}}")
        self.role = role
        # q·kᵀ = (q R)(k R)ᵀ and attn·v = (attn·(v R)) Rᵀ over the head dimension
        self.rotate = bool(cfg.rotate_inputs) and role in ('qk', 'av')
        # per-token steps run along the reduction axis of a @ b: rows of a, columns of b.
        # A centred operand is shifted per (head, channel): q (.., h, N, d) and v
        # (.., h, M, d) along their last axis, kᵀ (.., h, d, M) along -2.
        heads = -3 if role in ('qk', 'av') else None
        self.a_quantizer = Quantizer(cfg.attn_prob if role == 'av' else cfg.act, token_axis=-1,
                                     center_axis=-1, head_axis=heads)
        self.b_quantizer = Quantizer(cfg.act, token_axis=-2,
                                     center_axis=-1 if role == 'av' else -2, head_axis=heads)
        self._float_module = None

    @classmethod
    def from_float(cls, module: MatMul, cfg: Optional[QuantConfig] = None,
                   role: str = 'generic') -> 'QuantMatMul':
        if not isinstance(module, MatMul):
            raise TypeError(f'QuantMatMul.from_float expects a MatMul, got '
                            f'{type(module).__name__}')
        new = cls(cfg, role)
        new.train(module.training)
        object.__setattr__(new, '_float_module', module)
        return new

    def to_float(self) -> MatMul:
        module = self._float_module if self._float_module is not None else MatMul()
        module.train(self.training)
        return module

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.rotate:
            return torch.matmul(self.a_quantizer(a), self.b_quantizer(b))
        if self.role == 'qk':  # a: q (.., N, d), b: kᵀ (.., d, M)
            rot = shared_rotation(a.shape[-1], a.device, a.dtype)
            return torch.matmul(self.a_quantizer(rot(a)),
                                self.b_quantizer(rot(b.transpose(-2, -1)).transpose(-2, -1)))
        rot = shared_rotation(b.shape[-1], b.device, b.dtype)  # av: b is v (.., M, d)
        return rot.inverse(torch.matmul(self.a_quantizer(a), self.b_quantizer(rot(b))))

    def extra_repr(self) -> str:
        return f'role={self.role}' + (', rotated' if self.rotate else '')
