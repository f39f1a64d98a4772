"""The procedural demo sets: deterministic, skip/regenerate logic, valid COCO annotations
(checked with pycocotools and mmdet's CocoDataset) and an ADE20K-format set that mmseg's
dataset machinery loads with the demo config's pipeline."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimiq_mm.datasets.demo_data import (ADE_CLASSES, ADE_THING_CLASSES, COCO_CLASSES,
                                         DemoDataConfig, demo_data_is_current,
                                         generate_demo_data, mask_to_rle)

REPO = Path(__file__).resolve().parents[1]
SMALL = DemoDataConfig(seed=3, num_train=8, num_val=7, size=(96, 112))


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo') / 'data'
    manifest = generate_demo_data(out, SMALL, workers=1)
    assert manifest['skipped'] is False
    return out


def _all_files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob('*')) if p.is_file()}


def test_same_seed_gives_byte_identical_files_whatever_the_workers(small_set, tmp_path):
    again = generate_demo_data(tmp_path / 'again', SMALL, workers=2)
    assert again['skipped'] is False
    first, second = _all_files(small_set), _all_files(tmp_path / 'again')
    assert first.keys() == second.keys()
    assert 'manifest.json' in first and 'coco/annotations/instances_val.json' in first
    assert len([k for k in first if k.startswith('coco/train/')]) == SMALL.num_train
    assert len([k for k in first if k.startswith('ade/annotations/validation/')]) == SMALL.num_val
    assert [k for k in first if first[k] != second[k]] == []

    other_seed = DemoDataConfig(seed=4, num_train=8, num_val=7, size=(96, 112))
    generate_demo_data(tmp_path / 'other', other_seed, workers=1)
    third = _all_files(tmp_path / 'other')
    assert third['coco/train/000000.png'] != first['coco/train/000000.png']
    assert third['ade/annotations/training/000000.png'] != \
        first['ade/annotations/training/000000.png']


def test_skip_when_current_and_regenerate_when_not(small_set, tmp_path):
    out = tmp_path / 'd'
    generate_demo_data(out, SMALL, workers=1)
    assert demo_data_is_current(out, SMALL)
    assert generate_demo_data(out, SMALL)['skipped'] is True
    assert not demo_data_is_current(out, DemoDataConfig(seed=3, num_train=9, num_val=7,
                                                        size=(96, 112)))

    # A damaged file or a stray file makes the folder stale; regeneration repairs it.
    victim = out / 'coco/val/000001.png'
    original = victim.read_bytes()
    victim.write_bytes(b'broken')
    (out / 'ade/images/training/extra.jpg').write_bytes(b'x')
    assert not demo_data_is_current(out, SMALL)
    assert generate_demo_data(out, SMALL, workers=1)['skipped'] is False
    assert victim.read_bytes() == original
    assert not (out / 'ade/images/training/extra.jpg').exists()
    assert generate_demo_data(out, SMALL, force=True, workers=1)['skipped'] is False

    # No temporary files are left behind.
    assert [p for p in out.rglob('*.tmp')] == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / 'mine.txt').write_text('precious')
    with pytest.raises(FileExistsError, match='refusing to overwrite'):
        generate_demo_data(tmp_path, SMALL, workers=1)
    assert (tmp_path / 'mine.txt').read_text() == 'precious'


def test_config_validation():
    with pytest.raises(ValueError, match='--size 256 256'):
        DemoDataConfig(size=(16, 16))
    with pytest.raises(ValueError, match='num_train'):
        DemoDataConfig(num_train=0)


def test_rle_encoder_matches_pycocotools():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    masks = [np.zeros((7, 5), np.uint8), np.ones((7, 5), np.uint8),
             (rng.random((40, 33)) > 0.5).astype(np.uint8)]
    big = np.zeros((300, 200), np.uint8)
    big[10:290, 3:190] = 1  # runs far longer than one 5-bit group
    big[150, 50] = 0
    masks.append(big)
    corner = np.zeros((9, 9), np.uint8)
    corner[0, 0] = 1  # mask starting with a foreground pixel
    masks.append(corner)
    for mask in masks:
        ours = mask_to_rle(mask)
        ref = mask_utils.encode(np.asfortranarray(mask))
        assert ours['counts'] == ref['counts'].decode()
        assert ours['size'] == list(ref['size'])
        np.testing.assert_array_equal(mask_utils.decode(ours), mask)


def test_coco_annotations_are_valid(small_set):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    h, w = SMALL.size
    seen = {}
    for split in ('train', 'val'):
        coco = COCO(str(small_set / f'coco/annotations/instances_{split}.json'))
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(COCO_CLASSES)
        assert len(coco.getImgIds()) == SMALL.num_images(split)
        seen[split] = set()
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            image = Image.open(small_set / 'coco' / split / info['file_name'])
            assert (image.mode, image.size) == ('RGB', (w, h))
            assert (info['height'], info['width']) == (h, w)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert len(anns) >= 1
            union = np.zeros((h, w), dtype=np.int32)
            for ann in anns:
                assert ann['iscrowd'] == 0
                assert ann['segmentation']['size'] == [h, w]
                mask = coco.annToMask(ann)
                assert mask.shape == (h, w)
                assert ann['area'] == mask.sum() == mask_utils.area(ann['segmentation']) > 0
                x, y, bw, bh = ann['bbox']
                assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
                np.testing.assert_allclose(ann['bbox'], mask_utils.toBbox(ann['segmentation']))
                ys, xs = np.nonzero(mask)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == \
                    (x, y, x + bw, y + bh)
                union += mask
                seen[split].add(ann['category_id'])
            # Visible masks: occluded parts belong to the occluder only.
            assert union.max() == 1
    assert seen['train'] == seen['val'] == set(range(1, len(COCO_CLASSES) + 1))


def test_coco_set_loads_through_mmdet_with_the_demo_config_pipeline(small_set):
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    register_all_modules(init_default_scope=True)

    cfg = Config.fromfile(str(REPO / 'configs/demo/maskrcnn_swin_demo.py'))
    ds_cfg = cfg.val_dataloader.dataset
    ds_cfg.data_root = str(small_set / 'coco')
    dataset = DATASETS.build(ds_cfg)
    assert len(dataset) == SMALL.num_val
    assert dataset.metainfo['classes'] == COCO_CLASSES
    sample = dataset[0]
    inputs, data = sample['inputs'], sample['data_samples']
    assert tuple(inputs.shape[1:]) == data.img_shape
    gt = data.gt_instances
    assert len(gt) >= 1
    masks = gt.masks.to_ndarray()
    boxes = gt.bboxes.numpy()
    # Box and mask agree after the pipeline's resize.
    for mask, box in zip(masks, boxes):
        ys, xs = np.nonzero(mask)
        assert abs(xs.min() - box[0]) <= 2 and abs(ys.min() - box[1]) <= 2
        assert abs(xs.max() + 1 - box[2]) <= 2 and abs(ys.max() + 1 - box[3]) <= 2
    assert set(gt.labels.tolist()) <= set(range(len(COCO_CLASSES)))


def test_ade_labels_and_mmseg_loading(small_set):
    from mmengine.config import Config
    from mmseg.datasets import ADE20KDataset
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)

    h, w = SMALL.size
    seen = {}
    for folder in ('training', 'validation'):
        labels = sorted((small_set / 'ade/annotations' / folder).glob('*.png'))
        images = sorted((small_set / 'ade/images' / folder).glob('*.jpg'))
        assert [p.stem for p in labels] == [p.stem for p in images]
        values = set()
        for path in labels:
            label = Image.open(path)
            assert (label.mode, label.size) == ('L', (w, h))
            values |= set(np.unique(np.asarray(label)).tolist())
        assert values <= set(range(len(ADE_CLASSES) + 1))
        seen[folder] = values - {0}
    # Every class occurs in both splits (0 = "other" is not a class).
    assert seen['training'] == seen['validation'] == set(range(1, len(ADE_CLASSES) + 1))

    # ADE20KDataset itself refuses classes outside its 150 names: the reason the demo
    # config uses BaseSegDataset with the same ADE20K conventions.
    with pytest.raises(ValueError, match='not a subset'):
        ADE20KDataset(data_root=str(small_set / 'ade'), metainfo=dict(classes=ADE_CLASSES),
                      data_prefix=dict(img_path='images/training',
                                       seg_map_path='annotations/training'))

    cfg = Config.fromfile(str(REPO / 'configs/demo/upernet_swin_demo.py'))
    for loader, n in ((cfg.train_dataloader, SMALL.num_train),
                      (cfg.val_dataloader, SMALL.num_val)):
        ds_cfg = loader.dataset
        ds_cfg.data_root = str(small_set / 'ade')
        dataset = DATASETS.build(ds_cfg)
        assert len(dataset) == n
        assert dataset.metainfo['classes'] == ADE_CLASSES
        assert dataset.metainfo['reduce_zero_label'] is True
        sample = dataset[0]
        seg = sample['data_samples'].gt_sem_seg.data.numpy()[0]
        assert set(np.unique(seg).tolist()) <= set(range(len(ADE_CLASSES))) | {255}

    # reduce_zero_label: raw value v becomes v - 1 and "other" (0) becomes 255.
    val_cfg = cfg.val_dataloader.dataset
    val_cfg.pipeline = [dict(type='LoadAnnotations', reduce_zero_label=True)]
    dataset = DATASETS.build(val_cfg)
    info = dataset[0]
    raw = np.asarray(Image.open(info['seg_map_path'])).astype(np.int64)
    expected = np.where(raw == 0, 255, raw - 1)
    np.testing.assert_array_equal(info['gt_seg_map'], expected)
    assert (raw > len(ADE_CLASSES) - len(ADE_THING_CLASSES)).any()  # things are labelled


def test_command_line_tool(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('make_demo_data',
                                                  REPO / 'tools/make_demo_data.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ['--out', str(tmp_path / 'd'), '--seed', '5', '--num-train', '7', '--num-val', '7',
            '--size', '64', '80', '--workers', '1']
    tool.main(argv)
    assert 'Wrote' in capsys.readouterr().out
    assert demo_data_is_current(tmp_path / 'd', DemoDataConfig(seed=5, num_train=7, num_val=7,
                                                               size=(64, 80)))
    tool.main(argv)
    assert 'up to date' in capsys.readouterr().out
    tool.main(argv + ['--force'])
    assert 'Wrote' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='--size 256 256'):
        tool.main(['--out', str(tmp_path / 'e'), '--size', '8', '8'])


GENERATE_CHILD = (
    'import sys, json\n'
    'from mimiq_mm.datasets.demo_data import DemoDataConfig, generate_demo_data\n'
    'm = generate_demo_data(sys.argv[1], DemoDataConfig(seed=3, num_train=8, num_val=7, '
    'size=(96, 112)), workers=1)\n'
    'print(json.dumps(m["skipped"]))\n')


def test_concurrent_generation_into_one_folder_takes_turns(tmp_path):
    """Parallel benchmark processes asking for the same demo folder: one generates, the
    others wait and reuse it (before the lock, a second process deleted the first's files
    under it: FileNotFoundError / 'holds 0 val images')."""
    import subprocess
    import sys
    out = tmp_path / 'shared'
    procs = [subprocess.Popen([sys.executable, '-c', GENERATE_CHILD, str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert sorted(o.strip() for o, _ in results) == ['false', 'true', 'true']
    assert demo_data_is_current(out, SMALL)
