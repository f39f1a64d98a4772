# CPU-sized demo: MimiQ images from the shipped demo UperNet Swin teacher
# (configs/demo/upernet_swin_demo.py, checkpoints/demo/upernet_swin_demo.pth).
#   python tools/generate.py configs/synthesis/mimiq_demo_upernet_swin.py \
#       --work-dir work_dirs/demo/synthetic_upernet
_base_ = ['../demo/upernet_swin_demo.py']

teacher = dict(scope='mmseg', checkpoint='checkpoints/demo/upernet_swin_demo.pth')
synthesis = dict(
    method='mimiq', num_images=16, batch_size=8, iterations=50, image_size=(128, 128),
    seed=0, task_loss='none', log_interval=5)
