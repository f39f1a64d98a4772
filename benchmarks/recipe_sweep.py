#!/usr/bin/env python
"""Which activation-range recipe to use: PTQ of the demo teachers under several quantizer
settings, then full MimiQ for the best of them (GPU; CPU with --small).

MIMIQ.md lists the 4-bit hazards (min-max ranges are a poor estimator; post-softmax
probabilities under a uniform grid; post-LayerNorm outlier channels). Each variant below is a
set of ``--cfg-options`` for the demo MimiQ config, run through benchmarks/accuracy.py (same
synthetic sets, same val images, results folder per variant):

    python benchmarks/recipe_sweep.py --tasks det --finetune-top 2
    python benchmarks/recipe_sweep.py --tasks seg --variants minmax mse_log2 --finetune-top 1

Writes ``<out>/recipe_sweep_<card>.{json,md}`` (a table: variant x row) next to the
per-variant accuracy files. The variants are ranked by PTQ on MimiQ synthetic images (a
data-free signal would be better; this ranking uses the demo val metric and the table says so).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import accuracy  # noqa: E402  (benchmarks/accuracy.py)
from mimiq_mm.utils.report import machine_info, read_json, write_json  # noqa: E402

# every variant below is a per-TENSOR activation recipe (chosen before the default became
# dynamic per-token steps, 2026-12-01); 'default' is QuantConfig() as it is now
PT = {'quant_cfg.act.granularity': 'per_tensor'}
VARIANTS = {
    'default': {},
    'minmax': dict(PT),
    'mse': {**PT, 'quant_cfg.act.observer': 'mse'},
    'percentile': {**PT, 'quant_cfg.act.observer': 'percentile'},
    'minmax_log2': {**PT, 'quant_cfg.attn_prob.kind': 'log2'},
    'mse_log2': {**PT, 'quant_cfg.act.observer': 'mse', 'quant_cfg.attn_prob.kind': 'log2'},
    'mse_log2_reparam': {**PT, 'quant_cfg.act.observer': 'mse', 'quant_cfg.attn_prob.kind': 'log2',
                         'quant_cfg.reparam': True},
    # candidates for one default that survives real pretrained statistics (issue: real
    # backbones): RepQ-ViT's pieces (LayerNorm reparam, log-sqrt2 softmax grid) with MSE
    # (clipping-ratio search) weight and activation ranges
    'pct_log2_reparam': {**PT, 'quant_cfg.act.observer': 'percentile',
                         'quant_cfg.attn_prob.kind': 'log2', 'quant_cfg.reparam': True},
    'wmse_mse_sqrt2_reparam': {**PT, 'quant_cfg.weight.observer': 'mse',
                               'quant_cfg.act.observer': 'mse',
                               'quant_cfg.attn_prob.kind': 'log_sqrt2',
                               'quant_cfg.reparam': True},
    'wmse_pct_sqrt2_reparam': {**PT, 'quant_cfg.weight.observer': 'mse',
                               'quant_cfg.act.observer': 'percentile',
                               'quant_cfg.attn_prob.kind': 'log_sqrt2',
                               'quant_cfg.reparam': True},
    'wmse_mse_log2_reparam': {**PT, 'quant_cfg.weight.observer': 'mse',
                              'quant_cfg.act.observer': 'mse',
                              'quant_cfg.attn_prob.kind': 'log2', 'quant_cfg.reparam': True},
    'wmse_minmax_log2': {**PT, 'quant_cfg.weight.observer': 'mse', 'quant_cfg.attn_prob.kind': 'log2'},
}
PTQ_ROWS = ('ptq_gaussian', 'ptq_mimiq')




def cfg_argv(options: dict) -> list:
    if not options:
        return []
    return ['--cfg-options'] + [f'{k}={v}' for k, v in options.items()]


def run_variant(args, task, name, rows, bits='W4A4') -> dict:
    argv = ['--tasks', task, '--rows', *rows, '--bits', bits,
            '--out', str(Path(args.out) / name), '--work-dir', args.work_dir,
            *cfg_argv(VARIANTS[name])]
    if args.small:
        argv.append('--small')
    if args.device:
        argv += ['--device', args.device]
    if getattr(args, 'num_train', None):
        argv += ['--num-train', str(args.num_train)]
    for key in ('num_val', 'num_images', 'synth_iters', 'synth_batch', 'ft_iters', 'ft_batch'):
        value = getattr(args, key)
        if value is not None:
            argv += ['--' + key.replace('_', '-'), str(value)]
    state = accuracy.main(argv)
    return {k: v for k, v in state['cells'].items() if k.startswith(f'{task}/')}


def primary(cell: dict, task: str) -> float:
    name = accuracy.demo.TASKS[task].primary.name
    return float(cell['metrics'][name])


def render(state: dict) -> str:
    lines = ['# Activation-range recipe sweep on the demo teachers (W4A4)', '',
             f'Card **{state["machine"].get("card")}**, torch {state["machine"].get("torch")}; '
             f'updated {state["updated"]}. Each variant is a set of --cfg-options for '
             'configs/mimiq/demo_*_w4a4.py; numbers are % (bbox / segm mAP, or mIoU) on the '
             'demo val set; variants are ranked by PTQ on MimiQ synthetic images.', '']
    for task, variants in state['tasks'].items():
        spec = accuracy.demo.TASKS[task]
        lines += [f'## {task} ({" / ".join(m.label for m in spec.metrics)})', '',
                  '| variant | cfg-options | PTQ Gaussian | PTQ MimiQ images | PTQ real images '
                  '| full MimiQ |',
                  '|:---|:---|---:|---:|---:|---:|']
        for name, cells in variants.items():
            def fmt(row):
                cell = cells.get(f'{task}/{row}/W4A4')
                return ' / '.join(f'{100 * cell["metrics"][m.name]:.1f}'
                                  for m in spec.metrics) if cell else 'n/a'
            opts = ' '.join(f'{k}={v}' for k, v in VARIANTS[name].items()) or '(config)'
            lines.append(f'| {name} | {opts} | {fmt("ptq_gaussian")} | {fmt("ptq_mimiq")} | '
                         f'{fmt("ptq_real")} | {fmt("mimiq")} |')
        float_cell = next((c.get(f'{task}/float/float') for c in variants.values()
                           if c.get(f'{task}/float/float')), None)
        if float_cell:
            lines += ['', 'float teacher: ' + ' / '.join(
                f'{100 * float_cell["metrics"][m.name]:.1f}' for m in spec.metrics)]
        lines.append('')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--tasks', nargs='+', default=['det'], choices=sorted(accuracy.demo.TASKS))
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--ptq-rows', nargs='+', default=list(PTQ_ROWS),
                   choices=('ptq_gaussian', 'ptq_mimiq', 'ptq_psaq', 'ptq_real'),
                   help='the PTQ rows run for every variant (ranked by ptq_mimiq)')
    p.add_argument('--num-train', type=int, default=None,
                   help='demo TRAIN images for ptq_real (accuracy.py --num-train)')
    p.add_argument('--finetune-top', type=int, default=2,
                   help='run full MimiQ for the K best variants (by PTQ on MimiQ images)')
    p.add_argument('--out', default='benchmarks/results/recipe_sweep')
    p.add_argument('--work-dir', default='work_dirs/recipe_sweep')
    p.add_argument('--small', action='store_true')
    p.add_argument('--device', default=None)
    p.add_argument('--time-budget', type=float, default=None,
                   help='seconds: start no new full-MimiQ run after this')
    for key in ('num_val', 'num_images', 'synth_iters', 'synth_batch', 'ft_iters', 'ft_batch'):
        p.add_argument('--' + key.replace('_', '-'), type=int, default=None)
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.device)
    card = accuracy.card_name(machine)
    path = out / f'recipe_sweep_{card}{"_small" if args.small else ""}.json'
    state = read_json(path) if path.is_file() else None
    state = state if isinstance(state, dict) else {'tasks': {}}

    def save():
        state.update(machine=machine, updated=datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec='seconds'))
        write_json(path, state)
        path.with_suffix('.md').write_text(render(state))

    for task in args.tasks:
        results = state['tasks'].setdefault(task, {})
        for i, name in enumerate(args.variants):
            rows = (('float',) if i == 0 else ()) + tuple(args.ptq_rows)
            print(f'== {task} {name}: {", ".join(rows)}', flush=True)
            results[name] = run_variant(args, task, name, rows)
            save()
        ranked = sorted(args.variants, key=lambda n: -primary(
            results[n][f'{task}/ptq_mimiq/W4A4'], task))
        print(f'== {task} ranking by PTQ on MimiQ images: {ranked}', flush=True)
        for name in ranked[:args.finetune_top]:
            if args.time_budget and time.perf_counter() - start > args.time_budget:
                print('time budget reached: no more fine-tuning runs', flush=True)
                break
            print(f'== {task} {name}: mimiq', flush=True)
            results[name] = run_variant(args, task, name, ('mimiq',))
            save()
    save()
    print(render(state))
    return state


if __name__ == '__main__':
    main()
