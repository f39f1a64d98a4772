# Demo teacher: Mask R-CNN with a scaled-down Swin backbone, trained from scratch on the
# procedural COCO-format set that `python tools/make_demo_data.py --out data/demo` writes
# (256x256 images, 7 shape classes; see mimiq_mm/datasets/demo_data.py).
#
#   python tools/make_demo_data.py --out data/demo
#   then train with mmengine's Runner.from_cfg(Config.fromfile(<this file>)).train()
#
# Sizes: Swin embed 48, depths (2,2,2,2), heads (2,4,8,16) (head dim 24), window 8 (the
# 64/32/16/8-token feature maps of a 256 px image are whole windows), FPN/RoI channels 64.
# Nothing is downloaded: no pretrained weights, every init_cfg is None.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']

data_root = 'data/demo/coco/'
# Must match mimiq_mm.datasets.demo_data.COCO_CLASSES / COCO_PALETTE (tested).
metainfo = dict(
    classes=('disc', 'square', 'triangle', 'ring', 'star', 'cross', 'ellipse'),
    palette=[(220, 20, 60), (0, 128, 255), (255, 170, 0), (0, 200, 120), (160, 60, 220),
             (250, 250, 60), (90, 200, 250)])
num_classes = 7
img_scale = (256, 256)
embed_dims = 48
neck_channels = 64
pretrained = None  # upstream: ImageNet Swin-T weights (a URL); nothing is downloaded

model = dict(
    backbone=dict(
        embed_dims=embed_dims,
        depths=[2, 2, 2, 2],
        num_heads=[2, 4, 8, 16],
        window_size=8,
        drop_path_rate=0.1,
        convert_weights=False,
        init_cfg=None),
    neck=dict(
        in_channels=[embed_dims, embed_dims * 2, embed_dims * 4, embed_dims * 8],
        out_channels=neck_channels),
    rpn_head=dict(
        in_channels=neck_channels,
        feat_channels=neck_channels,
        # Objects are ~12-150 px (COCO's are ~3-4x larger): anchors 16..256 px.
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=neck_channels),
        bbox_head=dict(in_channels=neck_channels, fc_out_channels=128,
                       num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=neck_channels),
        mask_head=dict(in_channels=neck_channels, conv_out_channels=neck_channels,
                       num_classes=num_classes)))

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
train_dataloader = dict(
    batch_size=16,
    num_workers=8,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# Short schedule: 20 epochs x 63 iterations (1000 images, batch 16) on one GPU.
max_epochs = 20
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='CosineAnnealingLR', T_max=max_epochs, eta_min_ratio=0.01, by_epoch=True,
         begin=0, end=max_epochs, convert_to_iter_based=True)
]
optim_wrapper = dict(optimizer=dict(lr=2e-4, weight_decay=0.05), clip_grad=dict(max_norm=10.0))

# The teacher checkpoint holds the weights only (no optimizer state): about 4 bytes/param.
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=1, save_last=True,
                    save_optimizer=False, save_param_scheduler=False))
log_processor = dict(window_size=20)
randomness = dict(seed=0)
