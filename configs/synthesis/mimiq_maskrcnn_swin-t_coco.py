# MimiQ synthetic images (MIMIQ.md §1) from the float Mask R-CNN Swin-T (1x COCO) teacher.
#   python tools/generate.py configs/synthesis/mimiq_maskrcnn_swin-t_coco.py \
#       --work-dir data/mimiq_synthetic/maskrcnn_swin-t \
#       --cfg-options teacher.checkpoint=checkpoints/mask_rcnn_swin-t-p4-w7_fpn_1x_coco.pth
# Multi-GPU (disjoint shards, resumable): torchrun --nproc_per_node 8 tools/generate.py ...
# The teacher model is the inherited top-level `model` (its pretrained init_cfg is dropped;
# weights come from teacher.checkpoint); mean/std come from its data_preprocessor.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']

teacher = dict(
    scope='mmdet',
    checkpoint='checkpoints/mask_rcnn_swin-t-p4-w7_fpn_1x_coco.pth')

# Published schedule (classification): 10k images, batch 16, 2000 iterations per batch.
synthesis = dict(
    method='mimiq',
    num_images=10000,
    batch_size=16,
    iterations=2000,
    image_size=(512, 512),          # (height, width); non-square works, e.g. (320, 480)
    seed=0,
    lr=0.1, lr_min=1e-3, betas=(0.9, 0.999), weight_decay=1e-6,
    w_sim=1.0, w_task=1.0, w_tv=2.5e-5,
    task_loss='none',               # ablation: see mimiq_maskrcnn_swin-t_coco_task.py
    jitter=(8, 16), noise_std=0.05, color_jitter=0.1,
    # speed (same images up to float rounding): bf16=True (autocast, L_sim stats in fp32),
    # compile='full' (torch.compile of forward + L_sim + TV and its backward; 'loss' or True:
    # L_sim only), compile_mode='max-autotune-no-cudagraphs', tf32=True (fp32 matmuls in TF32)
    bf16=False, compile=False)
