# Demo teacher: UperNet with a scaled-down Swin backbone, trained from scratch on the
# procedural ADE20K-format set that `python tools/make_demo_data.py --out data/demo` writes
# (256x256 images; 6 texture "stuff" + 6 shape "thing" classes; label 0 = other, ignored
# via reduce_zero_label as in ADE20K; see mimiq_mm/datasets/demo_data.py).
#
# mmseg's ADE20KDataset only accepts a subset of its own 150 class names, so the data sets
# here are mmseg's BaseSegDataset (the class ADE20KDataset derives from) with the ADE20K
# suffixes and reduce_zero_label=True, and the demo classes as metainfo.
#
# Sizes: Swin embed 48, depths (2,2,2,2), heads (2,4,8,16) (head dim 24), window 8,
# UperNet/FCN channels 64, BN instead of SyncBN. Nothing is downloaded.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']

data_root = 'data/demo/ade'
# Must match mimiq_mm.datasets.demo_data.ADE_CLASSES / ADE_PALETTE (tested).
metainfo = dict(
    classes=('gradient', 'stripes', 'checker', 'dots', 'waves', 'grain',
             'disc', 'square', 'triangle', 'ring', 'star', 'cross'),
    palette=[(120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
             (120, 120, 80), (220, 20, 60), (0, 128, 255), (255, 170, 0), (0, 200, 120),
             (160, 60, 220), (250, 250, 60)])
num_classes = 12
crop_size = (256, 256)
embed_dims = 48
head_channels = 64
norm_cfg = dict(type='BN', requires_grad=True)
checkpoint_file = None  # upstream: ImageNet Swin-T weights (a URL); nothing is downloaded

data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        init_cfg=None,
        pretrain_img_size=crop_size[0],
        embed_dims=embed_dims,
        depths=[2, 2, 2, 2],
        num_heads=[2, 4, 8, 16],
        window_size=8,
        drop_path_rate=0.1),
    decode_head=dict(
        in_channels=[embed_dims, embed_dims * 2, embed_dims * 4, embed_dims * 8],
        channels=head_channels,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        loss_decode=dict(avg_non_ignore=True)),
    auxiliary_head=dict(
        in_channels=embed_dims * 4,
        channels=head_channels,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        loss_decode=dict(avg_non_ignore=True)))

dataset_type = 'BaseSegDataset'
dataset_kwargs = dict(
    type=dataset_type,
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)
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
train_dataloader = dict(
    batch_size=16,
    num_workers=8,
    persistent_workers=True,
    dataset=dict(
        **dataset_kwargs,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    dataset=dict(
        **dataset_kwargs,
        data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# Short schedule: 2000 iterations of batch 16 (32 passes over 1000 images) on one GPU.
max_iters = 2000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=200, end=max_iters)
]
optim_wrapper = dict(optimizer=dict(lr=2e-4, weight_decay=0.01))

# The teacher checkpoint holds the weights only (no optimizer state): about 4 bytes/param.
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1, save_last=True, save_optimizer=False,
                    save_param_scheduler=False))
randomness = dict(seed=0)
