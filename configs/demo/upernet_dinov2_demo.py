# Real-backbone demo teacher: UperNet on a FROZEN pretrained DINOv2 ViT-S/14
# (mimiq_mm.models.DINOv2Pyramid), the heads of configs/demo/upernet_swin_demo.py trained on
# the procedural ADE20K-format demo set. See configs/demo/maskrcnn_dinov2_demo.py for why.
#
#   python tools/train.py configs/demo/upernet_dinov2_demo.py --work-dir work_dirs/dinov2_seg
#   python tools/publish_checkpoint.py work_dirs/dinov2_seg/iter_1500.pth \
#       checkpoints/dinov2/upernet_dinov2_demo.pth
_base_ = ['./upernet_swin_demo.py']
custom_imports = dict(imports=['mimiq_mm.models'], allow_failed_imports=False)

crop_size = (224, 224)
vit_dims = 384
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(_delete_=True, type='DINOv2Pyramid', pretrained='dinov2_vits14_imgfocus',
                  out_indices=(2, 5, 8, 11), out_strides=(4, 8, 16, 32), frozen=True),
    decode_head=dict(in_channels=[vit_dims] * 4),
    auxiliary_head=dict(in_channels=vit_dims))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 1500
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=100, end=max_iters)
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
