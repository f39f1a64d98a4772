"""Head-wise structural attention distillation (HSAD, MIMIQ.md §3).

For every attention layer the per-head attention output ``O_h = softmax(A_h) V_h``
(``B' x H x N x d``; ``B'`` = batch x windows for Swin, so windows are compared separately) of
the quantized student is matched to the float teacher's. For each (sample, head, channel) the
two maps over the ``N`` token positions are compared with the contrast-structure term of SSIM

    cs = (2 σ_ts + C2) / (σ_t² + σ_s² + C2)

and ``L_HSAD = 1 - mean(cs)`` (mean over channels, heads, samples, then layers).
"""
from typing import Dict, List, Sequence

import torch
from torch import Tensor

HSAD_KINDS = ('ssim', 'mse', 'l1')
DEFAULT_C2 = 0.03 ** 2


def contrast_structure(teacher: Tensor, student: Tensor, dim: int = -2,
                       c2: float = DEFAULT_C2) -> Tensor:
    """SSIM's contrast-structure term between two tensors along ``dim`` (the token axis).

    Returns a tensor with ``dim`` reduced. Statistics are population statistics (divide by N).
    """
    if teacher.shape != student.shape:
        raise ValueError(f'teacher and student attention outputs differ in shape: '
                         f'{tuple(teacher.shape)} vs {tuple(student.shape)}')
    t = teacher.float()
    s = student.float()
    t_c = t - t.mean(dim=dim, keepdim=True)
    s_c = s - s.mean(dim=dim, keepdim=True)
    var_t = t_c.pow(2).mean(dim=dim)
    var_s = s_c.pow(2).mean(dim=dim)
    cov = (t_c * s_c).mean(dim=dim)
    return (2 * cov + c2) / (var_t + var_s + c2)


def hsad_layer_loss(teacher_out: Tensor, student_out: Tensor, kind: str = 'ssim',
                    num_prefix_tokens: int = 0, c2: float = DEFAULT_C2) -> Tensor:
    """HSAD of one attention layer; inputs ``(B', H, N, d)`` attention outputs per head."""
    if kind not in HSAD_KINDS:
        raise ValueError(f'Unknown HSAD kind {kind!r}; use one of {HSAD_KINDS}.')
    if teacher_out.dim() != 4:
        raise ValueError('HSAD expects per-head attention outputs of shape (B, H, N, d), '
                         f'got {tuple(teacher_out.shape)}')
    if num_prefix_tokens:
        teacher_out = teacher_out[:, :, num_prefix_tokens:]
        student_out = student_out[:, :, num_prefix_tokens:]
    teacher_out = teacher_out.detach()
    if kind == 'ssim':
        return 1.0 - contrast_structure(teacher_out, student_out, dim=2, c2=c2).mean()
    if kind == 'mse':
        return torch.nn.functional.mse_loss(student_out.float(), teacher_out.float())
    return torch.nn.functional.l1_loss(student_out.float(), teacher_out.float())


def _group(records: Sequence) -> Dict[str, List]:
    grouped: Dict[str, List] = {}
    for rec in records:
        grouped.setdefault(rec.name, []).append(rec)
    return grouped


def hsad_loss(teacher_records: Sequence, student_records: Sequence, kind: str = 'ssim',
              c2: float = DEFAULT_C2) -> Tensor:
    """L_HSAD over all recorded attention calls.

    Args:
        teacher_records / student_records: ``AttentionRecord`` lists (see
            ``mimiq_mm.attention``) of the teacher and the student for the same input.
            They are paired by module name and call order; the student is a copy of the
            teacher, so the names agree.
        kind: ``'ssim'`` (contrast-structure, the method), ``'mse'`` or ``'l1'``.
        c2: SSIM constant.

    Returns:
        Scalar: mean over layers (and calls) of the per-layer loss.
    """
    if kind not in HSAD_KINDS:
        raise ValueError(f'Unknown HSAD kind {kind!r}; use one of {HSAD_KINDS}.')
    t_by = _group(teacher_records)
    s_by = _group(student_records)
    if set(t_by) != set(s_by):
        missing = sorted(set(t_by) ^ set(s_by))
        raise ValueError('Teacher and student recorded different attention layers; '
                         f'unmatched: {missing[:8]}')
    if not t_by:
        raise ValueError('No attention records: HSAD needs adapted attention modules '
                         '(mimiq_mm.attention.adapt_attention_) and an active recorder.')
    losses = []
    for name, t_recs in t_by.items():
        s_recs = s_by[name]
        if len(t_recs) != len(s_recs):
            raise ValueError(f'{name}: teacher recorded {len(t_recs)} calls, student '
                             f'{len(s_recs)}')
        for t_rec, s_rec in zip(t_recs, s_recs):
            losses.append(hsad_layer_loss(t_rec.output, s_rec.output, kind=kind,
                                          num_prefix_tokens=t_rec.num_prefix_tokens, c2=c2))
    return torch.stack(losses).mean()
