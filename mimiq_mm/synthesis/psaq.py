"""PSAQ-ViT's label-free objective: entropy of the patch-similarity distribution.

The idea (PSAQ-ViT, Li et al. 2022): on real images the patch features of a ViT are diverse,
so the distribution of pairwise cosine similarities between patches is spread out; on noise it
is peaked. Synthetic images are optimised so that this distribution has high differential
entropy. Per feature level and image:

1. cosine similarity between (a random subset of) pairs of patch features;
2. a Gaussian kernel density estimate ``p(t)`` of those similarities on a grid over [-1, 1];
3. differential entropy ``H = -sum_t p(t) log p(t) dt``.

The loss is ``-H`` averaged over levels and images (lower loss = more diverse patches).
Written from the description of the method, not from its code.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['patch_similarity_entropy', 'psaq_loss']

#: Small floor inside the log so that empty grid cells contribute 0 (p log p -> 0).
DENSITY_EPS = 1e-12


def patch_similarity_entropy(tokens: Tensor, generator: torch.Generator, bins: int = 64,
                             bandwidth: float = 0.05, max_pairs: int = 4096) -> Tensor:
    """Differential entropy of the patch cosine-similarity distribution, per image.

    Args:
        tokens: (B, N, C) patch features.
        generator: source of the random pair subset (reproducibility).
        bins: grid points of the density estimate over [-1, 1].
        bandwidth: Gaussian kernel width (similarity units).
        max_pairs: at most this many patch pairs per image (sampled when N*(N-1)/2 is larger).

    Returns:
        (B,) entropies (differentiable).
    """
    if tokens.dim() != 3 or tokens.shape[1] < 2:
        raise ValueError(f'tokens must be (B, N>=2, C), got {tuple(tokens.shape)}')
    batch, num, _ = tokens.shape
    feats = F.normalize(tokens.float(), dim=-1)
    iu = torch.triu_indices(num, num, offset=1, device=tokens.device)
    if iu.shape[1] > max_pairs:
        pick = torch.randperm(iu.shape[1], generator=generator, device=generator.device)
        iu = iu[:, pick[:max_pairs].to(tokens.device)]
    sims = (feats[:, iu[0]] * feats[:, iu[1]]).sum(-1)               # (B, P)
    grid = torch.linspace(-1.0, 1.0, bins, device=tokens.device)
    step = 2.0 / (bins - 1)
    z = (grid.view(1, -1, 1) - sims.unsqueeze(1)) / bandwidth        # (B, bins, P)
    density = torch.exp(-0.5 * z * z).mean(-1) / (bandwidth * math.sqrt(2 * math.pi))
    return -(density * torch.log(density + DENSITY_EPS)).sum(-1) * step


def psaq_loss(levels: Sequence[Tensor], generator: torch.Generator, bins: int = 64,
              bandwidth: float = 0.05, max_pairs: int = 4096) -> Tensor:
    """``-mean entropy`` over feature levels (list of (B, N, C)) and images."""
    entropies = [patch_similarity_entropy(t, generator, bins, bandwidth, max_pairs).mean()
                 for t in levels if t.shape[1] >= 2]
    if not entropies:
        raise ValueError('psaq_loss needs at least one feature level with 2 or more patches')
    return -torch.stack(entropies).mean()
