#!/usr/bin/env python
"""Accuracy against synthesis cost: the time-to-quality curve, from accuracy.py results files.

Each input is a ``benchmarks/accuracy.py`` results file; the runs differ in
``--synth-iters`` (and seed). Cells are grouped by task, row, bit width and every other
setting the row depends on (``accuracy.settings_used``), except the synthesis iterations,
the synthesis batch and the seed. For each group and iteration count the report gives
every seed's primary metric (box mAP for detection, mIoU for segmentation), their mean,
the synthesis cost in image-iterations (images x iterations: the measure that does not
depend on what else shared the card) and the synthesis seconds the cell recorded.

    python benchmarks/time_to_quality.py --out benchmarks/results/time_to_quality \\
        --note "..." RUN/accuracy_nvidia-h200.json ...

Writes ``time_to_quality_<card>.{json,md,png}`` under ``--out``. All files must come from
one card and score the same val images.
"""
import argparse
import datetime
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from mimiq_mm.utils.report import Column, card_slug, markdown_table, write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import load_results, settings_used  # noqa: E402

#: settings that vary along a curve or between its seeds, not between curves
CURVE_LEVEL = ('synth_iters', 'synth_batch', 'seed')
PRIMARY = {'det': ('bbox_mAP', 'segm_mAP'), 'seg': ('mIoU',)}


def metric_names(task: str):
    return PRIMARY['seg' if task.startswith('seg') else 'det']


def collect(paths):
    """``{curve key: {synth_iters: {seed: cell summary}}}`` and the card."""
    curves = defaultdict(lambda: defaultdict(dict))
    cards, num_val = set(), set()
    for path in paths:
        state = load_results(Path(path), 'time_to_quality.py')
        settings = state['settings']
        cards.add(state.get('card') or state.get('machine', {}).get('card'))
        num_val.add(settings.get('num_val'))
        for cell in state['cells'].values():
            if cell['row'] == 'float' or not cell.get('metrics'):
                continue
            used = settings_used(cell['row'], settings)
            if 'synth_iters' not in used:
                continue  # real images or noise: no synthesis curve
            rest = {k: v for k, v in used.items() if k not in CURVE_LEVEL}
            key = (cell['task'], cell['row'], cell['bits'], json.dumps(rest, sort_keys=True))
            iters, seed = int(used['synth_iters']), int(settings.get('seed', 0))
            if seed in curves[key][iters]:
                raise SystemExit(f'time_to_quality.py: error: {path}: {cell["task"]} '
                                 f'{cell["row"]} {cell["bits"]} at {iters} iterations, seed '
                                 f'{seed}, is in two files (the same experiment twice)')
            synth = next((v for k, v in cell.get('seconds', {}).items()
                          if 'synthesis' in k), None)
            curves[key][iters][seed] = dict(
                metrics={m: cell['metrics'].get(m) for m in metric_names(cell['task'])},
                synthesis_s=synth, image_iters=int(settings['num_images']) * iters,
                source=str(path))
    if len(cards) > 1 or len(num_val) > 1:
        raise SystemExit(f'time_to_quality.py: error: the files come from several cards '
                         f'{sorted(map(str, cards))} or val sets {sorted(map(str, num_val))}')
    return curves, next(iter(cards), None)


def summarise(curves):
    rows = []
    for (task, row, bits, rest), points in sorted(curves.items()):
        for iters in sorted(points):
            seeds = points[iters]
            names = metric_names(task)
            entry = dict(task=task, row=row, bits=bits, settings=json.loads(rest),
                         synth_iters=iters, seeds=sorted(seeds),
                         image_iters=next(iter(seeds.values()))['image_iters'],
                         synthesis_s=[seeds[s]['synthesis_s'] for s in sorted(seeds)])
            for m in names:
                values = [seeds[s]['metrics'][m] for s in sorted(seeds)]
                values = [v for v in values if v is not None]
                entry[m] = values
                entry[m + '_mean'] = statistics.mean(values) if values else None
            rows.append(entry)
    return rows


def to_markdown(rows, card, note):
    lines = [f'# Time to quality ({card})', '']
    if note:
        lines += [f'note: {note}', '']
    table = []
    for r in rows:
        names = metric_names(r['task'])
        per_seed = '; '.join(
            f's{s}: ' + ' / '.join(f'{100 * r[m][i]:.1f}' for m in names)
            for i, s in enumerate(r['seeds']))
        table.append(dict(
            task=r['task'], row=r['row'], bits=r['bits'], iters=r['synth_iters'],
            image_iters=r['image_iters'], per_seed=per_seed,
            mean=' / '.join(f'{100 * r[m + "_mean"]:.2f}' for m in names),
            synth=', '.join(f'{s:.0f}' for s in r['synthesis_s'] if s is not None)))
    cols = [Column('task', 'teacher', align='<'), Column('row', 'row', align='<'),
            Column('bits', 'bits'), Column('iters', 'synthesis iterations'),
            Column('image_iters', 'image-iterations'),
            Column('per_seed', 'metric per seed', align='<'),
            Column('mean', 'mean'), Column('synth', 'synthesis s (as recorded)')]
    lines += [markdown_table(table, cols), '',
              'Metric: box / mask mAP (detection) or mIoU (segmentation), in %. Synthesis '
              'seconds are those the cell recorded; when several processes shared the card '
              'they overstate the time alone, so the cost axis is image-iterations.', '']
    return '\n'.join(lines)


def plot(rows, path):
    from mimiq_mm.utils.figures import metric_curves
    series = defaultdict(list)
    for r in rows:
        m = metric_names(r['task'])[0]
        series[f'{r["task"]} {r["row"]} {r["bits"]} ({m})'].append(
            (r['image_iters'], 100 * r[m + '_mean']))
    return metric_curves(series, path, xlabel='synthesis image-iterations (log)',
                         ylabel='mean over seeds, %', title='accuracy vs synthesis cost')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('files', nargs='+', help='accuracy.py results files (JSON)')
    p.add_argument('--out', default='benchmarks/results/time_to_quality')
    p.add_argument('--note', default='')
    p.add_argument('--no-plot', action='store_true')
    args = p.parse_args(argv)
    curves, card = collect(args.files)
    if not curves:
        raise SystemExit('time_to_quality.py: error: no synthesised cells in the files')
    rows = summarise(curves)
    out = Path(args.out)
    stem = f'time_to_quality_{card_slug(card or "unknown")}'
    md = to_markdown(rows, card, args.note)
    write_json(out / f'{stem}.json', dict(
        card=card, note=args.note, rows=rows,
        written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')))
    (out / f'{stem}.md').write_text(md)
    if not args.no_plot:
        plot(rows, out / f'{stem}.png')
    print(md)
    return rows


if __name__ == '__main__':
    main()
