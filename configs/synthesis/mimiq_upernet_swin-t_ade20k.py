# MimiQ synthetic images from the float UperNet Swin-T (ADE20K 512x512) teacher.
#   python tools/generate.py configs/synthesis/mimiq_upernet_swin-t_ade20k.py \
#       --work-dir data/mimiq_synthetic/upernet_swin-t \
#       --cfg-options teacher.checkpoint=checkpoints/upernet_swin-t_ade20k.pth
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']

teacher = dict(scope='mmseg', checkpoint='checkpoints/upernet_swin-t_ade20k.pth')
synthesis = dict(
    method='mimiq', num_images=10000, batch_size=16, iterations=2000,
    image_size=(512, 512), seed=0,
    w_sim=1.0, w_task=1.0, w_tv=2.5e-5,
    task_loss='none')   # 'task': decode head made confident on its own argmax (ablation)
