"""L2 total variation image prior (MIMIQ.md §1, the ``TV(x)`` term of ``L_gen``).

Differences to the 4 neighbour directions (right, down, down-right, down-left). Each
direction contributes the L2 norm of its difference tensor over the whole batch (as in
DeepInversion's image prior); the two diagonal directions are weighted by ``1/sqrt(2)``
because their neighbours are ``sqrt(2)`` pixels away. ``reduction='mean'`` uses the mean
squared difference per direction instead (independent of batch and image size).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ['DIAGONAL_WEIGHT', 'TV_REDUCTIONS', 'total_variation_l2']

#: Weight of the two diagonal directions (their neighbour distance is sqrt(2)).
DIAGONAL_WEIGHT = 1.0 / math.sqrt(2.0)
TV_REDUCTIONS = ('norm', 'mean')


def total_variation_l2(x: Tensor, reduction: str = 'norm') -> Tensor:
    """L2 total variation of images ``x`` of shape ``(B, C, H, W)``.

    Args:
        reduction: ``'norm'`` (default): sum over directions of the L2 norm of the
            difference tensor; ``'mean'``: sum over directions of the mean squared difference.
    """
    if x.dim() != 4:
        raise ValueError(f'total_variation_l2 expects (B, C, H, W) images, got shape {tuple(x.shape)}')
    if reduction not in TV_REDUCTIONS:
        raise ValueError(f'reduction must be one of {TV_REDUCTIONS}, got {reduction!r}')
    diffs = (
        (1.0, x[..., :, 1:] - x[..., :, :-1]),                 # horizontal
        (1.0, x[..., 1:, :] - x[..., :-1, :]),                 # vertical
        (DIAGONAL_WEIGHT, x[..., 1:, 1:] - x[..., :-1, :-1]),  # down-right
        (DIAGONAL_WEIGHT, x[..., 1:, :-1] - x[..., :-1, 1:]),  # down-left
    )
    if reduction == 'norm':
        terms = [w * torch.linalg.vector_norm(d.float()) for w, d in diffs]
    else:
        terms = [w * d.float().pow(2).mean() for w, d in diffs]
    return sum(terms[1:], terms[0])
