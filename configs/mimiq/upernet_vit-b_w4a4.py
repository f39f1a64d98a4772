# MimiQ data-free W4/A4 fine-tuning of UperNet ViT-B/16 (+MLN neck, ADE20K 512x512, 80k).
#   python tools/train.py configs/mimiq/upernet_vit-b_w4a4.py \
#       --cfg-options teacher_checkpoint=checkpoints/upernet_vit-b_ade20k.pth
_base_ = ['mmseg::vit/vit_vit-b16_mln_upernet_8xb2-80k_ade20k-512x512.py']
custom_imports = dict(
    imports=['mimiq_mm', 'mimiq_mm.models', 'mimiq_mm.engine', 'mimiq_mm.datasets'],
    allow_failed_imports=False)

teacher_checkpoint = None  # REQUIRED: float checkpoint of the base config's model
quant_cfg = dict(
    weight=dict(bits=4), act=dict(bits=4), attn_prob=dict(bits=4), scope='backbone')

# offline-safe
_base_.model.pretrained = None
_base_.model.backbone.init_cfg = None

model = dict(
    _delete_=True,
    type='mimiq_mm.MimiQDistiller',
    teacher=_base_.model,
    teacher_checkpoint=teacher_checkpoint,
    quant_cfg=quant_cfg,
    gamma=10.0,
    hsad_kind='ssim',
    kd_weight=1.0,
    kd_weights=dict(feat=1.0, seg=1.0, seg_aux=0.4),
    temperature=1.0,
    feat_source='backbone',
    feat_kind='norm_mse')

synthetic_root = 'data/mimiq_synthetic/upernet_vit-b'
synthesis = dict(method='mimiq', num_images=10000, batch_size=16, iterations=2000,
                 image_size=(512, 512), seed=0, task_loss='none')
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    _delete_=True,
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='mimiq_mm.SyntheticImageDataset', data_root=synthetic_root,
                 pipeline=train_pipeline))
# val/test: the base ADE20K validation set (IoUMetric mIoU) on the student

max_iters = 5000
train_cfg = dict(_delete_=True, type='mimiq_mm.MimiQIterBasedTrainLoop',
                 max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0),
    paramwise_cfg=dict(custom_keys={'.step': dict(lr_mult=10.0, decay_mult=0.0)}),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=200, end=max_iters, eta_min=0.0),
]
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000,
                    max_keep_ckpts=3),
    logger=dict(type='LoggerHook', interval=50))
log_processor = dict(by_epoch=False)
custom_hooks = [
    dict(type='mimiq_mm.MimiQSynthesisHook'),
    dict(type='mimiq_mm.MimiQCalibrationHook', num_batches=32),
    # fine-tuning is kept only if it lowers the distillation loss on images it never saw
    dict(type='mimiq_mm.MimiQKeepBestHook', holdout_images=64),
]
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True)
