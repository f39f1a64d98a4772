# Upper-bound baseline: real COCO images (resized + centre-cropped) in the same folder layout.
# The teacher is only used to report its inter-head SSIM on them.
_base_ = ['./mimiq_maskrcnn_swin-t_coco.py']

synthesis = dict(method='real', real_root='data/coco/train2017', iterations=0)
