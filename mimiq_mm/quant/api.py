"""Model-level verbs: ``quantize_`` / ``dequantize_``, ``calibration_mode``,
``set_quant_state`` / ``quant_state``, and iterators over what was quantized."""
import contextlib
import itertools
import logging
import warnings
from collections import Counter
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .config import QuantConfig
from .gptq import InputMoments, apply_gptq_
from .gptq import summarize as summarize_gptq
from .modules import MatMul, QuantConv2d, QuantLinear, QuantMatMul
from .quantizers import Quantizer
from .reparam import (apply_calibrated_reparam_, find_reparam_pairs,
                      smooth_layernorm_linears_)

QUANT_MODULE_TYPES = (QuantLinear, QuantConv2d, QuantMatMul)
# Attribute names the attention adapters give the two products (docs/INTERFACES.md).
MATMUL_ROLE_BY_ATTR = {'qk_matmul': 'qk', 'av_matmul': 'av'}

_log = logging.getLogger(__name__)
FilterFn = Callable[[nn.Module, str], bool]


def _as_config(config) -> QuantConfig:
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(config)
    raise ValueError(f'config must be a QuantConfig, a dict of its fields or None, got '
                     f'{type(config).__name__}')


def get_scope(model: nn.Module, scope: str) -> Tuple[nn.Module, str]:
    """``(scope_module, its fully-qualified-name prefix)``."""
    if scope == 'backbone' and isinstance(getattr(model, 'backbone', None), nn.Module):
        return model.backbone, 'backbone.'
    return model, ''


def _default_input_layer(scope_module: nn.Module, prefix: str) -> Optional[str]:
    for name, module in scope_module.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return prefix + name
    return None


def _split(fqn: str) -> Tuple[str, str]:
    parent, _, attr = fqn.rpartition('.')
    return parent, attr


