"""mimiq_mm: data-free low-bit quantization (MimiQ) for OpenMMLab detectors and segmentors.

The pipeline, one sub-package per stage::

    synthesis/  (2) synthetic images against the float teacher's attention heads
    quant/      (3) fake-quant student: quantize_(model, QuantConfig(...))
    attention/      per-backbone adapters exposing q·kᵀ and attn·v (+ recorders)
    losses/         L_sim, TV, HSAD, task KD
    models/     (4) MimiQDistiller: frozen teacher + quantized student
    engine/     (5) hooks/loops for mmengine's Runner (tools/train.py, tools/test.py)

Importing the package installs torch's ``weights_only`` allow-list for mmengine checkpoints
and routes mmengine's checkpoint loading through mimiq_mm's one loader (local files only,
weights-only; :mod:`mimiq_mm.utils.checkpoint`), and registers every component in the mimiq_mm
registries, so configs only need ``custom_imports=dict(imports=['mimiq_mm'])``.
"""
import warnings

# mmengine/mmcv import pkg_resources (setuptools < 81 is pinned for it); its deprecation
# notice says nothing actionable to our users, so it is silenced here, once.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

from .utils.checkpoint import (allow_mmengine_checkpoints,  # noqa: E402
                               install_checkpoint_loaders)
from .version import __version__  # noqa: E402

allow_mmengine_checkpoints()
install_checkpoint_loaders()  # every mmengine checkpoint read: local + weights_only, no URLs

# Public API (each stage's package holds the rest).
from .attention import (AttentionRecorder, adapt_attention_, register_adapter,  # noqa: E402
                        restore_attention_)
from .datasets import SyntheticImageDataset  # noqa: E402
from .engine import MimiQCalibrationHook, MimiQIterBasedTrainLoop, MimiQSynthesisHook  # noqa
from .models import MimiQDistiller  # noqa: E402
from .quant import (QuantConfig, QuantizerConfig, calibration_mode, dequantize_,  # noqa: E402
                    quantize_, set_quant_state)
from .synthesis import SynthesisConfig, synthesize  # noqa: E402

__all__ = [
    '__version__', 'allow_mmengine_checkpoints', 'QuantConfig', 'QuantizerConfig',
    'quantize_', 'dequantize_', 'calibration_mode', 'set_quant_state', 'adapt_attention_',
    'restore_attention_', 'register_adapter', 'AttentionRecorder', 'SynthesisConfig',
    'synthesize', 'SyntheticImageDataset', 'MimiQDistiller', 'MimiQSynthesisHook',
    'MimiQCalibrationHook', 'MimiQIterBasedTrainLoop',
]
