"""Task knowledge distillation losses for detectors and segmentors (MIMIQ.md §3, "KD").

Pure tensor functions; :class:`mimiq_mm.models.MimiQDistiller` decides which model outputs to
feed them (backbone/neck features, RPN objectness and deltas, RoI class logits / box deltas /
mask logits on shared proposals, segmentation logits). The teacher side is always detached.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

FEATURE_KD_KINDS = ('mse', 'norm_mse', 'l1')


def feature_kd_loss(teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor],
                    kind: str = 'mse') -> Tensor:
    """Mean over levels of a distance between teacher and student feature maps.

    ``'norm_mse'`` divides each level's MSE by the teacher's mean square, so levels of
    different magnitude count alike.
    """
    if kind not in FEATURE_KD_KINDS:
        raise ValueError(f'Unknown feature KD kind {kind!r}; use one of {FEATURE_KD_KINDS}.')
    if isinstance(teacher_feats, Tensor):
        teacher_feats, student_feats = [teacher_feats], [student_feats]
    if len(teacher_feats) != len(student_feats):
        raise ValueError(f'{len(teacher_feats)} teacher vs {len(student_feats)} student '
                         'feature levels')
    losses = []
    for t, s in zip(teacher_feats, student_feats):
        t = t.detach().float()
        s = s.float()
        if kind == 'l1':
            losses.append(F.l1_loss(s, t))
        else:
            mse = F.mse_loss(s, t)
            if kind == 'norm_mse':
                mse = mse / t.pow(2).mean().clamp_min(1e-6)
            losses.append(mse)
    return torch.stack(losses).mean()


def kl_div_with_temperature(teacher_logits: Tensor, student_logits: Tensor,
                            temperature: float = 1.0, dim: int = 1) -> Tensor:
    """``T² · KL(softmax(t/T) || softmax(s/T))`` summed over ``dim``, averaged elsewhere.

    For segmentation logits ``(B, C, H, W)`` with ``dim=1`` this is the per-pixel KL averaged
    over pixels; for RoI logits ``(n, C+1)`` with ``dim=1`` the per-RoI KL averaged over RoIs.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f'logit shapes differ: {tuple(teacher_logits.shape)} vs '
                         f'{tuple(student_logits.shape)}')
    if teacher_logits.numel() == 0:
        return student_logits.sum() * 0.0
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    p_t = F.softmax(t, dim=dim)
    kl = (p_t * (F.log_softmax(t, dim=dim) - F.log_softmax(s, dim=dim))).sum(dim=dim)
    return kl.mean() * temperature ** 2


def sigmoid_kd_loss(teacher_logits: Tensor, student_logits: Tensor,
                    temperature: float = 1.0, weight: Optional[Tensor] = None) -> Tensor:
    """Binary cross-entropy of the student against the teacher's sigmoid probabilities
    minus the teacher's own entropy (so it is 0 when the logits agree), times ``T²``."""
    if teacher_logits.numel() == 0:
        return student_logits.sum() * 0.0
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    target = torch.sigmoid(t)
    loss = (F.binary_cross_entropy_with_logits(s, target, reduction='none') -
            F.binary_cross_entropy_with_logits(t, target, reduction='none'))
    return _weighted_mean(loss, weight) * temperature ** 2


def weighted_regression_kd(teacher: Tensor, student: Tensor, weight: Optional[Tensor] = None,
                           kind: str = 'smooth_l1', beta: float = 1.0) -> Tensor:
    """Distance between regression outputs (box deltas), optionally weighted per element
    (broadcast), e.g. by the teacher's foreground probability."""
    if teacher.numel() == 0:
        return student.sum() * 0.0
    t = teacher.detach().float()
    s = student.float()
    if kind == 'smooth_l1':
        loss = F.smooth_l1_loss(s, t, reduction='none', beta=beta)
    elif kind == 'mse':
        loss = F.mse_loss(s, t, reduction='none')
    elif kind == 'l1':
        loss = F.l1_loss(s, t, reduction='none')
    else:
        raise ValueError(f"Unknown regression KD kind {kind!r}; use 'smooth_l1', 'mse' "
                         "or 'l1'.")
    return _weighted_mean(loss, weight)


