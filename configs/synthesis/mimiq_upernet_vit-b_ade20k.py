# MimiQ synthetic images from the float UperNet ViT-B/16 (ADE20K 512x512) teacher
# (mmseg VisionTransformer: mmcv MultiheadAttention; the class token is dropped by L_sim).
_base_ = ['mmseg::vit/vit_vit-b16_mln_upernet_8xb2-80k_ade20k-512x512.py']

teacher = dict(scope='mmseg', checkpoint='checkpoints/upernet_vit-b16_ade20k.pth')
synthesis = dict(
    method='mimiq', num_images=10000, batch_size=16, iterations=2000,
    image_size=(512, 512), seed=0, task_loss='none')
