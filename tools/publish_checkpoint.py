"""Strip an mmengine checkpoint to what a user needs (weights + dataset meta) and record its
sha256, e.g. to ship the demo teachers:

    python tools/publish_checkpoint.py work_dirs/x/iter_2000.pth checkpoints/demo/x.pth
"""
import argparse
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mimiq_mm  # noqa: E402,F401  (weights_only allow-list for mmengine checkpoints)


def sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('src')
    parser.add_argument('dst')
    parser.add_argument('--frozen-pretrained', nargs='*', default=[], metavar='PREFIX=NAME',
                        help='leave out frozen pretrained weights, e.g. '
                             'backbone.vit.=dinov2_vits14_imgfocus (put back when the '
                             'teacher is loaded, from the converted file `make setup` writes)')
    args = parser.parse_args(argv)
    from mimiq_mm.utils.checkpoint import load_checkpoint_file
    ckpt = load_checkpoint_file(args.src, map_location='cpu', what='src')
    meta = ckpt.get('meta', {})
    state = {k: v.contiguous() for k, v in ckpt['state_dict'].items()}
    frozen = []
    if args.frozen_pretrained:
        from mimiq_mm.models.dinov2 import strip_frozen_pretrained
        prefixes = dict(item.split('=', 1) for item in args.frozen_pretrained)
        state, frozen = strip_frozen_pretrained(state, prefixes)
    from mimiq_mm.models.dinov2 import FROZEN_PRETRAINED_META
    out = dict(state_dict=state,
               meta=dict(**{FROZEN_PRETRAINED_META: frozen or None},
                         dataset_meta=meta.get('dataset_meta'), epoch=meta.get('epoch'),
                         iter=meta.get('iter'), mmengine_version=meta.get('mmengine_version'),
                         source=os.path.basename(args.src)))
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    tmp = args.dst + '.tmp'
    torch.save(out, tmp)
    os.replace(tmp, args.dst)
    digest = sha256(args.dst)
    with open(args.dst + '.sha256', 'w') as f:
        f.write(f'{digest}  {os.path.basename(args.dst)}\n')
    size = os.path.getsize(args.dst) / 2**20
    print(f'{args.dst}: {size:.1f} MiB, sha256 {digest}')


if __name__ == '__main__':
    main()
