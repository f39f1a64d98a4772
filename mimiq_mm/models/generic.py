"""MimiQ calibration + fine-tuning for ANY ``nn.Module`` (a timm model with its own head, a
backbone, ...), not only mmdet / mmseg models.

    from mimiq_mm import QuantConfig
    from mimiq_mm.models.generic import DistillSettings, load_synthetic_images, quantize_and_distill

    images = load_synthetic_images('work_dirs/synthetic')      # written by synthesize()
    student, report = quantize_and_distill(model, images, QuantConfig(),
                                           DistillSettings(iters=300))

The student is a deep copy of ``model`` passed through :func:`mimiq_mm.quant.quantize_`,
calibrated on the images, then fine-tuned with

    L = output_weight * output KD + gamma * L_HSAD                      (MIMIQ.md §3)

where the output KD is a normalised MSE between the student's and the teacher's outputs
(every floating tensor of a tensor / tuple / dict output) and L_HSAD the head-wise
structural attention distillation. The fine-tuning never makes the student worse by the
only measure a data-free user has: the distillation loss on images held out of training
(``holdout``). When fine-tuning raises it, the calibrated (PTQ) student is kept and the
report says so.

The pieces are shared with :class:`mimiq_mm.models.MimiQDistiller` (the mmengine pipeline):
:func:`record_pair` (teacher and student forwards under the attention recorders) and
:func:`heldout_loss` (the keep-the-better-student decision, also used by
:class:`mimiq_mm.engine.MimiQKeepBestHook`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from mimiq_mm.losses.hsad import HSAD_KINDS, hsad_loss
from mimiq_mm.losses.task_kd import feature_kd_loss

Forward = Callable[[nn.Module, Tensor], Any]


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """Settings of :func:`quantize_and_distill` (validated).

    Attributes:
        iters: fine-tuning steps (0 = calibration only, i.e. PTQ).
        batch_size: images per step (and per calibration batch).
        lr: AdamW learning rate of the weights; the learnt quantizer steps get
            ``lr * step_lr_mult``.
        gamma: weight of L_HSAD (published 10).
        output_weight: weight of the output distillation.
        hsad_kind: 'ssim' (the method), 'mse' or 'l1'.
        calib_batches: calibration batches (None: every training batch once).
        holdout: fraction of the images kept out of training to decide whether the
            fine-tuned student beats the calibrated one (0 = no decision, keep fine-tuned).
        clip_grad: max gradient norm (None: no clipping).
        seed: order of the batches.
        log_interval: report every N steps through ``progress`` (0: never).
        train_scope: which parameters fine-tuning updates (:func:`trainable_parameters`):
            'quantized' (default: every parameter inside ``quant_cfg.scope``), 'layers'
            (the quantized layers' own weights, biases and steps), 'steps' (the learnt
            quantizer steps only), 'weights' ('quantized' without the steps) or 'all'.
    """
    iters: int = 300
    batch_size: int = 8
    lr: float = 1e-5
    step_lr_mult: float = 10.0
    gamma: float = 10.0
    output_weight: float = 1.0
    hsad_kind: str = 'ssim'
    calib_batches: Optional[int] = None
    holdout: float = 0.125
    clip_grad: Optional[float] = 10.0
    seed: int = 0
    log_interval: int = 50
    train_scope: str = 'quantized'

    def __post_init__(self):
        def positive_int(name, value, minimum=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f'{name}={value!r} is not valid; use an int >= {minimum}')
        positive_int('iters', self.iters, 0)
        positive_int('batch_size', self.batch_size)
        positive_int('log_interval', self.log_interval, 0)
        if self.calib_batches is not None:
            positive_int('calib_batches', self.calib_batches)
        for name in ('lr', 'step_lr_mult', 'gamma', 'output_weight'):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f'{name}={getattr(self, name)!r} is not valid; use a finite '
                                 'value >= 0')
        if self.gamma == 0 and self.output_weight == 0 and self.iters:
            raise ValueError('gamma and output_weight are both 0: nothing to fine-tune on')
        if self.hsad_kind not in HSAD_KINDS:
            raise ValueError(f'hsad_kind={self.hsad_kind!r} is not valid; use one of '
                             f'{HSAD_KINDS}')
        if not 0.0 <= float(self.holdout) < 1.0:
            raise ValueError(f'holdout={self.holdout!r} is not valid; use a fraction in [0, 1)')
        if self.clip_grad is not None and not float(self.clip_grad) > 0:
            raise ValueError(f'clip_grad={self.clip_grad!r} is not valid; use > 0 or None')
        check_train_scope(self.train_scope)


#: what fine-tuning may update, see :func:`trainable_parameters`
TRAIN_SCOPES = ('quantized', 'all', 'steps', 'layers', 'weights')


def check_train_scope(train_scope: str) -> None:
    if train_scope not in TRAIN_SCOPES:
        raise ValueError(f'train_scope={train_scope!r} is not valid; use one of {TRAIN_SCOPES}')


def _is_step(name: str) -> bool:
    return name.rsplit('.', 1)[-1] == 'step'


def trainable_parameters(student: nn.Module, quant_scope: Optional[str],
                         train_scope: str = 'quantized') -> List[nn.Parameter]:
    """The parameters of a quantized ``student`` that fine-tuning updates, each once.

    ``quant_scope`` is ``QuantConfig.scope`` (the part ``quantize_`` quantized).
    ``train_scope``: 'quantized' every parameter inside that part; 'all' every parameter
    of the student; 'steps' the learnt quantizer steps (LSQ ``step``) inside that part;
    'layers' the quantized layers' own parameters (Linear / Conv weights and biases, the
    steps of their quantizers and of the attention matmuls), so LayerNorms, position tables,
    tokens and layer scales stay the teacher's; 'weights' every parameter inside that part
    except the learnt quantizer steps, so the calibrated clipping ratios stay as calibration
    set them. Raises ``ValueError`` when nothing is left.
    """
    from mimiq_mm.quant import get_scope, quant_modules
    check_train_scope(train_scope)
    part = student if train_scope == 'all' else get_scope(student, quant_scope)[0]
    if train_scope == 'layers':
        found = [p for _, m in quant_modules(part) for p in m.parameters()]
    elif train_scope in ('steps', 'weights'):
        want_steps = train_scope == 'steps'
        found = [p for name, p in part.named_parameters() if _is_step(name) == want_steps]
    else:
        found = list(part.parameters())
    trained = list({id(p): p for p in found}.values())
    if not trained:
        raise ValueError(f"train_scope={train_scope!r} leaves nothing to fine-tune: the "
                         'quantizers of this quant_cfg learn no steps (lsq=False '
                         "everywhere); use train_scope='quantized'")
    return trained


# ------------------------------------------------------------------ shared pieces
def default_forward(model: nn.Module, inputs: Tensor):
    return model(inputs)


def record_pair(teacher: nn.Module, student: nn.Module, run: Callable[[nn.Module], Any],
                with_attention: bool):
    """``(teacher_out, teacher_records), (student_out, student_records)`` of ``run(model)``
    for both models; the teacher without gradients. Records are the per-head attention
    records of the adapted attention modules (empty lists when ``with_attention`` is
    False)."""
    from mimiq_mm.attention import AttentionRecorder
    with torch.no_grad():
        if with_attention:
            with AttentionRecorder(teacher, detach=True) as t_rec:
                t_out = run(teacher)
            t_records = t_rec.records
        else:
            t_out, t_records = run(teacher), []
    if with_attention:
        with AttentionRecorder(student) as s_rec:
            s_out = run(student)
        s_records = s_rec.records
    else:
        s_out, s_records = run(student), []
    return (t_out, t_records), (s_out, s_records)


def _tensors(out) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _tensors(out[key])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def output_distill_loss(teacher_out, student_out) -> Tensor:
    """Mean normalised MSE over the floating tensors of two outputs of the same structure."""
    t_list, s_list = _tensors(teacher_out), _tensors(student_out)
    if not t_list or len(t_list) != len(s_list):
        raise ValueError(f'cannot distil outputs of different structure: {len(t_list)} vs '
                         f'{len(s_list)} floating tensors (pass forward=... returning '
                         'tensors)')
    return torch.stack([feature_kd_loss(t, s, kind='norm_mse')
                        for t, s in zip(t_list, s_list)]).mean()


def distill_losses(teacher: nn.Module, student: nn.Module, inputs: Tensor,
                   forward: Forward = default_forward, gamma: float = 10.0,
                   output_weight: float = 1.0, hsad_kind: str = 'ssim') -> Dict[str, Tensor]:
    """The generic fine-tuning objective on one batch (a dict of weighted terms)."""
    (t_out, t_rec), (s_out, s_rec) = record_pair(
        teacher, student, lambda m: forward(m, inputs), with_attention=gamma > 0)
    losses = {}
    if gamma > 0:
        losses['loss_hsad'] = gamma * hsad_loss(t_rec, s_rec, kind=hsad_kind)
    if output_weight > 0:
        losses['loss_kd_out'] = output_weight * output_distill_loss(t_out, s_out)
    return losses


@torch.no_grad()
def heldout_loss_terms(loss_fn: Callable[[Any], Dict[str, Tensor]],
                       batches: Iterable) -> Dict[str, float]:
    """Mean over ``batches`` of each loss term of ``loss_fn(batch)`` (no gradients), e.g.
    ``{'loss_hsad': .., 'loss_kd_feat': ..}``: which part of the distillation moved."""
    totals: Dict[str, float] = {}
    n = 0
    for batch in batches:
        for name, value in loss_fn(batch).items():
            totals[name] = totals.get(name, 0.0) + float(value.float().sum())
        n += 1
    if n == 0:
        raise ValueError('no held-out batch to score the student on')
    return {name: total / n for name, total in totals.items()}


def heldout_loss(loss_fn: Callable[[Any], Dict[str, Tensor]], batches: Iterable) -> float:
    """Mean over ``batches`` of the summed loss terms ``loss_fn(batch)`` (no gradients): the
    data-free score that decides between the calibrated and the fine-tuned student."""
    return float(sum(heldout_loss_terms(loss_fn, batches).values()))


def load_synthetic_images(root: str, mean: Sequence[float] = None, std: Sequence[float] = None,
                          max_images: Optional[int] = None) -> Tensor:
    """The images of a synthetic set folder (``synthesize`` output) as a normalised float
    tensor ``(N, 3, H, W)``: ``(rgb - mean) / std`` with 0..255 statistics (default
    ImageNet's, what synthesis assumes for a model without a data preprocessor)."""
    import numpy as np
    from PIL import Image

    from mimiq_mm.datasets import SyntheticImageDataset
    from mimiq_mm.synthesis.teacher import IMAGENET_MEAN, IMAGENET_STD
    infos = SyntheticImageDataset(root, require_complete=True, max_images=max_images,
                                  serialize_data=False)
    mean = torch.tensor(mean or IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(std or IMAGENET_STD).view(1, 3, 1, 1)
    arrays = [np.asarray(Image.open(infos.get_data_info(i)['img_path']).convert('RGB'))
              for i in range(len(infos))]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (x - mean) / std


# ------------------------------------------------------------------ the function
def _batches(images: Tensor, batch_size: int) -> List[Tensor]:
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


def quantize_and_distill(model: nn.Module, images: Union[Tensor, Sequence[Tensor]],
                         quant_cfg=None, settings: Optional[DistillSettings] = None,
                         forward: Forward = default_forward, device=None,
                         progress: Optional[Callable[[str], None]] = print
                         ) -> Tuple[nn.Module, dict]:
    """Quantize a copy of ``model``, calibrate it on ``images`` and fine-tune it with HSAD +
    output distillation against ``model`` (left unchanged, used as the frozen teacher).

    Args:
        model: the float model (any ``nn.Module`` with attention the adapters know, see
            docs/custom_backbone.md).
        images: synthetic images in the model's input space, ``(N, C, H, W)`` or a list of
            such batches (:func:`load_synthetic_images` reads a synthetic set folder).
        quant_cfg: :class:`mimiq_mm.quant.QuantConfig` (or a dict of its fields); default
            ``QuantConfig()``. ``scope='backbone'`` quantizes ``model.backbone`` when the
            model has one, else the whole model.
        settings: :class:`DistillSettings`.
        forward: ``forward(model, inputs) -> output`` whose floating tensors are distilled
            (default ``model(inputs)``).
        device: where to run (default: the model's device).
        progress: a callable receiving one line of progress text (None: silent).

    Returns:
        ``(student, report)``: the student (eval mode, quantizers calibrated) and a dict with
        the held-out losses (``heldout_ptq``, ``heldout_finetuned``), ``kept``
        ('finetuned' / 'ptq' / 'ptq (no fine-tuning)'), the loss history and, when weights
        were GPTQ-rounded, ``gptq_summary`` (the line ``calibration_mode`` reports).
    """
    from mimiq_mm.attention import adapt_attention_
    from mimiq_mm.quant import QuantConfig, calibration_mode, get_scope, quantize_
    settings = settings or DistillSettings()
    if not isinstance(settings, DistillSettings):
        raise TypeError(f'settings must be a DistillSettings, got {type(settings).__name__}')
    cfg = QuantConfig.from_dict(quant_cfg)
    say = progress or (lambda _msg: None)
    if isinstance(images, Tensor):
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f'images must be a float (N, C, H, W) tensor, got '
                             f'{images.dtype} {tuple(images.shape)}')
        if not torch.isfinite(images).all():
            raise ValueError('images hold NaN/inf values')
        batches = _batches(images, settings.batch_size)
    else:
        batches = list(images)
    if not batches:
        raise ValueError('no images to calibrate on')
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device('cpu')
    device = torch.device(device)

    teacher = model
    was_training = teacher.training
    grad_flags = [p.requires_grad for p in teacher.parameters()]

    def restore_teacher():
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), grad_flags):
            p.requires_grad_(flag)

    teacher.eval()
    student = copy.deepcopy(teacher)
    quantize_(student, cfg)
    adapt_attention_(get_scope(teacher, cfg.scope)[0])  # same per-head records as the student
    teacher.to(device)
    student.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)

    n_hold = int(round(len(batches) * settings.holdout)) if settings.iters else 0
    if n_hold and len(batches) - n_hold < 1:
        n_hold = 0
    train, held = batches[:len(batches) - n_hold], batches[len(batches) - n_hold:]
    report: dict = dict(num_train_batches=len(train), num_heldout_batches=len(held),
                        history=[])

    student.eval()
    calib: dict = {}
    with calibration_mode(student, report=calib):
        for x in train[:settings.calib_batches or len(train)]:
            forward(student, x.to(device))
    say(f'calibrated on {min(len(train), settings.calib_batches or len(train))} batches')
    if 'gptq_summary' in calib:
        report['gptq_summary'] = calib['gptq_summary']
        say(calib['gptq_summary'])
    if not settings.iters:
        report['kept'] = 'ptq (no fine-tuning)'
        restore_teacher()
        return student.eval(), report

    def loss_fn(x):
        return distill_losses(teacher, student, x.to(device), forward, settings.gamma,
                              settings.output_weight, settings.hsad_kind)

    if held:
        report['heldout_ptq'] = heldout_loss(loss_fn, held)
        ptq_state = copy.deepcopy(student.state_dict())
    trained = trainable_parameters(student, cfg.scope, settings.train_scope)
    step_ids = {id(p) for n, p in student.named_parameters() if _is_step(n)}
    steps = [p for p in trained if id(p) in step_ids]
    weights = [p for p in trained if id(p) not in step_ids]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    groups = [dict(params=weights, lr=settings.lr)] if weights else []
    if steps:
        groups.append(dict(params=steps, lr=settings.lr * settings.step_lr_mult,
                           weight_decay=0.0))
    optim = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=settings.iters)
    gen = torch.Generator().manual_seed(settings.seed)
    order: List[int] = []
    student.train()
    for it in range(settings.iters):
        if not order:
            order = torch.randperm(len(train), generator=gen).tolist()
        losses = loss_fn(train[order.pop()])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            terms = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f'fine-tuning loss is not finite at step {it}: {terms}; '
                                     'lower lr or check the images')
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if settings.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(steps + weights, float(settings.clip_grad))
        optim.step()
        sched.step()
        if settings.log_interval and (it + 1) % settings.log_interval == 0:
            report['history'].append(dict(iter=it + 1, **{k: float(v) for k, v in
                                                          losses.items()}))
            say(f'step {it + 1}/{settings.iters}: ' + ', '.join(
                f'{k}={float(v):.4f}' for k, v in losses.items()))
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    report['kept'] = 'finetuned'
    if held:
        report['heldout_finetuned'] = heldout_loss(loss_fn, held)
        if report['heldout_finetuned'] > report['heldout_ptq']:
            student.load_state_dict(ptq_state)
            report['kept'] = 'ptq'
        say(f"held-out distillation loss: calibrated {report['heldout_ptq']:.4f}, fine-tuned "
            f"{report['heldout_finetuned']:.4f}: keeping the {report['kept']} student")
    restore_teacher()
    return student, report
