"""Synthesis methods, registered by name in ``SYNTHESIS_METHODS``.

- ``mimiq``: pixel optimisation of ``w_sim * L_sim + w_task * L_task + w_tv * TV`` (MIMIQ.md §1);
- ``psaq``: pixel optimisation of PSAQ-ViT's patch-similarity entropy (+ the same TV/task terms);
- ``gaussian``: clamped N(0, 1) in the normalised space, no optimisation;
- ``real``: real images from a folder, resized and centre-cropped to the image size.

A method turns a :class:`BatchContext` into a :class:`BatchResult`; the writer and the resume
logic live in :mod:`mimiq_mm.synthesis.engine`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from ..losses.attention_similarity import inter_head_similarity_loss, mean_inter_head_ssim
from ..losses.tv import total_variation_l2
from ..registry import SYNTHESIS_METHODS
from .augment import augment, jitter_for_step
from .config import SynthesisConfig
from .psaq import psaq_loss
from .teacher import SynthesisTeacher

__all__ = ['BatchContext', 'BatchResult', 'NonFiniteSynthesisError', 'SynthesisMethod',
           'MimiQSynthesis', 'PSAQSynthesis', 'GaussianSynthesis', 'RealImages',
           'build_method', 'list_real_images']


class NonFiniteSynthesisError(FloatingPointError):
    """A loss or the pixels became NaN/inf while optimising a batch."""

    def __init__(self, batch_index: int, step: int, terms: Dict[str, float]):
        self.batch_index, self.step, self.terms = batch_index, step, terms
        super().__init__(
            f'non-finite value in synthesis batch {batch_index} at step {step} '
            f'(loss terms: {terms}). Images of finished batches are kept; lower synthesis.lr, '
            'set synthesis.bf16=False, or check the teacher weights for NaN/inf.')


@dataclass
class BatchContext:
    batch_index: int
    num_images: int
    seed: int
    generator: torch.Generator
    device: torch.device
    image_indices: List[int]
    progress: Optional[Callable[[int, Dict[str, float]], None]] = None


@dataclass
class BatchResult:
    x: Optional[Tensor] = None                  # normalised (B, 3, H, W)
    rgb: Optional[np.ndarray] = None            # or ready uint8 RGB (B, H, W, 3)
    losses: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, float]] = field(default_factory=list)
    ssim_before: Optional[Dict[str, float]] = None   # {'ssim': mean, 'ssim_sq': mean SSIM^2}
    ssim_after: Optional[Dict[str, float]] = None


class SynthesisMethod:
    """Base class: holds the teacher and the settings."""
    needs_teacher = True
    needs_attention = False

    def __init__(self, teacher: Optional[SynthesisTeacher], cfg: SynthesisConfig,
                 attention: bool = False):
        if self.needs_teacher and teacher is None:
            raise ValueError(f"synthesis method {cfg.method!r} needs a teacher model")
        self.teacher = teacher
        self.cfg = cfg
        self.attention = attention     # attention recording available (adapted teacher)
        if cfg.lsim_kernel == 'triton':
            # registers the kernels' custom ops before anything is traced by torch.compile
            from mimiq_mm.losses import lsim_triton
            if not lsim_triton.available():
                raise RuntimeError("synthesis.lsim_kernel='triton' needs triton (it ships "
                                   "with CUDA builds of torch); use lsim_kernel='torch'")

    def generate(self, ctx: BatchContext) -> BatchResult:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers
    def autocast(self, device: torch.device):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def inter_head_ssim(self, x: Tensor) -> Optional[Dict[str, float]]:
        """Mean inter-head SSIM and SSIM^2 of the teacher on ``x`` (None without attention)."""
        if not self.attention or self.teacher is None:
            return None
        from ..attention import AttentionRecorder
        with AttentionRecorder(self.teacher.attention_scope, detach=True) as rec:
            with self.autocast(x.device):
                self.teacher.features(x)
        if not any(r.logits.shape[1] > 1 for r in rec.records):
            return None
        return {'ssim': mean_inter_head_ssim(rec.records),
                'ssim_sq': mean_inter_head_ssim(rec.records, squared=True)}

    def initial_pixels(self, ctx: BatchContext) -> Tensor:
        height, width = self.cfg.image_size
        x = torch.randn((len(ctx.image_indices), 3, height, width), generator=ctx.generator,
                        device=ctx.device)
        low, high = self.teacher.pixel_range(ctx.device)
        return torch.maximum(torch.minimum(x, high), low)


@contextlib.contextmanager
def float32_matmul_precision(precision: Optional[str]):
    """``torch.set_float32_matmul_precision(precision)`` inside the block (None: unchanged)."""
    if precision is None:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class PixelOptimisation(SynthesisMethod):
    """AdamW on the pixels with cosine lr, jitter/noise/colour augmentation and clamping."""

    def objective(self, x: Tensor, generator: torch.Generator) -> Dict[str, Tensor]:
        """Loss terms on the augmented batch; must contain ``'loss'`` (weighted sum)."""
        raise NotImplementedError

    def add_tv(self, terms: Dict[str, Tensor], x: Tensor) -> Dict[str, Tensor]:
        """Add the TV prior of the (un-augmented) pixels ``x`` to ``terms`` (float32 loss)."""
        tv = total_variation_l2(x, self.cfg.tv_reduction)
        terms['tv'] = tv
        terms['loss'] = terms['loss'].float() + self.cfg.w_tv * tv
        return terms

    def step_terms(self, x_aug: Tensor, x: Tensor, generator: torch.Generator) -> Dict[str, Tensor]:
        """All loss terms of one step (objective on ``x_aug`` under autocast, TV on ``x``)."""
        with self.autocast(x.device):
            terms = self.objective(x_aug, generator)
        return self.add_tv(terms, x)

    def task_term(self, x: Tensor, generator: torch.Generator) -> Optional[Tensor]:
        if self.cfg.task_loss == 'none' or self.cfg.w_task == 0:
            return None
        return self.teacher.task_loss(x, self.cfg.task_loss, generator, self.cfg.task_topk)

    def generate(self, ctx: BatchContext) -> BatchResult:
        cfg = self.cfg
        low, high = self.teacher.pixel_range(ctx.device)
        x = self.initial_pixels(ctx).requires_grad_(True)
        ssim_before = self.inter_head_ssim(x.detach())
        optimizer = torch.optim.AdamW([x], lr=cfg.lr, betas=cfg.betas,
                                      weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(cfg.iterations, 1), eta_min=cfg.lr_min)
        first_bad = torch.full((), -1, dtype=torch.long, device=ctx.device)
        history: List[Dict[str, float]] = []
        last: Dict[str, float] = {}
        with float32_matmul_precision('high' if cfg.tf32 else None):
            for step in range(cfg.iterations):
                optimizer.zero_grad(set_to_none=True)
                shift = jitter_for_step(step, cfg.iterations, cfg.jitter)
                x_aug = augment(x, shift, cfg.noise_std, cfg.color_jitter, ctx.generator)
                terms = self.step_terms(x_aug, x, ctx.generator)
                finite = torch.isfinite(terms['loss']) & torch.isfinite(x).all()
                first_bad = torch.where((~finite) & (first_bad < 0),
                                        torch.full_like(first_bad, step), first_bad)
                terms['loss'].backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    torch.maximum(torch.minimum(x, high), low, out=x)
                if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.iterations:
                    last = {k: float(v.detach()) for k, v in terms.items()}
                    self._raise_if_bad(first_bad, ctx, last)
                    history.append({'step': step + 1, **last})
                    if ctx.progress is not None:
                        done = history[-2]['step'] if len(history) > 1 else 0
                        ctx.progress(step + 1 - done, last)
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteSynthesisError(ctx.batch_index, cfg.iterations, last)
        return BatchResult(x=x, losses=last, history=history, ssim_before=ssim_before,
                           ssim_after=self.inter_head_ssim(x))

    @staticmethod
    def _raise_if_bad(first_bad: Tensor, ctx: BatchContext, terms: Dict[str, float]) -> None:
        step = int(first_bad)
        if step >= 0:
            raise NonFiniteSynthesisError(ctx.batch_index, step, terms)


@SYNTHESIS_METHODS.register_module(name='mimiq')
class MimiQSynthesis(PixelOptimisation):
    """MimiQ: make the teacher's attention heads agree (``L_sim``) + task + TV."""
    needs_attention = True

    def objective(self, x: Tensor, generator: torch.Generator) -> Dict[str, Tensor]:
        if self.cfg.w_sim == 0:      # ablation: task (+ TV) only, no attention recording
            task = self.task_term(x, generator)
            if task is None:
                raise ValueError("synthesis with w_sim=0 needs a task term: set "
                                 "task_loss='task' or 'classifier' and w_task > 0")
            return {'task': task, 'loss': self.cfg.w_task * task}
        with self.recorder() as rec:
            return self.recorded_objective(x, generator, rec)

    def recorder(self):
        from ..attention import AttentionRecorder
        return AttentionRecorder(self.teacher.attention_scope)

    def recorded_objective(self, x: Tensor, generator: torch.Generator,
                           rec) -> Dict[str, Tensor]:
        """L_sim (+ task) terms; ``rec`` is an active recorder of the attention scope.

        The records are taken out of ``rec`` before L_sim is computed, so no tensor is left
        in the recorder: under ``torch.compile`` the logits stay inside the graph instead of
        becoming outputs (the recorder's list is a side effect dynamo replays).
        """
        task = self.task_term(x, generator)
        if task is None:
            self.teacher.features(x)
        records = list(rec.records)
        rec.records.clear()
        if not records:
            raise RuntimeError(
                f'no attention records from {type(self.teacher.attention_scope).__name__}: '
                "method 'mimiq' needs attention layers that mimiq_mm.attention supports")
        sim = inter_head_similarity_loss(records,
                                         max_chunk_elements=self.cfg.max_chunk_elements,
                                         compiled=self.cfg.compile_scope == 'loss',
                                         fused=self.cfg.lsim_kernel == 'triton')
        terms = {'sim': sim, 'loss': self.cfg.w_sim * sim}
        if task is not None:
            terms['task'] = task
            terms['loss'] = terms['loss'] + self.cfg.w_task * task
        return terms

    def _full_step(self, x_aug: Tensor, x: Tensor, generator: torch.Generator,
                   rec) -> Dict[str, Tensor]:
        with self.autocast(x.device):
            terms = self.recorded_objective(x_aug, generator, rec)
        return self.add_tv(terms, x)

    def compiled_step(self, backend: str = 'inductor') -> Callable:
        """``torch.compile`` of :meth:`_full_step`, built on the first call (``backend`` counts
        only then; tests use ``'aot_eager'``). ``dynamic=False``: one graph per batch shape,
        so a smaller last batch compiles once more."""
        fn = self.__dict__.get('_compiled_full_step')
        if fn is None:
            fn = torch.compile(self._full_step, backend=backend, dynamic=False,
                               mode=self.cfg.compile_mode)
            self._compiled_full_step = fn
        return fn

    def step_terms(self, x_aug: Tensor, x: Tensor, generator: torch.Generator) -> Dict[str, Tensor]:
        if self.cfg.compile_scope != 'full' or self.cfg.w_sim == 0:
            return super().step_terms(x_aug, x, generator)
        if self.cfg.task_loss == 'none' or self.cfg.w_task == 0:
            generator = None     # unused: keep it out of the compiled function's inputs
        with self.recorder() as rec:
            return self.compiled_step()(x_aug, x, generator, rec)


