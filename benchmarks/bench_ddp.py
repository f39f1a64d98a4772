#!/usr/bin/env python
"""MimiQ on 1 vs 2 GPUs through mmengine's distributed launcher: same settings, wall time
per phase, speed-up, and the students' COCO bbox/segm mAP.

Each run is the whole demo pipeline of configs/mimiq/demo_maskrcnn_swin_w4a4.py in ONE
tools/train.py process tree, from a fresh work dir:

    synthesis (MimiQSynthesisHook: N images, each rank its own shard of the batches)
    -> calibration (MimiQCalibrationHook: observer statistics merged across ranks)
    -> fine-tuning (HSAD + task KD, DDP)
    -> COCO eval of the student on the demo val set (the runner's ValLoop after the last
       iteration; under DDP the val images are split over the ranks and gathered)

1 GPU: ``python tools/train.py CFG``; k GPUs: ``tools/dist_train.sh CFG k`` (torchrun).
Same GLOBAL batch on both (``--global-batch`` 8 = 1 x 8 = 2 x 4), same iterations, lr and
schedule, same number of calibration images (``num_batches`` per rank x per-GPU batch x
ranks), the same synthetic set size (the batch seeds depend on the batch index only, so
the 2-GPU set is the 1-GPU set made in two halves; compared image by image). So the
metrics should agree within run-to-run noise, and the speed-up is wall-clock at equal work.
Phase times come from benchmarks/ddp_phase_timer.py (rank 0, CUDA synchronised).

    source .gpulite/install.sh && python3 benchmarks/bench_ddp.py --copy-to $OUT   # 2 GPUs: ~4-5 min
    python benchmarks/bench_ddp.py --small                                 # CPU smoke (gloo)

Writes ``benchmarks/results/bench_ddp_<card>.{json,md}`` after EACH run (partial results
survive a time-out); ``--small`` writes into the work dir only. ``--time-budget`` (s) caps
the whole script: a run is killed when it would exceed it, the next is skipped.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / 'configs' / 'mimiq' / 'demo_maskrcnn_swin_w4a4.py'
TEACHER = ROOT / 'checkpoints' / 'demo' / 'maskrcnn_swin_demo.pth'

FULL = dict(num_images=128, synth_iters=200, synth_batch=32, ft_iters=300, global_batch=8,
            num_val=100, eval_batch=8, lr=1e-5)
SMALL = dict(num_images=4, synth_iters=2, synth_batch=2, ft_iters=4, global_batch=2,
             num_val=4, eval_batch=2, lr=1e-5)
PHASES = ('startup', 'synthesis', 'setup', 'calibration', 'finetune', 'checkpoint', 'eval')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--gpus', type=int, nargs='+', default=[2, 1],
                   help='process counts to run, in this order (default: 2 1)')
    p.add_argument('--small', action='store_true',
                   help='CPU smoke test: tiny sizes, gloo, tests/ddp_cpu_shim.py')
    for key, value in FULL.items():
        p.add_argument('--' + key.replace('_', '-'), type=type(value), default=None,
                       help=f'default {value} ({SMALL[key]} with --small)')
    p.add_argument('--teacher', default=str(TEACHER))
    p.add_argument('--work-dir', default=str(ROOT / 'work_dirs' / 'bench_ddp'))
    p.add_argument('--data-root', default=None,
                   help='demo data folder with coco/val (default: generated in the work dir)')
    p.add_argument('--time-budget', type=float, default=520.0,
                   help='seconds for the whole script (default 520)')
    p.add_argument('--copy-to', default=None,
                   help='also copy the results and the runs\' logs here after each run '
                        '(e.g. $OUT on the device machine)')
    p.add_argument('--out', default=None, help='results stem (default: '
                   'benchmarks/results/bench_ddp_<card>; --small: <work-dir>/bench_ddp_cpu)')
    args = p.parse_args(argv)
    base = SMALL if args.small else FULL
    args.settings = {k: (getattr(args, k) if getattr(args, k) is not None else v)
                     for k, v in base.items()}
    for n in args.gpus:
        if n < 1 or args.settings['global_batch'] % n:
            p.error(f'--global-batch {args.settings["global_batch"]} must split over {n} '
                    'processes')
    return args


# ----------------------------------------------------------------------------- machine
def card_name(small: bool) -> str:
    if small:
        return 'cpu'
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30).stdout
        names = [n.strip() for n in out.splitlines() if n.strip()]
        return names[0] if names else 'unknown-gpu'
    except (OSError, subprocess.SubprocessError):
        return 'unknown-gpu'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- data
def prepare_val(args, work: Path) -> dict:
    """The demo COCO val set (first ``num_val`` images; same images as data/demo's)."""
    sys.path.insert(0, str(ROOT))
    from mimiq_mm.datasets.demo_data import DemoDataConfig, generate_demo_data
    num_val = args.settings['num_val']
    start = time.time()
    if args.data_root:
        root = Path(args.data_root)
    else:
        root = work / 'demo_val'
        generate_demo_data(root, DemoDataConfig(seed=0, num_train=1, num_val=num_val,
                                                size=(256, 256)),
                           workers=min(8, os.cpu_count() or 1))
    ann = root / 'coco' / 'annotations' / 'instances_val.json'
    coco = json.loads(ann.read_text())
    images = sorted(coco['images'], key=lambda im: im['id'])[:num_val]
    if len(images) < num_val:
        raise SystemExit(f'{ann} has {len(images)} val images, fewer than --num-val {num_val}')
    keep = {im['id'] for im in images}
    coco = dict(coco, images=images,
                annotations=[a for a in coco['annotations'] if a['image_id'] in keep])
    subset = work / f'instances_val_first{num_val}.json'
    subset.write_text(json.dumps(coco))
    return dict(coco_root=str(root / 'coco'), ann_file=str(subset), seconds=time.time() - start)


# ----------------------------------------------------------------------------- config
def write_config(args, run_dir: Path, n: int, val: dict) -> Path:
    s = args.settings
    per_gpu = s['global_batch'] // n
    calib_batches = max(1, math.ceil(s['num_images'] / s['global_batch']))
    iters = s['ft_iters']
    warmup = max(1, min(10, iters // 5))
    imports = ['mimiq_mm', 'mimiq_mm.models', 'mimiq_mm.engine', 'mimiq_mm.datasets',
               'ddp_phase_timer'] + (['ddp_cpu_shim'] if args.small else [])
    synth = dict(method='mimiq', num_images=s['num_images'], batch_size=s['synth_batch'],
                 iterations=s['synth_iters'], seed=0, log_interval=50, progress=False,
                 figures=False)
    lines = [
        f'_base_ = [{str(CONFIG)!r}]',
        f'custom_imports = dict(imports={imports!r}, allow_failed_imports=False)',
        f'teacher_checkpoint = {str(Path(args.teacher).resolve())!r}',
        'model = dict(teacher_checkpoint=teacher_checkpoint)',
        f'synthesis = {synth!r}',
        f'train_dataloader = dict(batch_size={per_gpu}, num_workers=0, '
        f'persistent_workers=False, dataset=dict(data_root={str(run_dir / "synthetic")!r}))',
        f'val_dataloader = dict(batch_size={s["eval_batch"] // n or 1}, num_workers=0, '
        f'persistent_workers=False, dataset=dict(data_root={val["coco_root"] + "/"!r}, '
        f'ann_file={val["ann_file"]!r}, data_prefix=dict(img="val/")))',
        'test_dataloader = val_dataloader',
        f'val_evaluator = dict(ann_file={val["ann_file"]!r})',
        'test_evaluator = val_evaluator',
        f'train_cfg = dict(max_iters={iters}, val_interval={iters})',
        f'optim_wrapper = dict(optimizer=dict(lr={s["lr"]!r}))',
        'param_scheduler = ['
        f'dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end={warmup}), '
        f'dict(type="CosineAnnealingLR", by_epoch=False, begin={warmup}, '
        f'end={max(iters, warmup + 1)}, eta_min=0.0)]',
        f'default_hooks = dict(checkpoint=dict(interval={iters}, max_keep_ckpts=1, '
        'save_last=True), logger=dict(interval=50))',
        'custom_hooks = ['
        'dict(type="mimiq_mm.MimiQSynthesisHook"), '
        f'dict(type="mimiq_mm.MimiQCalibrationHook", num_batches={calib_batches}), '
        'dict(type="PhaseTimerHook", edge="start", priority="HIGHEST"), '
        'dict(type="PhaseTimerHook", edge="end", priority="LOWEST")]',
        'randomness = dict(seed=0)',
    ]
    if args.small:
        lines += ['env_cfg = dict(dist_cfg=dict(backend="gloo"))',
                  'model_wrapper_cfg = dict(type="CPUDistributedDataParallel")']
    path = run_dir / 'bench_cfg.py'
    path.write_text('\n'.join(lines) + '\n')
    return path


# ----------------------------------------------------------------------------- runs
def _descendants(pid: int) -> list:
    """PIDs below ``pid`` (Linux /proc; torchrun starts its ranks in new sessions, so the
    process group of the launcher does not hold them)."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc, grace: float = 15.0) -> None:
    """SIGTERM the run (launcher and every rank), SIGKILL what is left after ``grace``."""
    import signal
    pids = [proc.pid] + _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + grace
        while sig == signal.SIGTERM and time.time() < deadline and any(
                os.path.exists(f'/proc/{p}') and not _zombie(p) for p in pids):
            time.sleep(0.5)
    proc.wait()


def _zombie(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


def run_one(args, n: int, val: dict, timeout: float) -> dict:
    run_dir = Path(args.work_dir) / f'gpus{n}'
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = write_config(args, run_dir, n, val)
    s = args.settings
    paths = [str(HERE)] + ([str(ROOT / 'tests')] if args.small else []) + [str(ROOT)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        paths + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    if n == 1:
        cmd = [sys.executable, str(ROOT / 'tools' / 'train.py'), str(cfg)]
    else:
        env.update(PYTHON=sys.executable, PORT=str(free_port()))
        cmd = ['bash', str(ROOT / 'tools' / 'dist_train.sh'), str(cfg), str(n)]
    cmd += ['--work-dir', str(run_dir)]
    if args.small:
        env.update(OMP_NUM_THREADS='1')
    launch = time.time()
    env['BENCH_LAUNCH_TIME'] = repr(launch)
    log_path = run_dir / 'run.log'
    print(f'[bench_ddp] {n} process(es): {" ".join(cmd)}  (timeout {timeout:.0f} s, log '
          f'{log_path})', flush=True)
    result = dict(gpus=n, per_gpu_batch=s['global_batch'] // n, global_batch=s['global_batch'],
                  command=' '.join(cmd), log=str(log_path))
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            rc = 'timeout'
    result['wall_s'] = time.time() - launch
    result['returncode'] = rc
    times = run_dir / 'phase_times.json'
    if rc != 0 or not times.is_file():
        tail = log_path.read_text(errors='replace')[-4000:]
        print(f'[bench_ddp] {n} process(es) FAILED (rc={rc}); log tail:\n{tail}', flush=True)
        result['error'] = tail[-1500:]
        return result
    rec = json.loads(times.read_text())
    m = rec['marks']
    phases = dict(
        startup=m['synthesis_start'] - launch,
        synthesis=m['synthesis_end'] - m['synthesis_start'],
        setup=m['calibration_start'] - m['synthesis_end'],
        calibration=m['calibration_end'] - m['calibration_start'],
        finetune=m['finetune_end'] - m['calibration_end'],
        checkpoint=m['eval_start'] - m['finetune_end'],
        eval=m['eval_end'] - m['eval_start'])
    result.update(
        phases_s=phases, device=rec.get('device'), torch=rec.get('torch'),
        world_size=rec.get('world_size'),
        images_per_s=dict(
            synthesis=s['num_images'] / phases['synthesis'],
            synthesis_image_iters=s['num_images'] * s['synth_iters'] / phases['synthesis'],
            finetune=s['ft_iters'] * s['global_batch'] / phases['finetune'],
            eval=s['num_val'] / phases['eval']),
        metrics=rec.get('metrics', {}))
    met = result['metrics']
    print(f'[bench_ddp] {n} process(es): wall {result["wall_s"]:.1f} s; '
          + ', '.join(f'{k} {v:.1f} s' for k, v in phases.items())
          + f'; bbox mAP {met.get("coco/bbox_mAP")}, segm mAP {met.get("coco/segm_mAP")}',
          flush=True)
    return result


def compare_synthetic(work: Path, a: int, b: int) -> dict:
    """Image-by-image comparison of the two runs' synthetic sets."""
    import numpy as np
    from PIL import Image
    da, db = work / f'gpus{a}' / 'synthetic' / 'images', work / f'gpus{b}' / 'synthetic' / 'images'
    if not da.is_dir() or not db.is_dir():
        return {}
    names = sorted(p.name for p in da.iterdir())
    same_names = names == sorted(p.name for p in db.iterdir())
    identical, max_diff, diffs = 0, 0, []
    for name in names:
        pa, pb = da / name, db / name
        if not pb.is_file():
            continue
        if hashlib.md5(pa.read_bytes()).digest() == hashlib.md5(pb.read_bytes()).digest():
            identical += 1
            diffs.append(0.0)
            continue
        xa = np.asarray(Image.open(pa), dtype=np.float32)
        xb = np.asarray(Image.open(pb), dtype=np.float32)
        d = np.abs(xa - xb)
        max_diff = max(max_diff, float(d.max()))
        diffs.append(float(d.mean()))
    return dict(images=len(names), same_file_names=same_names, byte_identical=identical,
                max_abs_pixel_diff=max_diff,
                mean_abs_pixel_diff=float(sum(diffs) / len(diffs)) if diffs else None)


# ----------------------------------------------------------------------------- report
def summary(results: dict) -> dict:
    runs = {r['gpus']: r for r in results['runs'] if 'phases_s' in r}
    out = {}
    if 1 in runs:
        base = runs[1]
        for n, r in runs.items():
            if n == 1:
                continue
            sp = {k: base['phases_s'][k] / r['phases_s'][k]
                  for k in PHASES if r['phases_s'][k] > 0}
            work = ('synthesis', 'calibration', 'finetune', 'eval')
            sp['pipeline_excl_startup'] = (sum(base['phases_s'][k] for k in work)
                                           / sum(r['phases_s'][k] for k in work))
            sp['wall'] = base['wall_s'] / r['wall_s']
            delta = {k: r['metrics'].get(k, float('nan')) - base['metrics'].get(k, float('nan'))
                     for k in ('coco/bbox_mAP', 'coco/segm_mAP')}
            out[f'{n}_vs_1'] = dict(speedup=sp, map_delta=delta)
    return out


def write_report(stem: Path, results: dict) -> None:
    results['summary'] = summary(results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix('.json').write_text(json.dumps(results, indent=1))
    s = results['settings']
    lines = [
        '# MimiQ demo pipeline on 1 vs 2 GPUs (mmengine distributed launcher)', '',
        f'Machine: {results["machine"]}, card **{results["card"]}**. '
        f'Updated {results["updated"]}. Command: `{results["command"]}`.', '',
        f'Settings (both runs): teacher `{results["teacher"]}`, configs/mimiq/'
        f'demo_maskrcnn_swin_w4a4.py (W4A4); synthesis {s["num_images"]} images x '
        f'{s["synth_iters"]} iterations (batch {s["synth_batch"]}, batches sharded over the '
        f'ranks); calibration on {s["num_images"]} images (observer statistics merged over '
        f'the ranks); fine-tuning {s["ft_iters"]} iterations at the SAME global batch '
        f'{s["global_batch"]} (per GPU: {s["global_batch"]} on 1 GPU, '
        f'{s["global_batch"] // 2} on 2), lr {s["lr"]}; COCO eval of the student on '
        f'{s["num_val"]} demo val images by the runner\'s ValLoop (split over the ranks). '
        f'Each run is one fresh tools/train.py (1 GPU) or tools/dist_train.sh (torchrun) '
        'process tree; times from rank 0, CUDA synchronised.', '',
        '| GPUs | per-GPU batch | startup s | synthesis s (img/s) | setup s | calibration s '
        '| fine-tuning s (img/s) | ckpt s | eval s (img/s) | total wall s | bbox mAP | '
        'segm mAP |',
        '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in results['runs']:
        if 'phases_s' not in r:
            lines.append(f'| {r["gpus"]} | {r["per_gpu_batch"]} | failed (rc='
                         f'{r.get("returncode")}) after {r["wall_s"]:.0f} s; see {r["log"]} '
                         '| | | | | | | | | |')
            continue
        p, ips, m = r['phases_s'], r['images_per_s'], r['metrics']

        def pct(key):
            v = m.get(key)
            return f'{100 * v:.1f}' if isinstance(v, float) and v >= 0 else 'n/a'
        lines.append(
            f'| {r["gpus"]} | {r["per_gpu_batch"]} | {p["startup"]:.1f} | '
            f'{p["synthesis"]:.1f} ({ips["synthesis"]:.2f}) | {p["setup"]:.1f} | '
            f'{p["calibration"]:.1f} | {p["finetune"]:.1f} ({ips["finetune"]:.1f}) | '
            f'{p["checkpoint"]:.1f} | {p["eval"]:.1f} ({ips["eval"]:.1f}) | '
            f'{r["wall_s"]:.1f} | {pct("coco/bbox_mAP")} | {pct("coco/segm_mAP")} |')
    for key, cmp_ in results['summary'].items():
        sp, d = cmp_['speedup'], cmp_['map_delta']
        lines += ['', f'Speed-up {key.replace("_vs_", " vs ")} GPU(s) (time ratio): '
                  + ', '.join(f'{k} {v:.2f}x' for k, v in sp.items())
                  + f'. mAP difference (2 - 1 GPU, points): bbox {100 * d["coco/bbox_mAP"]:+.1f}'
                  f', segm {100 * d["coco/segm_mAP"]:+.1f}.']
    if results.get('synthetic_sets'):
        c = results['synthetic_sets']
        lines += ['', f'Synthetic sets of the two runs: {c["images"]} images, '
                  f'{c["byte_identical"]} byte-identical, max |pixel diff| '
                  f'{c["max_abs_pixel_diff"]:.0f}, mean |pixel diff| '
                  f'{c["mean_abs_pixel_diff"]:.3f} (0-255).']
    for note in results.get('notes', []):
        lines += ['', note]
    stem.with_suffix('.md').write_text('\n'.join(lines) + '\n')


def copy_out(args, stem: Path, work: Path) -> None:
    if not args.copy_to:
        return
    dest = Path(args.copy_to)
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ('.json', '.md'):
        if stem.with_suffix(suffix).is_file():
            shutil.copy(stem.with_suffix(suffix), dest / (stem.name + suffix))
    for log in sorted(work.glob('gpus*/run.log')):
        shutil.copy(log, dest / f'bench_ddp_{log.parent.name}.log')


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    work = Path(args.work_dir).resolve()
    args.work_dir = str(work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from mimiq_mm.utils.report import card_slug
    card = card_name(args.small)
    stem = Path(args.out) if args.out else (
        work / 'bench_ddp_cpu' if args.small
        else HERE / 'results' / f'bench_ddp_{card_slug(card)}')
    val = prepare_val(args, work)
    print(f'[bench_ddp] card {card}; demo val set ready in {val["seconds"]:.1f} s', flush=True)
    results = dict(card=card, machine=f'{platform.node()}, {os.cpu_count()} CPU cores',
                   command=' '.join([Path(sys.executable).name] + sys.argv),
                   teacher=str(Path(args.teacher)), settings=args.settings,
                   val_data_seconds=val['seconds'], runs=[], notes=[],
                   time_budget_s=args.time_budget)
    for i, n in enumerate(args.gpus):
        left = args.time_budget - (time.time() - t0)
        # leave the later runs ~ their share: a hung first run must not eat the budget
        reserve = 0.0 if i == len(args.gpus) - 1 else 0.35 * left
        if left - reserve < 30:
            results['notes'].append(f'{n}-GPU run skipped: {left:.0f} s of the time budget '
                                    'left.')
            print(f'[bench_ddp] skipping {n} process(es): {left:.0f} s left', flush=True)
            continue
        results['runs'].append(run_one(args, n, val, left - reserve))
        results['updated'] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds')
        if len([r for r in results['runs'] if 'phases_s' in r]) >= 2:
            ok = sorted(r['gpus'] for r in results['runs'] if 'phases_s' in r)
            results['synthetic_sets'] = compare_synthetic(work, ok[0], ok[-1])
        write_report(stem, results)
        copy_out(args, stem, work)
        print(f'[bench_ddp] wrote {stem}.json/.md ({time.time() - t0:.0f} s so far)',
              flush=True)
    results['updated'] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds')
    write_report(stem, results)
    copy_out(args, stem, work)
    print(stem.with_suffix('.md').read_text())
    failed = [r for r in results['runs'] if 'phases_s' not in r]
    return 1 if failed or not results['runs'] else 0


if __name__ == '__main__':
    sys.exit(main())
