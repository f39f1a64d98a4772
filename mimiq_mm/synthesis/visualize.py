"""Figures of a synthetic dataset: a contact sheet and per-head attention maps.

- ``contact_sheet.png``: a grid of the first finished images;
- ``attention_heads.png``: one attention layer of the teacher, the (min-max normalised)
  attention logits of one query for every head, on a synthetic image (top row) and on a Gaussian-noise image (bottom),
  with the layer's mean inter-head SSIM in each row title.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..losses.attention_similarity import mean_inter_head_ssim, minmax_normalize_rows
from .config import SynthesisConfig
from .writer import IMAGES_DIR, read_finished_batches

__all__ = ['CONTACT_SHEET', 'ATTENTION_FIGURE', 'contact_sheet', 'attention_heads_figure',
           'write_figures']

logger = logging.getLogger(__name__)

CONTACT_SHEET = 'contact_sheet.png'
ATTENTION_FIGURE = 'attention_heads.png'
SHEET_PAD = 2            # pixels between tiles
SHEET_TILE = 128         # longest side of a tile (pixels)
MAX_HEADS_SHOWN = 8
GAUSSIAN_FIGURE_SEED = 0


def _finished_images(out_dir: Path):
    records = read_finished_batches(out_dir)
    return [out_dir / IMAGES_DIR / n for b in sorted(records) for n in records[b]['images']]


def contact_sheet(out_dir, max_images: int = 64) -> Optional[Path]:
    """Tile up to ``max_images`` finished images into ``out_dir/contact_sheet.png``."""
    from PIL import Image

    from .writer import save_png
    out_dir = Path(out_dir)
    paths = _finished_images(out_dir)[:max_images]
    if not paths:
        return None
    tiles = []
    for p in paths:
        with Image.open(p) as img:
            img = img.convert('RGB')
            scale = SHEET_TILE / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            tiles.append(np.asarray(img.resize(size, Image.BILINEAR)))
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tile_h = max(t.shape[0] for t in tiles)
    tile_w = max(t.shape[1] for t in tiles)
    sheet = np.full((rows * (tile_h + SHEET_PAD) + SHEET_PAD,
                     cols * (tile_w + SHEET_PAD) + SHEET_PAD, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = SHEET_PAD + r * (tile_h + SHEET_PAD), SHEET_PAD + c * (tile_w + SHEET_PAD)
        sheet[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    path = out_dir / CONTACT_SHEET
    save_png(path, sheet)
    return path


def _pick_record(records, layer):
    multi = [r for r in records if r.logits.shape[1] > 1]
    if not multi:
        raise ValueError('no attention layer with 2 or more heads to show')
    if layer is None:
        return multi[len(multi) // 2]
    if isinstance(layer, int):
        return multi[layer]
    named = [r for r in multi if r.name == layer]
    if not named:
        raise KeyError(f'figure_layer {layer!r} not found; layers: {sorted({r.name for r in multi})}')
    return named[0]


def _head_maps(record, batch_size: int):
    """(H, gh, gw) min-max normalised logits (what L_sim compares) of the middle query in
    the middle window of image 0."""
    p = record.num_prefix_tokens
    logits = record.logits.detach().float()[:, :, p:, p:]
    windows = logits.shape[0] // batch_size
    b = windows // 2
    q = logits.shape[2] // 2
    probs = minmax_normalize_rows(logits[b, :, q])
    keys = probs.shape[-1]
    grid = getattr(record, 'grid', None)
    if grid is None or grid[0] * grid[1] != keys:
        side = int(math.isqrt(keys))
        grid = (side, keys // side) if side * (keys // side) == keys else (1, keys)
    return probs.reshape(probs.shape[0], *grid).cpu().numpy()


def attention_heads_figure(out_dir, teacher, settings: SynthesisConfig, device) -> Optional[Path]:
    """Per-head attention maps on a synthetic vs a Gaussian-noise image."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from PIL import Image

    from ..attention import AttentionRecorder
    out_dir = Path(out_dir)
    paths = _finished_images(out_dir)
    if not paths:
        return None
    with Image.open(paths[0]) as img:
        rgb = torch.from_numpy(np.array(img.convert('RGB'))).unsqueeze(0)
    synthetic = teacher.from_pixels(rgb, device)
    gen = torch.Generator(device=device).manual_seed(GAUSSIAN_FIGURE_SEED)
    low, high = teacher.pixel_range(device)
    noise = torch.maximum(torch.minimum(
        torch.randn(synthetic.shape, generator=gen, device=device), high), low)
    rows = []
    with torch.no_grad():
        for label, x in (('synthetic', synthetic), ('gaussian noise', noise)):
            with AttentionRecorder(teacher.attention_scope, detach=True) as rec:
                teacher.features(x)
            record = _pick_record(rec.records, settings.figure_layer)
            rows.append((label, record, _head_maps(record, 1),
                         mean_inter_head_ssim([record], squared=True)))
    heads = min(rows[0][2].shape[0], MAX_HEADS_SHOWN)
    fig, axes = plt.subplots(2, heads, figsize=(2.0 * heads, 4.4), squeeze=False)
    for r, (label, record, maps, ssim) in enumerate(rows):
        for h in range(heads):
            ax = axes[r][h]
            ax.imshow(maps[h], cmap='viridis', vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f'head {h}', fontsize=8)
        axes[r][0].set_ylabel(f'{label}\nmean SSIM$^2$ {ssim:.3f}', fontsize=8)
    fig.suptitle(f'{rows[0][1].name}: min-max normalised attention logits of the middle '
                 'query, per head', fontsize=9)
    fig.tight_layout()
    path = out_dir / ATTENTION_FIGURE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_figures(out_dir, teacher, settings: SynthesisConfig, device) -> None:
    """Both figures; a failure is logged, never fatal (the dataset is already written)."""
    try:
        contact_sheet(out_dir, settings.contact_sheet_max)
    except Exception as err:  # figures are a convenience
        logger.warning('contact sheet not written: %s: %s', type(err).__name__, err)
    if teacher is None:
        return
    try:
        attention_heads_figure(out_dir, teacher, settings, device)
    except Exception as err:
        logger.warning('attention figure not written: %s: %s', type(err).__name__, err)
