#!/usr/bin/env python
"""Where does low-bit quantization of the real pretrained backbone break? A fast probe.

Quantizes the DINOv2 ViT-S/14 backbone (mimiq_mm.models.DINOv2Pyramid, converted by
`make setup`) under recipe variants, calibrates on real demo TRAIN images and compares the
final LayerNorm output with the float backbone's on held-out ones (relative L2 error and
cosine similarity per image). No heads, no metric: a CPU-minute per variant, to find the
component that fails before spending GPU time on the task metric (benchmarks/accuracy.py).

    python benchmarks/feature_fidelity.py                       # every variant
    python benchmarks/feature_fidelity.py --variants w8a4 fc2_only4 fc2_only4_rot

Writes benchmarks/results/real_backbone/feature_fidelity_<card>.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MINMAX = dict(observer='minmax', lsq=False, granularity='per_tensor')
A8 = dict(act=dict(bits=8, **MINMAX), attn_prob=dict(bits=8, **MINMAX))
OLD = dict(weight=dict(observer='minmax'), rotate_inputs=False)  # before the default changed


def _only4(pattern, rotate=False):
    """Everything at 8 bits except the inputs of the layers matching ``pattern`` (4 bits)."""
    return dict(weight=dict(bits=8, observer='minmax'), rotate_inputs=rotate,
                overrides={pattern: dict(act=dict(bits=4))}, **A8)


VARIANTS = {
    'w8a8': ('8-bit weights and activations, min-max', dict(OLD, weight=dict(bits=8), **A8)),
    'w8a4': ('8-bit weights, 4-bit min-max activations',
             dict(OLD, weight=dict(bits=8), act=dict(**MINMAX), attn_prob=dict(bits=8))),
    'qkv_only4': ('only the qkv inputs (post-LayerNorm) at 4 bits', _only4('*attn.qkv')),
    'proj_only4': ('only the attention-projection inputs at 4 bits', _only4('*attn.proj')),
    'fc1_only4': ('only the fc1 inputs (post-LayerNorm) at 4 bits', _only4('*mlp.fc1')),
    'fc2_only4': ('only the fc2 inputs (post-GELU) at 4 bits', _only4('*mlp.fc2')),
    'fc2_only4_rot': ('fc2 inputs at 4 bits, rotated', _only4('*mlp.fc2', rotate=True)),
    'w4a4_old_default': ('W4A4, the previous QuantConfig() ranges (min-max weights, LSQ-init '
                         'activations), no rotation',
                         dict(OLD, act=dict(observer='lsq', granularity='per_tensor'),
                              attn_prob=dict(kind='uniform', lsq=True, observer='lsq'))),
    'w4a4_reparam_pct_log2': ('W4A4 percentile + log2 + LayerNorm reparam (the issue\'s best '
                              'before)', dict(OLD, act=dict(observer='percentile', lsq=False,
                                                            granularity='per_tensor'),
                                              reparam=True)),
    'w4a4_per_tensor_mse': ('W4A4, rotated inputs, per-tensor MSE activation ranges, log2 (the '
                            'default until the per-token change)',
                            dict(act=dict(observer='mse', granularity='per_tensor'))),
    'w4a4_pt_linear_only': ('W4A4 default, but the attention-matmul inputs (q, k, v) per-tensor '
                            'with MSE ranges', dict(overrides={'*_matmul': dict(
                                act=dict(granularity='per_tensor', observer='mse'))})),
    'w4a4_v_per_tensor': ('W4A4 default, but v (attn·v input) per-tensor with MSE ranges (q, k '
                          'per-token)', dict(overrides={'*av_matmul': dict(
                              act=dict(granularity='per_tensor', observer='mse'))})),
    'w4a4_default': ('W4A4, QuantConfig() (rotated inputs, dynamic per-token activation '
                     'steps, MSE weight ranges, log2)', dict()),
}


def load_images(root: Path, n: int, size: int = 224):
    import numpy as np
    import torch
    from PIL import Image
    files = sorted((root / 'coco' / 'train').glob('*'))[:n]
    if len(files) < n:
        raise SystemExit(f'feature_fidelity.py: error: {root}/coco/train has {len(files)} '
                         f'images, {n} needed (python tools/make_demo_data.py --out {root})')
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert('RGB').resize(
        (size, size)))).permute(2, 0, 1).float() for f in files])
    return (x - mean) / std


def main(argv=None):
    import torch

    from mimiq_mm.models.dinov2 import DINOv2Pyramid
    from mimiq_mm.quant import QuantConfig, calibration_mode, quantize_
    from mimiq_mm.utils.report import (card_slug, machine_info, markdown_table, Column,
                                       write_json)
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument('--data-root', default='data/demo')
    p.add_argument('--calib', type=int, default=12)
    p.add_argument('--test', type=int, default=4)
    p.add_argument('--out', default='benchmarks/results/real_backbone')
    args = p.parse_args(argv)
    images = load_images(ROOT / args.data_root, args.calib + args.test)
    calib, test = images[:args.calib], images[args.calib:]
    base = DINOv2Pyramid()
    base.init_weights()
    base.eval()
    with torch.no_grad():
        ref = base.forward_blocks(test)[0]
    rows = []
    for name in args.variants:
        desc, changes = VARIANTS[name]
        model = copy.deepcopy(base)
        quantize_(model, QuantConfig.from_dict(dict(changes, scope='all')))
        with torch.no_grad():
            with calibration_mode(model):
                for i in range(0, len(calib), 4):
                    model.forward_blocks(calib[i:i + 4])
            out = model.forward_blocks(test)[0]
        rel = float((out - ref).flatten(1).norm(dim=1).div(ref.flatten(1).norm(dim=1)).mean())
        cos = float(torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean())
        rows.append(dict(variant=name, what=desc, rel_err=round(rel, 3), cosine=round(cos, 3),
                         quant_cfg=changes))
        print(f'{name:24s} rel.err {rel:.3f}  cosine {cos:.3f}   {desc}', flush=True)
    machine = machine_info(None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f'feature_fidelity_{card_slug(machine.get("card", "cpu"))}'
    write_json(stem.with_suffix('.json'), dict(machine=machine, rows=rows,
                                               calib_images=args.calib, test_images=args.test))
    md = ['# Feature fidelity of the quantized DINOv2 ViT-S/14 backbone', '',
          f'{machine.get("cpu", "?")} ({machine.get("cpu_count", "?")} cores), card '
          f'{machine.get("card", "cpu")}, torch {machine.get("torch", "?")}. Calibrated on '
          f'{args.calib} demo train images, compared on {args.test} others (224 px): final '
          'LayerNorm output vs the float backbone (1.0 cosine = identical).', '',
          markdown_table(rows, [Column('variant', 'variant', align='<'),
                                Column('rel_err', 'rel. L2 error'), Column('cosine', 'cosine'),
                                Column('what', 'what', align='<')])]
    stem.with_suffix('.md').write_text('\n'.join(md) + '\n')
    print(f'wrote {stem}.json and .md')


if __name__ == '__main__':
    main()
