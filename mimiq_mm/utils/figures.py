"""Figures of the demo and the benchmarks (matplotlib, Agg backend: no display needed).

- :func:`results_bar_chart`: grouped bars, one group per method, one bar per metric, with
  the float model as a dashed line per metric.
- :func:`attention_head_maps` + :func:`teacher_student_attention_figure`: one attention
  layer of the float teacher and of the quantized student on the same image, per head.
  Swin windows are stitched back into the feature map, so each panel covers the whole image.
- :func:`synthetic_contact_sheet`: the contact sheet of a synthetic dataset folder.
- :func:`metric_curves`: one line per series of ``(x, y)`` points, log x axis (accuracy
  against synthesis cost).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ['results_bar_chart', 'attention_head_maps', 'pick_attention_layer',
           'teacher_student_attention_figure', 'synthetic_contact_sheet', 'metric_curves']

MAX_HEADS_SHOWN = 8


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path, dpi: int, **layout) -> Path:
    """Lay out ``fig``, write it to ``path`` (parents made) and close it."""
    fig.tight_layout(**layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def results_bar_chart(rows: Sequence[dict], metrics: Sequence[Tuple[str, str]], path,
                      title: str = '', reference: Optional[dict] = None,
                      scale: float = 100.0) -> Path:
    """Grouped bar chart of ``rows`` (dicts with a ``label`` and the metric keys).

    Args:
        metrics: ``(key, label)`` pairs; values are multiplied by ``scale`` (percent).
        reference: a row drawn as a dashed horizontal line per metric (the float model).
    """
    plt = _pyplot()
    path = Path(path)
    import textwrap
    labels = [textwrap.fill(str(r.get('label', r.get('method', ''))), 20) for r in rows]
    n, m = len(rows), len(metrics)
    width = 0.8 / max(m, 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * n + 1.5), 4.2))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    x = np.arange(n)
    for j, (key, label) in enumerate(metrics):
        values = [r.get(key) for r in rows]
        heights = [scale * v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + (j - (m - 1) / 2) * width, heights, width, label=label,
                      color=colours[j % len(colours)])
        for bar, v in zip(bars, values):
            text = 'n/a' if v is None else f'{scale * v:.1f}'
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha='center', va='bottom', fontsize=7, xytext=(0, 1),
                        textcoords='offset points')
        if reference is not None and reference.get(key) is not None:
            ax.axhline(scale * reference[key], color=colours[j % len(colours)],
                       linestyle='--', linewidth=1, alpha=0.7)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel('%' if scale == 100.0 else 'value')
    top = max([scale * (r.get(k) or 0.0) for r in rows for k, _ in metrics] + [1e-3])
    ax.set_ylim(0, top * 1.18)
    ax.legend(fontsize=8, loc='upper right')
    if title:
        ax.set_title(title, fontsize=9)
    return _save(plt, fig, path, dpi=110)


def metric_curves(series: Dict[str, Sequence[Tuple[float, float]]], path, xlabel: str = '',
                  ylabel: str = '', title: str = '') -> Path:
    """Line plot, one line per ``series`` entry (its points sorted by x), log x axis."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker='o', label=label)
    ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path, dpi=110)


