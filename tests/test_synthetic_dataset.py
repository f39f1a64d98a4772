"""SyntheticImageDataset over a synthesis folder, through real mmdet / mmseg pipelines."""
import json

import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.registry import DefaultScope

from mimiq_mm.datasets import SyntheticImageDataset
from mimiq_mm.registry import DATASETS
from mimiq_mm.synthesis import synthesize
from mimiq_mm.testing import build_tiny_model, tiny_timm_vit

SIZE = (32, 48)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp('syn') / 'data'
    synthesize(tiny_timm_vit(img_size=32), out,
               dict(method='gaussian', num_images=5, batch_size=2, image_size=SIZE,
                    progress=False, figures=False))
    return out


def test_loads_finished_batches_through_mmdet_pipeline_into_a_detector(folder):
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(64, 64), keep_ratio=True),
                dict(type='PackDetInputs',
                     meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                'scale_factor'))]
    with DefaultScope.overwrite_default_scope('mmdet'):
        from mmdet.registry import DATASETS as MMDET_DATASETS
        dataset = MMDET_DATASETS.build(dict(type='mimiq_mm.SyntheticImageDataset',
                                            data_root=str(folder), pipeline=pipeline))
        assert len(dataset) == 5
        info = dataset.get_data_info(4)
        assert info['img_id'] == 4 and info['img_path'].endswith('images/000004.png')
        assert info['ori_shape'] == SIZE and info['instances'] == []
        sample = dataset[1]
        assert tuple(sample['inputs'].shape) == (3, 43, 64)       # 32x48 -> keep-ratio 64
        meta = sample['data_samples'].metainfo
        assert meta['img_id'] == 1 and meta['ori_shape'] == SIZE
        assert len(sample['data_samples'].gt_instances) == 0
        model = build_tiny_model('maskrcnn_swin').eval()
        with torch.no_grad():
            preds = model.test_step(pseudo_collate([dataset[0], dataset[2]]))
    assert len(preds) == 2 and hasattr(preds[0], 'pred_instances')


def test_mmseg_pipeline_and_registry(folder):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackSegInputs')]
    with DefaultScope.overwrite_default_scope('mmseg'):
        dataset = DATASETS.build(dict(type='mimiq_mm.SyntheticImageDataset', data_root=str(folder),
                                      pipeline=pipeline, max_images=3))
        assert len(dataset) == 3
        sample = dataset[2]
    assert tuple(sample['inputs'].shape) == (3,) + SIZE
    assert sample['data_samples'].metainfo['img_path'].endswith('000002.png')


def test_partial_and_missing_folders(folder, tmp_path):
    partial = tmp_path / 'partial'
    partial.mkdir()
    (partial / 'batches').mkdir()
    (partial / 'images').mkdir()
    manifest = json.loads((folder / 'manifest.json').read_text())
    (partial / 'manifest.json').write_text(json.dumps(manifest))
    for name in ('000000.png', '000001.png'):
        (partial / 'images' / name).write_bytes((folder / 'images' / name).read_bytes())
    (partial / 'batches' / 'batch_00000.json').write_bytes(
        (folder / 'batches' / 'batch_00000.json').read_bytes())
    # an image of an unfinished batch is not part of the dataset
    (partial / 'images' / '000002.png').write_bytes(b'half')
    assert len(SyntheticImageDataset(str(partial))) == 2
    with pytest.raises(RuntimeError, match='1 of 3 batches'):
        SyntheticImageDataset(str(partial), require_complete=True)
    with pytest.raises(FileNotFoundError, match='tools/generate.py'):
        SyntheticImageDataset(str(tmp_path / 'empty'))
