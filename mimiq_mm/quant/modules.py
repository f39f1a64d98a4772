"""Quantizable modules. ``MatMul`` is the float product that attention adapters route
q·kᵀ and attn·v through; ``quantize_`` swaps it for ``QuantMatMul``."""
import torch
from torch import nn


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so that quantize_ can find and replace it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)
