#!/usr/bin/env python
"""Run-to-run spread of benchmarks/accuracy.py cells: one results file per seed, compared.

A single accuracy cell on the demo detector moves by a few tenths of an AP from one seed to
the next (synthetic images, calibration order, fine-tuning order), which is as large as the
differences the tables are read for. This tool groups the cells of several results files
(typically one ``accuracy.py --seed N --out DIR`` run per seed) by task, row, bit width,
number of images (synthetic, or real for the real-data rows), ``--cfg-options`` and every
other setting of the run that the row depends on (``accuracy.settings_used``: e.g. synthesis
iterations, fine-tuning length, lr), except the seed and the synthesis batch, and reports
every seed's value, the mean and the spread, plus the mean as a share of the float
teacher's. Settings that differ between the groups shown are
listed in the table.

    python benchmarks/accuracy_seeds.py --out benchmarks/results/accuracy/det_seeds \\
        --float benchmarks/results/accuracy/det/accuracy_nvidia-h200.json \\
        RUN_SEED0/accuracy_nvidia-h200.json RUN_SEED1/accuracy_nvidia-h200.json ...

Every file must come from the same card and score the same val images (``num_val``). Two
files with the same seed for one group are refused (the same experiment counted twice).
Writes ``accuracy_seeds_<card>.json`` and ``.md`` under ``--out``.
"""
import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from mimiq_mm.utils.report import (Column, card_slug, markdown_table, percent_of,  # noqa: E402
                                   write_json)

sys.path.insert(0, str(Path(__file__).resolve().parent))
# benchmarks/accuracy.py: the results files and what a row uses
from accuracy import load_results, settings_used  # noqa: E402

#: settings that do not define an experiment group (they vary between seeds of one group)
SEED_LEVEL = ('seed', 'synth_batch')
#: settings shown in their own columns or checked on their own (not in the 'settings' column)
_OWN_COLUMN = ('num_val', 'num_images', 'cfg_options')


def group_key(cell: dict, settings: dict) -> tuple:
    settings = settings_used(cell['row'], settings)
    options = settings.get('cfg_options') or {}
    uses_images = cell['row'] != 'float'
    rest = {k: v for k, v in settings.items()
            if k not in SEED_LEVEL + _OWN_COLUMN} if uses_images else {}
    # the whole quantizer recipe the cell ran with (recorded since GPTQ became a default):
    # cells of another package default are another experiment
    quant = json.dumps(cell.get('quant'), sort_keys=True)
    return (cell['task'], cell['row'], cell['bits'],
            settings.get('num_images') if uses_images else None,
            json.dumps(options, sort_keys=True), json.dumps(rest, sort_keys=True), quant)


def collect(paths, float_path=None, rows=None, bits=None) -> dict:
    groups, cards, num_val, floats = {}, set(), {}, {}

    def load_one_card(path):
        state = load_results(Path(path), 'accuracy_seeds.py')
        cards.add(state.get('card'))
        if len(cards) > 1:
            raise SystemExit(f'accuracy_seeds.py: error: the files come from different cards '
                             f'{sorted(map(str, cards))}; compare one card at a time')
        return state

    for path in paths:
        state = load_one_card(path)
        settings = state['settings']
        seed = int(settings.get('seed', 0))
        for cell in state['cells'].values():
            task = cell['task']
            if (rows and cell['row'] not in rows) or (bits and cell['bits'] not in bits):
                continue
            if num_val.setdefault(task, settings['num_val']) != settings['num_val']:
                raise SystemExit(f'accuracy_seeds.py: error: {path} scores {settings["num_val"]}'
                                 f' {task} val images, another file {num_val[task]}')
            key = group_key(cell, settings)
            runs = groups.setdefault(key, {})
            if seed in runs:
                raise SystemExit(f'accuracy_seeds.py: error: seed {seed} of {key[:3]} is in '
                                 f'both {runs[seed]["file"]} and {path}')
            runs[seed] = dict(metrics=cell['metrics'], file=str(path),
                              settings={k: settings[k] for k in SEED_LEVEL if k in settings})
    if float_path:
        for cell in load_one_card(float_path)['cells'].values():
            if cell['row'] == 'float':
                floats[cell['task']] = cell['metrics']
    return dict(groups=groups, card=cards.pop(), num_val=num_val, floats=floats)