def _window_layout(num_windows: int, image_hw: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """(rows, cols) of windows whose aspect ratio is closest to the image's."""
    aspect = (image_hw[0] / image_hw[1]) if image_hw else 1.0
    best = (1, num_windows)
    for rows in range(1, num_windows + 1):
        if num_windows % rows:
            continue
        cols = num_windows // rows
        if abs(math.log(rows / cols) - math.log(aspect)) < \
                abs(math.log(best[0] / best[1]) - math.log(aspect)):
            best = (rows, cols)
    return best


def attention_head_maps(record, batch_size: int = 1, image_index: int = 0,
                        image_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """``(H, h, w)`` attention each key token receives (softmax over keys, mean over the
    queries of its window) for image ``image_index`` of a recorded batch.

    For window attention (``B' = batch * windows``) the windows are stitched back in
    row-major order (mmdet/mmseg ``window_partition``), so a map covers the whole feature
    map of an unshifted block; ``image_hw`` picks the window layout of non-square inputs.
    """
    p = record.num_prefix_tokens
    logits = record.logits.detach().float()
    probs = torch.softmax(logits, dim=-1)[:, :, p:, p:]
    received = probs.mean(dim=2)                                  # (B', H, Nk)
    windows = received.shape[0] // batch_size
    received = received[image_index * windows:(image_index + 1) * windows]
    keys = received.shape[-1]
    grid = record.grid
    if grid is None or grid[0] * grid[1] != keys:
        side = math.isqrt(keys)
        grid = (side, keys // side) if side * (keys // side) == keys else (1, keys)
    rows, cols = _window_layout(windows, image_hw)
    heads = received.shape[1]
    maps = received.reshape(rows, cols, heads, grid[0], grid[1])
    maps = maps.permute(2, 0, 3, 1, 4).reshape(heads, rows * grid[0], cols * grid[1])
    return maps.cpu().numpy()


def pick_attention_layer(records, windows_per_image: int = 4, batch_size: int = 1) -> str:
    """Default layer to show: among the layers with at least ``windows_per_image`` windows
    (a map with spatial extent), the first one with the most heads."""
    multi = [r for r in records if r.logits.shape[1] > 1]
    if not multi:
        raise ValueError('no attention layer with 2 or more heads to show')
    wide = [r for r in multi if r.logits.shape[0] // batch_size >= windows_per_image] or multi
    most = max(r.logits.shape[1] for r in wide)
    return next(r.name for r in wide if r.logits.shape[1] == most)


def _normalise(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float('nan')


@torch.no_grad()
def teacher_student_attention_figure(teacher: torch.nn.Module, student: torch.nn.Module,
                                     inputs: torch.Tensor, image_rgb: np.ndarray, path,
                                     layer: Optional[str] = None,
                                     title: str = '') -> Dict[str, object]:
    """Per-head attention of one layer, float teacher (top row) vs quantized student
    (bottom row), on the same input image; each student panel is titled with its Pearson
    correlation to the teacher's head.

    Args:
        teacher, student: modules with adapted attention (e.g. ``distiller.teacher.backbone``
            and ``distiller.student.backbone``); called as ``module(inputs)``.
        inputs: ``(1, 3, H, W)`` normalised network input.
        image_rgb: ``(H, W, 3)`` uint8 image shown on the left.
        layer: recorded attention module name (default :func:`pick_attention_layer`).

    Returns:
        ``dict(path=..., layer=..., head_correlation=[...])``.
    """
    from mimiq_mm.attention import AttentionRecorder
    plt = _pyplot()
    path = Path(path)
    image_hw = tuple(inputs.shape[-2:])
    maps = {}
    for key, module in (('teacher', teacher), ('student', student)):
        with AttentionRecorder(module, detach=True) as rec:
            module(inputs)
        if layer is None:
            layer = pick_attention_layer(rec.records)
        by_name = rec.by_name()
        if layer not in by_name:
            raise KeyError(f'attention layer {layer!r} not recorded; layers: {sorted(by_name)}')
        maps[key] = attention_head_maps(by_name[layer][0], 1, 0, image_hw)
    heads = min(maps['teacher'].shape[0], MAX_HEADS_SHOWN)
    corr = [_correlation(maps['teacher'][h], maps['student'][h])
            for h in range(maps['teacher'].shape[0])]
    fig, axes = plt.subplots(2, heads + 1, figsize=(1.9 * (heads + 1), 5.0), squeeze=False)
    for r, key in enumerate(('teacher', 'student')):
        axes[r][0].imshow(image_rgb)
        axes[r][0].set_ylabel('float teacher' if key == 'teacher' else 'W/A quantized\nstudent',
                              fontsize=8)
        for h in range(heads):
            ax = axes[r][h + 1]
            ax.imshow(_normalise(maps[key][h]), cmap='viridis', vmin=0.0, vmax=1.0,
                      interpolation='nearest')
            ax.set_title(f'head {h}' if key == 'teacher' else f'head {h}  r={corr[h]:.2f}',
                         fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    what = (f'{layer}: attention received per key token (softmax over keys, mean over the '
            'queries of its window), min-max normalised per panel')
    fig.suptitle(f'{title}\n{what}' if title else what, fontsize=8)
    _save(plt, fig, path, dpi=100, h_pad=1.5)  # h_pad: room for the student row's titles
    return dict(path=str(path), layer=layer, head_correlation=corr)


def synthetic_contact_sheet(synthetic_dir, path, max_images: int = 64) -> Optional[Path]:
    """Copy (or make) the contact sheet of a synthetic dataset folder to ``path``."""
    from mimiq_mm.synthesis.visualize import CONTACT_SHEET, contact_sheet
    synthetic_dir, path = Path(synthetic_dir), Path(path)
    sheet = synthetic_dir / CONTACT_SHEET
    if not sheet.is_file():
        sheet = contact_sheet(synthetic_dir, max_images)
        if sheet is None:
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sheet, path)
    return path