def _weighted_mean(loss: Tensor, weight: Optional[Tensor]) -> Tensor:
    if weight is None:
        return loss.mean()
    weight = weight.detach().float().expand_as(loss)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-6)


def rpn_kd_loss(teacher_cls: Sequence[Tensor], teacher_reg: Sequence[Tensor],
                student_cls: Sequence[Tensor], student_reg: Sequence[Tensor],
                temperature: float = 1.0, reg_kind: str = 'smooth_l1'):
    """RPN objectness (sigmoid KD) and anchor deltas (weighted by the teacher's objectness).

    Inputs are the per-level outputs of ``RPNHead.forward``: ``(B, A, H, W)`` objectness
    logits (sigmoid RPN) and ``(B, 4A, H, W)`` deltas. Returns ``(loss_cls, loss_reg)``.
    """
    cls_losses, reg_losses = [], []
    for t_c, t_r, s_c, s_r in zip(teacher_cls, teacher_reg, student_cls, student_reg):
        num_anchors = t_r.shape[1] // 4
        if t_c.shape[1] == num_anchors:  # sigmoid objectness
            cls_losses.append(sigmoid_kd_loss(t_c, s_c, temperature))
            obj = torch.sigmoid(t_c.detach().float())
        else:  # softmax objectness, (B, 2A, H, W): pairs (bg, fg) per anchor
            b, _, h, w = t_c.shape
            t2 = t_c.reshape(b, num_anchors, -1, h, w)
            s2 = s_c.reshape(b, num_anchors, -1, h, w)
            cls_losses.append(kl_div_with_temperature(t2, s2, temperature, dim=2))
            obj = F.softmax(t2.detach().float(), dim=2)[:, :, 0]
        b, _, h, w = t_r.shape
        weight = obj.reshape(b, num_anchors, 1, h, w)
        reg_losses.append(weighted_regression_kd(
            t_r.reshape(b, num_anchors, 4, h, w), s_r.reshape(b, num_anchors, 4, h, w),
            weight, kind=reg_kind))
    return torch.stack(cls_losses).mean(), torch.stack(reg_losses).mean()


def roi_bbox_kd_loss(teacher_cls: Tensor, teacher_reg: Tensor, student_cls: Tensor,
                     student_reg: Tensor, temperature: float = 1.0,
                     reg_kind: str = 'smooth_l1'):
    """RoI head KD on shared RoIs: class logits ``(n, C+1)`` (softmax, background last, as in
    mmdet) by KL with temperature; box deltas ``(n, 4C)`` or ``(n, 4)`` weighted by the
    teacher's foreground probability. Returns ``(loss_cls, loss_reg)``."""
    loss_cls = kl_div_with_temperature(teacher_cls, student_cls, temperature, dim=1)
    if teacher_reg is None:
        return loss_cls, student_cls.sum() * 0.0
    fg = 1.0 - F.softmax(teacher_cls.detach().float(), dim=1)[:, -1:]
    loss_reg = weighted_regression_kd(teacher_reg, student_reg, fg, kind=reg_kind)
    return loss_cls, loss_reg


def roi_mask_kd_loss(teacher_masks: Tensor, student_masks: Tensor,
                     labels: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """Mask-logit KD ``(n, C, M, M)``: per-pixel sigmoid KD on the channel of each RoI's
    (teacher-predicted) class ``labels``; class-agnostic masks use channel 0."""
    if teacher_masks.numel() == 0:
        return student_masks.sum() * 0.0
    if teacher_masks.shape[1] > 1:
        if labels is None:
            raise ValueError('class-specific mask logits need the RoI labels')
        idx = torch.arange(teacher_masks.shape[0], device=teacher_masks.device)
        teacher_masks = teacher_masks[idx, labels]
        student_masks = student_masks[idx, labels]
    return sigmoid_kd_loss(teacher_masks, student_masks, temperature)
