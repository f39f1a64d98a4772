"""Deployable quantized checkpoints: integer weights + quantizer parameters.

``export_quantized(student, path)`` writes a file (``torch.save``, loadable with
``weights_only=True``) with

* ``quantized_weights``: for every ``QuantLinear`` / ``QuantConv2d`` with a calibrated
  uniform weight quantizer, the integer codes of its weight (``bits <= 4``: two codes per
  byte, low nibble first, stored as ``code - quant_min``; else one int8/uint8 per code), the
  per-channel scales and zero points, the bit width and the shape;
* ``state_dict``: everything else of the student (biases, norms, the activation quantizers'
  steps / zero points / flags, ...), float;
* ``meta``: the teacher model config and the ``QuantConfig`` dict, so that
  :func:`build_quantized_model` can rebuild the model without any other file.

Decoding computes ``(code - zero_point) * scale`` exactly as the fake quantizer does, so the
rebuilt model's outputs are identical to the fine-tuned student's.
"""
import io
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

FORMAT = 'mimiq_mm.quantized/1'
#: Registry scopes an export file may name (``meta.scope``, a ``_scope_`` key or a
#: ``'scope.Type'`` anywhere in ``meta.teacher``): the scope decides which package mmengine
#: imports (``f'{scope}.models'`` / ``f'{scope}.registry'``), so a file must not choose it.
MODEL_SCOPES = ('mmdet', 'mmseg')
#: Scopes of nested component types that are accepted as well (installed, trusted packages).
COMPONENT_SCOPES = MODEL_SCOPES + ('mmengine', 'mmcv', 'mimiq_mm')


