# Baseline: clamped N(0, 1) noise in the teacher's normalised input space (no optimisation).
_base_ = ['./mimiq_maskrcnn_swin-t_coco.py']

synthesis = dict(method='gaussian', iterations=0)
