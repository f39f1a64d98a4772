"""Issue 15, defects 1 and 8: what a file may make the project do.

* every path that reads a checkpoint refuses a remote URL before any network access (a
  downloaded file used to be unpickled in full by torch.hub);
* ``meta['config']`` of a checkpoint, which mmengine's resume executes as a Python config,
  is never executed;
* an export file cannot choose the package that gets imported (its model scope).
"""
import socket
import sys

import pytest
import torch
from torch import nn

import mimiq_mm  # noqa: F401  (installs the loaders)

REMOTE = ['http://127.0.0.1:8765/teacher.pth', 'https://example.invalid/x.pth',
          's3://bucket/x.pth', 'open-mmlab://resnet50_caffe', 'torchvision://resnet18',
          'open-mmlab:s3://bucket/x.pth', 'pavi://model/x.pth', 'mmcls://resnet50']


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or to download fails the test loudly."""
    attempts = []

    def forbidden(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f'network access attempted: {args!r}')

    monkeypatch.setattr(socket.socket, 'connect', forbidden)
    monkeypatch.setattr(socket, 'create_connection', forbidden)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', forbidden)
    import mmengine.runner.checkpoint as mm_ckpt
    monkeypatch.setattr(mm_ckpt, 'load_url', forbidden)
    return attempts


@pytest.mark.parametrize('url', REMOTE)
def test_remote_checkpoints_are_refused_before_any_download(url, no_network):
    from mmengine.runner import load_checkpoint
    from mmengine.runner.checkpoint import _load_checkpoint

    from mimiq_mm.utils.checkpoint import load_teacher_weights
    # the teacher of tools/train.py / the distiller
    with pytest.raises(ValueError, match='is a URL.*local files only'):
        load_teacher_weights(nn.Linear(2, 2), url)
    # mmengine's own entry points: load_from, --resume, init_cfg=Pretrained ...
    with pytest.raises(ValueError, match='is a URL'):
        load_checkpoint(nn.Linear(2, 2), url, map_location='cpu')
    with pytest.raises(ValueError, match='is a URL'):
        _load_checkpoint(url, map_location='cpu')
    assert no_network == []


def test_the_one_loader_refuses_urls_with_its_own_error(no_network):
    from mimiq_mm.utils.checkpoint import (RemoteCheckpointError, is_remote_path,
                                           load_checkpoint_file)
    for url in REMOTE:
        assert is_remote_path(url)
        with pytest.raises(RemoteCheckpointError, match='checkpoint='):
            load_checkpoint_file(url)
    assert not is_remote_path('checkpoints/demo/x.pth')
    assert not is_remote_path('/abs/path/iter_2.pth')
    assert no_network == []


def test_synthesis_teacher_url_refused(no_network, tmp_path):
    from mimiq_mm.synthesis.teacher import load_teacher_checkpoint
    with pytest.raises(ValueError, match='teacher.checkpoint.*URL'):
        load_teacher_checkpoint(nn.Linear(2, 2), 'http://127.0.0.1:8765/teacher.pth')
    assert no_network == []


def test_local_loader_stays_weights_only(tmp_path):
    """The loader mmengine now uses for local files still refuses a crafted pickle, even
    when torch is told to default to full unpickling."""
    import os

    from mmengine.runner.checkpoint import _load_checkpoint
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))

    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': {}, 'meta': Evil()}, str(bad))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
        with pytest.raises(RuntimeError, match='weights-only'):
            _load_checkpoint(str(bad), map_location='cpu')
    assert not marker.exists()


def test_resume_never_executes_meta_config(tmp_path):
    """mmengine's Runner.resume passes meta['config'] to Config.fromstring, which runs it as
    a Python config file; a weights-only-safe checkpoint could carry code there."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            out = self.lin(torch.stack(inputs))
            return dict(loss=out.pow(2).mean()) if mode == 'loss' else out

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return dict(inputs=torch.ones(2) * i)

    runner = Runner(model=Model(), work_dir=str(tmp_path / 'work'),
                    train_dataloader=dict(dataset=Data(), batch_size=2, num_workers=0,
                                          sampler=dict(type='DefaultSampler', shuffle=False)),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                    train_cfg=dict(by_epoch=False, max_iters=2), experiment_name='resume_meta')
    marker = tmp_path / 'config_code_ran'
    ckpt = dict(state_dict=Model().state_dict(),
                meta=dict(epoch=0, iter=1,
                          config=f"_ = open({str(marker)!r}, 'w').write('ran')\n"),
                message_hub=runner.message_hub.state_dict())
    path = tmp_path / 'crafted.pth'
    torch.save(ckpt, str(path))
    runner.resume(str(path))
    assert not marker.exists(), "meta['config'] of a checkpoint was executed"
    assert runner.iter == 1


# ----------------------------------------------------------------------------- exports
def _export_payload(meta):
    from mimiq_mm.export import FORMAT
    return dict(format=FORMAT, quantized_weights={}, state_dict={}, meta=meta)


@pytest.mark.parametrize('where', ['scope', 'nested_scope', 'type_prefix', 'deep_type'])
def test_export_file_cannot_choose_the_imported_module(where, tmp_path, monkeypatch):
    """The scope in an export file used to become ``__import__(f'{scope}.models')``."""
    from mimiq_mm.export import build_quantized_model
    pkg = tmp_path / 'evilscope_issue15'
    pkg.mkdir()
    marker = tmp_path / 'imported'
    code = f'open({str(marker)!r}, "w").write("imported")\n'
    for name in ('__init__.py', 'models.py', 'registry.py'):
        (pkg / name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    teacher = dict(type='MaskRCNN')
    meta = dict(teacher=teacher, quant_cfg=None, scope='mmdet')
    if where == 'scope':
        meta['scope'] = 'evilscope_issue15'
    elif where == 'nested_scope':
        teacher['_scope_'] = 'evilscope_issue15'
    elif where == 'type_prefix':
        teacher['type'] = 'evilscope_issue15.MaskRCNN'
    else:
        teacher['backbone'] = dict(type='evilscope_issue15.Backbone')
    path = tmp_path / 'export.pth'
    torch.save(_export_payload(meta), str(path))
    error = None
    try:
        build_quantized_model(str(path))
    except Exception as err:  # noqa: BLE001  (checked below)
        error = err
    assert not marker.exists(), 'a module named by the export file was imported'
    assert 'evilscope_issue15' not in sys.modules
    assert isinstance(error, ValueError) and 'evilscope_issue15' in str(error), repr(error)


def test_export_scope_allow_list_accepts_known_scopes():
    from mimiq_mm.export import MODEL_SCOPES, check_export_scopes
    assert set(MODEL_SCOPES) == {'mmdet', 'mmseg'}
    meta = dict(scope='mmseg', teacher=dict(type='EncoderDecoder',
                                            backbone=dict(type='mmseg.SwinTransformer'),
                                            data_preprocessor=dict(_scope_='mmseg')))
    assert check_export_scopes(meta) == 'mmseg'
    with pytest.raises(ValueError, match="'os'"):
        check_export_scopes(dict(scope='os', teacher=dict(type='X')))
