# Real-backbone demo teacher: Mask R-CNN on a FROZEN pretrained DINOv2 ViT-S/14
# (mimiq_mm.models.DINOv2Pyramid: blocks 2/5/8/11 -> stride 4/8/16/32 maps), the neck and
# heads of configs/demo/maskrcnn_swin_demo.py trained on the procedural demo COCO set. The
# backbone keeps the pretrained model's statistics (LayerNorm-output outlier channels,
# heavy-tailed GELU outputs, peaky softmax rows), which the demo Swins trained from scratch
# lack. Its weights come from `make setup` (mimiq_mm.models.pretrained); nothing is
# downloaded here.
#
#   python tools/make_demo_data.py --out data/demo
#   python tools/train.py configs/demo/maskrcnn_dinov2_demo.py --work-dir work_dirs/dinov2_det
#   python tools/publish_checkpoint.py work_dirs/dinov2_det/epoch_12.pth \
#       checkpoints/dinov2/maskrcnn_dinov2_demo.pth      # ships neck + heads only
_base_ = ['./maskrcnn_swin_demo.py']
custom_imports = dict(imports=['mimiq_mm.models'], allow_failed_imports=False)

# 224 = 16 patches of 14 = 7 x 32: the ViT's pretraining size, and every pyramid level
# divides it (the demo images are 256 px).
img_scale = (224, 224)
vit_dims = 384
model = dict(
    backbone=dict(_delete_=True, type='DINOv2Pyramid', pretrained='dinov2_vits14_imgfocus',
                  out_indices=(2, 5, 8, 11), out_strides=(4, 8, 16, 32), frozen=True),
    neck=dict(in_channels=[vit_dims] * 4))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.8, 1.25), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', T_max=max_epochs, eta_min_ratio=0.01, by_epoch=True,
         begin=0, end=max_epochs, convert_to_iter_based=True)
]
default_hooks = dict(checkpoint=dict(interval=max_epochs))
