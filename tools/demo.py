#!/usr/bin/env python
"""The main demo: data-free W4/A4 quantization of the shipped demo teacher with MimiQ,
against the float teacher and a PTQ baseline calibrated on Gaussian noise, all
scored with the real OpenMMLab metrics (COCO bbox/segm mAP, or mIoU) in this very run.

    python tools/demo.py                              # = make demo (detection, W4/A4)
    python tools/demo.py --task seg                   # UperNet Swin, mIoU
    python tools/demo.py --num-images 16 --synth-iters 20 --ft-iters 20 --num-val 20
    python tools/demo.py --teacher-checkpoint /path/to/float.pth --work-dir work_dirs/x

Stages (each cached in the work dir and reused by a later run unless --force):
  data      the demo val set (tools/make_demo_data.py functions; the train images are never
            generated nor read: the method is data-free);
  float     the float teacher on demo val;
  ptq       PTQ of the teacher with the quantizers of configs/mimiq/demo_*_w4a4.py (det:
            min-max ranges, log2 post-softmax grid; seg: percentile ranges), calibrated on
            Gaussian-noise images, no fine-tuning;
  ptq_mimiq the same PTQ calibrated on the MimiQ synthetic images (synthesized
            here, then reused by the next stage);
  mimiq     MimiQ: images synthesized against the teacher's backbone with the inter-head
            attention similarity loss (MimiQSynthesisHook), quantizers calibrated on them
            (MimiQCalibrationHook), HSAD + task-KD fine-tuning (MimiQDistiller, mmengine
            Runner, the tools/train.py machinery), then evaluated.
Writes results.json, results.md, synthetic_contact_sheet.png, attention_teacher_vs_student.png
and results_bar.png into the work dir, and prints the table and the time of every stage.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import os.path as osp
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mimiq_mm  # noqa: E402,F401  (registries, safe checkpoint loading)
from mimiq_mm.utils.report import (Column, format_seconds, machine_info,  # noqa: E402
                                   markdown_table, percent_of, read_json, text_table,
                                   write_json)

RESULT_FILE = 'result.json'
FINGERPRINT_VERSION = 1


# ----------------------------------------------------------------------------- tasks
@dataclasses.dataclass(frozen=True)
class Metric:
    key: str        # key in the Runner's test() dict
    name: str       # key in results.json (always a fraction in [0, 1])
    label: str      # table header
    scale: float    # runner value * scale = fraction (mmseg reports mIoU in percent)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    mimiq_config: str
    float_config: str
    checkpoint: str
    dataset: str            # 'coco' | 'ade'
    metrics: Tuple[Metric, ...]
    default_work_dir: str

    @property
    def primary(self) -> Metric:
        return self.metrics[0]


TASKS: Dict[str, TaskSpec] = {
    'det': TaskSpec(
        name='det',
        mimiq_config='configs/mimiq/demo_maskrcnn_swin_w4a4.py',
        float_config='configs/demo/maskrcnn_swin_demo.py',
        checkpoint='checkpoints/demo/maskrcnn_swin_demo.pth',
        dataset='coco',
        metrics=(Metric('coco/bbox_mAP', 'bbox_mAP', 'bbox mAP', 1.0),
                 Metric('coco/segm_mAP', 'segm_mAP', 'segm mAP', 1.0)),
        default_work_dir='work_dirs/demo'),
    'seg': TaskSpec(
        name='seg',
        mimiq_config='configs/mimiq/demo_upernet_swin_w4a4.py',
        float_config='configs/demo/upernet_swin_demo.py',
        checkpoint='checkpoints/demo/upernet_swin_demo.pth',
        dataset='ade',
        metrics=(Metric('mIoU', 'mIoU', 'mIoU', 0.01),),
        default_work_dir='work_dirs/demo_seg'),
    # The real-backbone teachers: the same heads on a frozen pretrained DINOv2 ViT-S/14
    # (its weights from `make setup`; the shipped checkpoints hold the neck and heads).
    'det_dinov2': TaskSpec(
        name='det_dinov2',
        mimiq_config='configs/mimiq/demo_maskrcnn_dinov2_w4a4.py',
        float_config='configs/demo/maskrcnn_dinov2_demo.py',
        checkpoint='checkpoints/dinov2/maskrcnn_dinov2_demo.pth',
        dataset='coco',
        metrics=(Metric('coco/bbox_mAP', 'bbox_mAP', 'bbox mAP', 1.0),
                 Metric('coco/segm_mAP', 'segm_mAP', 'segm mAP', 1.0)),
        default_work_dir='work_dirs/demo_det_dinov2'),
    'seg_dinov2': TaskSpec(
        name='seg_dinov2',
        mimiq_config='configs/mimiq/demo_upernet_dinov2_w4a4.py',
        float_config='configs/demo/upernet_dinov2_demo.py',
        checkpoint='checkpoints/dinov2/upernet_dinov2_demo.pth',
        dataset='ade',
        metrics=(Metric('mIoU', 'mIoU', 'mIoU', 0.01),),
        default_work_dir='work_dirs/demo_seg_dinov2'),
}


# ----------------------------------------------------------------------------- recipes
@dataclasses.dataclass(frozen=True)
class Recipe:
    """One way of producing a quantized student (a row of the results).

    Attributes:
        synthesis: method of the calibration / training images ('gaussian', 'psaq',
            'mimiq', 'real').
        synthesis_overrides: extra ``SynthesisConfig`` fields (ablations).
        learn_steps: the activation steps are learnt (LSQ) in fine-tuning, starting from
            the calibrated ranges; False = post-training quantization (ranges fixed). How
            the ranges are calibrated (``quant_cfg.act.observer``: min-max, percentile,
            MSE; ``quant_cfg.attn_prob.kind``: uniform or log2) comes from the config, so
            every row of a table shares one range estimator.
        finetune: run the HSAD + task-KD fine-tuning (MimiQDistiller) after calibration.
        model_overrides: ``MimiQDistiller`` arguments changed (ablations).
    """
    name: str
    label: str
    synthesis: str
    learn_steps: bool = False
    finetune: bool = False
    synthesis_overrides: Tuple[Tuple[str, object], ...] = ()
    model_overrides: Tuple[Tuple[str, object], ...] = ()


NO_TASK_KD = (('kd_weights', (('rpn_cls', 0.0), ('rpn_reg', 0.0), ('roi_cls', 0.0),
                              ('roi_reg', 0.0), ('roi_mask', 0.0), ('seg', 0.0),
                              ('seg_aux', 0.0))),)

RECIPES: Dict[str, Recipe] = {r.name: r for r in [
    Recipe('ptq_gaussian', 'PTQ on Gaussian noise', 'gaussian'),
    Recipe('ptq_psaq', 'PTQ on PSAQ-ViT synthetic', 'psaq'),
    Recipe('ptq_mimiq', 'PTQ on MimiQ synthetic', 'mimiq'),
    # Calibrated initial steps, then learnt (LSQ) during fine-tuning: on the demo teacher the
    # 2*mean|x|/sqrt(Qmax) LSQ init scored below min-max before and after fine-tuning.
    Recipe('mimiq', 'MimiQ (synthesis + HSAD/KD fine-tuning)', 'mimiq', True, True),
    Recipe('ptq_real', 'PTQ on real train images', 'real'),
    Recipe('ft_real', 'real-data fine-tuning (same recipe)', 'real', True, True),
    Recipe('abl_no_sim', 'ablation: L_sim off (TV + task loss)', 'mimiq', True, True,
           synthesis_overrides=(('w_sim', 0.0), ('task_loss', 'task'))),
    Recipe('abl_no_hsad', 'ablation: HSAD off', 'mimiq', True, True,
           model_overrides=(('gamma', 0.0),)),
    Recipe('abl_no_task_kd', 'ablation: task-KD terms off', 'mimiq', True, True,
           model_overrides=NO_TASK_KD),
    # the synthesis itself ablated: the same calibration and fine-tuning on Gaussian noise
    # (with dynamic per-token activation steps, PTQ on noise matches PTQ on MimiQ images,
    # benchmarks/results/time_to_quality/; this row says what the images add in fine-tuning)
    Recipe('abl_gaussian', 'ablation: fine-tuning on Gaussian noise', 'gaussian', True, True),
]}

DEMO_RECIPES = ('ptq_gaussian', 'ptq_mimiq', 'mimiq')


def _as_dict(pairs) -> dict:
    return {k: (_as_dict(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple) else v)
            for k, v in pairs}


# ----------------------------------------------------------------------------- options
@dataclasses.dataclass
class Options:
    """Sizes of a run (defaults: the CPU demo, measured to fit 15 minutes on 2 cores)."""
    num_val: int = 100
    num_images: int = 32
    synth_iters: int = 60
    synth_batch: int = 8
    ft_iters: int = 40
    ft_batch: int = 4
    eval_batch: int = 4
    lr: float = 1e-5  # 1e-4 lost 4.8 bbox AP in 60 iterations on the demo teacher
    seed: int = 0
    wbits: int = 4
    abits: int = 4
    device: Optional[str] = None

    @property
    def bits_label(self) -> str:
        return f'W{self.wbits}A{self.abits}'

    @property
    def calib_batches(self) -> int:
        return max(1, math.ceil(self.num_images / self.ft_batch))


# ----------------------------------------------------------------------------- helpers
class StageTimer:
    """Wall-clock times of named stages, printed as they finish."""

    def __init__(self, printer=None):
        self.seconds: Dict[str, float] = {}
        self.notes: Dict[str, str] = {}
        stream = sys.stdout  # the console, also while a stage's output goes to its log
        self.printer = printer or (lambda msg: print(msg, file=stream, flush=True))

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float, note: str = '') -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if note:
            self.notes[name] = note
        self.printer(f'  [{name}] {format_seconds(seconds)}{" (" + note + ")" if note else ""}')


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def quiet_stdout(log_path: Path):
    """Send ``print`` output (pycocotools, mmengine's console logger) to ``log_path``.

    mmengine binds its console handler to the ``sys.stdout`` of the moment a Runner is
    built, so the file is never closed while the process runs (later log lines of that
    Runner still land there)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log_path, 'a', buffering=1)  # noqa: SIM115  (kept open on purpose)
    _OPEN_LOGS.append(stream)
    with contextlib.redirect_stdout(stream):
        yield stream


