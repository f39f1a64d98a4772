"""The synthetic dataset folder (docs/INTERFACES.md, synthesis/): atomic, resumable writes.

::

    out_dir/
      manifest.json              method, seed, config, image size, mean/std, per-batch records
      images/000000.png ...      8-bit RGB, denormalised with the teacher's mean/std
      batches/batch_00000.json   per-batch losses, SSIM before/after, file list (written LAST)

A batch is finished only when its ``batches/*.json`` exists. Every file is written to a
temporary name in the same folder and moved into place with ``os.replace``, so a killed run
never leaves a half-written image or record under a final name.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ['IMAGES_DIR', 'BATCHES_DIR', 'MANIFEST', 'FORMAT_VERSION', 'image_name',
           'batch_record_name', 'atomic_write_bytes', 'atomic_write_json', 'save_png',
           'check_image', 'read_finished_batches', 'DatasetFolder']

logger = logging.getLogger(__name__)

IMAGES_DIR = 'images'
BATCHES_DIR = 'batches'
MANIFEST = 'manifest.json'
FORMAT_VERSION = 1
TMP_MARK = '.tmp-'
_BATCH_RE = re.compile(r'^batch_(\d+)\.json$')


def image_name(index: int) -> str:
    return f'{index:06d}.png'


def batch_record_name(batch_index: int) -> str:
    return f'batch_{batch_index:05d}.json'


def _tmp_path(path: Path, tag: str) -> Path:
    return path.with_name(f'.{path.name}{TMP_MARK}{tag}')


def atomic_write_bytes(path, data: bytes, tag: str = '0') -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    tmp = _tmp_path(path, tag)
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj, tag: str = '0') -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + '\n').encode(), tag)


def save_png(path, rgb: np.ndarray, tag: str = '0') -> None:
    """Save an (H, W, 3) uint8 RGB array as PNG, atomically."""
    from PIL import Image
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}')
    buf = io.BytesIO()
    Image.fromarray(rgb, mode='RGB').save(buf, format='PNG')
    atomic_write_bytes(path, buf.getvalue(), tag)


def check_image(path, size_hw: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """``None`` if ``path`` is a complete RGB PNG (of ``size_hw``), else the reason why not."""
    from PIL import Image
    path = Path(path)
    if not path.is_file():
        return 'missing'
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
            mode, (width, height) = img.mode, img.size
    except Exception as err:  # PIL raises many types for broken files
        return f'unreadable ({type(err).__name__}: {err})'
    if mode != 'RGB':
        return f'mode {mode}, expected RGB'
    if size_hw is not None and (height, width) != tuple(size_hw):
        return f'size {height}x{width}, expected {size_hw[0]}x{size_hw[1]}'
    return None


def read_finished_batches(out_dir) -> Dict[int, dict]:
    """``{batch_index: record}`` for every finished batch in ``out_dir``."""
    folder = Path(out_dir) / BATCHES_DIR
    records = {}
    if not folder.is_dir():
        return records
    for path in sorted(folder.iterdir()):
        match = _BATCH_RE.match(path.name)
        if not match:
            continue
        try:
            records[int(match.group(1))] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning('unreadable batch record %s (%s): the batch will be regenerated',
                           path, err)
    return records


class DatasetFolder:
    """Writer of one synthetic dataset folder, for one rank."""

    def __init__(self, out_dir, rank: int = 0):
        self.root = Path(out_dir)
        self.rank = rank
        self.tag = f'r{rank}'
        self.images = self.root / IMAGES_DIR
        self.batches = self.root / BATCHES_DIR

    def prepare(self) -> None:
        self.images.mkdir(parents=True, exist_ok=True)
        self.batches.mkdir(parents=True, exist_ok=True)
        # this rank's leftovers of a killed run (other ranks' temp files may be in flight)
        for folder in (self.root, self.images, self.batches):
            for tmp in folder.glob(f'.*{TMP_MARK}{self.tag}'):
                tmp.unlink(missing_ok=True)

    # ---------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> Optional[dict]:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest, self.tag)

    # ---------------------------------------------------------------- batches
    def batch_path(self, batch_index: int) -> Path:
        return self.batches / batch_record_name(batch_index)

    def image_path(self, index: int) -> Path:
        return self.images / image_name(index)

    def finished(self) -> Dict[int, dict]:
        return read_finished_batches(self.root)

    def validate_batch(self, record: dict, size_hw) -> List[Tuple[str, str]]:
        """[(file name, reason)] of the images of a finished batch that are not valid."""
        bad = []
        for name in record.get('images', []):
            reason = check_image(self.images / name, size_hw)
            if reason is not None:
                bad.append((name, reason))
        return bad

    def invalidate_batch(self, batch_index: int) -> None:
        """Mark a batch unfinished (its images are overwritten when it is regenerated)."""
        self.batch_path(batch_index).unlink(missing_ok=True)

    def write_images(self, first_index: int, rgb: np.ndarray) -> List[str]:
        names = []
        for offset, image in enumerate(rgb):
            name = image_name(first_index + offset)
            save_png(self.images / name, np.ascontiguousarray(image), self.tag)
            names.append(name)
        return names

    def write_batch_record(self, batch_index: int, record: dict) -> None:
        atomic_write_json(self.batch_path(batch_index), record, self.tag)
