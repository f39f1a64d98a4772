"""``synthesize(teacher, out_dir, cfg)``: resumable, sharded generation of a synthetic dataset.

Batches are the unit of work. Batch ``b`` holds images ``b * batch_size ...`` and is generated
from its own seed ``batch_seed(seed, b)`` only, so a batch generated again after a crash is the
same batch, and the final folder does not depend on how often the run was interrupted. Under
torchrun each rank takes the batch indices ``b % world_size == rank``: disjoint shards, each
batch with its own seed.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import RESUME_IGNORED_KEYS, SynthesisConfig
from .methods import BatchContext, build_method
from .teacher import SynthesisTeacher, as_teacher
from .writer import FORMAT_VERSION, DatasetFolder, image_name, writer_lock

__all__ = ['synthesize', 'batch_seed', 'shard_batches', 'dist_info']

logger = logging.getLogger(__name__)

SEED_BITS = 63


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of one batch: a hash of (global seed, batch index); batch indices are disjoint
    across ranks, so every rank's batches have their own seeds."""
    digest = hashlib.sha256(f'mimiq_mm/{int(seed)}/{int(batch_index)}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << SEED_BITS) - 1)


def shard_batches(num_batches: int, rank: int, world_size: int) -> List[int]:
    return [b for b in range(num_batches) if b % world_size == rank]


def dist_info(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """(rank, world_size): explicit values, else torch.distributed, else RANK/WORLD_SIZE env."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))


def _resolve_device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    return torch.device('cpu')


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _output_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESUME_IGNORED_KEYS}


def _check_compatible(existing: dict, manifest: dict, out_dir: Path) -> None:
    old = _output_settings(existing.get('config', {}))
    new = _output_settings(manifest['config'])
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    for key in ('mean', 'std', 'channel_order'):
        if existing.get(key) != manifest.get(key):
            diff.append(key)
    # sets written before the fingerprint existed, or without a teacher, are not compared
    if existing.get('teacher_weights') and manifest.get('teacher_weights') and \
            existing['teacher_weights'] != manifest['teacher_weights']:
        diff.append('teacher_weights')
    if diff:
        details = ', '.join(f'{k}: {old.get(k, existing.get(k))!r} -> '
                            f'{new.get(k, manifest.get(k))!r}' for k in diff)
        raise ValueError(
            f'{out_dir} already holds a synthetic dataset made with other settings ({details}). '
            'Resume with the same synthesis config, or choose a new folder: '
            'tools/train.py --cfg-options synthetic_root=DIR, tools/generate.py --work-dir DIR, '
            'synthesize(..., out_dir=DIR).')


def check_synthetic_set(out_dir, settings: SynthesisConfig, teacher=None) -> None:
    """Raise ValueError when ``out_dir`` already holds a synthetic set whose manifest was
    written with other image-changing settings than ``settings``, or (``teacher`` given)
    by a teacher with other weights (a finished set is reused as it is, so a changed config
    or teacher checkpoint must not meet the images of the old one). No manifest: nothing
    to check."""
    folder = DatasetFolder(out_dir)
    try:
        existing = folder.read_manifest()
    except (OSError, ValueError):  # unreadable: left to the reader of the set
        return
    if not isinstance(existing, dict):
        return
    wanted = {key: existing.get(key) for key in ('mean', 'std', 'channel_order')}
    if teacher is not None:
        wanted['teacher_weights'] = as_teacher(teacher).fingerprint()
    _check_compatible(existing, dict(wanted, config=settings.to_dict()), folder.root)


def _make_progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it
        return None
    return tqdm(total=total, desc=desc, unit='it', dynamic_ncols=True)


def _adapt_attention(teacher: SynthesisTeacher, required: bool) -> bool:
    """Adapt the teacher's attention modules in place (outputs unchanged); True on success."""
    try:
        from ..attention import adapt_attention_
        adapt_attention_(teacher.attention_scope)
        return True
    except Exception as err:
        if required:
            raise
        logger.warning('attention recording unavailable for %s (%s: %s); inter-head SSIM '
                       'is not reported', type(teacher.attention_scope).__name__,
                       type(err).__name__, err)
        return False


def _manifest(settings: SynthesisConfig, teacher: Optional[SynthesisTeacher],
              world_size: int) -> dict:
    from .teacher import IMAGENET_MEAN, IMAGENET_STD
    return {
        'format_version': FORMAT_VERSION,
        'method': settings.method,
        'seed': settings.seed,
        'num_images': settings.num_images,
        'batch_size': settings.batch_size,
        'num_batches': settings.num_batches,
        'image_size': list(settings.image_size),
        'mean': teacher.mean if teacher is not None else list(IMAGENET_MEAN),
        'std': teacher.std if teacher is not None else list(IMAGENET_STD),
        'channel_order': teacher.channel_order if teacher is not None else 'rgb',
        'teacher': teacher.description if teacher is not None else None,
        'teacher_weights': teacher.fingerprint() if teacher is not None else None,
        'world_size': world_size,
        'config': settings.to_dict(),
        'created': _now(),
    }


def _batch_summary(record: dict) -> dict:
    keys = ('batch_index', 'rank', 'seed', 'losses', 'ssim_before', 'ssim_after', 'seconds')
    summary = {k: record.get(k) for k in keys}
    summary['num_images'] = len(record.get('images', []))
    return summary


def _finalise_manifest(folder: DatasetFolder, manifest: dict, settings: SynthesisConfig) -> dict:
    records = folder.finished()
    manifest = dict(manifest)
    manifest['batches'] = [_batch_summary(records[b]) for b in sorted(records)]
    manifest['num_finished_batches'] = len(records)
    manifest['complete'] = len(records) == settings.num_batches
    for when in ('before', 'after'):
        values = [r[f'ssim_{when}'] for r in records.values() if r.get(f'ssim_{when}')]
        for key in ('ssim', 'ssim_sq'):
            if values:
                manifest[f'mean_{key}_{when}'] = sum(v[key] for v in values) / len(values)
    manifest['updated'] = _now()
    folder.write_manifest(manifest)
    return manifest


def _batch_problems(folder: DatasetFolder, settings: SynthesisConfig, b: int,
                    record: dict) -> List[Tuple[str, str]]:
    """[(file, reason)] of what is wrong with finished batch ``b``: its record lists other
    images than the settings make, or (``check_images_on_resume``) an image is missing,
    unreadable or of the wrong size."""
    first = b * settings.batch_size
    count = min(settings.batch_size, settings.num_images - first)
    expected = [image_name(first + i) for i in range(count)]
    if record.get('images') != expected:
        return [(folder.batch_path(b).name, f'lists {record.get("images")}, '
                                            f'expected {expected}')]
    if settings.check_images_on_resume:
        return folder.validate_batch(record, settings.image_size)
    return []


def corrupt_batches(out_dir, cfg=None) -> Dict[int, List[Tuple[str, str]]]:
    """``{batch: [(file, reason)]}`` for the finished batches of the synthetic set in
    ``out_dir`` that :func:`synthesize` would regenerate (missing, truncated or wrongly
    sized images). Read-only; empty for a sound set."""
    settings = SynthesisConfig.from_dict(cfg)
    folder = DatasetFolder(out_dir)
    problems = {}
    for b, record in folder.finished().items():
        if 0 <= b < settings.num_batches:
            bad = _batch_problems(folder, settings, b, record)
            if bad:
                problems[b] = bad
    return problems


def _pending_batches(folder: DatasetFolder, settings: SynthesisConfig, mine: List[int]
                     ) -> Tuple[List[int], Dict[int, list]]:
    """Batches of this rank still to generate, and the corrupt files found per batch."""
    finished = folder.finished()
    pending, corrupt = [], {}
    for b in mine:
        record = finished.get(b)
        if record is None:
            pending.append(b)
            continue
        bad = _batch_problems(folder, settings, b, record)
        if bad:
            for name, reason in bad:
                logger.warning('corrupt synthetic image %s in %s (batch %d): %s; '
                               'regenerating batch %d', name, folder.root, b, reason, b)
            folder.invalidate_batch(b)
            corrupt[b] = [{'file': n, 'reason': r} for n, r in bad]
            pending.append(b)
    return pending, corrupt


def synthesize(teacher, out_dir, cfg=None, *, classifier: Optional[nn.Module] = None,
               on_batch_end: Optional[Callable[[int, dict], None]] = None,
               rank: Optional[int] = None, world_size: Optional[int] = None) -> Path:
    """Generate (or finish) a synthetic image dataset in ``out_dir``.

    Args:
        teacher: the float model (mmdet detector, mmseg segmentor, timm classifier, backbone
            ``nn.Module``) or a :class:`SynthesisTeacher`; may be ``None`` for ``method='real'``.
            The model is moved to the synthesis device; its attention modules are adapted in
            place (same outputs); eval mode and ``requires_grad`` are restored afterwards.
        out_dir: dataset folder (created; an existing one is resumed).
        cfg: a :class:`SynthesisConfig`, a ``synthesis`` dict, or a full config with a
            ``synthesis`` key.
        classifier: classification head on the backbone outputs (``task_loss='classifier'``).
        on_batch_end: called as ``on_batch_end(batch_index, record)`` after each batch is
            finished (its record written).
        rank, world_size: shard explicitly (default: torch.distributed or RANK/WORLD_SIZE).

    Returns:
        ``Path(out_dir)``.
    """
    settings = SynthesisConfig.from_dict(cfg)
    rank, world_size = dist_info(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} outside world_size {world_size}')
    device = _resolve_device(settings.device)
    if teacher is not None:
        teacher = as_teacher(teacher, classifier=classifier)
    elif settings.method != 'real':
        raise ValueError(f"synthesis method {settings.method!r} needs a teacher model")

    folder = DatasetFolder(out_dir, rank)
    folder.root.mkdir(parents=True, exist_ok=True)
    with writer_lock(folder.root, rank):  # one writer per shard and folder
        _synthesize_locked(folder, teacher, settings, rank, world_size, device, on_batch_end)
    return folder.root


def _synthesize_locked(folder: DatasetFolder, teacher, settings: SynthesisConfig, rank: int,
                       world_size: int, device: torch.device, on_batch_end) -> None:
    folder.prepare()
    manifest = _manifest(settings, teacher, world_size)
    existing = folder.read_manifest()
    if existing is not None:
        _check_compatible(existing, manifest, folder.root)
        manifest['created'] = existing.get('created', manifest['created'])
    else:
        folder.write_manifest(manifest)

    mine = shard_batches(settings.num_batches, rank, world_size)
    pending, corrupt = _pending_batches(folder, settings, mine)
    if len(pending) < len(mine):
        logger.info('resuming %s: %d of this rank\'s %d batches already finished',
                    folder.root, len(mine) - len(pending), len(mine))

    frozen = teacher.frozen() if teacher is not None else contextlib.nullcontext()
    with frozen:
        attention = False
        if teacher is not None:
            teacher.to(device)
            needs = settings.method == 'mimiq'
            attention = _adapt_attention(teacher, required=needs)
        method = build_method(settings, teacher, attention)
        bar = _make_progress(len(pending) * max(settings.iterations, 1),
                             settings.progress and rank == 0 and bool(pending),
                             f'synthesis[{settings.method}]')
        try:
            for b in pending:
                _run_batch(b, settings, method, folder, device, bar, corrupt.get(b),
                           on_batch_end, rank)
        finally:
            if bar is not None:
                bar.close()
        manifest = _finalise_manifest(folder, manifest, settings)
        if rank == 0 and settings.figures:
            from .visualize import write_figures
            write_figures(folder.root, teacher if attention else None, settings, device)


def _run_batch(b: int, settings: SynthesisConfig, method, folder: DatasetFolder,
               device: torch.device, bar, corrupt, on_batch_end, rank: int) -> None:
    first = b * settings.batch_size
    indices = list(range(first, min(first + settings.batch_size, settings.num_images)))
    seed = batch_seed(settings.seed, b)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def progress(steps: int, terms: Dict[str, float]) -> None:
        if bar is None:
            return
        bar.update(steps)
        shown = {'batch': b}
        shown.update({k: f'{v:.4g}' for k, v in terms.items()})
        bar.set_postfix(shown, refresh=False)

    ctx = BatchContext(batch_index=b, num_images=len(indices), seed=seed, generator=generator,
                       device=device, image_indices=indices, progress=progress)
    start = time.perf_counter()
    result = method.generate(ctx)
    rgb = result.rgb if result.rgb is not None else method.teacher.to_pixels(result.x).numpy()
    names = folder.write_images(first, rgb)
    record = {
        'batch_index': b,
        'rank': rank,
        'seed': seed,
        'method': settings.method,
        'images': names,
        'image_ids': indices,
        'losses': result.losses,
        'ssim_before': result.ssim_before,
        'ssim_after': result.ssim_after,
        'iterations': settings.iterations if settings.method in ('mimiq', 'psaq') else 0,
        'seconds': round(time.perf_counter() - start, 3),
        'history': result.history,
        'finished': _now(),
    }
    if corrupt:
        record['regenerated_because'] = corrupt
    folder.write_batch_record(b, record)        # last: marks the batch finished
    if on_batch_end is not None:
        on_batch_end(b, record)
