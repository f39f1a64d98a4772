"""``SyntheticImageDataset``: the images of a synthetic dataset folder, unlabeled.

Reads the finished batches (``batches/batch_*.json``) of a folder written by
``mimiq_mm.synthesis.synthesize`` / ``tools/generate.py``. Every sample is a dict that the
standard OpenMMLab pipelines understand without annotations, e.g.::

    pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(512, 512)),
                dict(type='PackDetInputs')]          # or PackSegInputs
    dataset = dict(type='mimiq_mm.SyntheticImageDataset', data_root='work_dirs/synthetic',
                   pipeline=pipeline)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from mmengine.dataset import BaseDataset

from ..registry import DATASETS
from ..synthesis.writer import BATCHES_DIR, IMAGES_DIR, MANIFEST

__all__ = ['SyntheticImageDataset']

GENERATE_HINT = ('python tools/generate.py configs/synthesis/<config>.py --work-dir {root} '
                 '(or mimiq_mm.synthesis.synthesize(teacher, {root!r}, cfg))')


@DATASETS.register_module()
class SyntheticImageDataset(BaseDataset):
    """Unlabeled synthetic images of a MimiQ dataset folder.

    Args:
        data_root: the folder (holding ``manifest.json``, ``images/``, ``batches/``).
        pipeline: transforms, e.g. ``LoadImageFromFile`` ... ``PackDetInputs``/``PackSegInputs``.
        require_complete: raise if not every batch listed in the manifest is finished
            (default: use whatever is finished, e.g. while generation is still running).
        max_images: use only the first ``max_images`` images (by image id).
        **kwargs: passed to :class:`mmengine.dataset.BaseDataset` (``metainfo``,
            ``indices``, ``serialize_data``, ``test_mode``, ``lazy_init``...).

    Each data info holds ``img_path``, ``img_id`` (the global image index), ``ori_shape``,
    ``height``, ``width``, empty ``instances`` (mmdet) and ``seg_fields`` (mmseg).
    """

    METAINFO: dict = dict(classes=())

    def __init__(self, data_root: str, pipeline: Sequence[Union[dict, Callable]] = (),
                 require_complete: bool = False, max_images: Optional[int] = None, **kwargs):
        self.require_complete = require_complete
        self.max_images = max_images
        self.manifest: dict = {}
        kwargs.setdefault('ann_file', '')
        super().__init__(data_root=str(data_root), pipeline=list(pipeline), **kwargs)

    def load_data_list(self) -> List[dict]:
        root = Path(self.data_root)
        manifest_path = root / MANIFEST
        batches = sorted((root / BATCHES_DIR).glob('batch_*.json')) if root.is_dir() else []
        if not batches:
            raise FileNotFoundError(
                f'{root} holds no finished synthetic batch (no batches/batch_*.json). '
                'Create the dataset first: ' + GENERATE_HINT.format(root=str(root)))
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        expected = self.manifest.get('num_batches')
        if self.require_complete and expected is not None and len(batches) < expected:
            raise RuntimeError(
                f'{root} has {len(batches)} of {expected} batches finished and '
                'require_complete=True: finish it by running the same command again: '
                + GENERATE_HINT.format(root=str(root)))
        size = self.manifest.get('image_size')
        data_list = []
        for path in batches:
            record = json.loads(path.read_text())
            ids = record.get('image_ids') or [None] * len(record['images'])
            for name, img_id in zip(record['images'], ids):
                if img_id is None:
                    img_id = int(Path(name).stem)
                info = dict(img_path=str(root / IMAGES_DIR / name), img_id=int(img_id),
                            instances=[], seg_fields=[], batch_index=record.get('batch_index'))
                if size is not None:
                    info.update(height=int(size[0]), width=int(size[1]),
                                ori_shape=(int(size[0]), int(size[1])))
                data_list.append(info)
        data_list.sort(key=lambda d: d['img_id'])
        if self.max_images is not None:
            data_list = data_list[:self.max_images]
        return data_list
