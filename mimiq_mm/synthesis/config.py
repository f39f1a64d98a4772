"""Settings of a synthesis run (the ``synthesis=dict(...)`` block of a config), validated."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple, Union

import numpy as np

from ..losses.attention_similarity import DEFAULT_MAX_CHUNK_ELEMENTS

__all__ = ['SynthesisConfig', 'METHODS', 'TASK_LOSSES', 'RESUME_IGNORED_KEYS', 'COMPILE_SCOPES',
           'COMPILE_MODES']

METHODS = ('mimiq', 'gaussian', 'psaq', 'real')
TASK_LOSSES = ('none', 'classifier', 'task')
TV_REDUCTIONS = ('norm', 'mean')
#: ``synthesis.compile``: False/'none' (eager), True/'loss' (L_sim only), 'full' (the whole
#: teacher forward + L_sim + TV step, forward and backward).
COMPILE_SCOPES = ('none', 'loss', 'full')
#: ``synthesis.compile_mode``: the ``mode`` given to ``torch.compile`` (None: its default).
COMPILE_MODES = (None, 'default', 'reduce-overhead', 'max-autotune',
                 'max-autotune-no-cudagraphs')
#: ``synthesis.lsim_kernel``: the PyTorch L_sim or the fused Triton kernels (same values).
LSIM_KERNELS = ('torch', 'triton')
#: Settings that do not change the generated images (beyond float rounding): they may
#: differ when a run resumes.
RESUME_IGNORED_KEYS = frozenset({'device', 'compile', 'compile_mode', 'tf32', 'lsim_kernel',
                                 'log_interval',
                                 'figures',
                                 'contact_sheet_max', 'figure_layer', 'progress',
                                 'check_images_on_resume', 'max_chunk_elements'})


@dataclass(frozen=True)
class SynthesisConfig:
    """All knobs of :func:`mimiq_mm.synthesis.synthesize`.

    Defaults are small enough for a CPU demo; the published MimiQ schedule is
    ``iterations=2000, batch_size=16, num_images=10000`` (see ``configs/synthesis``).
    """
    method: str = 'mimiq'
    num_images: int = 16
    batch_size: int = 8
    iterations: int = 50
    image_size: Union[int, Tuple[int, int]] = (224, 224)   # (height, width)
    seed: int = 0
    # optimiser (AdamW + cosine from lr to lr_min)
    lr: float = 0.1
    lr_min: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-6
    # L_gen = w_sim * L_sim + w_task * L_task + w_tv * TV
    w_sim: float = 1.0
    w_task: float = 1.0
    w_tv: float = 2.5e-5
    task_loss: str = 'none'
    tv_reduction: str = 'norm'
    task_topk: int = 100          # 'task' on detectors: top anchors / proposals per image
    # augmentation each step
    jitter: Tuple[int, int] = (8, 16)     # max roll (px) in the first / second half
    noise_std: float = 0.05               # Gaussian noise (normalised units)
    color_jitter: float = 0.1             # +-scale and +-shift per image and channel
    # PSAQ-ViT baseline (patch-similarity entropy)
    w_psaq: float = 1.0
    psaq_bins: int = 64
    psaq_bandwidth: float = 0.05
    psaq_max_pairs: int = 4096
    # 'real' baseline
    real_root: Optional[str] = None
    real_extensions: Tuple[str, ...] = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
    # speed: bf16 autocast of the teacher forward (L_sim statistics stay float32);
    # torch.compile: False/'none', True/'loss' (the L_sim computation only), 'full' (teacher
    # forward under the attention recorder + L_sim + TV, and their backward, as one compiled
    # function; the task term, if any, is traced too); compile_mode: torch.compile's mode
    # (e.g. 'max-autotune-no-cudagraphs'); tf32: float32 matmuls in TF32 on CUDA
    # (torch.set_float32_matmul_precision('high') while optimising); lsim_kernel: 'torch'
    # (the PyTorch L_sim, compiled or not) or 'triton' (mimiq_mm.losses.lsim_triton: one
    # fused kernel per direction; CUDA)
    bf16: bool = False
    compile: Union[bool, str] = False
    compile_mode: Optional[str] = None
    tf32: bool = False
    lsim_kernel: str = 'torch'
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS
    device: Optional[str] = None
    # reporting
    log_interval: int = 10
    progress: bool = True
    figures: bool = True
    contact_sheet_max: int = 64
    figure_layer: Union[int, str, None] = None
    check_images_on_resume: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._check_types()
        if self.method not in METHODS:
            raise ValueError(f'synthesis.method must be one of {METHODS}, got {self.method!r}')
        if self.task_loss not in TASK_LOSSES:
            raise ValueError(f'synthesis.task_loss must be one of {TASK_LOSSES}, '
                             f'got {self.task_loss!r}')
        if self.tv_reduction not in TV_REDUCTIONS:
            raise ValueError(f'synthesis.tv_reduction must be one of {TV_REDUCTIONS}, '
                             f'got {self.tv_reduction!r}')
        for name in ('num_images', 'batch_size', 'log_interval', 'psaq_bins', 'psaq_max_pairs',
                     'task_topk', 'max_chunk_elements'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'synthesis.{name} must be >= 1, got {getattr(self, name)}')
        if self.iterations < 0:
            raise ValueError(f'synthesis.iterations must be >= 0, got {self.iterations}')
        if self.compile not in (False, True) + COMPILE_SCOPES:
            raise ValueError(f'synthesis.compile must be False, True (= {"loss"!r}) or one of '
                             f'{COMPILE_SCOPES}, got {self.compile!r}')
        if self.lsim_kernel not in LSIM_KERNELS:
            raise ValueError(f'synthesis.lsim_kernel must be one of {LSIM_KERNELS}, got '
                             f'{self.lsim_kernel!r}')
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f'synthesis.compile_mode must be one of {COMPILE_MODES}, '
                             f'got {self.compile_mode!r}')
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError('synthesis.image_size must be an int or (height, width), '
                             f'got {self.image_size!r}')
        object.__setattr__(self, 'image_size', size)
        object.__setattr__(self, 'betas', tuple(float(b) for b in self.betas))
        object.__setattr__(self, 'jitter', tuple(int(j) for j in self.jitter))
        object.__setattr__(self, 'real_extensions', tuple(self.real_extensions))
        if len(self.jitter) != 2:
            raise ValueError(f'synthesis.jitter must be (first_half, second_half), got {self.jitter}')
        if self.method == 'real' and not self.real_root:
            raise ValueError("synthesis.method='real' needs synthesis.real_root=<folder of "
                             'images> (e.g. --cfg-options synthesis.real_root=data/coco/val2017)')

    def _check_types(self) -> None:
        """Plain int / float / bool fields get a value of that type (an int for a float is
        fine), so that ``--cfg-options synthesis.num_images=abc`` fails naming the field.
        (Annotations are strings here: ``from __future__ import annotations``.)"""
        allowed = {'int': numbers.Integral, 'float': numbers.Real, 'bool': (bool, np.bool_)}
        for f in dataclasses.fields(self):
            kinds = allowed.get(f.type)
            if kinds is None:
                continue
            value = getattr(self, f.name)
            is_bool = isinstance(value, (bool, np.bool_))  # bool is an Integral too
            if not isinstance(value, kinds) or (f.type != 'bool' and is_bool):
                raise TypeError(f'synthesis.{f.name} must be {f.type}, got {value!r} '
                                f'({type(value).__name__})')
            if f.type == 'float' and not math.isfinite(float(value)):
                raise ValueError(f'synthesis.{f.name}={value!r} is not a finite number')

    @property
    def compile_scope(self) -> str:
        """``synthesis.compile`` as one of :data:`COMPILE_SCOPES` (True means ``'loss'``)."""
        if self.compile is True:
            return 'loss'
        if self.compile is False:
            return 'none'
        return self.compile

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    @classmethod
    def from_dict(cls, cfg: Union[Mapping[str, Any], 'SynthesisConfig', None]) -> 'SynthesisConfig':
        """Build from a mapping (unknown keys raise ``ValueError`` listing the valid ones)."""
        if isinstance(cfg, cls):
            return cfg
        cfg = dict(cfg or {})
        if 'synthesis' in cfg and isinstance(cfg['synthesis'], Mapping):
            cfg = dict(cfg['synthesis'])
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f'unknown synthesis setting(s) {unknown}; valid: {sorted(valid)}')
        for key in ('betas', 'jitter', 'image_size', 'real_extensions'):
            if isinstance(cfg.get(key), list):
                cfg[key] = tuple(cfg[key])
        return cls(**cfg)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out['extra'] = dict(self.extra)
        return _jsonable(out)


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
