"""Inter-head attention similarity (MimiQ's ``L_sim``, MIMIQ.md §1).

For every attention layer the pre-softmax logits ``A`` of shape ``(B', H, Nq, Nk)`` are taken
(class/register tokens dropped), every query row ``A[b, h, n, :]`` is min-max normalised to
[0, 1] (masked keys, e.g. Swin's shifted-window mask, map to 0), and the rows of every pair of heads ``(i, j)`` for the same query are compared with
SSIM computed from *global* statistics of the whole map::

    SSIM_ij = (2 mu_i mu_j + C1) (2 sigma_ij + C2) / ((mu_i^2 + mu_j^2 + C1) (sigma_i^2 + sigma_j^2 + C2))

Global statistics do not depend on how the keys are laid out spatially (ViT patch grid or Swin
window), so the key axis is used as it comes. Variances and the covariance are population
statistics (divided by ``Nk``).

``L_sim = mean over layers of mean over (B', queries, head pairs i < j) of (1 - SSIM_ij^2)``.

The pairwise statistics are one ``einsum`` over the key axis. Large layers are processed in
chunks of queries; when gradients are needed each chunk is wrapped in activation
checkpointing, so the peak extra memory is bounded by one chunk.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    'SSIM_C1', 'SSIM_C2', 'MASK_MARGIN', 'DEFAULT_MAX_CHUNK_ELEMENTS', 'minmax_normalize_rows',
    'attention_ssim_matrix', 'inter_head_similarity_loss', 'mean_inter_head_ssim',
]

#: SSIM stabilisers for maps with dynamic range 1 (``(0.01 L)^2`` and ``(0.03 L)^2``).
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2
#: Guard against division by zero when a row is constant (max == min).
MINMAX_EPS = 1e-8
#: Keys this far (in logits) below the row maximum count as masked (see minmax_normalize_rows).
MASK_MARGIN = 50.0
#: Above this many elements per (B', H, Nq, Nk) tensor, queries are processed in chunks.
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 27


def minmax_normalize_rows(logits: Tensor, eps: float = MINMAX_EPS,
                          mask_margin: float = MASK_MARGIN) -> Tensor:
    """Min-max normalise the last axis of ``logits`` to [0, 1] (constant rows become 0).

    Keys whose logit is more than ``mask_margin`` below the row maximum (attention weight
    below ``exp(-mask_margin)`` of the top key: Swin's -100 shift mask, ``-inf`` masks) are
    masked: they map to 0 and do not set the row minimum, so the visible keys keep the full
    [0, 1] range.
    """
    high = logits.amax(dim=-1, keepdim=True)
    masked = logits < high - mask_margin
    low = logits.masked_fill(masked, float('inf')).amin(dim=-1, keepdim=True)
    logits = torch.where(masked, low, logits)
    return (logits - low) / (high - low).clamp_min(eps)


def _strip_prefix(logits: Tensor, num_prefix_tokens: int) -> Tensor:
    if logits.dim() != 4:
        raise ValueError(f'attention logits must be (B, H, Nq, Nk), got shape {tuple(logits.shape)}')
    if num_prefix_tokens < 0:
        raise ValueError(f'num_prefix_tokens must be >= 0, got {num_prefix_tokens}')
    if num_prefix_tokens:
        logits = logits[:, :, num_prefix_tokens:, num_prefix_tokens:]
    if logits.shape[-1] < 2:
        raise ValueError('attention maps need at least 2 key positions after dropping '
                         f'{num_prefix_tokens} prefix tokens, got shape {tuple(logits.shape)}')
    return logits


def _ssim_chunk(logits: Tensor, c1: float, c2: float) -> Tensor:
    """SSIM between heads for a chunk of queries: (B, H, q, K) -> (B, q, H, H), float32.

    Works in the (B, q, H, K) layout (one copy, fused with the cast to float32), so the
    pairwise covariance is a plain batched ``matmul`` over keys. Always float32, also under
    autocast (bf16 would round the normalised maps to 8 bits).
    """
    with torch.autocast(logits.device.type, enabled=False):
        maps = logits.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        maps = minmax_normalize_rows(maps)                     # (B, q, H, K)
        num_keys = maps.shape[-1]
        mean = maps.mean(dim=-1)                               # (B, q, H)
        centred = maps - mean.unsqueeze(-1)
        if torch.compiler.is_compiling():
            # Traced: an element-wise product reduced over keys, which Inductor turns into
            # one fused reduction kernel (forward and backward). As a matmul it became
            # cuBLAS float32 SIMT kernels over (H x K) @ (K x H) products: ~23% of the GPU
            # time of a compiled synthesis step (bench_synthesis --profile, H200).
            cov = (centred.unsqueeze(-2) * centred.unsqueeze(-3)).sum(-1) / num_keys
        else:
            cov = torch.matmul(centred, centred.transpose(-1, -2)) / num_keys   # (B, q, H, H)
        var = torch.diagonal(cov, dim1=-2, dim2=-1)           # (B, q, H)
        mean_term = (2 * mean.unsqueeze(-1) * mean.unsqueeze(-2) + c1) / (
            mean.unsqueeze(-1) ** 2 + mean.unsqueeze(-2) ** 2 + c1)
        struct_term = (2 * cov + c2) / (var.unsqueeze(-1) + var.unsqueeze(-2) + c2)
        return mean_term * struct_term


def _pair_loss_sum(logits: Tensor, c1: float, c2: float) -> Tensor:
    """Sum over (B', q, i<j) of 1 - SSIM_ij^2 for one chunk of queries."""
    ssim = _ssim_chunk(logits, c1, c2)
    heads = ssim.shape[-1]
    upper = torch.ones(heads, heads, dtype=torch.bool, device=ssim.device).triu(1)
    return torch.where(upper, 1.0 - ssim.pow(2), 0.0).sum()


_COMPILED = {}


def _pair_loss_fn(compiled: bool):
    """The per-chunk loss, optionally through ``torch.compile`` (fuses the elementwise work
    on the large logit tensors: about 2.5x faster L_sim forward+backward on an H200)."""
    if not compiled:
        return _pair_loss_sum
    if 'fn' not in _COMPILED:
        _COMPILED['fn'] = torch.compile(_pair_loss_sum, dynamic=True)
    return _COMPILED['fn']


def _query_chunks(logits: Tensor, max_elements: int) -> int:
    per_query = logits.shape[0] * logits.shape[1] * logits.shape[3]
    return max(1, max_elements // max(per_query, 1))


def attention_ssim_matrix(logits: Tensor, num_prefix_tokens: int = 0, c1: float = SSIM_C1,
                          c2: float = SSIM_C2) -> Tensor:
    """Per-query SSIM between all heads of min-max normalised attention rows.

    Args:
        logits: pre-softmax attention logits ``(B', H, Nq, Nk)``.
        num_prefix_tokens: class/register tokens at the front of both token axes (dropped).

    Returns:
        ``(B', Nq', H, H)`` float32 tensor, symmetric, with (near) 1 on the diagonal.
    """
    return _ssim_chunk(_strip_prefix(logits, num_prefix_tokens), c1, c2)


def _layer_loss(logits: Tensor, num_prefix_tokens: int, c1: float, c2: float,
                max_elements: int, compiled: bool = False, fused: bool = False) -> Tensor:
    logits = _strip_prefix(logits, num_prefix_tokens)
    batch, heads, queries, _ = logits.shape
    count = batch * queries * heads * (heads - 1) // 2
    if fused:  # one Triton program per query row: no float32 copy, no chunks needed
        from .lsim_triton import fused_pair_loss_sum
        return fused_pair_loss_sum(logits, c1, c2) / count
    pair_loss_sum = _pair_loss_fn(compiled)
    if logits.numel() <= max_elements:
        return pair_loss_sum(logits, c1, c2) / count
    step = _query_chunks(logits, max_elements)
    use_checkpoint = torch.is_grad_enabled() and logits.requires_grad
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, queries, step):
        chunk = logits[:, :, start:start + step]
        if use_checkpoint:
            total = total + checkpoint(pair_loss_sum, chunk, c1, c2, use_reentrant=False)
        else:
            total = total + pair_loss_sum(chunk, c1, c2)
    return total / count


def _as_pairs(records: Iterable) -> list[tuple[Tensor, int]]:
    pairs = []
    for rec in records:
        if isinstance(rec, Tensor):
            pairs.append((rec, 0))
        else:
            pairs.append((rec.logits, int(getattr(rec, 'num_prefix_tokens', 0))))
    return pairs


def inter_head_similarity_loss(records: Sequence, c1: float = SSIM_C1, c2: float = SSIM_C2,
                               max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
                               compiled: bool = False, fused: bool = False) -> Tensor:
    """MimiQ's ``L_sim`` over attention layers.

    Args:
        records: ``AttentionRecord``s (``.logits``, ``.num_prefix_tokens``) or plain logit
            tensors ``(B', H, Nq, Nk)`` without prefix tokens. Every record is one layer call;
            layers with a single head have no head pairs and are skipped.
        max_chunk_elements: layers whose logits have more elements are processed in query
            chunks (with activation checkpointing when gradients flow).
        compiled: run the per-layer computation through ``torch.compile`` (same values).
        fused: the fused Triton kernels of :mod:`mimiq_mm.losses.lsim_triton` (CUDA; same
            values and gradients to float rounding; ``compiled`` and the chunking are then
            not used).

    Returns:
        Scalar float32 loss in [0, 1]: the mean over layers of the mean over (B', queries,
        head pairs) of ``1 - SSIM^2``.
    """
    pairs = _as_pairs(records)
    if not pairs:
        raise ValueError('inter_head_similarity_loss got no attention records: run the model '
                         'inside `with AttentionRecorder(model) as rec:` and pass rec.records')
    losses = [_layer_loss(logits, prefix, c1, c2, max_chunk_elements, compiled, fused)
              for logits, prefix in pairs if logits.shape[1] > 1]
    if not losses:
        raise ValueError('inter_head_similarity_loss needs attention layers with at least 2 '
                         'heads; every record has a single head')
    return torch.stack(losses).mean()


@torch.no_grad()
def mean_inter_head_ssim(records: Sequence, c1: float = SSIM_C1, c2: float = SSIM_C2,
                         squared: bool = False) -> float:
    """Mean SSIM over layers, queries and head pairs (i < j): a report of head agreement.

    With ``squared=True`` the mean of SSIM^2 (= 1 - L_sim), which ignores the sign: L_sim
    also rewards anti-correlated heads, so the plain mean can stay near 0 while L_sim falls.
    """
    values = []
    for logits, prefix in _as_pairs(records):
        if logits.shape[1] < 2:
            continue
        ssim = attention_ssim_matrix(logits.detach(), prefix, c1, c2)
        heads = ssim.shape[-1]
        iu = torch.triu_indices(heads, heads, offset=1, device=ssim.device)
        pairs = ssim[..., iu[0], iu[1]]
        values.append((pairs.pow(2) if squared else pairs).mean())
    if not values:
        raise ValueError('mean_inter_head_ssim needs attention records with at least 2 heads')
    return float(torch.stack(values).mean())