@SYNTHESIS_METHODS.register_module(name='psaq')
class PSAQSynthesis(PixelOptimisation):
    """PSAQ-ViT baseline: maximise the entropy of patch-feature similarities."""

    def objective(self, x: Tensor, generator: torch.Generator) -> Dict[str, Tensor]:
        cfg = self.cfg
        task = self.task_term(x, generator)
        levels = self.teacher.feature_tokens(x)
        psaq = psaq_loss(levels, generator, cfg.psaq_bins, cfg.psaq_bandwidth,
                         cfg.psaq_max_pairs)
        terms = {'psaq': psaq, 'loss': cfg.w_psaq * psaq}
        if task is not None:
            terms['task'] = task
            terms['loss'] = terms['loss'] + cfg.w_task * task
        return terms


@SYNTHESIS_METHODS.register_module(name='gaussian')
class GaussianSynthesis(SynthesisMethod):
    """Baseline: standard normal noise in the normalised space, clamped to the valid range."""

    def generate(self, ctx: BatchContext) -> BatchResult:
        x = self.initial_pixels(ctx)
        ssim = self.inter_head_ssim(x)
        if ctx.progress is not None:
            ctx.progress(max(self.cfg.iterations, 1), {})
        return BatchResult(x=x, ssim_before=ssim, ssim_after=ssim)


