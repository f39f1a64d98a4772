"""mimiq_mm.attention: adapters exposing per-head q·kᵀ and attn·v of attention modules through
``MatMul`` children (``qk_matmul`` / ``av_matmul``), and recorders of those products.

See docs/INTERFACES.md ("attention/") and docs/custom_backbone.md.
"""
from .adapter import (AttentionAdapter, UnsupportedAttentionError, adapt_attention_,
                      find_attention_modules, get_adapter, is_adapted, is_attention_like,
                      register_adapter, restore_attention_)
from .adapters import MultiheadAttentionAdapter, TimmAttentionAdapter, WindowAttentionAdapter
from .recorder import AttentionRecord, AttentionRecorder

__all__ = [
    'AttentionAdapter', 'AttentionRecord', 'AttentionRecorder', 'MultiheadAttentionAdapter',
    'TimmAttentionAdapter', 'UnsupportedAttentionError', 'WindowAttentionAdapter',
    'adapt_attention_', 'find_attention_modules', 'get_adapter', 'is_adapted',
    'is_attention_like', 'register_adapter', 'restore_attention_'
]
