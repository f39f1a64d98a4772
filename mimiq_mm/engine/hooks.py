"""Hooks of the MimiQ fine-tuning run (stage 5).

* :class:`MimiQSynthesisHook` — generates the synthetic training set when it is missing,
  unfinished or has missing / corrupt images (only those batches are made again), before
  the train dataloader is built (hook point
  ``before_build_train_dataloader``, called by :class:`MimiQIterBasedTrainLoop`).
* :class:`MimiQCalibrationHook` — calibrates the student's quantizers on N synthetic
  batches before the first train step; skipped when every quantizer is already initialised
  (resume, or ``load_from`` a MimiQ checkpoint: the quantizer state lives in buffers /
  parameters and so in the checkpoint).

Under DDP (torchrun, ``--launcher pytorch``) each rank synthesizes its shard of the set, and
each rank observes ``num_batches`` batches of its own part of the data; the observer
statistics are then merged across ranks (:func:`sync_observers_`) so that the ranges come
from all of them, and rank 0's student state is broadcast so every rank starts fine-tuning
from bit-identical quantizers.
"""
import contextlib
import copy
import json
import logging
import os
import os.path as osp
import random
import time
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from mmengine import dist
from mmengine.hooks import Hook
from mmengine.logging import print_log

from mimiq_mm.registry import HOOKS

from .config_utils import nested_datasets

SYNTH_POLL_SECONDS = 1.0  # how often a rank looks for the other ranks' batches


def synthetic_set_complete(data_root: str, num_batches: Optional[int] = None) -> bool:
    """True when ``data_root`` holds a finished synthetic set: every batch listed in the
    manifest (or ``num_batches``) has a READABLE ``batches/*.json`` (docs/INTERFACES.md).
    "Finished" is :func:`mimiq_mm.synthesis.writer.read_finished_batches`, the definition the
    writer regenerates by and the dataset reads by, so a damaged record means "synthesize
    that batch again", never "complete" here and a crash in the reader."""
    from mimiq_mm.synthesis.writer import read_finished_batches
    manifest = osp.join(data_root, 'manifest.json')
    if not osp.isfile(manifest):
        return False
    try:
        with open(manifest) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    expected = num_batches or (meta.get('num_batches') if isinstance(meta, dict) else None)
    finished = read_finished_batches(data_root)
    if expected:
        return sum(1 for b in finished if 0 <= b < expected) >= expected
    return bool(finished)


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Run a block without touching the global random state of ``random``, numpy and torch
    (CPU and CUDA) that the training data pipeline draws from (``RandomFlip`` & co. with
    ``num_workers=0``). Synthesis and calibration run in a straight run but not in a
    resumed one, so whatever they draw would otherwise shift every later random transform
    and a resumed run would not continue the straight run."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _dataset_root(dataloader_cfg) -> Optional[str]:
    """``data_root`` of the innermost dataset of a dataloader config."""
    datasets = list(nested_datasets(dataloader_cfg))
    return datasets[-1].get('data_root') if datasets else None


