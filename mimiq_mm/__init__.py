"""mimiq_mm: data-free low-bit quantization (MimiQ) for OpenMMLab detectors and segmentors."""
from .version import __version__

__all__ = ['__version__']
