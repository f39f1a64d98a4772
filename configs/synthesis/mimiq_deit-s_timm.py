# MimiQ as published (classification): a timm DeiT-S teacher, CE on random labels as L_task.
#   python tools/generate.py configs/synthesis/mimiq_deit-s_timm.py \
#       --cfg-options teacher.checkpoint=checkpoints/deit_small_patch16_224.pth
teacher = dict(model=dict(type='timm', name='deit_small_patch16_224'),
               checkpoint='checkpoints/deit_small_patch16_224.pth')
synthesis = dict(
    method='mimiq', num_images=10000, batch_size=16, iterations=2000, image_size=224,
    seed=0, task_loss='classifier', w_sim=1.0, w_task=1.0, w_tv=2.5e-5)