@HOOKS.register_module()
class MimiQSynthesisHook(Hook):
    """Run :func:`mimiq_mm.synthesis.synthesize` with the teacher when the set is missing.

    Args:
        synthesis: settings for ``synthesize`` (``SynthesisConfig`` fields); default: the
            config's top-level ``synthesis`` dict.
        data_root: output folder; default: ``data_root`` of the train dataset.
        wait_timeout: seconds the non-zero ranks wait for rank 0's synthesis (file polling,
            so NCCL's barrier timeout is not hit by a long synthesis).

    Every rank synthesizes its shard of the batches (``synthesize`` shards over
    torch.distributed ranks and resumes an unfinished folder); rank 0 then waits (file
    polling) until all shards are written, and all ranks meet at a barrier.
    """
    priority = 'VERY_HIGH'

    def __init__(self, synthesis: Optional[dict] = None, data_root: Optional[str] = None,
                 wait_timeout: float = 7 * 24 * 3600.0):
        if synthesis is not None and not isinstance(synthesis, dict):
            raise TypeError(f'synthesis must be a dict of SynthesisConfig fields, got '
                            f'{type(synthesis).__name__}')
        self.synthesis = synthesis
        self.data_root = data_root
        self.wait_timeout = float(wait_timeout)

    def _settings(self, runner) -> dict:
        if self.synthesis is not None:
            return dict(self.synthesis)
        cfg = getattr(runner, 'cfg', None)
        synth = cfg.get('synthesis', None) if cfg is not None else None
        if synth is None:
            raise ValueError('MimiQSynthesisHook has no synthesis settings: give '
                             'MimiQSynthesisHook(synthesis=dict(...)) or a top-level '
                             '`synthesis = dict(...)` in the config.')
        return dict(synth)

    def ensure_synthetic_data(self, runner, data_root: Optional[str] = None) -> str:
        from mimiq_mm.models import unwrap_distiller
        root = self.data_root or data_root
        if not root:
            raise ValueError('MimiQSynthesisHook cannot tell where the synthetic set goes: '
                             'set train_dataloader.dataset.data_root or '
                             'MimiQSynthesisHook(data_root=...).')
        from mimiq_mm.synthesis import (SynthesisConfig, check_synthetic_set,
                                        corrupt_batches, synthesize)
        settings = SynthesisConfig.from_dict(self._settings(runner))
        model = unwrap_distiller(runner.model)
        if model is None:
            raise TypeError('MimiQSynthesisHook needs a MimiQDistiller model (its float '
                            'teacher generates the images).')
        if synthetic_set_complete(root, settings.num_batches):
            # a finished set made otherwise, or by another teacher: a clear error
            check_synthetic_set(root, settings, model.teacher)
            bad = corrupt_batches(root, settings)
            if not bad:
                print_log(f'Synthetic set found at {root}; skipping synthesis.',
                          logger='current')
                return root
            files = ', '.join(f'{name} ({reason})' for b in sorted(bad)
                              for name, reason in bad[b][:2])
            print_log(f'Synthetic set at {root}: {len(bad)} finished batch(es) have missing or '
                      f'corrupt images ({files}); regenerating those batches.',
                      logger='current', level=logging.WARNING)
        print_log(f'Synthesizing the training set into {root} ({settings.num_images} '
                  f'images) ...', logger='current')
        os.makedirs(root, exist_ok=True)
        device = next(model.student.parameters()).device
        with preserved_global_rng():
            synthesize(model.teacher, root, settings)
        model.teacher.to(device)  # synthesis may have moved it
        start = time.time()
        while not synthetic_set_complete(root, settings.num_batches):
            if time.time() - start > self.wait_timeout:
                raise TimeoutError(f'rank {dist.get_rank()} waited {self.wait_timeout}s for '
                                   f'the other ranks\' synthetic batches in {root}')
            time.sleep(SYNTH_POLL_SECONDS)
        dist.barrier()
        return root

    # custom hook point, called by MimiQIterBasedTrainLoop before building the dataloader
    def before_build_train_dataloader(self, runner, dataloader_cfg=None) -> None:
        self.ensure_synthetic_data(runner, _dataset_root(dataloader_cfg or {}))

    def before_train(self, runner) -> None:
        root = self.data_root or _dataset_root(runner.cfg.get('train_dataloader', {}))
        from mimiq_mm.synthesis.writer import read_finished_batches
        if root and not read_finished_batches(root):
            raise RuntimeError(f'The synthetic set at {root} is missing. Use '
                               "train_cfg=dict(type='mimiq_mm.MimiQIterBasedTrainLoop', ...) so "
                               'MimiQSynthesisHook can create it before the dataloader is '
                               'built, or run tools/generate.py first.')


#: How the observer buffers of the ranks combine (mimiq_mm/quant/observers.py): exact for
#: the running min/max, the batch counts and the sums; ``ema_*`` (order-dependent) averaged.
OBSERVER_REDUCE_OPS = {'min_val': 'min', 'max_val': 'max', 'num_batches': 'sum',
                       'sum_lo': 'sum', 'sum_hi': 'sum', 'abs_sum': 'sum', 'count': 'sum',
                       'ch_sum': 'sum', 'ema_lo': 'mean', 'ema_hi': 'mean'}