_OPEN_LOGS: List = []


def _resolve(path) -> str:
    path = Path(path)
    return str(path if path.is_absolute() else (ROOT / path))


# ----------------------------------------------------------------------------- data
def _usable_demo_data(root: Path, num_val: int, size=(256, 256)) -> bool:
    from mimiq_mm.datasets.demo_data import (GENERATOR_VERSION, DemoDataConfig,
                                             demo_data_is_current)
    manifest = read_json(root / 'manifest.json')
    if not isinstance(manifest, dict):
        return False
    cfg = manifest.get('config', {})
    if cfg.get('generator_version') != GENERATOR_VERSION or cfg.get('seed') != 0 or \
            list(cfg.get('size', [])) != list(size) or cfg.get('num_val', 0) < num_val:
        return False
    return demo_data_is_current(root, DemoDataConfig(
        seed=0, num_train=cfg['num_train'], num_val=cfg['num_val'], size=tuple(size)))


def prepare_val_data(data_root: Optional[str], num_val: int, printer=print) -> Path:
    """A demo data folder holding at least ``num_val`` val images: ``data_root`` when given
    (generated there if needed), else ``data/demo`` when it is current, else ``data/demo_val``
    (val images only; they are the same images as data/demo's val split: every image has
    its own seed)."""
    from mimiq_mm.datasets.demo_data import DemoDataConfig, generate_demo_data
    candidates = [Path(_resolve(data_root))] if data_root else \
        [ROOT / 'data/demo', ROOT / 'data/demo_val']
    for root in candidates:
        if _usable_demo_data(root, num_val):
            printer(f'  demo data: {root} (up to date)')
            return root
    root = candidates[-1]
    config = DemoDataConfig(seed=0, num_train=1, num_val=num_val, size=(256, 256))
    printer(f'  generating the demo val set ({config.num_val} images per task) in {root}')
    generate_demo_data(root, config)
    return root


