"""Train a model with an mmengine Runner: MimiQ configs (configs/mimiq/*) or plain
mmdet / mmseg configs (e.g. the float demo teachers in configs/demo/*).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [auto|PATH]] [--amp]
                          [--cfg-options teacher_checkpoint=PATH quant_cfg.act.bits=3 ...]
                          [--launcher {none,pytorch,slurm,mpi}]
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mimiq_mm  # noqa: E402,F401  (registries, safe checkpoint loading)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Train a detector / segmentor (MimiQ or '
                                                 'plain OpenMMLab config)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the actual batch size (auto_scale_lr)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from PATH, or from the latest checkpoint in the work '
                             'dir when no PATH is given')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (e.g. '
                             'teacher_checkpoint=PATH quant_cfg.weight.bits=3)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_cfg(args):
    from mmengine.config import Config

    from mimiq_mm.engine import apply_mimiq_fields, follow_max_iters, follow_synthetic_root
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        parsed_root = cfg.get('synthetic_root', None)
        parsed_iters = cfg.get('max_iters', None)
        cfg.merge_from_dict(args.cfg_options)
        follow_synthetic_root(cfg, parsed_root)
        follow_max_iters(cfg, parsed_iters)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        if cfg.optim_wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print('AMP is already enabled in the config.')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise RuntimeError('--auto-scale-lr needs `auto_scale_lr = dict(enable=False, '
                               'base_batch_size=...)` in the config.')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume {args.resume}: no such checkpoint. Use '
                                    '`--resume` alone to pick the latest in the work dir.')
        cfg.resume = True
        cfg.load_from = args.resume
    apply_mimiq_fields(cfg)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    from mimiq_mm.engine import build_runner, check_run_inputs, close_distributed
    cfg = build_cfg(args)
    check_run_inputs(cfg, 'train')  # before synthesis / calibration start
    runner = build_runner(cfg)
    runner.train()
    close_distributed()
    return runner


if __name__ == '__main__':
    main()
    # after a distributed run: leave without interpreter finalization (a torch/gloo
    # teardown abort would turn the finished run into a failure; see the function)
    from mimiq_mm.engine import exit_after_distributed_run
    exit_after_distributed_run()