@torch.no_grad()
def sync_observers_(model) -> int:
    """All-reduce the statistics of every observer in ``model`` across the ranks (in place),
    so that qparams computed from them cover the data seen by all ranks: min/max over
    the union, batch-averaged ranges and mean|x| over all batches. Buffers with no rule in
    :data:`OBSERVER_REDUCE_OPS` are left alone (the caller broadcasts rank 0's state
    afterwards). Every rank must call it (same model structure). Returns the number of
    buffers reduced; 0 when not distributed."""
    if dist.get_world_size() <= 1:
        return 0
    from mimiq_mm.quant.observers import ChannelMeanObserver, Observer
    reduced = 0
    for module in model.modules():
        if not isinstance(module, (Observer, ChannelMeanObserver)):
            continue
        for name, buf in module.named_buffers(recurse=False):
            op = OBSERVER_REDUCE_OPS.get(name)
            if op is None:
                continue
            if op == 'mean' and not buf.is_floating_point():
                continue
            dist.all_reduce(buf, op=op)
            reduced += 1
    return reduced


def student_quantizers(model):
    from mimiq_mm.quant.quantizers import Quantizer
    return [m for m in model.student.modules() if isinstance(m, Quantizer)]


@HOOKS.register_module()
class MimiQCalibrationHook(Hook):
    """Calibrate the student's quantizers before the first training step.

    Args:
        num_batches: synthetic batches to observe (per rank under DDP: with a fixed global
            batch the ranks together observe as many images as one process does).
        dataloader: optional dataloader config for calibration (default: a second loader
            built from the train dataloader config, so the training data order is
            unaffected).
        force: calibrate even when every quantizer is already initialised.
    """
    priority = 'VERY_HIGH'

    def __init__(self, num_batches: int = 8, dataloader: Optional[dict] = None,
                 force: bool = False):
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f'num_batches must be a positive int, got {num_batches!r}')
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.force = force

    def before_train(self, runner) -> None:
        from mimiq_mm.models import unwrap_distiller
        model = unwrap_distiller(runner.model)
        if model is None:
            raise TypeError('MimiQCalibrationHook needs a MimiQDistiller model, got '
                            f'{type(runner.model).__name__}')
        quantizers = student_quantizers(model)
        if not quantizers:
            raise RuntimeError('The student has no quantizers: was quantize_ applied?')
        if not self.force and all(q.is_initialized for q in quantizers):
            print_log(f'All {len(quantizers)} quantizers are initialised (resumed or loaded); '
                      'skipping calibration.', logger='current')
            return
        # A separate loader (own sampler): the train loop's data stream stays untouched, so a
        # resumed run (which skips calibration) sees exactly the batches of a straight run.
        loader_cfg = self.dataloader if self.dataloader is not None \
            else runner.cfg.get('train_dataloader')
        if loader_cfg is None:
            raise ValueError('MimiQCalibrationHook needs a dataloader config (argument '
                             '`dataloader` or the config\'s train_dataloader)')
        loader = runner.build_dataloader(copy.deepcopy(loader_cfg), seed=runner.seed)
        # Its random transforms draw from the global RNG too: restored afterwards.
        with preserved_global_rng():
            self.calibrate(model, loader, self.num_batches)
        if dist.get_world_size() > 1:  # bit-identical quantizers on every rank
            state = [{k: v.cpu() for k, v in model.student.state_dict().items()}]
            dist.broadcast_object_list(state, src=0)
            model.student.load_state_dict(state[0])
        n_init = sum(q.is_initialized for q in quantizers)
        world = dist.get_world_size()
        where = f' per rank, statistics merged over {world} ranks' if world > 1 else ''
        print_log(f'Calibrated {n_init}/{len(quantizers)} quantizers on {self.num_batches} '
                  f'synthetic batches{where}.', logger='current')

    @staticmethod
    @torch.no_grad()
    def calibrate(model, loader, num_batches: int) -> None:
        """Observe ``num_batches`` batches of ``loader`` through the student's loss path
        (the student's forward runs in float while the observers collect statistics).
        Distributed: every rank observes ``num_batches`` batches of its own shard and the
        statistics are merged across ranks before the qparams are computed."""
        from mimiq_mm.quant import calibration_mode
        seen = 0
        report: dict = {}
        with calibration_mode(model.student, report=report):
            for batch in loader:
                data = model.data_preprocessor(batch, True)
                model.loss(**data)
                seen += 1
                if seen >= num_batches:
                    break
            if seen == 0:
                raise RuntimeError('Calibration saw no batch: the dataloader is empty.')
            sync_observers_(model.student)
        if 'gptq_summary' in report:
            print_log(report['gptq_summary'], logger='current')


