"""Orthogonal rotation of Linear inputs before they are quantized (QuaRot / SpinQuant idea).

For an orthogonal ``R``: ``x Wᵀ = (x R)(W R)ᵀ``. Quantizing ``x R`` and ``W R`` instead of ``x``
and ``W`` changes nothing in float, but a rotation spreads a vector's energy over all of its
channels: the sparse, heavy-tailed post-GELU activations of a pretrained ViT (fc2 inputs:
most values near 0, a few at 15-20) and the outlier channels after a LayerNorm become close
to Gaussian, which a 4-bit uniform grid with a clipped range represents far better
(measured on the DINOv2 ViT-S/14 backbone: a 4-bit fc2 input alone, everything else at
8 bits, keeps a final-feature cosine of 0.10 unrotated, 0.95 rotated;
benchmarks/feature_fidelity.py).

``R = diag(s) · (A ⊗ H)``: random signs ``s``, a random orthogonal ``A`` (m x m) for the odd
part of the width and a normalised Sylvester Hadamard ``H`` (p x p, p the largest power of 2
dividing the width), so it is applied in ``O(d (m + p))`` instead of ``O(d²)``; up to
:data:`DENSE_MAX_DIM` channels the same ``R`` is applied as one dense matmul (two small
batched matmuls and their reshapes cost more there: 4.6x at width 48 on CPU). Everything
is a deterministic function of (width, seed): its buffers are not saved in checkpoints or
exports; ``quantize_`` rebuilds the same rotation.
"""
import math

import torch
from torch import Tensor, nn

DEFAULT_ROTATION_SEED = 0
#: widths up to this are rotated with the dense ``R`` (one matmul), wider ones factorised
DENSE_MAX_DIM = 256


def sylvester_hadamard(p: int) -> Tensor:
    """Normalised Hadamard matrix of order ``p`` (a power of 2): orthogonal, entries ±1/√p."""
    if p < 1 or p & (p - 1):
        raise ValueError(f'a Sylvester Hadamard matrix needs a power of 2, got {p}')
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


def random_orthogonal(m: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _split(dim: int):
    p = dim & -dim  # largest power of 2 dividing dim
    return dim // p, p


class InputRotation(nn.Module):
    """``x -> x R`` over the last axis (width ``dim``); see the module docstring."""

    def __init__(self, dim: int, seed: int = DEFAULT_ROTATION_SEED):
        super().__init__()
        if dim < 2:
            raise ValueError(f'cannot rotate a width of {dim}')
        self.dim = int(dim)
        m, p = _split(self.dim)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + self.dim)
        signs = torch.randint(0, 2, (self.dim,), generator=gen, dtype=torch.float64) * 2 - 1
        # not saved: a deterministic function of (dim, seed), rebuilt by quantize_
        self.register_buffer('signs', signs.float(), persistent=False)
        self.register_buffer('odd', random_orthogonal(m, gen).float(), persistent=False)
        self.register_buffer('hadamard', sylvester_hadamard(p).float(), persistent=False)
        dense = None
        if self.dim <= DENSE_MAX_DIM:  # R itself, built in float64 from the same factors
            dense = self._factored(torch.eye(self.dim, dtype=torch.float64),
                                   signs, self.odd.double(),
                                   self.hadamard.double()).float()
        self.register_buffer('dense', dense, persistent=False)

    @staticmethod
    def _factored(x: Tensor, signs: Tensor, odd: Tensor, hadamard: Tensor) -> Tensor:
        lead = x.shape[:-1]
        m, p = odd.shape[0], hadamard.shape[0]
        y = (x * signs.to(x.dtype)).reshape(*lead, m, p)
        y = torch.matmul(odd.t().to(x.dtype), y)            # (A^T Y)
        y = torch.matmul(y, hadamard.to(x.dtype))           # (A^T Y) H
        return y.reshape(*lead, m * p)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f'rotation of width {self.dim} got an input of width '
                             f'{x.shape[-1]}')
        if self.dense is not None:
            return torch.matmul(x, self.dense.to(x.dtype))
        return self._factored(x, self.signs, self.odd, self.hadamard)

    def inverse(self, y: Tensor) -> Tensor:
        """``y -> y Rᵀ`` (R is orthogonal)."""
        if self.dense is not None:
            return torch.matmul(y, self.dense.t().to(y.dtype))
        lead = y.shape[:-1]
        m, p = self.odd.shape[0], self.hadamard.shape[0]
        x = y.reshape(*lead, m, p)
        x = torch.matmul(self.odd.to(y.dtype), torch.matmul(x, self.hadamard.t().to(y.dtype)))
        return x.reshape(*lead, self.dim) * self.signs.to(y.dtype)

    def extra_repr(self) -> str:
        m, p = _split(self.dim)
        return (f'dim={self.dim} (random orthogonal {m} x Hadamard {p}'
                + (', applied dense)' if self.dense is not None else ')'))


_SHARED = {}


def shared_rotation(dim: int, device, dtype) -> InputRotation:
    """The rotation of width ``dim`` (seed :data:`DEFAULT_ROTATION_SEED`) on ``device``;
    deterministic, so it is built once per (width, device, dtype) and never saved."""
    key = (int(dim), str(device), dtype)
    rot = _SHARED.get(key)
    if rot is None:
        rot = _SHARED[key] = InputRotation(dim).to(device=device, dtype=dtype)
    return rot