def quantize_(model: nn.Module, config: Union[QuantConfig, Mapping, None] = None,
              filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Quantize ``model`` in place and return it (see docs/INTERFACES.md).

    1. ``mimiq_mm.attention.adapt_attention_`` on the scope, so attention modules own
       ``qk_matmul`` / ``av_matmul``;
    2. ``nn.Linear -> QuantLinear``, ``nn.Conv2d -> QuantConv2d``, ``MatMul -> QuantMatMul``
       inside ``config.scope``, honouring ``config.overrides`` (fnmatch on the name relative
       to ``model``) and ``filter_fn(module, fqn) -> bool`` (False = keep float).

    The new quantizers are uncalibrated: run ``with calibration_mode(model): ...`` next.
    """
    config = _as_config(config)
    scope_module, prefix = get_scope(model, config.scope)
    from mimiq_mm.attention import adapt_attention_  # lazy: sibling stage
    adapt_attention_(scope_module)

    input_layer = None
    if config.keep_input_float:
        input_layer = config.input_layer or _default_input_layer(scope_module, prefix)
    if config.smooth:
        # pairs whose Linears are all plain and about to be quantized (the fold is exact
        # either way; a float Linear gains nothing, a quantized one is left alone)
        names = {id(m): prefix + n for n, m in scope_module.named_modules()}

        def to_quantize(pair) -> bool:
            return all(isinstance(lin, nn.Linear) and not isinstance(lin, QUANT_MODULE_TYPES)
                       and config.for_module(names[id(lin)]) is not None
                       and (filter_fn is None or filter_fn(lin, names[id(lin)]))
                       for lin in pair.linears)
        smooth_layernorm_linears_(scope_module, config.smooth, to_quantize)
    reparam_linears = set()
    if config.reparam:
        for pair in find_reparam_pairs(scope_module):
            reparam_linears.update(id(m) for m in pair.linears)

    swaps = []
    for name, module in scope_module.named_modules():
        if not name:
            continue
        if isinstance(module, QUANT_MODULE_TYPES):
            _check_already_quantized(module, prefix + name, config.for_module(prefix + name))
            continue
        fqn = prefix + name
        is_matmul = isinstance(module, MatMul)
        if not (is_matmul or isinstance(module, (nn.Linear, nn.Conv2d))):
            continue
        if is_matmul and not config.quantize_attention:
            continue
        cfg = config.for_module(fqn)
        if cfg is None or (filter_fn is not None and not filter_fn(module, fqn)):
            continue
        if is_matmul:
            role = MATMUL_ROLE_BY_ATTR.get(_split(name)[1], 'generic')
            new = QuantMatMul.from_float(module, cfg, role=role)
        else:
            cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
            keep = cfg.keep_input_float and fqn == input_layer
            observe = (isinstance(module, nn.Linear) and id(module) in reparam_linears
                       and cfg.act.granularity == 'per_tensor' and cfg.act.kind == 'uniform')
            # reparam'd inputs keep their (folded) channels; every other Linear input is
            # rotated when asked (mimiq_mm.quant.rotation)
            rotate = (cfg.rotate_inputs and isinstance(module, nn.Linear) and not keep
                      and id(module) not in reparam_linears and module.in_features > 1)
            new = cls.from_float(module, cfg, keep_input_float=keep,
                                 observe_input_channels=observe, rotate_input=rotate)
            new.is_network_input = keep  # checked by calibration_mode
        for qname, q in new.named_modules():
            if isinstance(q, Quantizer):
                q.name = f'{fqn}.{qname}'
        # quantizer state lives where the float module lives (a model already on the GPU);
        # a MatMul has no state of its own: take its attention module's device
        owner = module
        if is_matmul:
            parent = _split(name)[0]
            owner = scope_module.get_submodule(parent) if parent else scope_module
        new.to(_device_of(owner))
        swaps.append((name, new))
    if config.keep_input_float and config.input_layer is not None:
        layers = [prefix + n for n, m in scope_module.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d))]
        if config.input_layer not in layers:
            raise ValueError(f'input_layer={config.input_layer!r} is not a Conv2d/Linear inside '
                             f'the quantization scope; the first ones are {layers[:5]}')
    for name, new in swaps:
        parent, attr = _split(name)
        setattr(scope_module.get_submodule(parent) if parent else scope_module, attr, new)
    return model


def _check_already_quantized(module: nn.Module, fqn: str, cfg) -> None:
    """A second ``quantize_`` leaves quantized layers as they are; with another config that
    would silently keep the old bit widths (a sweep over bit widths on one model object)."""
    if isinstance(module, QuantMatMul):  # its quantizers follow the layers' act / attn_prob
        return
    wanted = None if cfg is None else cfg.weight
    have = module.weight_quantizer.cfg
    if wanted != have:
        raise ValueError(
            f'{fqn} is already quantized (weight {have.bits} bits) and this config asks for '
            f'{"no quantization" if wanted is None else f"{wanted.bits} bits"} or other '
            'weight settings. quantize_ does not re-quantize a layer: call '
            'dequantize_(model) first, or quantize a fresh copy of the float model.')
    inputs = getattr(module, 'input_quantizer', None)
    if inputs is not None and inputs.cfg != cfg.act:
        raise ValueError(
            f'{fqn} is already quantized (activations {inputs.cfg.bits} bits) and this config '
            f'asks for {cfg.act.bits} bits or other activation settings. Call '
            'dequantize_(model) first, or quantize a fresh copy of the float model.')


def _device_of(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for a stateless module)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device('cpu')


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_` in place: every quant module becomes its float original
    (same Parameters) and attention adapters are restored. A LayerNorm reparam, if one was
    applied, stays folded (it does not change the float function)."""
    swaps = [(name, m.to_float()) for name, m in model.named_modules()
             if isinstance(m, QUANT_MODULE_TYPES)]
    for name, float_module in swaps:
        parent, attr = _split(name)
        setattr(model.get_submodule(parent) if parent else model, attr, float_module)
    from mimiq_mm.attention import restore_attention_  # lazy: sibling stage
    restore_attention_(model)
    return model


def quant_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` of every QuantLinear / QuantConv2d / QuantMatMul."""
    for name, module in model.named_modules():
        if isinstance(module, QUANT_MODULE_TYPES):
            yield name, module


def count_quant_modules(model: nn.Module) -> Dict[str, int]:
    """``{'QuantLinear': n, 'QuantConv2d': n, 'QuantMatMul': n}`` (zeros included)."""
    counts = Counter({cls.__name__: 0 for cls in QUANT_MODULE_TYPES})
    counts.update(type(m).__name__ for _, m in quant_modules(model))
    return dict(counts)


def quantizers(model: nn.Module) -> Iterator[Tuple[str, Quantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def lsq_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The LSQ ``step`` Parameters (for an optimizer param-group)."""
    for _, q in quantizers(model):
        if q.cfg.lsq:
            yield q.step


def set_quant_state(model: nn.Module, weight: Optional[bool] = None,
                    act: Optional[bool] = None) -> None:
    """Enable/disable fake-quant of weights and/or activations (None = leave as is)."""
    for _, q in quantizers(model):
        value = weight if q.is_weight else act
        if value is not None:
            q.fake_quant_enabled = bool(value)


@contextlib.contextmanager
def quant_state(model: nn.Module, weight: Optional[bool] = None, act: Optional[bool] = None):
    """Context form of :func:`set_quant_state`; the previous state is restored on exit."""
    saved = [(q, q.fake_quant_enabled) for _, q in quantizers(model)]
    try:
        set_quant_state(model, weight=weight, act=act)
        yield model
    finally:
        for q, enabled in saved:
            q.fake_quant_enabled = enabled


def _is_reparam_input(module) -> bool:
    """A Linear whose input the LayerNorm reparam rescales at the end of calibration (its
    weight changes then; GPTQ leaves it at nearest rounding)."""
    q = module.input_quantizer
    return q is not None and q.observe_channels


@contextlib.contextmanager
def calibration_mode(model: nn.Module, reparam: bool = True, report: Optional[dict] = None):
    """Calibrate every quantizer of ``model``.

    Inside the block the model computes in float while the activation observers collect
    statistics (their previous statistics are cleared on entry); Linear layers whose weight
    quantizer has ``rounding='gptq'`` also gather the second moment of their (rotated)
    inputs. On normal exit: the LayerNorm reparam is folded where
    ``quantize_(..., reparam=True)`` prepared it (and ``reparam`` is True), weight ranges
    are computed from the (possibly reparameterised) weights, the GPTQ layers' weights are
    rounded onto their grid (:mod:`mimiq_mm.quant.gptq`; written back into the weights),
    activation steps are computed from the observers, and ``initialized`` is set. GPTQ is a
    weight update (like fine-tuning): :func:`dequantize_` afterwards gives back float modules
    holding the rounded weights, so quantize a copy when the float model must stay as it is
    (the distiller and :func:`mimiq_mm.models.generic.quantize_and_distill` do). ``report``
    (a dict), when given, receives ``'gptq'``: {layer name: GPTQ output error / nearest
    rounding's on the calibration inputs} and ``'gptq_summary'``, one line of text. Quantizers
    whose module never ran stay uncalibrated (a warning names them). The previous
    enabled/observing state is restored on exit, also when the block raises (then
    nothing is computed).
    """
    qs = [q for _, q in quantizers(model)]
    saved = [(q, q.fake_quant_enabled, q.observing) for q in qs]
    first_called, hooks = [], []
    weight_layers = {m: n for n, m in quant_modules(model)
                     if isinstance(m, (QuantLinear, QuantConv2d))}
    if any(getattr(m, 'is_network_input', False) for m in weight_layers):
        def _record_first(module, args):
            if not first_called:
                first_called.append(module)
        hooks = [m.register_forward_pre_hook(_record_first) for m in weight_layers]
    gptq_layers = {m: n for m, n in weight_layers.items()
                   if isinstance(m, QuantLinear) and m.weight_quantizer.cfg.rounding == 'gptq'
                   and not _is_reparam_input(m)}
    moments = {m: InputMoments(m.in_features, m.weight.device) for m in gptq_layers}
    for m, stats in moments.items():
        # the input quantizer sees the input already rotated (x R, the basis of W R); a
        # layer with a float input has no quantizer and no rotation
        where = m.input_quantizer if m.input_quantizer is not None else m
        hooks.append(where.register_forward_pre_hook(
            lambda _, args, stats=stats: stats.add(args[0])))
    try:
        for q in qs:
            if q.is_weight:
                q.fake_quant_enabled = False
            else:
                q.observer.reset()
                q.observing = True
        yield model
        for q in qs:
            q.observing = False
        with torch.no_grad():
            if reparam:
                apply_calibrated_reparam_(model)
            for _, module in quant_modules(model):
                if isinstance(module, (QuantLinear, QuantConv2d)):
                    module.weight_quantizer.calibrate_from(module.effective_weight())
            if gptq_layers:
                ratios = apply_gptq_(gptq_layers, moments)
                summary = summarize_gptq(ratios)
                _log.info(summary)
                if report is not None:
                    report.update(gptq=ratios, gptq_summary=summary)
            missing = [q.name or '?' for q in qs
                       if not q.is_weight and not q.compute_qparams()]
        if first_called and not getattr(first_called[0], 'is_network_input', False):
            expected = [n for m, n in weight_layers.items() if m.is_network_input]
            warnings.warn(f'the first quantized layer to run was {weight_layers[first_called[0]]!r}'
                          f', but {expected} was taken as the layer that sees the network input '
                          f'(kept float); pass QuantConfig(input_layer='
                          f'{weight_layers[first_called[0]]!r}) to quantize_', RuntimeWarning)
        if missing:
            warnings.warn(f'{len(missing)} activation quantizer(s) saw no data during '
                          f'calibration and stay uncalibrated: {missing[:10]}'
                          f'{" ..." if len(missing) > 10 else ""}', RuntimeWarning)
    finally:
        for handle in hooks:
            handle.remove()
        for q, enabled, observing in saved:
            q.fake_quant_enabled = enabled
            q.observing = observing
