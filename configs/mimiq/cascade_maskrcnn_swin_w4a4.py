# MimiQ data-free W4/A4 fine-tuning of Cascade Mask R-CNN with a Swin-T backbone.
# mmdet 3.3 ships no Swin cascade config, so the teacher is mmdet's cascade-mask-rcnn
# (r50 fpn 1x) with its backbone replaced by Swin-T (as in the Swin paper's detection
# setting; the teacher checkpoint must match this architecture exactly).
# Distilled: features, RPN, every cascade stage's RoI cls/box on shared (teacher-refined)
# RoIs, and the last stage's mask head.
#   python tools/train.py configs/mimiq/cascade_maskrcnn_swin_w4a4.py \
#       --cfg-options teacher_checkpoint=checkpoints/mask_rcnn_swin-t_1x_coco.pth
# Bits: --cfg-options quant_cfg.weight.bits=3 quant_cfg.act.bits=3 quant_cfg.attn_prob.bits=3
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(
    imports=['mimiq_mm', 'mimiq_mm.models', 'mimiq_mm.engine', 'mimiq_mm.datasets'],
    allow_failed_imports=False)

# ---- what to quantize and from which float model ------------------------------------
teacher_checkpoint = None  # REQUIRED: float checkpoint of the base config's model
quant_cfg = dict(  # fields of mimiq_mm.quant.QuantConfig
    weight=dict(bits=4), act=dict(bits=4), attn_prob=dict(bits=4), scope='backbone')

# offline-safe: no pretrained download for the teacher (its weights come from the file)
_base_.model.backbone = dict(
    type='SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
    window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.,
    attn_drop_rate=0., drop_path_rate=0.2, patch_norm=True, out_indices=(0, 1, 2, 3),
    with_cp=False, convert_weights=True, init_cfg=None)
_base_.model.neck.in_channels = [96, 192, 384, 768]

model = dict(
    _delete_=True,
    type='mimiq_mm.MimiQDistiller',
    teacher=_base_.model,
    teacher_checkpoint=teacher_checkpoint,
    quant_cfg=quant_cfg,
    gamma=10.0,  # weight of L_HSAD
    hsad_kind='ssim',
    kd_weight=1.0,
    temperature=1.0,
    feat_source='neck',
    feat_kind='norm_mse',
    num_mask_rois=32,
    eval_teacher=False)

# ---- synthetic training data (MimiQ §1), generated on first use --------------------
synthetic_root = 'data/mimiq_synthetic/cascade_maskrcnn_swin-t'
synthesis = dict(method='mimiq', num_images=10000, batch_size=16, iterations=2000,
                 image_size=(512, 512), seed=0, task_loss='none')
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip',
                    'flip_direction')),
]
train_dataloader = dict(
    _delete_=True,
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='mimiq_mm.SyntheticImageDataset', data_root=synthetic_root,
                 pipeline=train_pipeline))
# val/test: the base COCO val2017 (CocoMetric bbox + segm) on the student

# ---- schedule --------------------------------------------------------------------
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
auto_scale_lr = dict(enable=False, base_batch_size=16)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000,
                    max_keep_ckpts=3),
    logger=dict(type='LoggerHook', interval=50))
log_processor = dict(by_epoch=False)
custom_hooks = [
    dict(type='mimiq_mm.MimiQSynthesisHook'),  # settings: `synthesis` above
    dict(type='mimiq_mm.MimiQCalibrationHook', num_batches=32),
    # fine-tuning is kept only if it lowers the distillation loss on images it never saw
    dict(type='mimiq_mm.MimiQKeepBestHook', holdout_images=64),
]
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True)
