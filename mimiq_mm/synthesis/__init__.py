"""mimiq_mm.synthesis: data-free synthetic images (MimiQ and baselines) as a dataset folder.

``synthesize(teacher, out_dir, cfg) -> Path`` writes the folder described in
docs/INTERFACES.md; ``tools/generate.py CONFIG`` is its command line.
"""
from .config import METHODS, TASK_LOSSES, SynthesisConfig
from .engine import (batch_seed, check_synthetic_set, corrupt_batches, dist_info, shard_batches,
                     synthesize)
from .methods import (BatchContext, BatchResult, GaussianSynthesis, MimiQSynthesis,
                      NonFiniteSynthesisError, PSAQSynthesis, RealImages, SynthesisMethod,
                      build_method)
from .psaq import patch_similarity_entropy, psaq_loss
from .teacher import SynthesisTeacher, as_teacher, build_teacher, load_teacher_checkpoint
from .writer import (BATCHES_DIR, IMAGES_DIR, MANIFEST, check_image, read_finished_batches)

__all__ = ['METHODS', 'TASK_LOSSES', 'SynthesisConfig', 'synthesize', 'check_synthetic_set',
           'corrupt_batches',
           'batch_seed',
           'dist_info', 'shard_batches', 'BatchContext', 'BatchResult', 'GaussianSynthesis',
           'MimiQSynthesis', 'NonFiniteSynthesisError', 'PSAQSynthesis', 'RealImages',
           'SynthesisMethod', 'build_method', 'patch_similarity_entropy', 'psaq_loss',
           'SynthesisTeacher', 'as_teacher', 'build_teacher', 'load_teacher_checkpoint',
           'BATCHES_DIR', 'IMAGES_DIR', 'MANIFEST', 'check_image', 'read_finished_batches']