def summarise(data: dict) -> list:
    rows = []
    for key, runs in sorted(data['groups'].items(), key=lambda kv: tuple(map(str, kv[0]))):
        task, row, bits, images, options, rest, _ = key
        seeds = sorted(runs)
        metrics = list(runs[seeds[0]]['metrics'])
        stats = {}
        for m in metrics:
            values = [runs[s]['metrics'][m] for s in seeds]
            mean = statistics.fmean(values)
            share = percent_of(mean, data['floats'].get(task, {}).get(m))
            stats[m] = dict(values=values, mean=mean, min=min(values), max=max(values),
                            stdev=statistics.stdev(values) if len(values) > 1 else None,
                            of_float=None if share is None else share / 100)
        rows.append(dict(task=task, row=row, bits=bits, num_images=images,
                         cfg_options=json.loads(options), settings=json.loads(rest),
                         seeds=seeds, metrics=stats,
                         files={str(s): runs[s]['file'] for s in seeds},
                         seed_settings={str(s): runs[s]['settings'] for s in seeds}))
    return rows


def differing_settings(rows) -> list:
    """Names of the settings whose value is not the same in every row that has them (a row
    that does not depend on a setting, e.g. PTQ on the fine-tuning lr, does not have it)."""
    names = sorted({k for r in rows for k in r['settings']})
    return [k for k in names
            if len({json.dumps(r['settings'][k]) for r in rows if k in r['settings']}) > 1]


def to_markdown(rows, data) -> str:
    table = []
    shown = differing_settings(rows)
    for r in rows:
        stats = [r['metrics'][m] for m in r['metrics']]
        table.append(dict(
            task=r['task'], row=r['row'], bits=r['bits'], images=r['num_images'],
            options=' '.join(f'{k}={v}' for k, v in r['cfg_options'].items()) or '-',
            settings=' '.join(f'{k}={r["settings"][k]}' for k in shown
                              if k in r['settings']) or '-',
            seeds=', '.join(map(str, r['seeds'])),
            per_seed='; '.join(' / '.join(f'{100 * st["values"][i]:.1f}' for st in stats)
                               for i in range(len(r['seeds']))),
            mean=' / '.join(f'{100 * st["mean"]:.2f}' + (
                f' +- {100 * st["stdev"]:.2f}' if st['stdev'] is not None else '')
                for st in stats),
            of_float=' / '.join(f'{100 * st["of_float"]:.1f} %' if st['of_float'] else 'n/a'
                                for st in stats)))
    columns = [Column('task', 'task', align='<'), Column('row', 'row', align='<'),
               Column('bits', 'bits', align='<'), Column('images', 'images'),
               Column('options', 'cfg-options', align='<')]
    if shown:
        columns.append(Column('settings', 'settings', align='<'))
    columns += [Column('seeds', 'seeds', align='<'),
               Column('per_seed', 'per seed', align='<'),
               Column('mean', 'mean (+- sd)', align='<'), Column('of_float', 'of float')]
    return '\n'.join([
        '# Seed-to-seed spread of accuracy cells', '',
        f'Card **{data["card"]}**; val images: '
        + ', '.join(f'{t} {n}' for t, n in sorted(data['num_val'].items()))
        + '. Values in % (bbox / segm mAP for det, mIoU for seg). Mean +- sample standard '
          'deviation over the seeds; "of float" = mean / float teacher.', '',
        markdown_table(table, columns)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('files', nargs='+', help='accuracy.py results files (JSON), one per seed')
    p.add_argument('--float', dest='float_path', default=None,
                   help='results file holding the float teacher cells (for "of float")')
    p.add_argument('--rows', nargs='+', default=None, help='only these rows')
    p.add_argument('--bits', nargs='+', default=None, help='only these bit widths')
    p.add_argument('--out', required=True, help='folder for the JSON and Markdown')
    args = p.parse_args(argv)
    data = collect(args.files, args.float_path, args.rows, args.bits)
    if not data['groups']:
        p.error('no cells left after --rows / --bits')
    rows = summarise(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f'accuracy_seeds_{card_slug(data["card"])}'
    record = dict(card=data['card'], num_val=data['num_val'], floats=data['floats'], rows=rows,
                  updated=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec='seconds'))
    write_json(stem.with_suffix('.json'), record)
    md = to_markdown(rows, data)
    stem.with_suffix('.md').write_text(md)
    print(md)
    print(f'wrote {stem}.json and {stem}.md')
    return record


if __name__ == '__main__':
    main()
