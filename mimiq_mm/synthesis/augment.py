"""Per-step augmentation of the optimised pixels (random roll, Gaussian noise, colour jitter).

All randomness comes from an explicit ``torch.Generator`` so that a batch is reproducible
from its seed alone (needed for resumable generation).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ['jitter_for_step', 'augment']


def jitter_for_step(step: int, iterations: int, jitter: tuple) -> int:
    """Maximum roll in pixels at ``step``: ``jitter[0]`` in the first half, ``jitter[1]`` after."""
    return jitter[0] if step < iterations // 2 else jitter[1]


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator,
                             device=generator.device).item())


def augment(x: Tensor, max_shift: int, noise_std: float, color_jitter: float,
            generator: torch.Generator) -> Tensor:
    """Differentiable augmentation of a batch ``x`` (B, C, H, W) in normalised space.

    - roll by (dy, dx) uniform in [-max_shift, max_shift] (clipped to the image size);
    - per image and channel: ``x * (1 + a) + b`` with a, b uniform in [-color_jitter, color_jitter];
    - additive Gaussian noise with standard deviation ``noise_std``.
    """
    height, width = x.shape[-2:]
    if max_shift > 0:
        dy = _randint(-min(max_shift, height - 1), min(max_shift, height - 1), generator)
        dx = _randint(-min(max_shift, width - 1), min(max_shift, width - 1), generator)
        if dy or dx:
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if color_jitter > 0:
        shape = (x.shape[0], x.shape[1], 1, 1)
        scale = (torch.rand(shape, generator=generator, device=generator.device) * 2 - 1)
        shift = (torch.rand(shape, generator=generator, device=generator.device) * 2 - 1)
        x = x * (1 + color_jitter * scale.to(x)) + color_jitter * shift.to(x)
    if noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, device=generator.device)
        x = x + noise_std * noise.to(x)
    return x