def _mimiq_loop():
    from .loops import MimiQIterBasedTrainLoop
    return MimiQIterBasedTrainLoop


def keep_calibrated(criterion: str, loss_ptq: float, loss_finetuned: float,
                    agreement_ptq: Optional[float] = None,
                    agreement_finetuned: Optional[float] = None) -> Tuple[bool, str]:
    """(keep the calibrated student?, what decided): by the held-out loss (fine-tuning
    raised it), or with ``criterion='agreement'`` by the agreement with the teacher
    (fine-tuning lowered it) when both agreements exist."""
    if criterion == 'agreement' and None not in (agreement_ptq, agreement_finetuned):
        return float(agreement_finetuned) < float(agreement_ptq), 'agreement'
    return loss_finetuned > loss_ptq, 'loss'


def _predict_unscaled(model, inputs, data_samples):
    """``model.predict`` at the network's input size: a synthetic image has no original
    size to scale back to (mmdet's ``rescale`` needs a ``scale_factor``)."""
    import inspect
    for sample in data_samples or ():
        meta = sample.metainfo
        fill = {k: v for k, v in (('scale_factor', (1.0, 1.0)),
                                  ('ori_shape', meta.get('img_shape'))) if k not in meta}
        if fill:
            sample.set_metainfo(fill)
    if 'rescale' in inspect.signature(model.predict).parameters:
        return model.predict(inputs, data_samples, rescale=False)
    return model.predict(inputs, data_samples)


