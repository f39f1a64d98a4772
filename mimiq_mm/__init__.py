"""mimiq_mm: data-free low-bit quantization (MimiQ) for OpenMMLab detectors and segmentors.

Importing the package installs torch's ``weights_only`` allow-list for mmengine checkpoints
(see :mod:`mimiq_mm.utils.checkpoint`) and registers every component in the mimiq_mm
registries.
"""
from .utils.checkpoint import allow_mmengine_checkpoints
from .version import __version__

allow_mmengine_checkpoints()

__all__ = ['__version__', 'allow_mmengine_checkpoints']
