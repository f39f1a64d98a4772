"""mimiq_mm.datasets: SyntheticImageDataset over a synthetic dataset folder."""
from .synthetic import SyntheticImageDataset

__all__ = ['SyntheticImageDataset']
