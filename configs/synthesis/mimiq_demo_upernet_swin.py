# CPU-sized demo: MimiQ images from the small demo UperNet Swin teacher
# (configs/demo/upernet_swin_demo.py). Train that teacher first, or smoke-test with random
# weights: --cfg-options teacher.checkpoint=None
#   python tools/generate.py configs/synthesis/mimiq_demo_upernet_swin.py \
#       --work-dir work_dirs/demo/synthetic --cfg-options teacher.checkpoint=None
_base_ = ['../demo/upernet_swin_demo.py']

teacher = dict(scope='mmseg', checkpoint='work_dirs/demo/teacher/iter_2000.pth')
synthesis = dict(
    method='mimiq', num_images=16, batch_size=8, iterations=50, image_size=(128, 128),
    seed=0, task_loss='none', log_interval=5)
