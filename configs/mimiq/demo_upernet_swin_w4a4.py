# MimiQ data-free W4/A4 on the demo segmentation teacher: UperNet with the scaled-down Swin
# backbone of configs/demo/upernet_swin_demo.py (256x256 procedural ADE20K-format data).
# CPU-sized, like configs/mimiq/demo_maskrcnn_swin_w4a4.py.
#
#   python tools/demo.py --task seg                      # float / PTQ / MimiQ, mIoU
#   python tools/train.py configs/mimiq/demo_upernet_swin_w4a4.py \
#       --cfg-options teacher_checkpoint=checkpoints/demo/upernet_swin_demo.pth
_base_ = ['../demo/upernet_swin_demo.py']
custom_imports = dict(
    imports=['mimiq_mm', 'mimiq_mm.models', 'mimiq_mm.engine', 'mimiq_mm.datasets'],
    allow_failed_imports=False)

# ---- what to quantize and from which float model ------------------------------------
teacher_checkpoint = 'checkpoints/demo/upernet_swin_demo.pth'
# The one default recipe of mimiq_mm.quant.QuantConfig (rotated inputs, dynamic per-token
# activation steps, MSE weight ranges, log2 post-softmax grid; chosen on the
# real-backbone and demo teachers, see
# benchmarks/results/real_backbone/): only the bit widths and the scope are set here.
quant_cfg = dict(weight=dict(bits=4), act=dict(bits=4), attn_prob=dict(bits=4), scope='backbone')

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

# ---- synthetic training data (MimiQ §1), generated on first use --------------------
synthetic_root = 'work_dirs/demo_seg/synthetic_mimiq'
synthesis = dict(method='mimiq', num_images=32, batch_size=8, iterations=60,
                 image_size=(256, 256), seed=0, task_loss='none', log_interval=10)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 256), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    _delete_=True,
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='mimiq_mm.SyntheticImageDataset', data_root=synthetic_root,
                 pipeline=train_pipeline))
# val/test: the demo ADE20K-format validation set (IoUMetric mIoU) on the student, inherited.
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False)
test_dataloader = val_dataloader

# ---- schedule (CPU demo) -------------------------------------------------------------
max_iters = 60
train_cfg = dict(_delete_=True, type='mimiq_mm.MimiQIterBasedTrainLoop',
                 max_iters=max_iters, val_interval=max_iters + 1)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0),
    paramwise_cfg=dict(custom_keys={'.step': dict(lr_mult=10.0, decay_mult=0.0)}),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=10, end=max_iters, eta_min=0.0),
]
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1, save_last=True, save_optimizer=True,
                    save_param_scheduler=True),
    logger=dict(type='LoggerHook', interval=10))
log_processor = dict(by_epoch=False, window_size=10)
custom_hooks = [
    dict(type='mimiq_mm.MimiQSynthesisHook'),
    dict(type='mimiq_mm.MimiQCalibrationHook', num_batches=8),
    # fine-tuning is kept only if it lowers the distillation loss on images it never saw
    dict(type='mimiq_mm.MimiQKeepBestHook', holdout_images=8),
]
randomness = dict(seed=0)
