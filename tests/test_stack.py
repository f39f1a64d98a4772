"""The OpenMMLab stack is real and complete: compiled mmcv ops, upstream mmdet/mmseg configs
that build, train and predict on CPU, and mmengine checkpoints that resume with torch's
``weights_only`` loading kept on."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mimiq_mm.testing import build_model_from_cfg, tiny_maskrcnn_swin_cfg, \
    tiny_upernet_swin_cfg, tiny_upernet_vit_cfg

REPO = Path(__file__).resolve().parents[1]


def test_mmcv_compiled_ops_run():
    from mmcv.ops import RoIAlign, nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    feat = torch.arange(16.).view(1, 1, 4, 4)
    rois = torch.tensor([[0., 0., 0., 3., 3.]])
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat, rois)
    assert out.shape == (1, 1, 2, 2) and torch.isfinite(out).all()


def _strings(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value)
    elif isinstance(obj, str):
        yield obj


def test_upstream_configs_carry_no_download():
    for make in (tiny_maskrcnn_swin_cfg, tiny_upernet_swin_cfg, tiny_upernet_vit_cfg):
        model_cfg = make().model
        assert not [s for s in _strings(model_cfg) if '://' in s or s.endswith('.pth')]
        assert model_cfg.backbone.get("init_cfg") is None and model_cfg.get("pretrained") is None


def _det_inputs(num_classes, shapes):
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=len(shapes), image_shapes=shapes, num_items=[2] * len(shapes),
                          num_classes=num_classes, with_mask=True)


def test_maskrcnn_swin_loss_and_predict():
    torch.manual_seed(0)
    cfg = tiny_maskrcnn_swin_cfg(num_classes=3)
    assert cfg.model.backbone.type == 'SwinTransformer' and cfg.model.type == 'MaskRCNN'
    model = build_model_from_cfg(cfg.model, 'mmdet')
    data = model.data_preprocessor(_det_inputs(3, [(3, 96, 128), (3, 96, 128)]), True)
    losses = model(**data, mode='loss')
    for key in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'):
        assert key in losses
    total = sum(v.sum() if torch.is_tensor(v) else sum(x.sum() for x in v)
                for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.stages[0].blocks[0].attn.w_msa.qkv.weight.grad is not None
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(_det_inputs(3, [(3, 96, 128)]), False)
        pred = model(**data, mode='predict')[0]
    inst = pred.pred_instances
    assert inst.bboxes.shape[1] == 4 and len(inst.scores) == len(inst.labels)
    if len(inst):
        assert inst.masks.shape[-2:] == (96, 128)


def _seg_inputs(num_classes, shape, batch=2):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 255, (3, *shape), dtype=torch.uint8))
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, *shape)))
        s.set_metainfo(dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('make_cfg, backbone', [(tiny_upernet_swin_cfg, 'SwinTransformer'),
                                                (tiny_upernet_vit_cfg, 'VisionTransformer')])
def test_upernet_loss_and_predict(make_cfg, backbone):
    torch.manual_seed(0)
    cfg = make_cfg(num_classes=4)
    assert cfg.model.backbone.type == backbone and cfg.model.decode_head.type == 'UPerHead'
    model = build_model_from_cfg(cfg.model, 'mmseg')
    data = model.data_preprocessor(_seg_inputs(4, (64, 64)), True)
    losses = model(**data, mode='loss')
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(losses)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(_seg_inputs(4, (64, 64), batch=1), False)
        pred = model(**data, mode='predict')[0]
    assert pred.pred_sem_seg.data.shape == (1, 64, 64)
    assert int(pred.pred_sem_seg.data.max()) < 4


# --------------------------------------------------------------------------- checkpoints
RUNNER_SCRIPT = r'''
import sys, torch
from torch import nn
import mimiq_mm  # installs the weights_only allow-list
from mmengine.model import BaseModel
from mmengine.runner import Runner

class Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.lin(torch.stack(inputs))
        if mode == 'loss':
            return dict(loss=((out.squeeze(1) - torch.stack(labels)) ** 2).mean())
        return out

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 16
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(4, generator=g), labels=torch.randn((), generator=g))

from mmengine.hooks import Hook

class Kill(Hook):
    """Simulates a crash right after iteration `at` (after its checkpoint was written)."""
    priority = 'LOWEST'
    def __init__(self, at):
        self.at = at
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at:
            import os
            os._exit(3)

work_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1'
max_iters = 4
torch.manual_seed(0)
runner = Runner(model=Toy(), work_dir=work_dir,
                train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler', shuffle=True),
                                      batch_size=4, num_workers=0),
                optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
                param_scheduler=dict(type='MultiStepLR', milestones=[3], by_epoch=False),
                train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=100),
                default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                                   logger=dict(type='LoggerHook', interval=1)),
                custom_hooks=[Kill(kill_at)] if kill_at else [],
                resume=resume, randomness=dict(seed=0), experiment_name='toy')
runner.train()
print('ITER', runner.iter)
print('WEIGHT', runner.model.lin.weight.detach().tolist())
'''


def _run(script, *args, env=None):
    env = dict(os.environ if env is None else env)
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    env.pop('TORCH_FORCE_WEIGHTS_ONLY_LOAD', None)
    return subprocess.run([sys.executable, '-c', script, *map(str, args)], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def _weights(out):
    return [line for line in out.splitlines() if line.startswith('WEIGHT')][-1]


def test_runner_checkpoint_resumes_with_weights_only(tmp_path):
    straight = _run(RUNNER_SCRIPT, tmp_path / 'a', 0, 0)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run(RUNNER_SCRIPT, tmp_path / 'b', 2, 0)
    assert killed.returncode == 3, killed.stderr[-3000:]
    ckpt = tmp_path / 'b' / 'iter_2.pth'
    assert ckpt.is_file()
    # The file really needs the allow-list: torch's default loader refuses it without.
    plain = _run('import sys, torch; torch.load(sys.argv[1])', ckpt)
    assert plain.returncode != 0 and 'weights_only' in plain.stderr
    resumed = _run(RUNNER_SCRIPT, tmp_path / 'b', 0, 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed epoch: 0, iter: 2' in resumed.stdout + resumed.stderr
    assert 'ITER 4' in resumed.stdout
    # same final weights as the uninterrupted run: optimizer/scheduler state came back too
    assert _weights(resumed.stdout) == _weights(straight.stdout)


class _Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_untrusted_pickle_is_refused(tmp_path):
    import mimiq_mm  # noqa: F401
    from mmengine.runner import load_checkpoint
    bad = tmp_path / 'bad.pth'
    with open(bad, 'wb') as f:
        pickle.dump({'state_dict': {}, 'meta': _Evil()}, f)
    with pytest.raises(Exception, match='(?i)weights.only|unsupported global'):
        load_checkpoint(nn.Linear(2, 2), str(bad), map_location='cpu')
