#!/usr/bin/env python
"""Generate a synthetic (data-free) image dataset with MimiQ or a baseline.

    python tools/generate.py configs/synthesis/mimiq_maskrcnn_swin-t_coco.py \
        --work-dir work_dirs/synthetic/maskrcnn_swin-t \
        --cfg-options teacher.checkpoint=checkpoints/mask_rcnn_swin-t.pth synthesis.num_images=64

    torchrun --nproc_per_node 8 tools/generate.py CONFIG --work-dir DIR   # disjoint shards

The run is resumable: run the same command again after an interruption.
"""
import argparse
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:       # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

DEFAULT_ROOT = Path('work_dirs') / 'synthetic'


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmengine config with `teacher` and `synthesis` blocks')
    parser.add_argument('--work-dir', help='output dataset folder (default: the config\'s '
                        f'work_dir, else {DEFAULT_ROOT}/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config keys, e.g. synthesis.num_images=64 '
                             'teacher.checkpoint=ckpt.pth')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='initialise torch.distributed through mmengine '
                        '(sharding also works without it, from RANK/WORLD_SIZE)')
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    from mmengine.config import Config

    from mimiq_mm.synthesis import build_teacher, synthesize
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if 'synthesis' not in cfg:
        sys.exit(f'{args.config} has no `synthesis=dict(...)` block; see configs/synthesis/ '
                 'for examples')
    if args.launcher != 'none':
        from mmengine.dist import init_dist
        init_dist(args.launcher)
    out_dir = Path(args.work_dir or cfg.get('work_dir') or DEFAULT_ROOT / Path(args.config).stem)
    method = cfg.synthesis.get('method', 'mimiq')
    has_teacher = cfg.get('teacher') is not None or cfg.get('model') is not None
    teacher = build_teacher(cfg) if (method != 'real' or has_teacher) else None
    root = synthesize(teacher, out_dir, cfg.synthesis)
    print(f'synthetic dataset: {root}')
    return root


if __name__ == '__main__':
    main()
