# Ablation of mimiq_maskrcnn_swin-t_coco.py: add the label-free task term through the
# detector's own heads (RPN objectness of its top-k anchors + RoI-head class confidence on
# its own top-k proposals). Compare against task_loss='none' at the same seed.
_base_ = ['./mimiq_maskrcnn_swin-t_coco.py']

synthesis = dict(task_loss='task', w_task=1.0, task_topk=100)
