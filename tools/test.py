"""Evaluate a checkpoint with an mmengine Runner (MimiQ or plain mmdet / mmseg configs).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
                         [--eval-teacher] [--cfg-options ...] [--launcher ...]

For a MimiQ config the checkpoint holds the quantized student; ``teacher_checkpoint`` is
only needed with ``--eval-teacher`` (teacher and student scored side by side, the teacher's
metrics under a ``teacher/`` prefix).
"""
import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mimiq_mm  # noqa: E402,F401


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Test (evaluate) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and the metrics json')
    parser.add_argument('--out', help='dump the predictions to a pickle file (.pkl)')
    parser.add_argument('--eval-teacher', action='store_true',
                        help='MimiQ configs: also evaluate the float teacher')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_cfg(args):
    from mmengine.config import Config

    from mimiq_mm.engine import apply_mimiq_fields, is_mimiq_config, wrap_teacher_metrics
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    cfg.resume = False
    apply_mimiq_fields(cfg)
    if is_mimiq_config(cfg):
        if args.eval_teacher:
            cfg.model.eval_teacher = True
            cfg.test_evaluator = wrap_teacher_metrics(cfg.test_evaluator)
        else:  # the student comes from the checkpoint; the teacher's file is not needed
            cfg.model.load_teacher = False
    elif args.eval_teacher:
        raise ValueError('--eval-teacher needs a MimiQ config (model.type=MimiQDistiller)')
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out must end with .pkl or .pickle, got {args.out!r}')
        dump = 'DumpDetResults' if cfg.get('default_scope') == 'mmdet' else 'DumpResults'
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, (list, tuple)) \
            else [cfg.test_evaluator]
        cfg.test_evaluator = list(evaluators) + [dict(type=dump, out_file_path=args.out)]
    return cfg


def main(argv=None):
    from mimiq_mm.engine import build_runner, check_run_inputs, close_distributed
    args = parse_args(argv)
    cfg = build_cfg(args)
    check_run_inputs(cfg, 'test')
    runner = build_runner(cfg)
    metrics = runner.test()
    close_distributed()
    metrics = {k: (float(v) if hasattr(v, '__float__') else v) for k, v in metrics.items()}
    os.makedirs(cfg.work_dir, exist_ok=True)
    with open(osp.join(cfg.work_dir, 'test_metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=2, default=str)
    return metrics


if __name__ == '__main__':
    main()
    # after a distributed run: leave without interpreter finalization (a torch/gloo
    # teardown abort would turn the finished run into a failure; see the function)
    from mimiq_mm.engine import exit_after_distributed_run
    exit_after_distributed_run()
