#!/usr/bin/env python
"""Generate the procedural demo datasets (COCO instance segmentation + ADE20K-format
semantic segmentation) that the demo teachers in configs/demo/ train and evaluate on.

    python tools/make_demo_data.py --out data/demo
    python tools/make_demo_data.py --out data/demo --seed 0 --num-train 800 --num-val 100 \
        --size 256 256 --force

Does nothing when --out already holds exactly this set (checked against its manifest.json);
--force regenerates. See mimiq_mm/datasets/demo_data.py for what is drawn.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimiq_mm.datasets.demo_data import DemoDataConfig, generate_demo_data  # noqa: E402


def parse_args(argv=None):
    defaults = DemoDataConfig()
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/demo', help='output folder (default: data/demo)')
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--num-train', type=int, default=defaults.num_train,
                        help=f'training images per dataset (default: {defaults.num_train})')
    parser.add_argument('--num-val', type=int, default=defaults.num_val,
                        help=f'validation images per dataset (default: {defaults.num_val})')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                        default=list(defaults.size), help='image height and width')
    parser.add_argument('--workers', type=int, default=None,
                        help='processes drawing images (default: CPU count, at most 8); '
                             'the output does not depend on it')
    parser.add_argument('--force', action='store_true',
                        help='regenerate even when --out already matches its manifest')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = DemoDataConfig(seed=args.seed, num_train=args.num_train,
                                num_val=args.num_val, size=tuple(args.size))
        manifest = generate_demo_data(args.out, config, force=args.force,
                                      workers=args.workers)
    except (ValueError, FileExistsError) as err:
        sys.exit(f'make_demo_data.py: error: {err}')
    if manifest['skipped']:
        print(f'{args.out} is up to date ({len(manifest["files"])} files match manifest.json); '
              'pass --force to regenerate.')
        return
    coco, ade = manifest['stats']['coco'], manifest['stats']['ade']
    print(f'Wrote {len(manifest["files"])} files to {args.out} in {manifest["seconds"]:.1f} s')
    for split in ('train', 'val'):
        print(f'  coco/{split}: {coco[split]["images"]} images, '
              f'{coco[split]["instances"]} instances {coco[split]["instances_per_class"]}')
        print(f'  ade/{split}: {ade[split]["images"]} images')


if __name__ == '__main__':
    main()
