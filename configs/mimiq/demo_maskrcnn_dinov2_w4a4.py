# MimiQ data-free W4/A4 on the real-backbone demo detector: Mask R-CNN on a frozen pretrained
# DINOv2 ViT-S/14 (configs/demo/maskrcnn_dinov2_demo.py). Everything but the teacher and the
# image size comes from configs/mimiq/demo_maskrcnn_swin_w4a4.py (the same recipe).
#
#   make setup      # converts the pretrained backbone once (nothing is downloaded later)
#   python tools/demo.py --task det_dinov2
#   python tools/train.py configs/mimiq/demo_maskrcnn_dinov2_w4a4.py
_base_ = ['./demo_maskrcnn_swin_w4a4.py']

teacher_checkpoint = 'checkpoints/dinov2/maskrcnn_dinov2_demo.pth'
img_scale = (224, 224)
model = dict(
    teacher=dict(
        backbone=dict(_delete_=True, type='DINOv2Pyramid', pretrained=None,
                      out_indices=(2, 5, 8, 11), out_strides=(4, 8, 16, 32), frozen=True),
        neck=dict(in_channels=[384] * 4)),
    teacher_checkpoint=teacher_checkpoint)

synthetic_root = 'work_dirs/demo/det_dinov2/synthetic_mimiq'
synthesis = dict(image_size=img_scale)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip',
                    'flip_direction')),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(dataset=dict(data_root=synthetic_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