def pack_int4(codes: Tensor) -> Tensor:
    """Pack unsigned 4-bit codes (values 0..15, any shape) into a flat uint8 tensor, two per
    byte (element 2i in the low nibble, 2i+1 in the high nibble)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) > 15:
        raise ValueError('pack_int4 expects codes in [0, 15]')
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` codes, flat uint8."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]


def _weight_layers(model: nn.Module):
    from mimiq_mm.quant import QuantConv2d, QuantLinear
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            yield name, module


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((-1, ) + (1, ) * (ndim - 1)) if t.dim() else t


def _exportable(quantizer) -> bool:
    return (quantizer is not None and quantizer.fake_quant_enabled
            and quantizer.cfg.kind == 'uniform')


@torch.no_grad()
def weight_codes(module) -> Tuple[Tensor, Tensor, Tensor, int, int]:
    """Integer codes of ``module.weight`` under its weight quantizer.

    Returns ``(codes, scale, zero_point, quant_min, bits)``; codes are int16 in
    ``[quant_min, quant_max]``.
    """
    q = module.weight_quantizer
    module.sync_weight_qparams()  # the range of the weights as they are now
    if not q.is_initialized:
        raise RuntimeError(f'weight quantizer {q.name or "?"} is not calibrated; export a '
                           'calibrated / fine-tuned student')
    qmin, qmax = q.quant_min_max
    scale = q._qparam().detach()
    zero_point = q.zero_point.detach()
    w = module.effective_weight().detach()  # W, or W R for a rotated input
    s = _channel_view(scale.to(w.dtype), w.dim())
    zp = _channel_view(zero_point.to(w.dtype), w.dim())
    codes = torch.clamp(torch.round(w * (1.0 / s)) + zp, qmin, qmax)
    return codes.to(torch.int16), scale.clone(), zero_point.clone(), qmin, q.cfg.bits


def _decode(entry: dict, dtype=torch.float32) -> Tensor:
    shape = tuple(entry['shape'])
    numel = 1
    for d in shape:
        numel *= d
    if entry['packed']:
        codes = unpack_int4(entry['codes'], numel).to(torch.int16) + entry['quant_min']
    else:
        codes = entry['codes'].to(torch.int16)
    codes = codes.reshape(shape).to(dtype)
    scale = _channel_view(entry['scale'].to(dtype), len(shape))
    zp = _channel_view(entry['zero_point'].to(dtype), len(shape))
    return (codes - zp) * scale


def _plain(obj):
    """ConfigDict / tuples -> plain python containers (weights_only-loadable)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def export_quantized(student: nn.Module, path: Optional[str] = None,
                     teacher_cfg: Optional[dict] = None, quant_cfg: Optional[dict] = None,
                     scope: Optional[str] = None) -> dict:
    """Build (and, with ``path``, save) the deployable checkpoint of a quantized model."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    qweights: Dict[str, dict] = {}
    for name, module in _weight_layers(student):
        if not _exportable(module.weight_quantizer):
            continue
        codes, scale, zp, qmin, bits = weight_codes(module)
        key = f'{name}.weight' if name else 'weight'
        if bits <= 4:
            stored, packed = pack_int4((codes - qmin).to(torch.uint8)), True
        else:
            stored = codes.to(torch.int8 if qmin < 0 else torch.uint8)
            packed = False
        qweights[key] = dict(codes=stored.cpu(), packed=packed, bits=int(bits),
                             quant_min=int(qmin), shape=list(module.weight.shape),
                             dtype=str(module.weight.dtype).replace('torch.', ''),
                             scale=scale.cpu().float(), zero_point=zp.cpu().float())
        state.pop(key, None)
    payload = dict(format=FORMAT, quantized_weights=qweights, state_dict=state,
                   meta=dict(teacher=_plain(teacher_cfg) if teacher_cfg is not None else None,
                             quant_cfg=_plain(quant_cfg), scope=scope))
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(payload, path)
    return payload


def _read_export(source):
    """A path is read with the project's one loader (local, weights-only); a payload dict
    is used as it is."""
    if isinstance(source, (str, os.PathLike)):
        from mimiq_mm.utils.checkpoint import load_checkpoint_file
        return load_checkpoint_file(source, map_location='cpu', what='exported checkpoint')
    return source


def check_export_scopes(meta: dict) -> Optional[str]:
    """The registry scope of an export's model, checked against :data:`MODEL_SCOPES`; every
    ``_scope_`` / ``'scope.Type'`` in ``meta['teacher']`` must be in
    :data:`COMPONENT_SCOPES`. Raises ValueError naming the offending value."""
    scope = meta.get('scope')
    if scope is not None and scope not in MODEL_SCOPES:
        raise ValueError(f'export file names the model scope {scope!r}; only {MODEL_SCOPES} '
                         'are accepted (the scope selects the package that gets imported)')

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == '_scope_' and value not in COMPONENT_SCOPES:
                    raise ValueError(f'export file: {where}._scope_={value!r} is not one of '
                                     f'{COMPONENT_SCOPES}')
                if key == 'type' and isinstance(value, str) and '.' in value and \
                        value.split('.', 1)[0] not in COMPONENT_SCOPES:
                    raise ValueError(f'export file: {where}.type={value!r} names the scope '
                                     f'{value.split(".", 1)[0]!r}, not one of '
                                     f'{COMPONENT_SCOPES}')
                walk(value, f'{where}.{key}')
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f'{where}[{i}]')

    walk(meta.get('teacher'), 'meta.teacher')
    top = meta.get('teacher') or {}
    nested = top.get('_scope_') if isinstance(top, dict) else None
    prefix = top.get('type', '').split('.', 1)[0] \
        if isinstance(top, dict) and '.' in str(top.get('type', '')) else None
    for cand in (nested, prefix):
        if cand is not None and cand not in MODEL_SCOPES:
            raise ValueError(f'export file: the model scope {cand!r} is not one of '
                             f'{MODEL_SCOPES}')
    return scope


def load_quantized_(student: nn.Module, source) -> nn.Module:
    """Load an exported checkpoint (path or payload) into a quantized model of the same
    structure (``quantize_`` applied), in place. Strict on keys."""
    payload = _read_export(source)
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise ValueError(f'{source!r} is not a {FORMAT} file (use tools/export.py to make '
                         'one)')
    state = dict(payload['state_dict'])
    layers = {(f'{n}.weight' if n else 'weight'): m for n, m in _weight_layers(student)}
    for key, entry in payload['quantized_weights'].items():
        decoded = _decode(entry, getattr(torch, entry.get('dtype', 'float32')))
        layer = layers.get(key)
        # codes are of the weight the quantizer sees (W R for a rotated input): back to W
        state[key] = layer.weight_from_effective(decoded) if layer is not None else decoded
    student.load_state_dict(state, strict=True)
    # The exported scales are the ones the integer weights were made with: keep them rather
    # than let the first forward recompute them from the decoded weights.
    for module in student.modules():
        if hasattr(module, 'mark_weight_qparams_current'):
            module.mark_weight_qparams_current()
    return student


def build_quantized_model(source) -> nn.Module:
    """Rebuild the quantized model from an exported file alone (needs the model's library,
    mmdet / mmseg, installed; nothing is downloaded)."""
    from mimiq_mm.models.distiller import build_task_model
    from mimiq_mm.quant import QuantConfig, quantize_
    payload = _read_export(source)
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise ValueError(f'{source!r} is not a {FORMAT} file (use tools/export.py to make '
                         'one)')
    meta = payload.get('meta') or {}
    if not meta.get('teacher'):
        raise ValueError('this export has no model config (meta.teacher); build the model '
                         'yourself and call load_quantized_(model, path)')
    scope = check_export_scopes(meta)
    model = build_task_model(meta['teacher'], scope, allowed_scopes=MODEL_SCOPES)
    quantize_(model, QuantConfig.from_dict(meta.get('quant_cfg')))
    load_quantized_(model, payload)
    model.eval()
    return model


def serialized_size(obj) -> int:
    """Bytes of ``torch.save(obj)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def float_state_dict(student: nn.Module) -> dict:
    """The float model's tensors (quantizer state dropped), for size comparison."""
    from mimiq_mm.quant import Quantizer
    skip = tuple(f'{n}.' for n, m in student.named_modules() if isinstance(m, Quantizer))
    return {k: v for k, v in student.state_dict().items() if not k.startswith(skip)}
