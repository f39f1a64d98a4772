"""RepQ-ViT-style scale reparameterisation of post-LayerNorm activations.

A few channels after a LayerNorm are huge (~100x the others); one per-tensor activation
range wastes the 4-bit grid on them. With a per-channel factor ``r_c > 0``::

    LayerNorm:  gamma_c <- gamma_c / r_c,  beta_c <- beta_c / r_c      (output y_c / r_c)
    next Linear(s):  W[:, c] <- W[:, c] * r_c                           (W' y' = W y)

the float function is unchanged (up to fp rounding) while the Linear's input channels now
share one range. ``r_c = absmax_c / mean_c(absmax_c)`` from the calibration statistics.
Only a scale is folded (no shift): Swin pads the LayerNorm output with zeros before the
window attention, and zeros stay zeros under a pure scale, so the fold is exact there too.

Which Linear follows which LayerNorm is declared per block CLASS in a small registry
(:func:`register_reparam_block`); nothing is matched on module names.

The same fold with a data-free factor, applied before quantization (``QuantConfig.smooth``):
:func:`smooth_factor` splits the range of each post-LayerNorm channel between the activation
and the weights, SmoothQuant-style, from the weights alone. The rotation of the Linear inputs
then acts on an input whose outlier channels have been scaled down.
"""
import importlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

# Floor of a reparam factor relative to the mean (channels that never fire).
MIN_REPARAM_FACTOR = 1e-2


@dataclass(frozen=True)
class NormLinearPair:
    """``norm`` (attribute path in the block) feeds exactly the Linear(s) ``linears``."""
    norm: str
    linears: Tuple[str, ...]


_REGISTRY: Dict[type, Tuple[NormLinearPair, ...]] = {}
# (module, class name, pairs) of library blocks, resolved when the library is importable.
_LIBRARY_BLOCKS = (
    ('mmdet.models.backbones.swin', 'SwinBlock',
     (NormLinearPair('norm1', ('attn.w_msa.qkv',)), NormLinearPair('norm2', ('ffn.layers.0.0',)))),
    ('mmseg.models.backbones.swin', 'SwinBlock',
     (NormLinearPair('norm1', ('attn.w_msa.qkv',)), NormLinearPair('norm2', ('ffn.layers.0.0',)))),
    # mmseg ViT: mmcv MultiheadAttention wraps nn.MultiheadAttention, whose packed
    # in-projection is the Linear ``in_proj`` once mimiq_mm.attention has adapted it.
    ('mmseg.models.backbones.vit', 'TransformerEncoderLayer',
     (NormLinearPair('norm1', ('attn.attn.in_proj',)),
      NormLinearPair('norm2', ('ffn.layers.0.0',)))),
    ('timm.models.vision_transformer', 'Block',
     (NormLinearPair('norm1', ('attn.qkv',)), NormLinearPair('norm2', ('mlp.fc1',)))),
    ('timm.models.swin_transformer', 'SwinTransformerBlock',
     (NormLinearPair('norm1', ('attn.qkv',)), NormLinearPair('norm2', ('mlp.fc1',)))),
)
_library_loaded = False


def register_reparam_block(block_cls: Type[nn.Module], pairs: Sequence[NormLinearPair]) -> None:
    """Declare, for a block class, which LayerNorm feeds which Linear(s)."""
    pairs = tuple(pairs)
    for p in pairs:
        if not isinstance(p, NormLinearPair) or not p.linears:
            raise ValueError(f'pairs must be NormLinearPair(norm, (linear, ...)), got {p!r}')
    _REGISTRY[block_cls] = pairs


def _load_library_blocks() -> None:
    global _library_loaded
    if _library_loaded:
        return
    for module_name, cls_name, pairs in _LIBRARY_BLOCKS:
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except ImportError:
            continue
        _REGISTRY.setdefault(cls, pairs)
    _library_loaded = True


def pairs_for(block: nn.Module) -> Tuple[NormLinearPair, ...]:
    """Registered pairs of ``block`` (exact class first, then its bases); () if none."""
    _load_library_blocks()
    for cls in type(block).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return ()


def _get(block: nn.Module, path: str) -> nn.Module:
    obj = block
    for part in path.split('.'):
        if not hasattr(obj, part):
            raise AttributeError(f'{type(block).__name__} has no sub-module {path!r} declared in '
                                 'its reparam registry entry; fix it with '
                                 'register_reparam_block(TheClass, [NormLinearPair(...)])')
        obj = getattr(obj, part)
    return obj


@dataclass
class ResolvedPair:
    block_name: str
    norm_name: str
    norm: nn.Module
    linear_names: Tuple[str, ...]
    linears: Tuple[nn.Module, ...]