def coco_val_subset(data_root: Path, num_val: int, out_dir: Path) -> Tuple[str, int]:
    """Annotation file of the first ``num_val`` val images (all of them: the original file).
    CocoMetric scores every image of its annotation file, so a subset needs its own."""
    ann = data_root / 'coco/annotations/instances_val.json'
    coco = json.loads(ann.read_text())
    if num_val > len(coco['images']):
        # never score fewer images than asked for (a results table would mix val sets)
        raise ValueError(f'{ann} lists {len(coco["images"])} val images, fewer than the '
                         f'{num_val} asked for; generate a larger demo set (python '
                         f'tools/make_demo_data.py --num-val {num_val})')
    if num_val == len(coco['images']):
        return str(ann), num_val
    images = sorted(coco['images'], key=lambda im: im['id'])[:num_val]
    keep = {im['id'] for im in images}
    subset = dict(coco, images=images,
                  annotations=[a for a in coco['annotations'] if a['image_id'] in keep])
    path = out_dir / f'instances_val_first{num_val}.json'
    write_json(path, subset)
    return str(path), num_val


# ----------------------------------------------------------------------------- configs
def _point_test_set(cfg, spec: TaskSpec, data_root: Path, opts: Options, ann_file: str):
    """Evaluate on the demo val set under ``data_root`` (no validation during training)."""
    loader = cfg.test_dataloader
    loader.batch_size = opts.eval_batch
    loader.num_workers = 0
    loader.persistent_workers = False
    if spec.dataset == 'coco':
        loader.dataset.data_root = str(data_root / 'coco')
        loader.dataset.ann_file = ann_file
        loader.dataset.data_prefix = dict(img='val/')
        cfg.test_evaluator.ann_file = ann_file
    else:
        val_dir = data_root / 'ade/images/validation'
        found = sum(1 for f in val_dir.iterdir() if f.is_file()) if val_dir.is_dir() else 0
        if found < opts.num_val:  # `indices` alone would silently score fewer images
            raise ValueError(f'{val_dir} holds {found} val images, fewer than the '
                             f'{opts.num_val} asked for; generate a larger demo set (python '
                             f'tools/make_demo_data.py --num-val {opts.num_val})')
        loader.dataset.data_root = str(data_root / 'ade')
        loader.dataset.indices = opts.num_val
    cfg.val_dataloader = None
    cfg.val_cfg = None
    cfg.val_evaluator = None
    return cfg


def float_config(spec: TaskSpec, data_root: Path, opts: Options, ann_file: str, work_dir: Path):
    from mmengine.config import Config
    cfg = Config.fromfile(_resolve(spec.float_config))
    cfg.work_dir = str(work_dir)
    cfg.log_level = 'WARNING'
    cfg.load_from = None
    _point_test_set(cfg, spec, data_root, opts, ann_file)
    _set_device(cfg, opts)
    return cfg


def _set_device(cfg, opts: Options) -> None:
    cfg.env_cfg = dict(cfg.get('env_cfg', {}), cudnn_benchmark=False,
                       mp_cfg=dict(mp_start_method='fork'), dist_cfg=dict(backend='gloo'))


def synthesis_settings(spec: TaskSpec, recipe: Recipe, opts: Options, base: dict,
                       data_root: Optional[Path]) -> dict:
    settings = dict(base)
    settings.update(method=recipe.synthesis, num_images=opts.num_images,
                    batch_size=opts.synth_batch, seed=opts.seed, progress=True)
    if recipe.synthesis in ('gaussian', 'real'):
        settings['iterations'] = 0
    else:
        settings['iterations'] = opts.synth_iters
    if recipe.synthesis == 'real':
        if data_root is None:
            raise ValueError('the real-data recipes need the demo TRAIN images')
        settings['real_root'] = str(data_root / ('coco/train' if spec.dataset == 'coco'
                                                 else 'ade/images/training'))
    if opts.device:
        settings['device'] = opts.device
    settings.update(dict(recipe.synthesis_overrides))
    return settings


