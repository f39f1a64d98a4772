"""Built-in attention adapters.

- Swin window attention (mmdet / mmseg ``WindowMSA``, timm swin ``WindowAttention``): one
  adapter, the modules share their attribute names (``qkv``, ``relative_position_bias_table``,
  ``relative_position_index``, ``window_size``, ``scale``, ``softmax``, ``attn_drop``, ``proj``,
  ``proj_drop``).
- timm ``Attention`` (timm ViT blocks): q_norm/k_norm, scale-norm ``norm``, optional ``gate``;
  always the explicit path, whatever ``fused_attn`` says.
- ``torch.nn.MultiheadAttention`` (also the inner module of mmcv ``MultiheadAttention`` used by
  mmseg ``VisionTransformer``): packed in-projection only. Its ``in_proj_weight`` /
  ``in_proj_bias`` move into an ``nn.Linear`` child ``in_proj`` (same Parameter objects), so the
  state_dict keys ``<name>.in_proj_weight`` / ``<name>.in_proj_bias`` become
  ``<name>.in_proj.weight`` / ``<name>.in_proj.bias`` while adapted. Old-style keys still load
  into an adapted module; ``restore_attention_`` puts the original keys back.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import AttentionAdapter, UnsupportedAttentionError, register_adapter

__all__ = ['WindowAttentionAdapter', 'TimmAttentionAdapter', 'MultiheadAttentionAdapter']


@register_adapter('mmdet.models.backbones.swin.WindowMSA',
                  'mmseg.models.backbones.swin.WindowMSA',
                  'timm.models.swin_transformer.WindowAttention')
class WindowAttentionAdapter(AttentionAdapter):
    """Swin (shifted) window attention with relative-position bias.

    Input ``(B*nW, N, C)`` windows, ``mask`` ``(nW, N, N)`` additive (0 / -100) or None.
    Records are per window; ``grid`` is the window size.
    """

    def _relative_position_bias(self) -> torch.Tensor:
        num_tokens = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(num_tokens, num_tokens, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B', H, N, d) each

        logits = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        logits = logits + self._relative_position_bias()
        if mask is not None:
            num_windows = mask.shape[0]
            logits = logits.view(batch // num_windows, num_windows, self.num_heads, num_tokens,
                                 num_tokens) + mask.unsqueeze(1).unsqueeze(0)
            logits = logits.view(-1, self.num_heads, num_tokens, num_tokens)
        probs = self.attn_drop(self.softmax(logits))
        out = self.av_matmul(probs, v)
        self.record_attention(logits, out, grid=tuple(self.window_size))

        x = out.transpose(1, 2).reshape(batch, num_tokens, -1)
        return self.proj_drop(self.proj(x))


def _additive_self_attn_mask(num_tokens: int, like: torch.Tensor,
                             attn_mask: Optional[torch.Tensor],
                             is_causal: bool) -> Optional[torch.Tensor]:
    """SDPA mask semantics as an additive bias: causal wins; a bool mask is True = attend."""
    if is_causal:
        return like.new_full((num_tokens, num_tokens), float('-inf')).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(
            ~attn_mask, float('-inf'))
    return attn_mask


@register_adapter('timm.layers.attention.Attention')
class TimmAttentionAdapter(AttentionAdapter):
    """timm ``Attention`` (timm ``VisionTransformer`` blocks), the explicit (unfused) math.

    Uses ``q_norm``/``k_norm`` (qk_norm), ``norm`` (scale_norm) and ``gate`` (gated) when the
    installed timm has them. ``attn_mask`` follows SDPA semantics (bool: True = attend).
    """

    def forward(self,
                x: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        gate_layer = getattr(self, 'gate', None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_norm, k_norm = getattr(self, 'q_norm', None), getattr(self, 'k_norm', None)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)

        logits = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        bias = _additive_self_attn_mask(num_tokens, logits, attn_mask, is_causal)
        if bias is not None:
            logits = logits + bias
        probs = self.attn_drop(logits.softmax(dim=-1))
        out = self.av_matmul(probs, v)
        self.record_attention(logits, out)

        x = out.transpose(1, 2).reshape(batch, num_tokens, -1)
        norm = getattr(self, 'norm', None)
        if norm is not None:
            x = norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are the same tensor or identical views of the same memory
    (mmcv's MultiheadAttention passes ``query.transpose(0, 1)``, ``key.transpose(0, 1)``
    and ``value.transpose(0, 1)`` of one tensor for self-attention).

    Eager: same shape, strides and data pointer. Under ``torch.compile`` a data pointer or
    storage offset cannot be traced (each read is a graph break), so there two views count
    as the same when they view the same base tensor with the same shape and strides and
    cover all of it (then their offsets agree too); views of part of a base, e.g. q and k
    sliced out of one packed tensor, are taken as different (the slower, always-correct
    path: one projection per input)."""
    if a is b:
        return True
    if not (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.stride() == b.stride() and a.requires_grad == b.requires_grad):
        return False
    if torch.compiler.is_compiling():
        base = a._base
        return base is not None and base is b._base and a.numel() == base.numel()
    return a.data_ptr() == b.data_ptr()


