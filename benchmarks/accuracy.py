#!/usr/bin/env python
"""Accuracy benchmark of data-free quantization on the demo teachers (GPU; CPU with --small).

For each task (det: Mask R-CNN Swin, COCO bbox/segm mAP; seg: UperNet Swin, mIoU) and each
bit width (W4A4, W6A6, W3A3, W2A4), the rows are:

  float          the float teacher (once per task)
  ptq_gaussian   min-max PTQ calibrated on Gaussian noise
  ptq_psaq       min-max PTQ calibrated on PSAQ-ViT-style synthetic images
  ptq_mimiq      min-max PTQ calibrated on MimiQ synthetic images
  mimiq          full MimiQ: MimiQ synthesis + LSQ calibration + HSAD/task-KD fine-tuning
  ptq_real       min-max PTQ on real demo TRAIN images            (upper bound)
  ft_real        the MimiQ fine-tuning recipe on real TRAIN images (upper bound)

plus ablations of full MimiQ at W4A4: abl_no_sim (synthesis without L_sim: Gaussian init
optimised with TV + the task loss only), abl_no_hsad (gamma = 0), abl_no_task_kd (the
RPN/RoI/segmentation-logit KD terms off; feature KD and HSAD kept), abl_gaussian (the
same calibration and fine-tuning on Gaussian-noise images: what the synthesis adds).

    python benchmarks/accuracy.py                                # everything (GPU)
    python benchmarks/accuracy.py --tasks det --rows float ptq_gaussian mimiq --bits W4A4
    python benchmarks/accuracy.py --small                        # CPU smoke run

Writes benchmarks/results/accuracy_<card>.json and .md (``_small`` appended with --small),
naming the machine and the card. Resumable: cells already in the JSON (same settings and
teacher) are skipped, so a long benchmark can be done in several short calls; synthetic
sets are shared between the rows and bit widths that use the same images.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mimiq_mm.utils.report import (Column, card_slug, machine_info, markdown_table,  # noqa: E402
                                   read_json, write_json)

BITS = ('W4A4', 'W6A6', 'W3A3', 'W2A4')
MAIN_ROWS = ('float', 'ptq_gaussian', 'ptq_psaq', 'ptq_mimiq', 'mimiq', 'ptq_real', 'ft_real')
ABLATION_ROWS = ('abl_no_sim', 'abl_no_hsad', 'abl_no_task_kd', 'abl_gaussian')
ABLATION_BITS = 'W4A4'
ALL_ROWS = MAIN_ROWS + ABLATION_ROWS
FORMAT_VERSION = 1
SMALL_NUM_TRAIN = 8

#: GPU defaults (sizes of one run) and the --small CPU smoke settings.
FULL = dict(num_val=100, num_images=128, synth_iters=200, synth_batch=32, ft_iters=300,
            ft_batch=8, eval_batch=8, lr=1e-5)
SMALL = dict(num_val=4, num_images=2, synth_iters=2, synth_batch=2, ft_iters=2, ft_batch=2,
             eval_batch=2, lr=1e-5)


def _load_demo():
    spec = importlib.util.spec_from_file_location('mimiq_tool_demo', ROOT / 'tools/demo.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


def card_name(info: dict) -> str:
    """File-name-safe name of the accelerator ('nvidia-h100-80gb-hbm3') or 'cpu'."""
    return card_slug(info.get('card', 'cpu'))


def cells_wanted(tasks, rows, bits) -> List[Tuple[str, str, str]]:
    out = []
    for task in tasks:
        for row in rows:
            if row == 'float':
                out.append((task, row, 'float'))
                continue
            for b in bits:
                if row in ABLATION_ROWS and b != ABLATION_BITS:
                    continue
                out.append((task, row, b))
    return out


def load_results(path, tool: str) -> dict:
    """An accuracy results file (JSON with ``cells`` and ``settings``), or exit with an error
    naming ``tool`` (the script reading it) and the file."""
    state = read_json(path)
    if not isinstance(state, dict) or 'cells' not in state or 'settings' not in state:
        raise SystemExit(f'{tool}: error: {path} is missing, unreadable or not an accuracy '
                         'results file')
    return state


def settings_used(row: str, settings: dict) -> dict:
    """The part of a run's settings (``Benchmark.settings``) that a row's cells depend on.

    The synthesis iterations and ``synthesis.*`` options count only for rows that synthesise
    images by optimisation (not Gaussian noise, not real images); the fine-tuning length,
    batch and lr only for rows that fine-tune. A real-data PTQ cell is the same experiment
    whatever ``--synth-iters`` its run was given."""
    if row == 'float':
        return {k: settings[k] for k in ('num_val', 'eval_batch') if k in settings}
    recipe = demo.RECIPES[row]
    optimised = recipe.synthesis not in ('gaussian', 'real')
    unused = (() if optimised else ('synth_iters',)) + \
        (() if recipe.finetune else ('ft_iters', 'ft_batch', 'lr'))
    used = {k: v for k, v in settings.items() if k not in unused}
    if not optimised and used.get('cfg_options'):
        options = {k: v for k, v in used['cfg_options'].items()
                   if not k.startswith('synthesis.')}
        used['cfg_options'] = options
        if not options:
            del used['cfg_options']
    return used


def cell_key(task: str, row: str, bits: str) -> str:
    return f'{task}/{row}/{bits}'


class Benchmark:
    def __init__(self, args):
        self.args = args
        self.settings = dict(SMALL if args.small else FULL)
        for key in self.settings:
            value = getattr(args, key, None)
            if value is not None:
                self.settings[key] = value
        if args.seed:  # another seed is another experiment: never merged with seed 0's
            self.settings['seed'] = int(args.seed)
        if args.cfg_options:  # e.g. the activation range estimator; part of the settings
            self.settings['cfg_options'] = dict(sorted(args.cfg_options.items()))
        self.work_dir = Path(demo._resolve(args.work_dir))
        self.machine = machine_info(args.device)
        suffix = '_small' if args.small else ''
        out = Path(demo._resolve(args.out))
        self.json_path = out / f'accuracy_{card_name(self.machine)}{suffix}.json'
        self.md_path = self.json_path.with_suffix('.md')
        given = {'det': args.det_checkpoint, 'seg': args.seg_checkpoint}
        self.checkpoints = {task: demo._resolve(given.get(task) or spec.checkpoint)
                            for task, spec in demo.TASKS.items()}
        self.state = self._load_state()
        self.data_root: Optional[Path] = None
        self._has_train = False

    # -- bookkeeping
    def _header(self) -> dict:
        return dict(format_version=FORMAT_VERSION, settings=self.settings,
                    small=bool(self.args.small))

    def _load_state(self) -> dict:
        state = read_json(self.json_path)
        header = self._header()
        if not isinstance(state, dict) or self.args.force:
            return dict(header, cells={}, teachers={})
        old = {k: state.get(k) for k in header}
        if old != header:
            raise SystemExit(
                f'accuracy.py: error: {self.json_path} holds results made with other settings '
                f'({old["settings"]} vs {header["settings"]}). Pass the same settings, '
                'another --out folder, or --force to start it again.')
        state.setdefault('cells', {})
        state.setdefault('teachers', {})
        return state

    def _save(self) -> None:
        self.state.update(self._header())
        self.state['machine'] = self.machine
        self.state['card'] = self.machine.get('card')
        self.state['updated'] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds')
        write_json(self.json_path, self.state)
        self.md_path.write_text(render_markdown(self.state))

    # -- data and teachers
    def _data(self, need_train: bool) -> Path:
        from mimiq_mm.datasets.demo_data import DemoDataConfig, generate_demo_data
        if self.data_root is not None and (not need_train or self._has_train):
            return self.data_root
        num_val = self.settings['num_val']
        if need_train:
            # --small never rewrites data/demo (the teachers' training set)
            default = self.work_dir / 'demo_data' if self.args.small else 'data/demo'
            root = Path(demo._resolve(self.args.data_root or default))
            num_train = self.args.num_train or (SMALL_NUM_TRAIN if self.args.small else 1000)
            existing = (read_json(root / 'manifest.json') or {}).get('config', {})
            # A folder with more val images than this run needs is kept as it is: rewriting
            # it would pull images from under another run that reads it (one per GPU).
            config = DemoDataConfig(seed=0, num_train=num_train,
                                    num_val=max(num_val, 100, existing.get('num_val', 0)
                                                if existing.get('num_train') == num_train
                                                else 0),
                                    size=(256, 256))
            generate_demo_data(root, config)  # no-op when current
            self._has_train = True
        else:
            root = demo.prepare_val_data(self.args.data_root, num_val)
            self._has_train = False
        self.data_root = root
        return root

    def _teacher_sha(self, task: str) -> str:
        path = self.checkpoints[task]
        if not Path(path).is_file():
            raise SystemExit(f'accuracy.py: error: {task} teacher {path} not found; pass '
                             f'--{task}-checkpoint PATH (or train: bash '
                             'tools/train_demo_teachers.sh)')
        sha = demo.sha256_file(path)
        known = self.state['teachers'].get(task)
        if known and known['sha256'] != sha:
            stale = [k for k in self.state['cells'] if k.startswith(f'{task}/')]
            print(f'  {task} teacher changed ({known["sha256"][:12]} -> {sha[:12]}): '
                  f'dropping its {len(stale)} cells')
            for k in stale:
                del self.state['cells'][k]
        self.state['teachers'][task] = dict(path=path, sha256=sha)
        return sha

    # -- one cell
    def cell_options(self, bits: str):
        """The demo's run sizes of one cell (``bits``: 'float' or e.g. 'W4A4')."""
        from mimiq_mm.quant import parse_bit_widths  # bits come from --bits' choices
        wbits, abits = (32, 32) if bits == 'float' else parse_bit_widths(bits)
        # the sizes of the settings; the seed (recorded there when not 0) comes from --seed
        sizes = {k: v for k, v in self.settings.items() if k in FULL}
        return demo.Options(wbits=min(wbits, 8), abits=min(abits, 8), seed=self.args.seed,
                            device=self.args.device, **sizes)

    def run_cell(self, task: str, row: str, bits: str) -> dict:
        spec = demo.TASKS[task]
        opts = self.cell_options(bits)
        recipe = None if row == 'float' else demo.RECIPES[row]
        data_root = self._data(need_train=recipe is not None and recipe.synthesis == 'real')
        ann_file, _ = (demo.coco_val_subset(data_root, opts.num_val, self.work_dir / task)
                       if spec.dataset == 'coco' else ('', opts.num_val))
        sha = self._teacher_sha(task)
        checkpoint = self.checkpoints[task]
        timer = demo.StageTimer()
        stage_dir = self.work_dir / task / 'stages' / f'{row}_{bits.lower()}'
        with demo.stage_lock(stage_dir):  # a second process on this work dir stops
            demo.cached_stage(stage_dir, {'fresh': time.time()}, force=True)  # clean folder
            start = time.perf_counter()
            if recipe is None:
                result = demo.run_float(spec, opts, data_root, ann_file, checkpoint, stage_dir,
                                        timer)
            else:
                base = demo.mimiq_config(spec, self.settings.get('cfg_options'))
                settings = demo.synthesis_settings(spec, recipe, opts, dict(base.synthesis),
                                                   data_root)
                synth_dir = demo.synthetic_dir(self.work_dir / task / 'synthetic', settings, sha)
                cfg = demo.stage_config(spec, recipe, opts, data_root, ann_file, checkpoint,
                                        stage_dir, synth_dir, settings,
                                        self.settings.get('cfg_options'))
                cfg.resume = False
                result = demo.run_quant(spec, recipe, cfg, stage_dir, synth_dir, timer, row)
        quant = {} if recipe is None else dict(
            quant=demo.quant_fingerprint(cfg.quant_cfg))
        if result.get('keep_best'):  # which student a fine-tuned cell scored
            quant['keep_best'] = result['keep_best']
        return dict(task=task, row=row, bits=bits, label='float teacher' if recipe is None
                    else recipe.label, metrics=result['metrics'], **quant,
                    seconds=dict(timer.seconds, total=time.perf_counter() - start),
                    notes=timer.notes,
                    finished=datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec='seconds'))

    def merge(self, paths) -> dict:
        """Add the cells of other results files made with the same settings, teachers and
        card (e.g. one per GPU of a multi-GPU machine, each with its own --out) to the
        results file of that card under --out. Runs anywhere (no GPU needed)."""
        header = self._header()
        others = []
        for path in paths:
            other = load_results(Path(path), 'accuracy.py')
            theirs = {k: other.get(k) for k in header}
            if theirs != header:
                raise SystemExit(f'accuracy.py: error: {path} was made with other settings '
                                 f'({theirs["settings"]} vs {header["settings"]}); not merged')
            others.append((path, other))
        cards = {other.get('card') for _, other in others}
        if len(cards) != 1:
            raise SystemExit(f'accuracy.py: error: the files were measured on different cards '
                             f'{sorted(map(str, cards))}; merge each card on its own')
        # the merged file is the one of the card the cells were measured on
        self.machine = dict(others[0][1].get('machine') or {})
        self.json_path = self.json_path.with_name(
            f'accuracy_{card_name(self.machine)}{"_small" if self.args.small else ""}.json')
        self.md_path = self.json_path.with_suffix('.md')
        self.state = self._load_state()
        for path, other in others:
            for task, teacher in other.get('teachers', {}).items():
                known = self.state['teachers'].get(task)
                if known and known['sha256'] != teacher['sha256']:
                    raise SystemExit(f'accuracy.py: error: {path} scored another {task} '
                                     f'teacher ({teacher["sha256"][:12]} vs '
                                     f'{known["sha256"][:12]}); not merged')
                self.state['teachers'][task] = teacher
            added = 0
            for key, cell in other['cells'].items():
                if key not in self.state['cells']:
                    self.state['cells'][key] = cell
                    added += 1
            self.state.setdefault('quant', {}).update(other.get('quant', {}))
            print(f'merged {added} cells from {path}')
        self._save()
        print(f'wrote {self.json_path} and {self.md_path}')
        return self.state

    def run(self) -> dict:
        cells = cells_wanted(self.args.tasks, self.args.rows, self.args.bits)
        todo = [c for c in cells if cell_key(*c) not in self.state['cells']]
        print(f'accuracy benchmark -> {self.json_path} ({len(cells)} cells asked, '
              f'{len(cells) - len(todo)} already done; card: {self.machine.get("card")})')
        deadline = (time.perf_counter() + self.args.time_budget) if self.args.time_budget else None
        for task in sorted({c[0] for c in todo}):
            self._teacher_sha(task)  # drops cells of a changed teacher before skipping
        todo = [c for c in cells if cell_key(*c) not in self.state['cells']]
        for i, (task, row, bits) in enumerate(todo):
            if deadline is not None and time.perf_counter() > deadline:
                print(f'time budget reached: {len(todo) - i} cells left for the next call')
                break
            print(f'[{i + 1}/{len(todo)}] {task} {row} {bits}')
            cell = self.run_cell(task, row, bits)
            self.state['cells'][cell_key(task, row, bits)] = cell
            self.state.setdefault('quant', {})[task] = demo.quant_summary(
                task, self.settings.get('cfg_options') or {})
            self._save()
            shown = ', '.join(f'{k}={100 * v:.1f}' for k, v in cell['metrics'].items())
            print(f'    {shown}  ({cell["seconds"]["total"]:.0f} s)')
        self._save()
        print(f'wrote {self.json_path} and {self.md_path}')
        return self.state


