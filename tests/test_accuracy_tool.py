"""benchmarks/accuracy.py bookkeeping: merging per-GPU results files, and the demo val subset
that must never hold fewer images than a results table claims."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def accuracy():
    return _load('mimiq_accuracy_tool', 'benchmarks/accuracy.py')


def _results_file(accuracy, path: Path, cells: dict, card='NVIDIA H200', num_val=500):
    settings = dict(accuracy.FULL, num_val=num_val)
    state = dict(format_version=accuracy.FORMAT_VERSION, settings=settings, small=False,
                 cells=cells, teachers={'det': dict(path='t.pth', sha256='ab' * 32)},
                 quant={'det': 'recipe'}, machine=dict(card=card, cpu='x', torch='2'),
                 card=card)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    return path


def _cell(row, bits, bbox, segm, **extra):
    return dict(dict(task='det', row=row, bits=bits, label=row,
                     metrics=dict(bbox_mAP=bbox, segm_mAP=segm), seconds={}, notes={}), **extra)


def test_merge_joins_per_gpu_files_of_one_card(accuracy, tmp_path):
    a = _results_file(accuracy, tmp_path / 'g0/r.json',
                      {'det/float/float': _cell('float', 'float', 0.155, 0.147)})
    b = _results_file(accuracy, tmp_path / 'g1/r.json',
                      {'det/mimiq/W4A4': _cell('mimiq', 'W4A4', 0.137, 0.129),
                       'det/ft_real/W4A4': _cell('ft_real', 'W4A4', 0.153, 0.143,
                                                 source='read back from a log')})
    out = tmp_path / 'merged'
    args = accuracy.parse_args(['--tasks', 'det', '--num-val', '500', '--out', str(out),
                                '--merge', str(a), str(b)])
    accuracy.Benchmark(args).merge(args.merge)
    # the merged file is named after the card of the cells, not of this (CPU) machine
    merged = json.loads((out / 'accuracy_nvidia-h200.json').read_text())
    assert set(merged['cells']) == {'det/float/float', 'det/mimiq/W4A4', 'det/ft_real/W4A4'}
    assert merged['card'] == 'NVIDIA H200'
    md = (out / 'accuracy_nvidia-h200.md').read_text()
    assert '| 13.7 / 12.9 |' in md and '15.3 / 14.3 †' in md
    assert '† read back from a log' in md
    # merging again adds nothing and keeps the cells
    accuracy.Benchmark(args).merge([str(a)])
    assert len(json.loads((out / 'accuracy_nvidia-h200.json').read_text())['cells']) == 3


def test_merge_refuses_other_settings_or_cards(accuracy, tmp_path):
    cells = {'det/float/float': _cell('float', 'float', 0.155, 0.147)}
    a = _results_file(accuracy, tmp_path / 'a.json', cells)
    other_val = _results_file(accuracy, tmp_path / 'b.json', cells, num_val=100)
    other_card = _results_file(accuracy, tmp_path / 'c.json', cells, card='NVIDIA H100')
    base = ['--tasks', 'det', '--num-val', '500', '--out', str(tmp_path / 'm'), '--merge']
    for bad, words in ((other_val, 'other settings'), (other_card, 'different cards')):
        args = accuracy.parse_args(base + [str(a), str(bad)])
        with pytest.raises(SystemExit, match=words):
            accuracy.Benchmark(args).merge(args.merge)
    assert not (tmp_path / 'm' / 'accuracy_nvidia-h200.json').exists()


def test_seed_is_part_of_the_settings(accuracy, tmp_path):
    cells = {'det/ptq_real/W4A4': _cell('ptq_real', 'W4A4', 0.142, 0.130)}
    seed0 = _results_file(accuracy, tmp_path / 'a.json', cells)
    base = ['--tasks', 'det', '--num-val', '500', '--out', str(tmp_path / 'm')]
    # a seed-1 run refuses to merge seed-0 cells (and would refuse to resume their file)
    args = accuracy.parse_args(base + ['--seed', '1', '--merge', str(seed0)])
    with pytest.raises(SystemExit, match='other settings'):
        accuracy.Benchmark(args).merge(args.merge)
    # ... and its cells run with that seed (the recorded seed is no second 'seed' argument)
    args = accuracy.parse_args(['--small', '--seed', '1', '--num-images', '3', '--out',
                                str(tmp_path / 's1'), '--work-dir', str(tmp_path / 'w')])
    bench = accuracy.Benchmark(args)
    assert bench.settings['seed'] == 1
    opts = bench.cell_options('W6A6')
    assert (opts.seed, opts.num_images, opts.wbits, opts.abits) == (1, 3, 6, 6)
    assert bench.cell_options('float').wbits == 8
    # seed 0 keeps the settings of files written before the seed was recorded
    args = accuracy.parse_args(base + ['--merge', str(seed0)])
    merged = accuracy.Benchmark(args).merge(args.merge)
    assert 'seed' not in merged['settings'] and len(merged['cells']) == 1


def test_coco_val_subset_never_scores_fewer_images(accuracy, tmp_path):
    demo = accuracy.demo  # tools/demo.py, as the benchmark loads it
    ann = tmp_path / 'coco/annotations/instances_val.json'
    ann.parent.mkdir(parents=True)
    images = [dict(id=i, file_name=f'{i:06d}.png', width=8, height=8) for i in range(5)]
    anns = [dict(id=i, image_id=i, category_id=1, bbox=[0, 0, 2, 2], area=4, iscrowd=0)
            for i in range(5)]
    ann.write_text(json.dumps(dict(images=images, annotations=anns, categories=[])))
    path, n = demo.coco_val_subset(tmp_path, 3, tmp_path)
    subset = json.loads(Path(path).read_text())
    assert n == 3 and [im['id'] for im in subset['images']] == [0, 1, 2]
    assert {a['image_id'] for a in subset['annotations']} == {0, 1, 2}
    assert demo.coco_val_subset(tmp_path, 5, tmp_path) == (str(ann), 5)
    with pytest.raises(ValueError, match='fewer than the 6 asked for'):
        demo.coco_val_subset(tmp_path, 6, tmp_path)


def test_ade_val_set_never_scores_fewer_images(accuracy, tmp_path):
    from mmengine.config import Config
    demo = accuracy.demo
    val = tmp_path / 'ade/images/validation'
    val.mkdir(parents=True)
    for i in range(3):
        (val / f'{i:06d}.jpg').write_bytes(b'x')
    spec = demo.TASKS['seg']
    cfg = Config(dict(test_dataloader=dict(dataset=dict(type='ADE20KDataset'))))
    demo._point_test_set(cfg, spec, tmp_path, demo.Options(num_val=3), '')
    assert cfg.test_dataloader.dataset.indices == 3
    with pytest.raises(ValueError, match='fewer than the 4 asked for'):
        demo._point_test_set(cfg, spec, tmp_path, demo.Options(num_val=4), '')


def test_real_rows_keep_a_demo_folder_with_more_val_images(accuracy, tmp_path):
    """The real-data rows need TRAIN images; a folder that already holds them and more val
    images than this run scores is used as it is, not rewritten under another run reading
    it (the race that mixed 100- and 500-image det cells on a 4-GPU machine)."""
    from mimiq_mm.datasets.demo_data import DemoDataConfig, generate_demo_data
    root = tmp_path / 'demo'
    # (the real-data rows keep at least the 100 val images of the demo in the folder)
    generate_demo_data(root, DemoDataConfig(seed=0, num_train=2, num_val=101, size=(256, 256)))
    before = (root / 'manifest.json').read_bytes()
    args = accuracy.parse_args(['--small', '--num-val', '4', '--num-train', '2', '--data-root',
                                str(root), '--out', str(tmp_path / 'out'), '--work-dir',
                                str(tmp_path / 'work')])
    assert accuracy.Benchmark(args)._data(need_train=True) == root
    assert (root / 'manifest.json').read_bytes() == before
    assert len(list((root / 'coco/val').iterdir())) == 101


def test_cfg_options_reach_the_synthetic_images(accuracy):
    """--cfg-options synthesis.* must change the synthesis of the benchmark / demo rows (and
    the synthetic set's folder), not only the fine-tuning config."""
    demo = accuracy.demo
    spec, recipe, opts = demo.TASKS['det'], demo.RECIPES['mimiq'], demo.Options()
    plain = demo.synthesis_settings(spec, recipe, opts, dict(demo.mimiq_config(spec).synthesis),
                                    None)
    base = demo.mimiq_config(spec, {'synthesis.task_loss': 'task', 'synthesis.w_tv': 1e-4})
    changed = demo.synthesis_settings(spec, recipe, opts, dict(base.synthesis), None)
    assert plain['task_loss'] == 'none' and changed['task_loss'] == 'task'
    assert changed['w_tv'] == 1e-4
    assert demo.synthetic_dir(Path('s'), changed, 'ab' * 32) != \
        demo.synthetic_dir(Path('s'), plain, 'ab' * 32)


def test_a_finished_synthetic_set_made_otherwise_is_refused(tmp_path):
    """A finished set is reused as it is; one made with other image-changing settings must
    stop with an error that names them (settings that do not change the images may differ)."""
    from mimiq_mm.synthesis import SynthesisConfig, check_synthetic_set
    made = SynthesisConfig(num_images=4, batch_size=2, iterations=3, w_tv=2.5e-5)
    (tmp_path / 'manifest.json').write_text(json.dumps(dict(
        config=made.to_dict(), mean=[0.5] * 3, std=[0.2] * 3, channel_order='rgb')))
    check_synthetic_set(tmp_path, made)
    check_synthetic_set(tmp_path, SynthesisConfig(num_images=4, batch_size=2, iterations=3,
                                                  w_tv=2.5e-5, compile='full', progress=False))
    with pytest.raises(ValueError, match='w_tv'):
        check_synthetic_set(tmp_path, SynthesisConfig(num_images=4, batch_size=2,
                                                      iterations=3, w_tv=1e-4))
    check_synthetic_set(tmp_path / 'nothing_here', made)  # no manifest: nothing to check


def test_synthetic_folders_differ_by_every_image_setting(accuracy):
    demo = accuracy.demo
    base = dict(method='mimiq', num_images=8, iterations=5, seed=0, image_size=(256, 256),
                w_tv=2.5e-5, lr=0.1)
    names = {demo.synthetic_dir(Path('s'), dict(base, **change), 'ab' * 32).name
             for change in ({}, {'w_tv': 1e-4}, {'lr': 0.05})}
    assert len(names) == 3
    # settings that do not change the images share the folder
    assert demo.synthetic_dir(Path('s'), dict(base, compile='full', progress=False),
                              'ab' * 32) == demo.synthetic_dir(Path('s'), base, 'ab' * 32)


def test_accuracy_seeds_groups_runs_and_refuses_mixed_inputs(accuracy, tmp_path):
    seeds = _load('mimiq_accuracy_seeds', 'benchmarks/accuracy_seeds.py')
    main = _results_file(accuracy, tmp_path / 's0/r.json',
                         {'det/float/float': _cell('float', 'float', 0.155, 0.147),
                          'det/mimiq/W4A4': _cell('mimiq', 'W4A4', 0.140, 0.133),
                          'det/mimiq/W6A6': _cell('mimiq', 'W6A6', 0.150, 0.140)})
    runs = []
    for seed, bbox in ((1, 0.143), (2, 0.137)):
        path = _results_file(accuracy, tmp_path / f's{seed}/r.json',
                             {'det/mimiq/W4A4': _cell('mimiq', 'W4A4', bbox, 0.130)})
        state = json.loads(path.read_text())
        state['settings']['seed'] = seed
        path.write_text(json.dumps(state))
        runs.append(str(path))
    out = tmp_path / 'out'
    record = seeds.main([str(main), *runs, '--float', str(main), '--rows', 'mimiq',
                         '--bits', 'W4A4', '--out', str(out)])
    (row,) = record['rows']  # W6A6 and float filtered out; the three seeds form one group
    assert row['seeds'] == [0, 1, 2]
    bbox = row['metrics']['bbox_mAP']
    assert bbox['values'] == [0.140, 0.143, 0.137]
    assert bbox['mean'] == pytest.approx(0.140) and bbox['stdev'] == pytest.approx(0.003)
    assert bbox['of_float'] == pytest.approx(0.140 / 0.155)
    md = (out / 'accuracy_seeds_nvidia-h200.md').read_text()
    assert '14.0 / 13.3; 14.3 / 13.0; 13.7 / 13.0' in md and '14.00 +- 0.30' in md
    assert '| settings |' not in md  # nothing differs between the groups
    # a run with other synthesis iterations is another group, not a duplicate seed 0
    longer = _results_file(accuracy, tmp_path / 'it1000/r.json',
                           {'det/mimiq/W4A4': _cell('mimiq', 'W4A4', 0.142, 0.136)})
    state = json.loads(longer.read_text())
    state['settings']['synth_iters'] = 1000
    longer.write_text(json.dumps(state))
    record = seeds.main([str(main), *runs, str(longer), '--rows', 'mimiq', '--bits', 'W4A4',
                         '--out', str(out)])
    assert [(r['settings']['synth_iters'], r['seeds']) for r in record['rows']] == \
        [(1000, [0]), (200, [0, 1, 2])]
    md = (out / 'accuracy_seeds_nvidia-h200.md').read_text()
    assert '| synth_iters=1000 |' in md and '| synth_iters=200 |' in md
    # the same seed twice, or another card, is refused
    with pytest.raises(SystemExit, match='seed 1'):
        seeds.main([runs[0], runs[0], '--out', str(out)])
    other = _results_file(accuracy, tmp_path / 'h100/r.json',
                          {'det/mimiq/W4A4': _cell('mimiq', 'W4A4', 0.1, 0.1)},
                          card='NVIDIA H100')
    with pytest.raises(SystemExit, match='different cards'):
        seeds.main([str(main), str(other), '--out', str(out)])


def test_settings_used_keeps_only_what_a_row_depends_on(accuracy):
    settings = dict(accuracy.FULL, seed=3, cfg_options={'synthesis.bf16': True,
                                                        'quant_cfg.act.lsq': False})
    mimiq = accuracy.settings_used('mimiq', settings)
    assert mimiq == settings  # synthesises by optimisation and fine-tunes: everything counts
    ptq = accuracy.settings_used('ptq_mimiq', settings)
    assert 'synth_iters' in ptq and not {'ft_iters', 'ft_batch', 'lr'} & set(ptq)
    real = accuracy.settings_used('ptq_real', settings)
    assert not {'synth_iters', 'ft_iters', 'ft_batch', 'lr'} & set(real)
    assert real['cfg_options'] == {'quant_cfg.act.lsq': False}
    assert real['num_images'] == settings['num_images'] and real['seed'] == 3
    ft_real = accuracy.settings_used('ft_real', dict(settings, cfg_options={'synthesis.bf16': 1}))
    assert 'synth_iters' not in ft_real and 'cfg_options' not in ft_real
    assert ft_real['ft_iters'] == settings['ft_iters']
    # fine-tuning on Gaussian noise: no synthesis iterations, the fine-tuning settings count
    noise = accuracy.settings_used('abl_gaussian', settings)
    assert 'synth_iters' not in noise and noise['lr'] == settings['lr']
    assert 'abl_gaussian' in accuracy.ABLATION_ROWS
    assert accuracy.settings_used('float', settings) == dict(num_val=settings['num_val'],
                                                             eval_batch=settings['eval_batch'])
    assert settings['cfg_options'] == {'synthesis.bf16': True, 'quant_cfg.act.lsq': False}


def test_accuracy_seeds_ignores_settings_a_row_does_not_use(accuracy, tmp_path):
    seeds = _load('mimiq_accuracy_seeds_used', 'benchmarks/accuracy_seeds.py')
    paths = []
    for seed, iters, bbox in ((0, 200, 0.142), (1, 1000, 0.144)):
        path = _results_file(accuracy, tmp_path / f's{seed}/r.json',
                             {'det/ptq_real/W4A4': _cell('ptq_real', 'W4A4', bbox, 0.131),
                              'det/mimiq/W4A4': _cell('mimiq', 'W4A4', bbox, 0.131)})
        state = json.loads(path.read_text())
        state['settings'].update(seed=seed, synth_iters=iters)
        path.write_text(json.dumps(state))
        paths.append(str(path))
    record = seeds.main([*paths, '--out', str(tmp_path / 'out')])
    groups = {(r['row'], r['settings'].get('synth_iters')): r['seeds'] for r in record['rows']}
    # real-data PTQ never used the synthesis iterations: one group of two seeds; full MimiQ
    # with 200 and with 1000 iterations are two experiments
    assert groups == {('ptq_real', None): [0, 1], ('mimiq', 200): [0], ('mimiq', 1000): [1]}


def test_real_rows_with_more_images_than_train_images_fail_before_running(accuracy, capsys):
    with pytest.raises(SystemExit):
        accuracy.parse_args(['--tasks', 'det', '--rows', 'mimiq', 'ptq_real',
                             '--num-images', '512', '--num-train', '256'])
    assert "rows ['ptq_real']" in capsys.readouterr().err
    # without real-data rows, or with enough train images, the same sizes are fine
    assert accuracy.parse_args(['--rows', 'mimiq', '--num-images', '512',
                                '--num-train', '256']).num_images == 512
    assert accuracy.parse_args(['--rows', 'ptq_real', '--num-images', '512',
                                '--num-train', '512']).num_train == 512


def test_a_second_process_on_the_same_stage_folder_stops_at_once(tmp_path):
    """Two accuracy.py runs sharing a work dir (the same cell at two learning rates) used
    to delete each other's stage folder mid-run; the second now stops with a clear error,
    and a lock left by a process that died does not block the next run."""
    import subprocess
    import sys
    import time
    sys.path.insert(0, str(ROOT / 'tools'))
    import demo
    from mimiq_mm.synthesis.writer import FolderBusyError
    stage = tmp_path / 'det' / 'stages' / 'mimiq_w4a4'
    holder = subprocess.Popen(
        [sys.executable, '-c',
         'import sys, time; sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tools"]\n'
         'import demo\nfrom pathlib import Path\n'
         'with demo.stage_lock(Path(sys.argv[2])):\n'
         '    print("held", flush=True); time.sleep(60)\n', str(ROOT), str(stage)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(FolderBusyError, match=rf'in use by another process \(pid '
                                                   rf'{holder.pid}\).*own --work-dir'):
            with demo.stage_lock(stage):
                pass
        # the lock file is beside the stage folder: clearing a stale stage keeps it
        demo.cached_stage(stage, {'fresh': time.time()}, force=True)
        with pytest.raises(FolderBusyError):
            with demo.stage_lock(stage):
                pass
    finally:
        holder.kill()
        holder.wait()
    with demo.stage_lock(stage):  # the holder died: its lock went with it
        assert stage.is_dir()


def test_time_to_quality_puts_iteration_counts_on_one_curve(accuracy, tmp_path):
    ttq = _load('mimiq_time_to_quality', 'benchmarks/time_to_quality.py')
    paths = []
    for seed, iters, bbox, secs in ((0, 50, 0.164, 21.0), (1, 50, 0.166, 24.0),
                                    (0, 200, 0.160, 105.0)):
        cells = {'det/ptq_mimiq/W4A4': _cell('ptq_mimiq', 'W4A4', bbox, 0.146, seconds={
            'ptq_mimiq: synthesis (mimiq)': secs, 'ptq_mimiq: calibration': 8.0}),
            # real images and the float row have no synthesis: not on any curve
            'det/ptq_real/W4A4': _cell('ptq_real', 'W4A4', 0.170, 0.150),
            'det/float/float': _cell('float', 'float', 0.18, 0.16)}
        path = _results_file(accuracy, tmp_path / f's{seed}_it{iters}/r.json', cells)
        state = json.loads(path.read_text())
        state['settings'].update(seed=seed, synth_iters=iters)
        path.write_text(json.dumps(state))
        paths.append(str(path))
    out = tmp_path / 'out'
    rows = ttq.main([*paths, '--out', str(out), '--note', 'test card'])
    assert [(r['row'], r['synth_iters'], r['seeds']) for r in rows] == \
        [('ptq_mimiq', 50, [0, 1]), ('ptq_mimiq', 200, [0])]
    fifty = rows[0]
    assert fifty['bbox_mAP'] == [0.164, 0.166]
    assert fifty['bbox_mAP_mean'] == pytest.approx(0.165)
    assert fifty['image_iters'] == accuracy.FULL['num_images'] * 50
    assert fifty['synthesis_s'] == [21.0, 24.0]
    md = (out / 'time_to_quality_nvidia-h200.md').read_text()
    assert 's0: 16.4 / 14.6; s1: 16.6 / 14.6' in md and '16.50 / 14.60' in md
    assert (out / 'time_to_quality_nvidia-h200.png').stat().st_size > 0
    # the same seed at the same iteration count twice is refused, and so is a second card
    with pytest.raises(SystemExit, match='seed 0'):
        ttq.main([paths[0], paths[0], '--out', str(out), '--no-plot'])
    other = _results_file(accuracy, tmp_path / 'h100/r.json',
                          {'det/ptq_mimiq/W4A4': _cell('ptq_mimiq', 'W4A4', 0.1, 0.1)},
                          card='NVIDIA H100')
    with pytest.raises(SystemExit, match='several cards'):
        ttq.main([paths[0], str(other), '--out', str(out), '--no-plot'])
