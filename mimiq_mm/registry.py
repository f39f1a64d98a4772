"""Registries of mimiq_mm, children of mmengine's root registries.

Everything a config names (``type='MimiQDistiller'``, ``type='SyntheticImageDataset'``,
``type='MimiQSynthesisHook'`` ...) is registered here, so configs only need
``custom_imports = dict(imports=['mimiq_mm'])`` or ``default_scope='mimiq_mm'``.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, locations=['mimiq_mm.models'])
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, locations=['mimiq_mm.datasets'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS,
                      locations=['mimiq_mm.datasets'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, locations=['mimiq_mm.engine'])
LOOPS = Registry('loop', parent=MMENGINE_LOOPS, locations=['mimiq_mm.engine'])
METRICS = Registry('metric', parent=MMENGINE_METRICS, locations=['mimiq_mm.engine'])

# Not an mmengine registry kind: synthesis objectives, keyed by name. (Attention adapters
# are keyed by the attention module's CLASS, which an mmengine Registry cannot do: see
# mimiq_mm.attention.register_adapter.)
SYNTHESIS_METHODS = Registry('synthesis method', locations=['mimiq_mm.synthesis'])
