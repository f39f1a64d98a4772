# MimiQ data-free W4/A4 fine-tuning of Mask R-CNN Swin-S.
# The teacher is mmdet's `mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py`
# model, which upstream defines as the Swin-T Mask R-CNN with depths (2, 2, 18, 2): the
# same delta is applied here on top of the Swin-T MimiQ recipe.
#   python tools/train.py configs/mimiq/maskrcnn_swin-s_w4a4.py \
#       --cfg-options teacher_checkpoint=checkpoints/mask_rcnn_swin-s_3x_coco.pth
_base_ = ['./maskrcnn_swin_w4a4.py']

model = dict(teacher=dict(backbone=dict(depths=[2, 2, 18, 2])))

synthetic_root = 'data/mimiq_synthetic/maskrcnn_swin-s'
train_dataloader = dict(dataset=dict(data_root=synthetic_root))
