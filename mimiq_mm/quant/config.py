"""Frozen, validated quantization configs.

``QuantizerConfig`` describes one quantizer (weights, activations or attention
probabilities); ``QuantConfig`` the whole recipe applied by ``quantize_``. Defaults follow
MIMIQ.md (W4/A4, per-output-channel symmetric weights, per-tensor LSQ activations, both
attention products quantized, LayerNorm/softmax/GELU and the network input float) with the
range estimators and input rotation that hold on real pretrained backbones (see
``default_weight_config``).
"""
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from .primitives import MAX_BITS, MIN_BITS

GRANULARITIES = ('per_tensor', 'per_channel', 'per_token')
# range estimators a dynamic per-token quantizer accepts (its clipping ratio of the absmax)
PER_TOKEN_OBSERVERS = ('minmax', 'mse')
OBSERVERS = ('minmax', 'percentile', 'ema', 'mse', 'lsq')
KINDS = ('uniform', 'log2', 'log_sqrt2')
SIGNEDNESS = ('auto', 'signed', 'unsigned')
SCOPES = ('backbone', 'all')
# how a weight goes to its grid point: nearest, or GPTQ's error-compensating order
ROUNDINGS = ('nearest', 'gptq')
# Fields of QuantConfig an override may change for one module.
OVERRIDABLE = ('weight', 'act', 'attn_prob', 'keep_input_float')

DEFAULT_PERCENTILE = 99.99
# percentile must lie in (MIN_PERCENTILE, MAX_PERCENTILE]: the lower one is 100 - percentile
MIN_PERCENTILE, MAX_PERCENTILE = 50.0, 100.0
DEFAULT_EMA_MOMENTUM = 0.1
DEFAULT_MSE_NORM = 2.0
DEFAULT_MSE_STEPS = 40


def parse_bit_widths(text: str) -> Tuple[int, int]:
    """``'W4A4'`` (any case) -> ``(4, 4)``: weight and activation bits, each in
    ``MIN_BITS..MAX_BITS``; anything else is a ``ValueError`` that says what is expected."""
    match = re.fullmatch(r'[Ww](\d+)[Aa](\d+)', str(text).strip())
    if not match:
        raise ValueError(f'bit widths must look like W4A4 (weights, activations), '
                         f'got {text!r}')
    wbits, abits = int(match.group(1)), int(match.group(2))
    for name, bits in (('weight', wbits), ('activation', abits)):
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f'{name} bits {bits} in {text!r} are outside '
                             f'{MIN_BITS}..{MAX_BITS}')
    return wbits, abits


def _check_choice(name: str, value: Any, valid: Tuple) -> None:
    if value not in valid:
        raise ValueError(f'{name}={value!r} is not valid; choose one of {list(valid)}')