def find_reparam_pairs(model: nn.Module) -> Iterator[ResolvedPair]:
    """Every registered (LayerNorm, Linear(s)) pair inside ``model``."""
    for name, block in model.named_modules():
        for pair in pairs_for(block):
            prefix = f'{name}.' if name else ''
            yield ResolvedPair(
                block_name=name, norm_name=prefix + pair.norm, norm=_get(block, pair.norm),
                linear_names=tuple(prefix + p for p in pair.linears),
                linears=tuple(_get(block, p) for p in pair.linears))


def reparam_factor(absmax: Tensor) -> Tensor:
    """``r_c = absmax_c / mean(absmax)`` floored at ``MIN_REPARAM_FACTOR``."""
    absmax = absmax.float()
    return torch.clamp(absmax / absmax.mean().clamp(min=torch.finfo(torch.float32).tiny),
                       min=MIN_REPARAM_FACTOR)


@torch.no_grad()
def reparam_layernorm_linear_(norm: nn.Module, linears: Sequence[nn.Module],
                              factor: Tensor) -> None:
    """Fold per-channel ``factor`` into the LayerNorm affine and the Linears' input
    channels, in place (float function unchanged)."""
    if getattr(norm, 'weight', None) is None:
        raise ValueError(f'{type(norm).__name__} has no affine weight to fold a scale into '
                         '(elementwise_affine=False); disable reparam for it')
    factor = factor.to(norm.weight)
    if factor.shape != norm.weight.shape:
        raise ValueError(f'factor shape {tuple(factor.shape)} != LayerNorm channels '
                         f'{tuple(norm.weight.shape)}')
    for lin in linears:
        if not isinstance(lin, nn.Linear) or lin.in_features != factor.numel():
            raise ValueError(f'{type(lin).__name__} cannot take a reparam factor of '
                             f'{factor.numel()} input channels')
    norm.weight.div_(factor)
    if getattr(norm, 'bias', None) is not None:
        norm.bias.div_(factor)
    for lin in linears:
        lin.weight.mul_(factor.to(lin.weight).unsqueeze(0))


def smooth_factor(norm: nn.Module, linears: Sequence[nn.Module], alpha: float) -> Tensor:
    """Data-free migration factor ``s_c = (a_c / w_c) ** alpha`` of one LayerNorm->Linear(s)
    pair, normalised to a geometric mean of 1: ``a_c = |gamma_c| + |beta_c|`` bounds the
    channel's LayerNorm output per unit of normalised input, ``w_c = max |W[:, c]|`` over the
    Linears. Folding it (:func:`reparam_layernorm_linear_`) divides channel ``c`` of the
    activation by ``s_c`` and multiplies the weight column by it: ``alpha=0`` changes
    nothing, ``alpha=1`` moves all of the channel's spread into the weights."""
    if getattr(norm, 'weight', None) is None:
        raise ValueError(f'{type(norm).__name__} has no affine weight to fold a scale into '
                         '(elementwise_affine=False); set QuantConfig.smooth=0 for it')
    tiny = 1e-8
    act = norm.weight.detach().abs().float()
    if getattr(norm, 'bias', None) is not None:
        act = act + norm.bias.detach().abs().float()
    wmax = torch.stack([lin.weight.detach().abs().float().amax(0) for lin in linears]).amax(0)
    factor = (act.clamp(min=tiny) / wmax.clamp(min=tiny)) ** float(alpha)
    factor = factor / factor.log().mean().exp()
    return torch.clamp(factor, min=MIN_REPARAM_FACTOR, max=1 / MIN_REPARAM_FACTOR)


@torch.no_grad()
def smooth_layernorm_linears_(model: nn.Module, alpha: float, select=None) -> List[str]:
    """Fold :func:`smooth_factor` into every registered pair of ``model`` (``select(pair)``
    False: skip it). The float function is unchanged. Returns the LayerNorms folded."""
    done = []
    if alpha == 0:
        return done
    for pair in find_reparam_pairs(model):
        if select is not None and not select(pair):
            continue
        reparam_layernorm_linear_(pair.norm, pair.linears,
                                  smooth_factor(pair.norm, pair.linears, alpha))
        done.append(pair.norm_name)
    return done


def apply_calibrated_reparam_(model: nn.Module) -> List[str]:
    """At the end of calibration: for each registered pair whose Linears collected
    per-channel input statistics, fold ``r`` and rescale those statistics. Returns the
    names of the LayerNorms folded."""
    done = []
    for pair in find_reparam_pairs(model):
        quantizers = [getattr(lin, 'input_quantizer', None) for lin in pair.linears]
        if not quantizers or any(q is None or not q.observe_channels or not q.observer.has_data()
                                 for q in quantizers):
            continue
        absmax = None
        for q in quantizers:
            lo, hi = q.observer.compute_range()
            a = torch.maximum(lo.abs(), hi.abs())
            absmax = a if absmax is None else torch.maximum(absmax, a)
        factor = reparam_factor(absmax)
        reparam_layernorm_linear_(pair.norm, pair.linears, factor)
        for q in quantizers:
            q.rescale_observed_channels_(factor)
        done.append(pair.norm_name)
    return done