def synthetic_dir(base: Path, settings: dict, teacher_sha: str) -> Path:
    """Folder of a synthetic set, named by what makes its images (shared between recipes,
    bit widths and runs that use the same set)."""
    tag = settings['method']
    if float(settings.get('w_sim', 1.0)) != 1.0:
        tag += f'_wsim{float(settings["w_sim"]):g}'
    if settings.get('task_loss', 'none') != 'none':
        tag += f'_task-{settings["task_loss"]}'
    h, w = settings.get('image_size', (256, 256))
    # every other image-changing setting (lr, TV weight, augmentation, ...) in a short hash
    from mimiq_mm.synthesis.config import RESUME_IGNORED_KEYS
    rest = {k: v for k, v in settings.items() if k not in RESUME_IGNORED_KEYS}
    digest = hashlib.sha1(json.dumps(canonical(rest), sort_keys=True).encode()).hexdigest()[:8]
    return base / (f'{tag}_t{teacher_sha[:8]}_n{settings["num_images"]}'
                   f'_it{settings["iterations"]}_{h}x{w}_s{settings["seed"]}_{digest}')


def quant_cfg_for(recipe: Recipe, opts: Options, base: dict) -> dict:
    q = copy.deepcopy(dict(base))
    q['weight'] = dict(q.get('weight', {}), bits=opts.wbits)
    for key in ('act', 'attn_prob'):
        q[key] = dict(q.get(key, {}), bits=opts.abits)
        # log quantizers have a fixed scale (the calibrated max): nothing to learn
        from mimiq_mm.quant import QuantConfig
        kind = q[key].get('kind', getattr(QuantConfig(), key).kind)
        learn = recipe.learn_steps and kind == 'uniform'
        q[key]['lsq'] = learn
    return q


def quant_fingerprint(q: dict) -> dict:
    """The whole quantizer recipe ``q`` (a partial QuantConfig dict) stands for, with the
    package defaults filled in: a cached stage made under other defaults (an upgrade that
    changed ``QuantConfig()``) is not taken for this one."""
    from mimiq_mm.quant import QuantConfig
    return canonical(dataclasses.asdict(QuantConfig.from_dict(dict(q))))


def mimiq_config(spec: TaskSpec, cfg_options: Optional[dict] = None):
    """The task's demo MimiQ config with ``--cfg-options`` merged in: the one source of the
    quantizer, distiller AND synthesis settings of every stage (``synthesis.*`` overrides
    reach the synthetic images too)."""
    from mmengine.config import Config
    cfg = Config.fromfile(_resolve(spec.mimiq_config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def stage_config(spec: TaskSpec, recipe: Recipe, opts: Options, data_root: Path,
                 ann_file: str, teacher_checkpoint: str, work_dir: Path, synth_dir: Path,
                 synth_settings: dict, cfg_options: Optional[dict] = None):
    """The MimiQ config of ``spec`` turned into this recipe's run (what tools/train.py
    would run with the equivalent --cfg-options)."""
    from mimiq_mm.engine import apply_mimiq_fields
    cfg = mimiq_config(spec, cfg_options)
    cfg.work_dir = str(work_dir)
    cfg.log_level = 'WARNING'
    cfg.teacher_checkpoint = teacher_checkpoint
    cfg.quant_cfg = quant_cfg_for(recipe, opts, cfg.quant_cfg)
    apply_mimiq_fields(cfg)
    for key, value in recipe.model_overrides:
        if isinstance(value, tuple):
            cfg.model[key] = dict(cfg.model.get(key) or {}, **_as_dict(value))
        else:
            cfg.model[key] = value
    cfg.synthesis = synth_settings
    cfg.synthetic_root = str(synth_dir)
    loader = cfg.train_dataloader
    loader.batch_size = opts.ft_batch
    loader.num_workers = 0
    loader.persistent_workers = False
    loader.dataset.data_root = str(synth_dir)
    iters = opts.ft_iters if recipe.finetune else 0
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters + 1
    cfg.optim_wrapper.optimizer.lr = opts.lr
    warmup = max(1, min(10, iters // 5))
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup, end=max(iters, warmup + 1),
             eta_min=0.0)]
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', by_epoch=False, interval=max(iters, 1), max_keep_ckpts=1,
        save_last=iters > 0, save_optimizer=True, save_param_scheduler=True)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10)
    hooks = []
    for hook in cfg.custom_hooks:
        hook = copy.deepcopy(hook)
        if hook['type'].endswith('MimiQCalibrationHook'):
            hook['num_batches'] = opts.calib_batches
        hooks.append(hook)
    cfg.custom_hooks = hooks
    cfg.randomness = dict(seed=opts.seed)
    cfg.resume = recipe.finetune  # a finished fine-tuning is reused (latest checkpoint)
    cfg.load_from = None
    _point_test_set(cfg, spec, data_root, opts, ann_file)
    _set_device(cfg, opts)
    return cfg