@dataclass(frozen=True)
class QuantizerConfig:
    """One quantizer.

    Attributes:
        bits: 2..8.
        granularity: 'per_tensor', 'per_channel' (weights: output channel) or 'per_token'
            (activations: a dynamic scale per vector along the product's reduction axis,
            its absmax at run time times a calibrated clipping ratio; the ratio, not a step,
            is what calibration sets and LSQ learns: observer 'minmax' = 1, 'mse' = the
            ratio with the smallest Lp error on the calibration data).
        symmetric: zero point 0 (True) or affine with a zero point (False).
        signedness: 'auto' = unsigned grid when the calibrated input is non-negative,
            else signed; or force 'signed' / 'unsigned'.
        observer: initial range from 'minmax', 'percentile', 'ema' (min/max EMA over
            batches), 'mse' (clipping ratio minimising the Lp error), or 'lsq'
            (step = 2*mean|x|/sqrt(Qmax)).
        lsq: learn the step (an ``nn.Parameter`` named ``step``) with LSQ gradient scaling.
        kind: 'uniform', or 'log2' / 'log_sqrt2' for non-negative inputs (softmax output);
            log quantizers have a fixed scale = calibrated max and no LSQ.
        percentile: upper percentile (lower = 100 - percentile) for observer 'percentile'.
        ema_momentum: weight of the new batch for observer 'ema'.
        mse_norm: p of the Lp error minimised by observer 'mse'.
        mse_steps: number of clipping ratios tried by observer 'mse'.
        rounding: weights only: 'nearest' grid point, or 'gptq' (during
            ``calibration_mode``, each Linear's weight is rounded column by column with the
            error of each rounding compensated on the remaining columns, using the second
            moment of its calibration inputs; :mod:`mimiq_mm.quant.gptq`). The grid (step)
            is the observer's either way.
        center: activations only: subtract a calibrated per-channel mean (the mean of each
            input channel over the calibration data; per head and channel for the attention
            matmul operands) before quantizing and add it back after: ``Q(x - m) + m``, a
            static channel-wise shift in the spirit of Outlier Suppression+ (Wei et al.,
            2023). The float function is unchanged; the grid only has to cover the spread
            around the mean (a LayerNorm output of a pretrained ViT carries channel means of
            up to ~4x its channels' typical absmax). When deployed, ``W m`` folds into the
            consumer's bias (a Linear/Conv input) or costs one matrix-vector product per
            head (q in q·kᵀ; a shift of k is a per-query constant that softmax ignores).
            Needs ``granularity='per_token'``: its step is found at run time on ``x - m``,
            where a static range would have been calibrated on ``x``. A partial change
            (:meth:`replace`, a dict in ``QuantConfig``) that moves a centred config to
            another granularity without naming ``center`` turns centring off.
    """
    bits: int = 4
    granularity: str = 'per_tensor'
    symmetric: bool = True
    signedness: str = 'auto'
    observer: str = 'lsq'
    lsq: bool = True
    kind: str = 'uniform'
    percentile: float = DEFAULT_PERCENTILE
    ema_momentum: float = DEFAULT_EMA_MOMENTUM
    mse_norm: float = DEFAULT_MSE_NORM
    mse_steps: int = DEFAULT_MSE_STEPS
    rounding: str = 'nearest'
    center: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) \
                or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f'bits={self.bits!r} is not valid; choose one of '
                             f'{list(range(MIN_BITS, MAX_BITS + 1))}')
        _check_choice('granularity', self.granularity, GRANULARITIES)
        _check_choice('observer', self.observer, OBSERVERS)
        _check_choice('kind', self.kind, KINDS)
        _check_choice('signedness', self.signedness, SIGNEDNESS)
        _check_choice('symmetric', self.symmetric, (True, False))
        _check_choice('lsq', self.lsq, (True, False))
        _check_choice('rounding', self.rounding, ROUNDINGS)
        if self.rounding != 'nearest' and self.kind != 'uniform':
            raise ValueError(f"rounding={self.rounding!r} is for weights on a uniform grid, "
                             f"got kind={self.kind!r}")
        if not MIN_PERCENTILE < float(self.percentile) <= MAX_PERCENTILE:
            raise ValueError(f'percentile={self.percentile!r} is not valid; use a value in '
                             f'({MIN_PERCENTILE:g}, {MAX_PERCENTILE:g}], e.g. '
                             f'{DEFAULT_PERCENTILE}')
        if not 0.0 < float(self.ema_momentum) <= 1.0:
            raise ValueError(f'ema_momentum={self.ema_momentum!r} is not valid; use a value '
                             'in (0, 1], e.g. 0.1')
        if float(self.mse_norm) <= 0:
            raise ValueError(f'mse_norm={self.mse_norm!r} is not valid; use a positive p, '
                             'e.g. 2.0')
        if not isinstance(self.mse_steps, int) or self.mse_steps < 2:
            raise ValueError(f'mse_steps={self.mse_steps!r} is not valid; use an int >= 2')
        if self.granularity == 'per_token':
            if self.observer not in PER_TOKEN_OBSERVERS:
                raise ValueError(f"granularity='per_token' sets its clipping ratio with "
                                 f"observer {list(PER_TOKEN_OBSERVERS)}, got "
                                 f"observer={self.observer!r}")
            if not self.symmetric:
                raise ValueError("granularity='per_token' supports symmetric=True only")
        if self.kind != 'uniform':
            if self.lsq:
                raise ValueError(f"kind={self.kind!r} has a fixed scale; set lsq=False "
                                 "(LSQ is only valid with kind='uniform')")
            if self.granularity != 'per_tensor':
                raise ValueError(f"kind={self.kind!r} supports granularity='per_tensor' only")
            if self.signedness == 'signed':
                raise ValueError(f"kind={self.kind!r} quantizes non-negative inputs; use "
                                 "signedness='auto' or 'unsigned'")
        _check_choice('center', self.center, (True, False))
        if self.center and self.granularity != 'per_token':
            raise ValueError(f"center=True needs granularity='per_token' (a step found at run "
                             f"time on x - mean); a {self.granularity} range is calibrated on x "
                             f"itself (set center=False)")
        if self.center and (self.kind != 'uniform' or self.signedness == 'unsigned'):
            raise ValueError(f"center=True shifts the input to a signed range around its mean; "
                             f"it needs kind='uniform' and signedness 'auto' or 'signed', got "
                             f"kind={self.kind!r}, signedness={self.signedness!r} (set center=False)")

    def replace(self, **changes) -> 'QuantizerConfig':
        if (self.center and 'center' not in changes
                and changes.get('granularity', 'per_token') != 'per_token'):
            changes = dict(changes, center=False)  # centring goes with the dynamic grid
        return _replace(self, changes)

    @classmethod
    def from_dict(cls, d: Mapping) -> 'QuantizerConfig':
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f'expected a dict of QuantizerConfig fields, got {type(d).__name__}')
        _check_keys(cls, d)
        return cls(**dict(d))


