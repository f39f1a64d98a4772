"""Evaluate the float teacher side by side with the quantized student."""
import copy
from typing import Any, Optional, Sequence

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