def quant_summary(task: str, cfg_options: dict) -> str:
    """How the quantized rows of ``task`` were configured, in words (its demo MimiQ config
    + --cfg-options, resolved through ``QuantConfig``: fields a config leaves out are the
    defaults)."""
    from mmengine.config import Config

    from mimiq_mm.quant import QuantConfig
    cfg = Config.fromfile(_resolve(TASKS[task].mimiq_config))
    if cfg_options:
        cfg.merge_from_dict({k: v for k, v in cfg_options.items()
                             if k.startswith('quant_cfg.')})
    q = QuantConfig.from_dict(cfg.quant_cfg.to_dict())
    act = ('dynamic per-token steps (absmax at run time'
           + (', MSE-searched clipping ratio)' if q.act.observer == 'mse' else ')')
           if q.act.granularity == 'per_token'
           else f'{q.act.granularity.replace("_", "-")}, `{q.act.observer}` ranges')
    rounding = 'GPTQ rounding' if q.weight.rounding == 'gptq' else 'nearest rounding'
    text = (f'weights per-channel, `{q.weight.observer}` ranges, {rounding}; activations {act}; '
            f'post-softmax probabilities '
            + (f'log quantizer `{q.attn_prob.kind}`' if q.attn_prob.kind != 'uniform'
               else f'uniform, `{q.attn_prob.observer}` ranges')
            + f'; inputs rotated: {"yes" if q.rotate_inputs else "no"}; LayerNorm reparam '
            f'{"on" if q.reparam else "off"}. PTQ rows keep the calibrated ranges; fine-tuned '
            'rows learn the uniform steps (LSQ; per-token: the clipping ratio) from them')
    other = {k: v for k, v in (cfg_options or {}).items() if not k.startswith('quant_cfg.')}
    if other:
        text += f'; other overrides: {other}'
    return text


