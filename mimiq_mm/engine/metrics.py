"""Evaluate the float teacher side by side with the quantized student."""
import copy
from typing import Any, Optional, Sequence

import torch
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS as MMENGINE_METRICS

from mimiq_mm.registry import METRICS

TEACHER_PREFIX = 'teacher_'


@METRICS.register_module()
class TeacherMetric(BaseMetric):
    """Wrap any metric so that it scores the teacher's predictions.

    ``MimiQDistiller(eval_teacher=True)`` stores the teacher's results as
    ``teacher_pred_instances`` / ``teacher_pred_sem_seg`` ...; this metric renames them to the
    usual keys and forwards to the wrapped metric, whose results are reported under
    ``prefix`` (default ``'teacher/<inner prefix>'``).

    Example::

        test_evaluator = [dict(type='CocoMetric', ...),
                          dict(type='mimiq_mm.TeacherMetric',
                               metric=dict(type='CocoMetric', ...))]
    """

    def __init__(self, metric: dict, prefix: Optional[str] = None,
                 collect_device: str = 'cpu'):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.metric = MMENGINE_METRICS.build(copy.deepcopy(metric)) \
            if isinstance(metric, dict) else metric
        inner = getattr(self.metric, 'prefix', None) or getattr(
            self.metric, 'default_prefix', None)
        self.metric.prefix = prefix or (f'teacher/{inner}' if inner else 'teacher')

    @property
    def dataset_meta(self):
        return self.metric.dataset_meta

    @dataset_meta.setter
    def dataset_meta(self, meta) -> None:
        self.metric.dataset_meta = meta

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        remapped = []
        for sample in data_samples:
            keys = [k for k in sample if k.startswith(TEACHER_PREFIX)]
            if not keys:
                raise KeyError('TeacherMetric found no teacher predictions: set '
                               'model.eval_teacher=True (tools/test.py --eval-teacher).')
            new = {k: v for k, v in sample.items() if not k.startswith(TEACHER_PREFIX)}
            for k in keys:
                new[k[len(TEACHER_PREFIX):]] = sample[k]
            remapped.append(new)
        self.metric.process(data_batch, remapped)

    def compute_metrics(self, results: list) -> dict:  # pragma: no cover - not used
        return self.metric.compute_metrics(results)

    def evaluate(self, size: int) -> dict:
        return self.metric.evaluate(size)


class TeacherAgreement:
    """How closely the student's task predictions follow the teacher's on the same images
    (no labels needed: a data-free check on held-out synthetic images).

    * detection (``pred_instances``): box AP at IoU 0.5 of the student's detections, scored
      against the teacher's detections with score >= ``score_thr`` as the ground truth
      (per class, all-point interpolated precision, averaged over the classes the teacher
      found);
    * segmentation (``pred_sem_seg``): mean IoU of the student's label map against the
      teacher's, over the classes present in either.

    ``add(teacher_samples, student_samples)`` per batch, then ``compute()``: a value in
    [0, 1], or None when the teacher found nothing to agree on.
    """

    def __init__(self, score_thr: float = 0.3, iou_thr: float = 0.5):
        self.score_thr, self.iou_thr = float(score_thr), float(iou_thr)
        self.kind: Optional[str] = None
        self._dets = {}      # class -> list of (score, is_true_positive)
        self._gts = {}       # class -> number of teacher boxes
        self._inter, self._union = {}, {}

    def add(self, teacher_samples: Sequence, student_samples: Sequence) -> None:
        for t, s in zip(teacher_samples, student_samples):
            if 'pred_instances' in t and 'pred_instances' in s:
                self.kind = 'det'
                self._add_det(t.pred_instances, s.pred_instances)
            elif 'pred_sem_seg' in t and 'pred_sem_seg' in s:
                self.kind = 'seg'
                self._add_seg(t.pred_sem_seg.data, s.pred_sem_seg.data)
            else:
                raise ValueError('TeacherAgreement needs pred_instances (detection) or '
                                 'pred_sem_seg (segmentation) in both predictions')

    def _add_det(self, t, s) -> None:
        from torchvision.ops import box_iou
        keep = t.scores >= self.score_thr
        t_boxes, t_labels = t.bboxes[keep].float().cpu(), t.labels[keep].cpu()
        s_boxes, s_scores = s.bboxes.float().cpu(), s.scores.float().cpu()
        s_labels = s.labels.cpu()
        for c in torch.unique(torch.cat([t_labels, s_labels])).tolist():
            gt = t_boxes[t_labels == c]
            self._gts[c] = self._gts.get(c, 0) + len(gt)
            sel = s_labels == c
            boxes, scores = s_boxes[sel], s_scores[sel]
            order = torch.argsort(scores, descending=True)
            boxes, scores = boxes[order], scores[order]
            taken = torch.zeros(len(gt), dtype=torch.bool)
            ious = box_iou(boxes, gt) if len(gt) and len(boxes) else None
            for i in range(len(boxes)):
                hit = False
                if ious is not None:
                    cand = ious[i].masked_fill(taken, -1.0)
                    j = int(torch.argmax(cand))
                    if float(cand[j]) >= self.iou_thr:
                        taken[j] = hit = True
                self._dets.setdefault(c, []).append((float(scores[i]), hit))

    def _add_seg(self, t, s) -> None:
        t, s = t.reshape(-1).cpu(), s.reshape(-1).cpu()
        for c in torch.unique(torch.cat([t, s])).tolist():
            tc, sc = t == c, s == c
            self._inter[c] = self._inter.get(c, 0) + int((tc & sc).sum())
            self._union[c] = self._union.get(c, 0) + int((tc | sc).sum())

    def compute(self) -> Optional[float]:
        if self.kind == 'seg':
            ious = [self._inter[c] / u for c, u in self._union.items() if u > 0]
            return sum(ious) / len(ious) if ious else None
        aps = []
        for c, num_gt in self._gts.items():
            if num_gt == 0:
                continue
            dets = sorted(self._dets.get(c, []), key=lambda d: -d[0])
            tp = fp = 0
            recall, precision = [0.0], [1.0]
            for _, hit in dets:
                tp, fp = tp + hit, fp + (not hit)
                recall.append(tp / num_gt)
                precision.append(tp / (tp + fp))
            # all-point interpolation: precision made monotone from the right
            for i in range(len(precision) - 2, -1, -1):
                precision[i] = max(precision[i], precision[i + 1])
            aps.append(sum((recall[i + 1] - recall[i]) * precision[i + 1]
                           for i in range(len(recall) - 1)))
        return sum(aps) / len(aps) if aps else None

    def describe(self) -> str:
        if self.kind == 'seg':
            return 'mIoU of the student label map against the teacher\'s'
        return (f'box AP@{self.iou_thr:g} against the teacher\'s detections with score >= '
                f'{self.score_thr:g}')
