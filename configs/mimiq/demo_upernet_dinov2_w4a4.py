# MimiQ data-free W4/A4 on the real-backbone demo segmentor: UperNet on a frozen pretrained
# DINOv2 ViT-S/14 (configs/demo/upernet_dinov2_demo.py). Everything but the teacher and the
# image size comes from configs/mimiq/demo_upernet_swin_w4a4.py (the same recipe).
#
#   python tools/demo.py --task seg_dinov2
#   python tools/train.py configs/mimiq/demo_upernet_dinov2_w4a4.py
_base_ = ['./demo_upernet_swin_w4a4.py']

teacher_checkpoint = 'checkpoints/dinov2/upernet_dinov2_demo.pth'
crop_size = (224, 224)
model = dict(
    teacher=dict(
        data_preprocessor=dict(size=crop_size),
        backbone=dict(_delete_=True, type='DINOv2Pyramid', pretrained=None,
                      out_indices=(2, 5, 8, 11), out_strides=(4, 8, 16, 32), frozen=True),
        decode_head=dict(in_channels=[384] * 4),
        auxiliary_head=dict(in_channels=384)),
    teacher_checkpoint=teacher_checkpoint)

synthetic_root = 'work_dirs/demo/seg_dinov2/synthetic_mimiq'
synthesis = dict(image_size=crop_size)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(dataset=dict(data_root=synthetic_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