# ----------------------------------------------------------------------------- stages
class _PhaseTimes:
    """Runner hook (lowest priority): the time calibration ends (all VERY_HIGH before_train
    hooks done) and training ends."""

    priority = 'LOWEST'

    def __init__(self):
        self.train_started = self.calibrated = self.finished = None

    def _hook(self):
        from mmengine.hooks import Hook
        outer = self

        class PhaseTimesHook(Hook):
            priority = 'LOWEST'

            def before_train(self, runner):
                outer.calibrated = time.perf_counter()

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                # progress on the terminal (the Runner's own log goes to stage.log)
                total = runner.train_loop.max_iters
                done = runner.iter + 1
                if done == total or done % max(1, total // 6) == 0:
                    loss = (outputs or {}).get('loss', float('nan'))
                    loss = float(loss.detach() if hasattr(loss, 'detach') else loss)
                    per_it = (time.perf_counter() - outer.calibrated) / done
                    print(f'    fine-tuning {done}/{total}: loss {loss:.4f} '
                          f'({per_it:.2f} s/it)', file=sys.__stdout__, flush=True)

            def after_train(self, runner):
                outer.finished = time.perf_counter()
        return PhaseTimesHook()


def _extract(metrics: dict, spec: TaskSpec) -> dict:
    out = {}
    for m in spec.metrics:
        if m.key not in metrics:
            raise KeyError(f'metric {m.key!r} missing from the evaluation; got {sorted(metrics)}')
        out[m.name] = float(metrics[m.key]) * m.scale
    return out


def run_float(spec: TaskSpec, opts: Options, data_root: Path, ann_file: str,
              checkpoint: str, stage_dir: Path, timer: StageTimer) -> dict:
    from mimiq_mm.engine import build_runner
    from mimiq_mm.models.distiller import load_teacher_weights
    cfg = float_config(spec, data_root, opts, ann_file, stage_dir)
    with quiet_stdout(stage_dir / 'stage.log'):
        runner = build_runner(cfg)
        load_teacher_weights(runner.model, checkpoint, cfg_key='--teacher-checkpoint')
        start = time.perf_counter()
        metrics = runner.test()
    timer.add('float: eval', time.perf_counter() - start, f'{opts.num_val} val images')
    return dict(metrics=_extract(metrics, spec), raw_metrics=metrics)


def ensure_synthetic(runner, synth_dir: Path) -> Tuple[float, bool]:
    """Create the synthetic set with the run's MimiQSynthesisHook logic (skipped when it is
    complete). Returns (seconds, generated_now)."""
    from mimiq_mm.engine import MimiQSynthesisHook, synthetic_set_complete
    from mimiq_mm.synthesis import SynthesisConfig
    settings = SynthesisConfig.from_dict(dict(runner.cfg.synthesis))
    existed = synthetic_set_complete(str(synth_dir), settings.num_batches)
    start = time.perf_counter()
    # skips a finished set after checking that it was made with these settings
    MimiQSynthesisHook(synthesis=dict(runner.cfg.synthesis)).ensure_synthetic_data(
        runner, str(synth_dir))
    return (0.0 if existed else time.perf_counter() - start), not existed


def run_quant(spec: TaskSpec, recipe: Recipe, cfg, stage_dir: Path, synth_dir: Path,
              timer: StageTimer, prefix: str, after_test=None) -> dict:
    """Build the Runner of a quantized recipe, synthesize (if missing), calibrate,
    fine-tune (if the recipe does), evaluate. ``after_test(runner)`` runs at the end."""
    from mimiq_mm.engine import build_runner
    phases = _PhaseTimes()
    with quiet_stdout(stage_dir / 'stage.log'):
        runner = build_runner(cfg)
        runner.register_hook(phases._hook(), priority='LOWEST')
        seconds, generated = ensure_synthetic(runner, synth_dir)
        timer.add(f'{prefix}: synthesis ({recipe.synthesis})', seconds,
                  f'{cfg.synthesis["num_images"]} images x {cfg.synthesis["iterations"]} it'
                  if generated else f'reused {synth_dir.name}')
        start = time.perf_counter()
        runner.train()
        end = time.perf_counter()
        calibrated = phases.calibrated or end
        calib = [h for h in cfg.custom_hooks if h['type'].endswith('MimiQCalibrationHook')]
        timer.add(f'{prefix}: calibration', calibrated - start,
                  f'{calib[0].get("num_batches") if calib else "?"} batches x '
                  f'{cfg.train_dataloader.batch_size} images')
        iters = cfg.train_cfg.max_iters
        if iters:
            timer.add(f'{prefix}: fine-tuning', end - calibrated,
                      f'{iters} iterations x {cfg.train_dataloader.batch_size} images')
        start = time.perf_counter()
        metrics = runner.test()
        timer.add(f'{prefix}: eval', time.perf_counter() - start)
        extra = after_test(runner) if after_test is not None else None
    return attach_keep_best(dict(metrics=_extract(metrics, spec), raw_metrics=metrics,
                                 extra=extra, synthetic_dir=str(synth_dir)), stage_dir)


def attach_keep_best(result: dict, stage_dir: Path) -> dict:
    """Add ``MimiQKeepBestHook``'s decision (``<stage>/keep_best.json``) to a stage result."""
    keep_best = read_json(stage_dir / 'keep_best.json')
    if isinstance(keep_best, dict) and 'kept' in keep_best:
        result['keep_best'] = keep_best
    return result


def kept_text(keep_best: Optional[dict]) -> str:
    """Which student a fine-tuned row scored and why, e.g. 'fine-tuned (held-out loss
    0.669 -> 0.663)'; '-' for a row without a decision (PTQ)."""
    if not keep_best:
        return '-'
    name = {'finetuned': 'fine-tuned', 'ptq': 'calibrated (PTQ)'}.get(keep_best['kept'],
                                                                    str(keep_best['kept']))
    agree = [keep_best.get(f'heldout_{k}_agreement') for k in ('ptq', 'finetuned')]
    agree_text = ('' if None in agree else
                  f'; agreement with the teacher {agree[0]:.3f} -> {agree[1]:.3f}')
    return (f"{name} (held-out loss {keep_best['heldout_ptq']:.3f} -> "
            f"{keep_best['heldout_finetuned']:.3f}{agree_text})")


def canonical(obj):
    """``obj`` as it reads back from JSON (tuples become lists), to compare with a file."""
    from mimiq_mm.utils.report import _jsonable
    return json.loads(json.dumps(_jsonable(obj)))


def stage_lock(stage_dir: Path):
    """Context: this process owns ``stage_dir`` (a lock file beside it, since a stale stage
    folder is deleted). A second run on the same work dir at the same time (e.g. the same
    cell at two learning rates) would delete and overwrite this one's checkpoints and
    results: it stops at once with :class:`FolderBusyError` instead."""
    from mimiq_mm.synthesis.writer import exclusive_lock
    return exclusive_lock(
        stage_dir.parent / f'.{stage_dir.name}.lock',
        f'stage folder {stage_dir} is in use by another process (pid {{pid}}); concurrent '
        'runs need their own --work-dir')


def cached_stage(stage_dir: Path, fingerprint: dict, force: bool) -> Optional[dict]:
    """The stored result of a finished stage with the same fingerprint; clears a stale
    stage folder (other settings, or --force)."""
    fingerprint = canonical(fingerprint)
    result = read_json(stage_dir / RESULT_FILE)
    if not force and isinstance(result, dict) and result.get('fingerprint') == fingerprint:
        return result
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return None


# ----------------------------------------------------------------------------- figures
def attention_figure(runner, path: Path, spec: TaskSpec) -> dict:
    """Teacher vs quantized student, same val image, one layer, every head."""
    import numpy as np
    from mmengine.dataset import pseudo_collate

    from mimiq_mm.models import unwrap_distiller
    from mimiq_mm.utils.figures import teacher_student_attention_figure
    model = unwrap_distiller(runner.model)
    sample = runner.test_dataloader.dataset[0]
    data = model.data_preprocessor(pseudo_collate([sample]), False)
    image = sample['inputs'].permute(1, 2, 0).cpu().numpy()
    if getattr(model.data_preprocessor, '_channel_conversion', False):
        image = image[..., ::-1]  # the pipeline loads BGR; shown as RGB
    model.eval()
    return teacher_student_attention_figure(
        model.teacher.backbone, model.student.backbone, data['inputs'][:1],
        np.ascontiguousarray(image).astype(np.uint8), path,
        title=f'{spec.name} demo: float teacher vs quantized student, one attention layer '
              'per head')


# ----------------------------------------------------------------------------- the demo
def build_rows(spec: TaskSpec, opts: Options, stage_results: Dict[str, dict]) -> List[dict]:
    float_metrics = stage_results['float']['metrics']
    rows = [dict(method='float', label='float teacher', wa='W32A32', kept='-', **float_metrics)]
    for name in DEMO_RECIPES:
        recipe = RECIPES[name]
        rows.append(dict(method=name, label=recipe.label, wa=opts.bits_label,
                         kept=kept_text(stage_results[name].get('keep_best')),
                         **stage_results[name]['metrics']))
    for row in rows:
        row['pct_of_float'] = percent_of(row[spec.primary.name],
                                         float_metrics[spec.primary.name])
    return rows


def table_columns(spec: TaskSpec) -> List[Column]:
    cols = [Column('label', 'method', align='<'), Column('wa', 'W/A', align='<')]
    cols += [Column(m.name, m.label, lambda v: f'{100 * v:.1f}') for m in spec.metrics]
    cols.append(Column('pct_of_float', f'% of float ({spec.primary.label})',
                       lambda v: f'{v:.1f}%'))
    cols.append(Column('kept', 'student scored (keep-best)', align='<'))
    return cols


def run_demo(args) -> dict:
    work_dir = Path(_resolve(args.work_dir or TASKS[args.task].default_work_dir))
    with stage_lock(work_dir / 'stages'):  # one demo per work dir at a time
        return _run_demo(args, work_dir)


def _run_demo(args, work_dir: Path) -> dict:
    spec = TASKS[args.task]
    opts = Options(num_val=args.num_val, num_images=args.num_images,
                   synth_iters=args.synth_iters, synth_batch=args.synth_batch,
                   ft_iters=args.ft_iters, ft_batch=args.ft_batch, eval_batch=args.eval_batch,
                   lr=args.lr, seed=args.seed, wbits=args.wbits, abits=args.abits,
                   device=args.device)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = _resolve(args.teacher_checkpoint or spec.checkpoint)
    if not osp.isfile(checkpoint):
        raise SystemExit(
            f'demo.py: error: teacher checkpoint {checkpoint} not found. The demo teachers '
            f'ship in checkpoints/demo/ (git pull), or pass --teacher-checkpoint PATH to a '
            f'float checkpoint of {spec.float_config} (bash tools/train_demo_teachers.sh '
            'trains both on a GPU).')
    timer = StageTimer()
    total_start = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    print(f'MimiQ demo ({spec.name}, {opts.bits_label}) -> {work_dir}')

    steps = 2 + len(DEMO_RECIPES)
    print(f'[1/{steps}] demo val data')
    with timer('data'):
        data_root = prepare_val_data(args.data_root, opts.num_val)
        ann_file, num_val = (coco_val_subset(data_root, opts.num_val, work_dir)
                             if spec.dataset == 'coco' else ('', opts.num_val))
    teacher_sha = sha256_file(checkpoint)
    common = dict(version=FINGERPRINT_VERSION, task=spec.name, teacher_sha256=teacher_sha,
                  data_root=str(data_root), num_val=opts.num_val)
    results: Dict[str, dict] = {}

    print(f'[2/{steps}] float teacher on {num_val} demo val images')
    stage_dir = work_dir / 'stages' / 'float'
    fingerprint = dict(common, stage='float')
    cached = cached_stage(stage_dir, fingerprint, args.force)
    if cached is None:
        result = run_float(spec, opts, data_root, ann_file, checkpoint, stage_dir, timer)
        result['fingerprint'] = canonical(fingerprint)
        write_json(stage_dir / RESULT_FILE, result)
        cached = result
    else:
        timer.add('float: eval', 0.0, 'cached')
    results['float'] = cached

    base = mimiq_config(spec, args.cfg_options)
    synth_base = work_dir / 'synthetic'
    figure_path = work_dir / 'attention_teacher_vs_student.png'
    for step, name in enumerate(DEMO_RECIPES, start=3):
        recipe = RECIPES[name]
        print(f'[{step}/{steps}] {recipe.label}, {opts.bits_label}')
        settings = synthesis_settings(spec, recipe, opts, dict(base.synthesis), None)
        synth_dir = synthetic_dir(synth_base, settings, teacher_sha)
        stage_dir = work_dir / 'stages' / f'{name}_{opts.bits_label.lower()}'
        fingerprint = dict(common, stage=name, recipe=dataclasses.asdict(recipe),
                           synthesis=settings, options=dataclasses.asdict(opts),
                           cfg_options=args.cfg_options or {},
                           quant=quant_fingerprint(quant_cfg_for(recipe, opts,
                                                                 base.quant_cfg.to_dict())))
        fingerprint['options'].pop('device', None)
        fingerprint['synthesis'].pop('device', None)
        fingerprint['synthesis'].pop('progress', None)
        cached = cached_stage(stage_dir, fingerprint, args.force)
        if cached is not None and name == 'mimiq' and not figure_path.is_file():
            cached = None  # the figure needs the student: rerun (reuses its checkpoint)
        if cached is None:
            cfg = stage_config(spec, recipe, opts, data_root, ann_file, checkpoint, stage_dir,
                               synth_dir, settings, args.cfg_options)
            after = None
            if name == 'mimiq':
                def after(runner):
                    start = time.perf_counter()
                    info = attention_figure(runner, figure_path, spec)
                    timer.add('figures: attention maps', time.perf_counter() - start)
                    return info
            result = run_quant(spec, recipe, cfg, stage_dir, synth_dir, timer, name, after)
            result['fingerprint'] = canonical(fingerprint)
            write_json(stage_dir / RESULT_FILE, result)
            cached = result
        else:
            timer.add(f'{name}', 0.0, 'cached')
        results[name] = attach_keep_best(cached, stage_dir)

    from mimiq_mm.utils.figures import results_bar_chart, synthetic_contact_sheet
    rows = build_rows(spec, opts, results)
    start = time.perf_counter()
    sheet = synthetic_contact_sheet(results['mimiq']['synthetic_dir'],
                                    work_dir / 'synthetic_contact_sheet.png')
    bar = results_bar_chart(
        rows, [(m.name, m.label) for m in spec.metrics], work_dir / 'results_bar.png',
        title=f'{spec.name} demo, {opts.bits_label}: float vs data-free quantized '
              f'({num_val} val images)', reference=rows[0])
    timer.add('figures: contact sheet + bar chart', time.perf_counter() - start)
    total = time.perf_counter() - total_start

    columns = table_columns(spec)
    table = text_table(rows, columns)
    quantizers = quant_summary(spec.name, args.cfg_options or {})
    print()
    print(table)
    print(f'Quantizers ({spec.mimiq_config}): {quantizers}.')
    print()
    print('Stage times (wall clock):')
    for stage, seconds in timer.seconds.items():
        note = timer.notes.get(stage, '')
        print(f'  {stage:<40} {format_seconds(seconds):>14}  {note}')
    print(f'  {"total":<40} {format_seconds(total):>14}')
    if load_at_start is not None and os.cpu_count() and \
            max(load_at_start, os.getloadavg()[0]) > os.cpu_count():
        print(f'  (the CPU was shared: load average {load_at_start:.1f} at start, '
              f'{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores)')
    summary = dict(
        task=spec.name, bits=opts.bits_label, config=spec.mimiq_config,
        teacher_checkpoint=checkpoint, teacher_sha256=teacher_sha,
        data_root=str(data_root), num_val_images=num_val,
        metrics=[dataclasses.asdict(m) for m in spec.metrics],
        metric_note='fractions in [0, 1] (COCO mAP@[.5:.95]; mIoU / 100)',
        rows=rows, options=dataclasses.asdict(opts), quantizers=quantizers,
        stage_seconds=timer.seconds, stage_notes=timer.notes, total_seconds=total,
        attention_figure=results['mimiq'].get('extra'),
        files=dict(contact_sheet=str(sheet) if sheet else None,
                   attention_figure=str(figure_path), bar_chart=str(bar)),
        machine=dict(machine_info(opts.device), load_average_1min_at_start=load_at_start))
    write_json(work_dir / 'results.json', summary)
    md = [f'# MimiQ demo: {spec.name}, {opts.bits_label}', '',
          f'Teacher `{osp.relpath(checkpoint, ROOT) if checkpoint.startswith(str(ROOT)) else checkpoint}` '
          f'(sha256 {teacher_sha[:12]}), {num_val} demo val images. '
          f'Synthetic images: {opts.num_images} x {opts.synth_iters} iterations; '
          f'fine-tuning: {opts.ft_iters} iterations x {opts.ft_batch} images.', '',
          f'Quantizers ({spec.mimiq_config}): {quantizers}.', '',
          markdown_table(rows, columns), '## Stage times', '',
          markdown_table([dict(stage=k, seconds=format_seconds(v), note=timer.notes.get(k, ''))
                          for k, v in timer.seconds.items()] +
                         [dict(stage='total', seconds=format_seconds(total), note='')],
                         [Column('stage', 'stage', align='<'),
                          Column('seconds', 'wall clock'), Column('note', 'note', align='<')]),
          f'Machine: {summary["machine"]["cpu"]} ({summary["machine"]["cpu_count"]} cores), '
          f'{summary["machine"]["card"]}, torch {summary["machine"]["torch"]}.', '',
          '![results](results_bar.png)', '', '![attention](attention_teacher_vs_student.png)',
          '', '![synthetic](synthetic_contact_sheet.png)', '']
    (work_dir / 'results.md').write_text('\n'.join(md))
    print(f'\nWrote {work_dir}/results.json, results.md, results_bar.png, '
          'attention_teacher_vs_student.png, synthetic_contact_sheet.png')
    return summary


def parse_args(argv=None):
    from mmengine.config import DictAction
    d = Options()
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--task', choices=sorted(TASKS), default='det',
                   help='det: Mask R-CNN Swin (COCO bbox/segm mAP); seg: UperNet Swin (mIoU)')
    p.add_argument('--work-dir', default=None,
                   help='output folder (default: work_dirs/demo, or work_dirs/demo_seg)')
    p.add_argument('--teacher-checkpoint', default=None,
                   help='float teacher (default: checkpoints/demo/<task teacher>.pth)')
    p.add_argument('--data-root', default=None,
                   help='demo data folder (default: data/demo if current, else data/demo_val, '
                        'generated when missing)')
    p.add_argument('--num-val', type=int, default=d.num_val, help='val images evaluated')
    p.add_argument('--num-images', type=int, default=d.num_images,
                   help='synthetic (and Gaussian-noise) images')
    p.add_argument('--synth-iters', type=int, default=d.synth_iters,
                   help='optimisation steps per synthetic batch')
    p.add_argument('--synth-batch', type=int, default=d.synth_batch)
    p.add_argument('--ft-iters', type=int, default=d.ft_iters, help='fine-tuning iterations')
    p.add_argument('--ft-batch', type=int, default=d.ft_batch,
                   help='fine-tuning (and calibration) batch size')
    p.add_argument('--eval-batch', type=int, default=d.eval_batch)
    p.add_argument('--lr', type=float, default=d.lr, help='fine-tuning learning rate')
    p.add_argument('--wbits', type=int, default=d.wbits)
    p.add_argument('--abits', type=int, default=d.abits)
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--device', default=None,
                   help="synthesis device (default: cuda when available, else cpu)")
    p.add_argument('--force', action='store_true',
                   help='recompute every stage (default: reuse finished ones)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='overrides of the MimiQ config, key=value')
    args = p.parse_args(argv)
    for name in ('num_val', 'num_images', 'synth_batch', 'ft_batch', 'eval_batch'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1')
    for name in ('synth_iters', 'ft_iters'):
        if getattr(args, name) < 0:
            p.error(f'--{name.replace("_", "-")} must be >= 0')
    return args


def main(argv=None):
    args = parse_args(argv)
    return run_demo(args)


if __name__ == '__main__':
    main()
