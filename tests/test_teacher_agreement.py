"""TeacherAgreement: the data-free check of a student's task predictions against the
teacher's own (MimiQKeepBestHook records it on held-out synthetic images)."""
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData, PixelData
from mmseg.structures import SegDataSample

from mimiq_mm.engine.metrics import TeacherAgreement


def _det(boxes, scores, labels):
    sample = DetDataSample()
    sample.pred_instances = InstanceData(bboxes=torch.tensor(boxes, dtype=torch.float32),
                                         scores=torch.tensor(scores),
                                         labels=torch.tensor(labels))
    return sample


def _seg(labels):
    sample = SegDataSample()
    sample.pred_sem_seg = PixelData(data=torch.tensor(labels).unsqueeze(0))
    return sample


TEACHER = _det([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [0.9, 0.8, 0.1],
               [0, 1, 1])


def test_detection_agreement_is_ap50_against_the_confident_teacher_boxes():
    same = TeacherAgreement()
    same.add([TEACHER], [TEACHER])
    # the teacher's 0.1 box is no ground truth; as the student's it is a false positive
    # ranked last, after both hits: AP stays 1
    assert same.compute() == pytest.approx(1.0)
    assert same.kind == 'det' and 'score >= 0.3' in same.describe()
    # one class found, the other box moved off (IoU < 0.5): class 0 AP 1, class 1 AP 0
    half = TeacherAgreement()
    half.add([TEACHER], [_det([[0, 0, 10, 10], [30, 30, 50, 50]], [0.9, 0.8], [0, 1])])
    assert half.compute() == pytest.approx(0.5)
    # a false positive ranked above the hit halves that class's precision at the hit
    fp_first = TeacherAgreement()
    fp_first.add([_det([[0, 0, 10, 10]], [0.9], [0])],
                 [_det([[70, 70, 80, 80], [0, 0, 10, 10]], [0.95, 0.5], [0, 0])])
    assert fp_first.compute() == pytest.approx(0.5)
    # nothing confident from the teacher: no value (the loss decides)
    empty = TeacherAgreement()
    empty.add([_det([[0, 0, 5, 5]], [0.05], [0])], [_det([[0, 0, 5, 5]], [0.9], [0])])
    assert empty.compute() is None


def test_segmentation_agreement_is_miou_against_the_teacher_label_map():
    teacher = [[0, 0, 1, 1], [0, 0, 1, 1]]
    same = TeacherAgreement()
    same.add([_seg(teacher)], [_seg(teacher)])
    assert same.compute() == pytest.approx(1.0) and same.kind == 'seg'
    other = TeacherAgreement()
    other.add([_seg(teacher)], [_seg([[0, 0, 0, 1], [0, 0, 1, 1]])])
    # class 0: 4 / 5, class 1: 3 / 4
    assert other.compute() == pytest.approx((4 / 5 + 3 / 4) / 2)
    with pytest.raises(ValueError, match='pred_instances .* or pred_sem_seg'):
        TeacherAgreement().add([_seg(teacher)], [TEACHER])


def test_keep_best_decides_by_the_loss_or_by_the_agreement():
    from mimiq_mm.engine.hooks import MimiQKeepBestHook, keep_calibrated
    # the loss: fine-tuning that raised it is undone
    assert keep_calibrated('loss', 0.5, 0.6, 0.8, 0.9) == (True, 'loss')
    assert keep_calibrated('loss', 0.5, 0.4, 0.8, 0.1) == (False, 'loss')
    # the agreement overrides the loss when both students have one
    assert keep_calibrated('agreement', 0.5, 0.4, 0.8, 0.7) == (True, 'agreement')
    assert keep_calibrated('agreement', 0.5, 0.6, 0.7, 0.8) == (False, 'agreement')
    # the teacher predicted nothing on the held-out images: the loss decides
    assert keep_calibrated('agreement', 0.5, 0.6, None, None) == (True, 'loss')
    with pytest.raises(ValueError, match="criterion='accuracy' is not valid"):
        MimiQKeepBestHook(criterion='accuracy')