def _field_names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _check_keys(cls, d: Mapping) -> None:
    unknown = sorted(set(d) - set(_field_names(cls)))
    if unknown:
        raise ValueError(f'unknown {cls.__name__} field(s) {unknown}; valid fields are '
                         f'{list(_field_names(cls))}')


def _replace(cfg, changes: Mapping):
    _check_keys(type(cfg), changes)
    return dataclasses.replace(cfg, **dict(changes))


# The ONE default recipe (issue: real pretrained backbones). Chosen on the DINOv2 ViT-S/14
# teachers and the demo Swins (benchmarks/results/real_backbone/): every Linear / attention
# matmul input is rotated (rotate_inputs) and quantized with a dynamic per-token step (its
# absmax at run time: nothing about the activation ranges is fitted to the synthetic images,
# which is what made calibrated per-tensor ranges fail on the demo Swin), weight ranges come
# from the MSE clipping search and Linear weights are GPTQ-rounded onto them from the
# calibration inputs (mimiq_mm/quant/gptq.py), the post-softmax probabilities get a log2 grid. The
# per-token clipping ratio starts at 1 and is learnt (LSQ) during fine-tuning.
def default_weight_config() -> QuantizerConfig:
    return QuantizerConfig(bits=4, granularity='per_channel', symmetric=True,
                           signedness='signed', observer='mse', lsq=False, rounding='gptq')


def default_act_config() -> QuantizerConfig:
    return QuantizerConfig(bits=4, granularity='per_token', symmetric=True,
                           signedness='auto', observer='minmax', lsq=True)


def default_attn_prob_config() -> QuantizerConfig:
    return QuantizerConfig(bits=4, granularity='per_tensor', symmetric=True,
                           signedness='auto', observer='minmax', lsq=False, kind='log2')


_DEFAULTS = {'weight': default_weight_config, 'act': default_act_config,
             'attn_prob': default_attn_prob_config}