@HOOKS.register_module()
class MimiQKeepBestHook(Hook):
    """Never end a run with a student that fine-tuning made worse (data-free decision).

    The last ``holdout_images`` images of the synthetic set are kept out of training (the
    train dataset gets ``max_images = num_images - holdout_images``). Before the first step
    (after calibration) the student's distillation loss on them is measured and the
    calibrated (PTQ) student is saved to ``<work_dir>/ptq_student.pth``; after the last step
    the loss is measured again, and when fine-tuning raised it the PTQ student is put back
    and the final checkpoint rewritten with it. ``<work_dir>/keep_best.json`` records both
    losses, their terms (``heldout_ptq_terms`` / ``heldout_finetuned_terms``: HSAD, feature
    and head KD separately) and which student was kept
    (:func:`mimiq_mm.models.generic.heldout_loss_terms`).

    Args:
        holdout_images: images held out of training (>= 1; at most a quarter of the set is
            held out; a set of fewer than 4 images gets no decision, with a warning).
        batch_size: batch size of the held-out scoring (default: the train batch size).
        criterion: what decides: ``'loss'`` (the summed held-out distillation loss) or
            ``'agreement'`` (the students' agreement with the teacher's own predictions on
            the held-out images, :class:`mimiq_mm.engine.metrics.TeacherAgreement`: closer
            to the task metric; falls back to the loss when the teacher predicted nothing
            there). Both are recorded either way (``heldout_*_agreement``).
    """
    priority = 'LOW'  # after MimiQCalibrationHook (VERY_HIGH) in before_train
    CRITERIA = ('loss', 'agreement')

    def __init__(self, holdout_images: int = 16, batch_size: Optional[int] = None,
                 criterion: str = 'loss'):
        if isinstance(holdout_images, bool) or not isinstance(holdout_images, int) \
                or holdout_images < 1:
            raise ValueError(f'holdout_images must be an int >= 1, got {holdout_images!r}')
        if criterion not in self.CRITERIA:
            raise ValueError(f'criterion={criterion!r} is not valid; choose one of '
                             f'{list(self.CRITERIA)}')
        self.criterion = criterion
        self.holdout_images = holdout_images
        self.batch_size = batch_size
        self._num_images: Optional[int] = None
        self._heldout_cfg: Optional[dict] = None
        self._holdout = 0

    # called by MimiQIterBasedTrainLoop before the train dataloader is built
    def before_build_train_dataloader(self, runner, dataloader_cfg=None) -> None:
        if dataloader_cfg is None:
            raise ValueError('MimiQKeepBestHook needs the train dataloader as a config dict')
        if not runner.cfg.get('train_cfg', {}).get('max_iters', 1):
            return  # no fine-tuning (PTQ): nothing to decide, every image calibrates
        synth = runner.cfg.get('synthesis', None) or {}
        num = int(synth.get('num_images', 0))
        holdout = min(self.holdout_images, num // 4)  # at most a quarter of the set
        if holdout < 1:
            print_log(f'MimiQKeepBestHook: {num} synthetic images are too few to hold any '
                      'out; the fine-tuned student is kept without a check.',
                      logger='current', level=logging.WARNING)
            return
        self._holdout = holdout
        dataset = list(nested_datasets(dataloader_cfg))[-1]
        held = copy.deepcopy(dict(dataloader_cfg))
        held.update(sampler=dict(type='DefaultSampler', shuffle=False),
                    batch_size=self.batch_size or dataloader_cfg.get('batch_size', 1),
                    num_workers=0, persistent_workers=False)
        held_ds = list(nested_datasets(held))[-1]
        held_ds.pop('max_images', None)
        held_ds['indices'] = list(range(num - holdout, num))
        dataset['max_images'] = num - holdout
        # MimiQCalibrationHook builds its own loader from runner.cfg.train_dataloader (a copy
        # the Runner made of the config): the held-out images stay out of calibration too
        cfg_loader = runner.cfg.get('train_dataloader', None)
        if isinstance(cfg_loader, dict) and cfg_loader is not dataloader_cfg:
            cfg_datasets = list(nested_datasets(cfg_loader))
            if cfg_datasets:
                cfg_datasets[-1]['max_images'] = num - holdout
        self._num_images, self._heldout_cfg = num, held

    def _score(self, runner) -> Tuple[float, Dict[str, float]]:
        """(summed held-out loss, its terms)."""
        from mimiq_mm.models import unwrap_distiller
        from mimiq_mm.models.generic import heldout_loss_terms
        model = unwrap_distiller(runner.model)
        loader = runner.build_dataloader(copy.deepcopy(self._heldout_cfg), seed=runner.seed)
        with preserved_global_rng():
            terms = heldout_loss_terms(
                lambda batch: model.loss(**model.data_preprocessor(batch, True)), loader)
        return float(sum(terms.values())), terms

    def _agreement(self, runner) -> Tuple[Optional[float], str]:
        """(the student's agreement with the teacher on the held-out images, what it
        measures); (None, reason) when it cannot be computed and the loss decides."""
        from mimiq_mm.engine.metrics import TeacherAgreement
        from mimiq_mm.models import unwrap_distiller
        model = unwrap_distiller(runner.model)
        loader = runner.build_dataloader(copy.deepcopy(self._heldout_cfg), seed=runner.seed)
        agree = TeacherAgreement()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), preserved_global_rng():
                for batch in loader:
                    data = model.data_preprocessor(batch, False)
                    teacher = _predict_unscaled(model.teacher, data['inputs'],
                                                copy.deepcopy(data['data_samples']))
                    student = _predict_unscaled(model.student, data['inputs'],
                                                copy.deepcopy(data['data_samples']))
                    agree.add(teacher, student)
        except Exception as err:  # a model without these predictions: the loss decides
            if self.criterion == 'agreement':
                raise
            print_log(f'MimiQKeepBestHook: no teacher agreement ({type(err).__name__}: '
                      f'{err}); recorded as null.', logger='current', level=logging.WARNING)
            return None, f'not computed ({type(err).__name__})'
        finally:
            model.train(was_training)
        value = agree.compute()
        return value, agree.describe() if value is not None else 'teacher predicted nothing'

    def _paths(self, runner):
        return (osp.join(runner.work_dir, 'ptq_student.pth'),
                osp.join(runner.work_dir, 'keep_best.json'))

    def before_train(self, runner) -> None:
        from mimiq_mm.models import unwrap_distiller
        if self._heldout_cfg is None:
            if not isinstance(runner.train_loop, _mimiq_loop()):
                raise RuntimeError('MimiQKeepBestHook needs train_cfg=dict(type='
                                   "'mimiq_mm.MimiQIterBasedTrainLoop', ...) to hold images "
                                   'out')
            return  # PTQ run, or too few images to hold out
        model = unwrap_distiller(runner.model)
        ptq_path, json_path = self._paths(runner)
        if runner.iter > 0 and osp.isfile(ptq_path) and osp.isfile(json_path):
            return  # resumed: the PTQ student and its score were saved by the first run
        self.ptq_loss, terms = self._score(runner)
        agreement, what = self._agreement(runner)
        if dist.get_rank() == 0:
            state = {k: v.detach().cpu() for k, v in model.student.state_dict().items()}
            torch.save(state, ptq_path + '.tmp')
            os.replace(ptq_path + '.tmp', ptq_path)
            with open(json_path, 'w') as f:
                json.dump(dict(heldout_images=self._holdout, heldout_ptq=self.ptq_loss,
                               heldout_ptq_terms=terms, heldout_ptq_agreement=agreement,
                               agreement=what, criterion=self.criterion), f, indent=1)
        print_log(f'Held-out distillation loss of the calibrated student: {self.ptq_loss:.4f} '
                  f'({self._holdout} synthetic images not trained on).', logger='current')

    def after_train(self, runner) -> None:
        from mimiq_mm.models import unwrap_distiller
        if self._heldout_cfg is None:
            return  # PTQ run
        model = unwrap_distiller(runner.model)
        ptq_path, json_path = self._paths(runner)
        with open(json_path) as f:
            record = json.load(f)
        finetuned, terms = self._score(runner)
        agreement, _ = self._agreement(runner)
        ptq_agreement = record.get('heldout_ptq_agreement')
        keep, decided_by = keep_calibrated(self.criterion, float(record['heldout_ptq']),
                                           finetuned, ptq_agreement, agreement)
        keep_ptq = [keep]
        dist.broadcast_object_list(keep_ptq, src=0)
        record.update(heldout_finetuned=finetuned, heldout_finetuned_terms=terms,
                      heldout_finetuned_agreement=agreement, decided_by=decided_by,
                      kept='ptq' if keep_ptq[0] else 'finetuned')
        if keep_ptq[0]:
            state = torch.load(ptq_path, map_location='cpu', weights_only=True)
            model.student.load_state_dict(state)
            runner.save_checkpoint(runner.work_dir, f'iter_{runner.iter}.pth',
                                   save_optimizer=False, save_param_scheduler=False,
                                   meta=dict(mimiq_kept='ptq'))
        if dist.get_rank() == 0:
            with open(json_path, 'w') as f:
                json.dump(record, f, indent=1)
        agree_text = ('' if agreement is None or ptq_agreement is None else
                      f'; agreement with the teacher {float(ptq_agreement):.3f} -> '
                      f'{agreement:.3f}')
        print_log(f'Held-out distillation loss: calibrated {record["heldout_ptq"]:.4f}, '
                  f'fine-tuned {finetuned:.4f}{agree_text}: keeping the {record["kept"]} '
                  f'student (decided by the {decided_by}).', logger='current')