def _canonical_float_mask(mask: Optional[torch.Tensor], dtype: torch.dtype,
                          what: str) -> Optional[torch.Tensor]:
    """nn.MultiheadAttention mask semantics: bool True = NOT allowed (-inf); float is added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float('-inf'))
    if not torch.is_floating_point(mask):
        raise TypeError(f'{what} must be a bool or floating-point tensor, got {mask.dtype}')
    return mask.to(dtype)


@register_adapter(nn.MultiheadAttention)
class MultiheadAttentionAdapter(AttentionAdapter):
    """``torch.nn.MultiheadAttention`` with a packed in-projection (``_qkv_same_embed_dim``).

    Same signature and return value ``(output, weights or None)`` as the original, for batched
    and unbatched inputs, ``batch_first`` either way, self- and cross-attention. Self-attention
    (query, key and value the same tensor, or identical views of the same memory) runs the
    packed projection once; cross-attention runs ``in_proj`` on each distinct input and keeps
    the matching third, so every projection goes through the same (quantizable) Linear.

    Not supported (UnsupportedAttentionError at adapt time): separate q/k/v projection weights
    (``kdim``/``vdim`` != ``embed_dim``), ``add_bias_kv``, ``add_zero_attn``.
    """

    @classmethod
    def adapter_check(cls, module: nn.Module) -> None:
        problems = []
        if not module._qkv_same_embed_dim:
            problems.append('separate q/k/v projection weights (kdim/vdim != embed_dim)')
        if module.bias_k is not None or module.bias_v is not None:
            problems.append('add_bias_kv=True')
        if module.add_zero_attn:
            problems.append('add_zero_attn=True')
        if problems:
            raise UnsupportedAttentionError(
                'nn.MultiheadAttention with ' + ', '.join(problems) +
                ' is not supported by MultiheadAttentionAdapter; construct it with '
                'kdim=vdim=None, add_bias_kv=False, add_zero_attn=False, or register your own '
                'adapter')

    # The packed parameters live in ``in_proj`` while adapted; code reading the attributes
    # (e.g. torch's own checks) still finds them.
    @property
    def in_proj_weight(self) -> nn.Parameter:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Optional[nn.Parameter]:
        return self.in_proj.bias

    def adapter_setup(self) -> None:
        weight = self._parameters['in_proj_weight']
        bias = self._parameters['in_proj_bias']
        self._mimiq_param_order = list(self._parameters)
        in_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                            device='meta')
        in_proj.weight = weight
        if bias is not None:
            in_proj.bias = bias
        del self._parameters['in_proj_weight']
        del self._parameters['in_proj_bias']
        self.in_proj = in_proj

    def _mimiq_restore_blockers(self) -> List[str]:
        blockers = super()._mimiq_restore_blockers()
        if type(self._modules.get('in_proj')) is not nn.Linear:
            blockers.append(f'in_proj is a {type(self._modules.get("in_proj")).__name__}, '
                            f'not a float nn.Linear')
        return blockers

    def adapter_teardown(self) -> None:
        in_proj = self._modules.pop('in_proj')
        params = dict(self._parameters, in_proj_weight=in_proj.weight,
                      in_proj_bias=in_proj.bias)
        order = self.__dict__.pop('_mimiq_param_order')
        self._parameters.clear()
        self._parameters.update((k, params[k]) for k in order)
        self._parameters.update((k, v) for k, v in params.items() if k not in order)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # accept checkpoints of the original module (in_proj_weight / in_proj_bias keys)
        for old, new in (('in_proj_weight', 'in_proj.weight'), ('in_proj_bias', 'in_proj.bias')):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _project(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dim = self.embed_dim
        if _same_tensor(query, key) and _same_tensor(key, value):
            return self.in_proj(query).chunk(3, dim=-1)
        q = self.in_proj(query)[..., :dim]
        if _same_tensor(key, value):
            k, v = self.in_proj(key)[..., dim:].chunk(2, dim=-1)
        else:
            k = self.in_proj(key)[..., dim:2 * dim]
            v = self.in_proj(value)[..., 2 * dim:]
        return q, k, v

    def forward(self,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None,
                average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if is_causal and attn_mask is None:
            raise RuntimeError('Need attn_mask if specifying the is_causal hint: pass the causal '
                               'mask as attn_mask (is_causal is only a hint).')
        batched = query.dim() == 3
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch, num_q, _ = query.shape
        num_k = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value)
        q = q.reshape(batch, num_q, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, num_k, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, num_k, heads, head_dim).transpose(1, 2)

        logits = self.qk_matmul(q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1))
        mask = _canonical_float_mask(attn_mask, logits.dtype, 'attn_mask')
        if mask is not None:
            logits = logits + (mask.view(batch, heads, num_q, num_k) if mask.dim() == 3 else mask)
        padding = _canonical_float_mask(key_padding_mask, logits.dtype, 'key_padding_mask')
        if padding is not None:
            logits = logits + padding.view(batch, 1, 1, num_k)
        probs = logits.softmax(dim=-1)
        if self.dropout > 0.0:
            probs = F.dropout(probs, p=self.dropout, training=self.training)
        out = self.av_matmul(probs, v)
        self.record_attention(logits, out)

        out = self.out_proj(out.transpose(1, 2).reshape(batch, num_q, self.embed_dim))
        weights = None
        if need_weights:
            weights = probs.mean(dim=1) if average_attn_weights else probs
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