# ----------------------------------------------------------------------------- markdown
def _fmt_cell(cell: Optional[dict], spec) -> Optional[str]:
    if cell is None:
        return None
    text = ' / '.join(f'{100 * cell["metrics"][m.name]:.1f}' for m in spec.metrics)
    return text + (' †' if cell.get('source') else '')


def render_markdown(state: dict) -> str:
    machine = state.get('machine', {})
    s = state.get('settings', {})
    lines = ['# Accuracy of data-free quantization on the demo teachers', '',
             f'Machine: {machine.get("hostname", "?")}, CPU {machine.get("cpu", "?")} '
             f'({machine.get("cpu_count", "?")} cores), card **{machine.get("card", "?")}**, '
             f'torch {machine.get("torch", "?")}. Updated {state.get("updated", "?")}.', '',
             f'Settings: {s.get("num_images")} synthetic images x {s.get("synth_iters")} '
             f'iterations (batch {s.get("synth_batch")}); fine-tuning {s.get("ft_iters")} '
             f'iterations x {s.get("ft_batch")} images; {s.get("num_val")} val images'
             f'; seed {s.get("seed", 0)}'
             + (' (**--small smoke settings: not meaningful numbers**)' if state.get('small')
                else '') + '.', '']
    cells = state.get('cells', {})
    for task, spec in demo.TASKS.items():
        if not any(k.startswith(f'{task}/') for k in cells):
            continue
        metric_names = ' / '.join(m.label for m in spec.metrics)
        teacher = state.get('teachers', {}).get(task, {})
        recipe = state.get('quant', {}).get(task) or demo.quant_summary(
            task, s.get('cfg_options') or {})
        lines += [f'## {task}: {spec.float_config} ({metric_names}, %)', '',
                  f'Teacher `{teacher.get("path", "?")}` (sha256 '
                  f'{str(teacher.get("sha256", "?"))[:12]}). Quantized rows: '
                  f'{spec.mimiq_config} ({recipe}).', '']
        rows = []
        for row in MAIN_ROWS:
            label = 'float teacher' if row == 'float' else demo.RECIPES[row].label
            entry = dict(row=row, label=label)
            for b in BITS:
                key = cell_key(task, row, 'float' if row == 'float' else b)
                entry[b] = _fmt_cell(cells.get(key), spec)
            rows.append(entry)
        cols = [Column('label', 'method', align='<')] + [Column(b, b) for b in BITS]
        lines += [markdown_table(rows, cols)]
        abl = []
        for row in ('mimiq',) + ABLATION_ROWS:
            key = cell_key(task, row, ABLATION_BITS)
            abl.append(dict(label=demo.RECIPES[row].label, value=_fmt_cell(cells.get(key), spec)))
        lines += [f'Ablations at {ABLATION_BITS}:', '',
                  markdown_table(abl, [Column('label', 'variant', align='<'),
                                       Column('value', metric_names)])]
        sources = sorted({c['source'] for k, c in cells.items()
                          if k.startswith(f'{task}/') and c.get('source')})
        lines += [f'† {src}' for src in sources] + ([''] if sources else [])
    return '\n'.join(lines) + '\n'


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--tasks', nargs='+', choices=sorted(demo.TASKS), default=['det', 'seg'])
    p.add_argument('--rows', nargs='+', choices=ALL_ROWS, default=list(ALL_ROWS))
    p.add_argument('--bits', nargs='+', choices=BITS, default=list(BITS))
    p.add_argument('--small', action='store_true',
                   help=f'tiny CPU settings {SMALL} (results file gets a _small suffix)')
    p.add_argument('--out', default='benchmarks/results')
    p.add_argument('--work-dir', default='work_dirs/bench_accuracy')
    p.add_argument('--data-root', default=None,
                   help='demo data (default data/demo; generated when missing)')
    p.add_argument('--num-train', type=int, default=None,
                   help='demo TRAIN images generated for the real-data rows (default 1000)')
    p.add_argument('--det-checkpoint', default=None)
    p.add_argument('--seg-checkpoint', default=None)
    for key, value in FULL.items():
        p.add_argument('--' + key.replace('_', '-'), type=type(value), default=None,
                       help=f'default {value} ({SMALL[key]} with --small)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                   help='overrides of the demo MimiQ configs for every quantized row, e.g. '
                        'quant_cfg.act.observer=mse quant_cfg.attn_prob.kind=log2 '
                        '(recorded in the results header)')
    p.add_argument('--seed', type=int, default=0,
                   help='seed of synthesis, calibration order and fine-tuning; a seed other '
                        'than 0 is part of the settings, so its cells never mix with seed '
                        "0's (run each seed with its own --out and compare them with "
                        'benchmarks/accuracy_seeds.py)')
    p.add_argument('--device', default=None, help='synthesis device (default: cuda if present)')
    p.add_argument('--time-budget', type=float, default=None,
                   help='seconds: start no new cell after this (for 10-minute GPU calls)')
    p.add_argument('--force', action='store_true', help='discard the results file, start again')
    p.add_argument('--merge', nargs='+', default=None, metavar='JSON',
                   help='run nothing: add the cells of these results files (same settings '
                        'and teachers, e.g. one per GPU) to the --out file and re-render it')
    args = p.parse_args(argv)
    real_rows = [r for r in args.rows
                 if r in demo.RECIPES and demo.RECIPES[r].synthesis == 'real']
    num_images = args.num_images or (SMALL if args.small else FULL)['num_images']
    num_train = args.num_train or (SMALL_NUM_TRAIN if args.small else 1000)
    if real_rows and not args.merge and num_images > num_train:
        # found before any cell runs, not after an hour of other cells
        p.error(f'rows {real_rows} calibrate / fine-tune on --num-images {num_images} real '
                f'train images, but --num-train is {num_train}: raise --num-train or run '
                'the real-data rows with their own --num-images')
    return args


def main(argv=None):
    args = parse_args(argv)
    bench = Benchmark(args)
    return bench.merge(args.merge) if args.merge else bench.run()


if __name__ == '__main__':
    main()