def list_real_images(root, extensions) -> List[Path]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f'synthesis.real_root {str(root)!r} is not a folder of images')
    exts = {e.lower() for e in extensions}
    return sorted(p for p in root.rglob('*') if p.is_file() and p.suffix.lower() in exts)


def resize_center_crop(img, size_hw):
    """PIL image -> RGB uint8 (H, W, 3): resize the short side, then centre-crop."""
    from PIL import Image
    height, width = size_hw
    img = img.convert('RGB')
    scale = max(height / img.height, width / img.width)
    new_w, new_h = max(width, math.ceil(img.width * scale)), max(height, math.ceil(img.height * scale))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)


@SYNTHESIS_METHODS.register_module(name='real')
class RealImages(SynthesisMethod):
    """Baseline: real images (sorted file list under ``real_root``) in the same layout."""
    needs_teacher = False

    def __init__(self, teacher, cfg, attention=False):
        super().__init__(teacher, cfg, attention)
        self.files = list_real_images(cfg.real_root, cfg.real_extensions)
        if len(self.files) < cfg.num_images:
            raise ValueError(f'synthesis.real_root {cfg.real_root!r} has {len(self.files)} '
                             f'images with extensions {cfg.real_extensions}, fewer than '
                             f'synthesis.num_images={cfg.num_images}')

    def generate(self, ctx: BatchContext) -> BatchResult:
        from PIL import Image
        arrays = []
        for index in ctx.image_indices:
            with Image.open(self.files[index]) as img:
                arrays.append(resize_center_crop(img, self.cfg.image_size))
        rgb = np.stack(arrays)
        ssim = None
        if self.teacher is not None:
            ssim = self.inter_head_ssim(self.teacher.from_pixels(torch.from_numpy(rgb), ctx.device))
        if ctx.progress is not None:
            ctx.progress(max(self.cfg.iterations, 1), {})
        return BatchResult(rgb=rgb, ssim_before=ssim, ssim_after=ssim,
                           losses={}, history=[{'source': str(self.files[i])}
                                               for i in ctx.image_indices])


def build_method(cfg: SynthesisConfig, teacher: Optional[SynthesisTeacher],
                 attention: bool) -> SynthesisMethod:
    cls = SYNTHESIS_METHODS.get(cfg.method)
    if cls is None:
        raise ValueError(f'unknown synthesis method {cfg.method!r}; registered: '
                         f'{sorted(SYNTHESIS_METHODS.module_dict)}')
    return cls(teacher, cfg, attention=attention)