@dataclass(frozen=True)
class QuantConfig:
    """Recipe for :func:`mimiq_mm.quant.quantize_`.

    Attributes:
        weight: weight quantizer of Linear/Conv2d.
        act: input quantizer of Linear/Conv2d and of both inputs of q·kᵀ and of v in attn·v
            (default: dynamic per-token steps, see ``default_act_config``).
        attn_prob: quantizer of the post-softmax probabilities (first input of attn·v);
            ``kind='log2'`` / ``'log_sqrt2'`` selects a log quantizer.
        quantize_attention: quantize q·kᵀ and attn·v (``MatMul`` -> ``QuantMatMul``).
        scope: 'backbone' (``model.backbone`` when present, else the whole model) or 'all'.
        overrides: ``{fnmatch pattern on the fully-qualified module name: changes}``;
            changes is ``None`` (keep that module float) or a dict over ``weight``, ``act``,
            ``attn_prob`` (each a dict of QuantizerConfig field changes) and
            ``keep_input_float``. Later patterns win.
        reparam: RepQ-ViT-style per-channel scale reparameterisation of post-LayerNorm
            activations into the LayerNorm affine and the following Linear(s), applied at
            the end of calibration.
        smooth: SmoothQuant-style migration exponent ``alpha`` in [0, 1] for the inputs of
            the Linear(s) that follow a LayerNorm (qkv, fc1): a per-channel factor from the
            LayerNorm affine and the Linear weights alone (data-free,
            :func:`mimiq_mm.quant.reparam.smooth_factor`) is folded into both before
            quantization (float function unchanged). 0 = off.
        rotate_inputs: quantize ``x R`` and ``W R`` for an orthogonal ``R`` (same float
            output) in every Linear whose input is quantized, except those the LayerNorm
            reparam handles (``reparam=True``): sparse heavy-tailed inputs (post-GELU) and
            outlier channels become near-Gaussian for the grid (:mod:`mimiq_mm.quant.rotation`).
        keep_input_float: the first Conv2d/Linear that sees the image keeps its input float
            (its weights are still quantized).
        input_layer: fully-qualified name of that layer; ``None`` = the first Conv2d/Linear
            in the scope in registration order.
    """
    weight: QuantizerConfig = field(default_factory=default_weight_config)
    act: QuantizerConfig = field(default_factory=default_act_config)
    attn_prob: QuantizerConfig = field(default_factory=default_attn_prob_config)
    quantize_attention: bool = True
    scope: str = 'backbone'
    overrides: Tuple[Tuple[str, Optional[Tuple[Tuple[str, Any], ...]]], ...] = ()
    reparam: bool = False
    smooth: float = 0.0
    rotate_inputs: bool = True
    keep_input_float: bool = True
    input_layer: Optional[str] = None

    def __post_init__(self):
        for name in ('weight', 'act', 'attn_prob'):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                # a dict is a partial change of this field's default
                object.__setattr__(self, name, _DEFAULTS[name]().replace(**dict(value)))
            elif not isinstance(value, QuantizerConfig):
                raise ValueError(f'{name} must be a QuantizerConfig or a dict of its fields, '
                                 f'got {type(value).__name__}')
        _check_choice('scope', self.scope, SCOPES)
        for name in ('quantize_attention', 'reparam', 'rotate_inputs', 'keep_input_float'):
            _check_choice(name, getattr(self, name), (True, False))
        if self.weight.granularity == 'per_token':
            raise ValueError("weight granularity='per_token' is not valid: 'per_token' is for "
                             "activations (a dynamic step per input vector); quantize weights "
                             "'per_channel' or 'per_tensor'")
        for name in ('act', 'attn_prob'):
            if getattr(self, name).rounding != 'nearest':
                raise ValueError(f"{name}.rounding={getattr(self, name).rounding!r}: rounding "
                                 "applies to weights only; an activation quantizer rounds to "
                                 "the nearest grid point (set it in QuantConfig.weight)")
        if self.reparam and self.act.granularity != 'per_tensor':
            raise ValueError(f"reparam=True folds per-channel scales chosen for a per-tensor "
                             f"input grid; it needs act.granularity='per_tensor', got "
                             f"{self.act.granularity!r} (a per-token grid does not need it)")
        if (isinstance(self.smooth, bool) or not isinstance(self.smooth, (int, float))
                or not 0.0 <= float(self.smooth) <= 1.0):
            raise ValueError(f'smooth must be a migration exponent in [0, 1] (0 = off), got '
                             f'{self.smooth!r}')
        object.__setattr__(self, 'smooth', float(self.smooth))
        if self.input_layer is not None and not isinstance(self.input_layer, str):
            raise ValueError(f'input_layer must be a module name (str) or None, got '
                             f'{self.input_layer!r}')
        object.__setattr__(self, 'overrides', self._normalise_overrides(self.overrides))

    def _normalise_overrides(self, overrides) -> Tuple:
        items = overrides.items() if isinstance(overrides, Mapping) else overrides
        out = []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError('overrides must be a dict {pattern: changes | None}, got '
                                 f'entry {item!r}')
            pattern, changes = item
            if not isinstance(pattern, str):
                raise ValueError(f'override pattern must be a str, got {pattern!r}')
            if changes is None:
                out.append((pattern, None))
                continue
            if not isinstance(changes, (Mapping, tuple, list)):
                raise ValueError(f'override {pattern!r}: changes must be a dict or None, got '
                                 f'{changes!r}')
            changes = dict(changes)
            unknown = sorted(set(changes) - set(OVERRIDABLE))
            if unknown:
                raise ValueError(f'override {pattern!r}: unknown key(s) {unknown}; valid '
                                 f'keys are {list(OVERRIDABLE)} (or None to keep float)')
            frozen = []
            for key, value in changes.items():
                if key == 'keep_input_float':
                    _check_choice(f'override {pattern!r} keep_input_float', value, (True, False))
                elif isinstance(value, QuantizerConfig):
                    value = tuple(dataclasses.asdict(value).items())
                elif isinstance(value, (Mapping, tuple, list)):
                    value = dict(value)
                    _check_keys(QuantizerConfig, value)
                    value = tuple(sorted(dict(value).items()))
                else:
                    raise ValueError(f'override {pattern!r}: {key} must be a dict of '
                                     f'QuantizerConfig fields, got {value!r}')
                if key != 'keep_input_float':
                    getattr(self, key).replace(**dict(value))  # validate the values early
                frozen.append((key, value))
            out.append((pattern, tuple(frozen)))
        return tuple(out)

    def overrides_dict(self) -> dict:
        return {p: (None if c is None else {k: (dict(v) if isinstance(v, tuple) else v)
                                            for k, v in c})
                for p, c in self.overrides}

    def for_module(self, fqn: str) -> Optional['QuantConfig']:
        """The config for module ``fqn`` after all matching overrides; ``None`` = keep float."""
        import fnmatch
        cfg = self
        for pattern, changes in self.overrides:
            if not fnmatch.fnmatchcase(fqn, pattern):
                continue
            if changes is None:
                return None
            updates = {}
            for key, value in changes:
                if key == 'keep_input_float':
                    updates[key] = value
                else:
                    updates[key] = getattr(cfg, key).replace(**dict(value))
            cfg = dataclasses.replace(cfg, **updates)
        return cfg if cfg is self else dataclasses.replace(cfg, overrides=())

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> 'QuantConfig':
        """Build from a plain (mmengine) dict; nested quantizer configs may be dicts."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f'expected a dict of QuantConfig fields, got {type(d).__name__}')
        d = dict(d)
        d.pop('type', None)
        _check_keys(cls, d)
        if 'overrides' in d and d['overrides'] is not None and isinstance(d['overrides'], Mapping):
            d['overrides'] = dict(d['overrides'])
        return cls(**d)
