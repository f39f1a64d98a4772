#!/usr/bin/env python
"""Where does a quantized demo teacher lose its accuracy? PTQ of the demo teacher under
quantizer variants that differ in one component (weights only at low bits, activations
only, post-softmax probabilities only, weight range estimator, LayerNorm reparam, layers
kept at 8 bits, ...), all calibrated on the same images and scored with the real metric.

    python benchmarks/quant_sensitivity.py --task det                       # all variants
    python benchmarks/quant_sensitivity.py --task det --variants base w4a8 w8a4
    python benchmarks/quant_sensitivity.py --task det --calib real --num-train 64

A variant is a set of ``quant_cfg`` changes applied on top of the task's demo MimiQ config
(configs/mimiq/demo_*_w4a4.py) with ``--bits``; PTQ = calibrated ranges, no fine-tuning.
Results (one JSON per run + a Markdown table) go to ``--out``; finished variants with the
same settings are reused.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tools'))

from mimiq_mm.quant import parse_bit_widths  # noqa: E402

# name -> (description, quant_cfg changes: {field: {subfield: value}} or {field: value})
A8 = dict(act=dict(bits=8), attn_prob=dict(bits=8))
VARIANTS = {
    'base': ('the demo recipe at --bits', {}),
    'w4a8': ('weights at --bits, activations and probabilities at 8 bits', A8),
    'w8a4': ('weights at 8 bits, activations and probabilities at --bits',
             dict(weight=dict(bits=8))),
    'act_only': ('only Linear/Conv/matmul inputs at --bits (weights, probabilities 8)',
                 dict(weight=dict(bits=8), attn_prob=dict(bits=8))),
    'prob_only': ('only the post-softmax probabilities at --bits',
                  dict(weight=dict(bits=8), act=dict(bits=8))),
    'w_mse': ('weights: MSE-optimal per-channel clipping instead of min-max',
              dict(weight=dict(observer='mse'))),
    'w_mse_only': ('weights only (MSE clipping), activations 8 bits',
                   dict(weight=dict(observer='mse'), **A8)),
    'a_percentile': ('per-tensor activation ranges from the percentile observer',
                     dict(act=dict(observer='percentile', granularity='per_tensor'))),
    'a_mse': ('per-tensor activation ranges from the MSE observer (the default until '
              '2026-12-01 evening)', dict(act=dict(observer='mse', granularity='per_tensor'))),
    'a_asym': ('activations: asymmetric (zero point) instead of symmetric ranges',
               dict(act=dict(symmetric=False, granularity='per_tensor'))),
    'w_asym': ('weights: asymmetric per-channel ranges', dict(weight=dict(symmetric=False))),
    'aw_asym': ('weights and activations asymmetric',
                dict(weight=dict(symmetric=False), act=dict(symmetric=False, granularity='per_tensor'))),
    'a_asym_reparam': ('asymmetric activations + LayerNorm reparam',
                       dict(act=dict(symmetric=False, granularity='per_tensor'), reparam=True)),
    'a_asym_w8': ('asymmetric activations at --bits, weights at 8 bits',
                  dict(act=dict(symmetric=False, granularity='per_tensor'), weight=dict(bits=8))),
    'reparam': ('RepQ-ViT LayerNorm reparam of post-LN activations (per-tensor inputs)',
                dict(reparam=True, act=dict(granularity='per_tensor'))),
    'w_mse_reparam': ('MSE weight clipping + LayerNorm reparam',
                      dict(weight=dict(observer='mse'), reparam=True,
                           act=dict(granularity='per_tensor'))),
    'no_attn_mm': ('attention matmuls kept float', dict(quantize_attention=False)),
    'patch8': ('patch embedding kept at 8 bits',
               dict(overrides={'*patch_embed*': dict(weight=dict(bits=8), act=dict(bits=8))})),
    'stage0_8': ('first Swin stage at 8 bits',
                 dict(overrides={'*stages.0.*': dict(weight=dict(bits=8), act=dict(bits=8),
                                                     attn_prob=dict(bits=8))})),
    'last_stage8': ('last Swin stage at 8 bits',
                    dict(overrides={'*stages.3.*': dict(weight=dict(bits=8), act=dict(bits=8),
                                                        attn_prob=dict(bits=8))})),
    'fc2_8': ('MLP fc2 (post-GELU input) at 8 bits',
              dict(overrides={'*ffn.layers.1': dict(act=dict(bits=8))})),
    'rot_mse': ('rotated Linear / matmul inputs, MSE weight and activation ranges',
                dict(weight=dict(observer='mse'), act=dict(observer='mse', granularity='per_tensor'),
                rotate_inputs=True)),
    'rot_mse_8': ('rot_mse at 8-bit activations (weights at --bits)',
                  dict(weight=dict(observer='mse'), act=dict(observer='mse', bits=8, granularity='per_tensor'),
                       attn_prob=dict(bits=8), rotate_inputs=True)),
    'no_rotation': ('inputs not rotated (rotate_inputs=False)', dict(rotate_inputs=False)),
    'a_minmax': ('per-tensor activation ranges from min-max',
                 dict(act=dict(observer='minmax', granularity='per_tensor'))),
    'a_pt': ('dynamic per-token activation steps (absmax, clipping ratio 1)',
             dict(act=dict(granularity='per_token', observer='minmax'))),
    'a_pt_mse': ('dynamic per-token activation steps, MSE-searched clipping ratio',
                 dict(act=dict(granularity='per_token', observer='mse'))),
    'mm_per_tensor_mse': ('per-token Linear inputs, attention-matmul inputs (q, k, v) per-tensor '
                          'with MSE ranges',
                          dict(overrides={'*_matmul': dict(act=dict(granularity='per_tensor',
                                                                    observer='mse'))})),
    'a_mse_p3': ('activation ranges minimising the L3 error (clips less than L2)',
                 dict(act=dict(observer='mse', mse_norm=3.0, granularity='per_tensor'))),
    'a_mse_p4': ('activation ranges minimising the L4 error',
                 dict(act=dict(observer='mse', mse_norm=4.0, granularity='per_tensor'))),
    'w_minmax': ('weight ranges from min-max', dict(weight=dict(observer='minmax'))),
    'w_gptq': ('GPTQ weight rounding (error-compensating, from the calibration inputs)',
               dict(weight=dict(rounding='gptq'))),
    'w_gptq_a8': ('GPTQ weight rounding, activations and probabilities at 8 bits',
                  dict(weight=dict(rounding='gptq'), **A8)),
    'w_nearest': ('nearest weight rounding (no GPTQ)', dict(weight=dict(rounding='nearest'))),
    'center': ('activations centred: Q(x - m) + m with the calibrated per-channel mean m',
               dict(act=dict(center=True))),
    # data-free SmoothQuant-style fold into the LayerNorm -> qkv / fc1 pairs (QuantConfig.smooth)
    **{f'smooth{int(a * 100)}': (f'LayerNorm -> Linear smoothing, migration exponent {a}',
                                 dict(smooth=a)) for a in (0.25, 0.5, 0.75, 1.0)},
    # one input kind at 8 bits at a time (mmdet/mmseg Swin and timm ViT names)
    'qkv_in8': ('qkv input (post-LayerNorm) at 8 bits',
                dict(overrides={'*w_msa.qkv': dict(act=dict(bits=8)),
                                '*attn.qkv': dict(act=dict(bits=8))})),
    'proj_in8': ('attention output projection input at 8 bits',
                 dict(overrides={'*w_msa.proj': dict(act=dict(bits=8)),
                                 '*attn.proj': dict(act=dict(bits=8))})),
    'fc1_in8': ('MLP fc1 input (post-LayerNorm) at 8 bits',
                dict(overrides={'*ffn.layers.0.0': dict(act=dict(bits=8)),
                                '*mlp.fc1': dict(act=dict(bits=8))})),
    'fc2_in8': ('MLP fc2 input (post-GELU) at 8 bits',
                dict(overrides={'*ffn.layers.1': dict(act=dict(bits=8)),
                                '*mlp.fc2': dict(act=dict(bits=8))})),
    'mm_in8': ('q, k and v (attention matmul inputs) at 8 bits',
               dict(overrides={'*qk_matmul': dict(act=dict(bits=8)),
                               '*av_matmul': dict(act=dict(bits=8))})),
    'downsample8': ('patch-merging (downsample) layers at 8 bits',
                    dict(overrides={'*downsample*': dict(weight=dict(bits=8), act=dict(bits=8))})),
}


def merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and key != 'overrides':
            out[key] = dict(out.get(key) or {}, **value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _machine_line(device) -> str:
    from mimiq_mm.utils.report import machine_info
    m = machine_info(device)
    return (f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores), card {m.get('card', '?')}, "
            f"torch {m.get('torch', '?')}")


def _bits_arg(text: str) -> str:
    """argparse type of --bits: 'w4a4' -> 'W4A4', checked by parse_bit_widths."""
    try:
        parse_bit_widths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip().upper()


def main(argv=None):
    import demo
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--task', choices=sorted(demo.TASKS), default='det')
    p.add_argument('--variants', nargs='+', choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument('--calib', choices=('mimiq', 'gaussian', 'real'), default='mimiq')
    p.add_argument('--bits', default='W4A4', type=_bits_arg,
                   help='weight/activation bits of the base recipe, e.g. W4A4')
    p.add_argument('--num-val', type=int, default=100)
    p.add_argument('--num-images', type=int, default=32)
    p.add_argument('--synth-iters', type=int, default=60)
    p.add_argument('--synth-batch', type=int, default=8)
    p.add_argument('--calib-batch', type=int, default=4)
    p.add_argument('--num-train', type=int, default=64, help='real TRAIN images (--calib real)')
    p.add_argument('--device', default=None)
    p.add_argument('--out', default='work_dirs/quant_sensitivity')
    p.add_argument('--note', default='', help='free text for the report')
    args = p.parse_args(argv)

    from mimiq_mm.utils.report import write_json
    spec = demo.TASKS[args.task]
    wbits, abits = parse_bit_widths(args.bits)
    opts = demo.Options(num_val=args.num_val, num_images=args.num_images,
                        synth_iters=args.synth_iters, synth_batch=args.synth_batch,
                        ft_iters=0, ft_batch=args.calib_batch, eval_batch=4, wbits=wbits,
                        abits=abits, device=args.device)
    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)
    need_train = args.calib == 'real'
    if need_train:
        from mimiq_mm.datasets.demo_data import DemoDataConfig, generate_demo_data
        data_root = Path(demo._resolve('data/demo_sens'))
        generate_demo_data(data_root, DemoDataConfig(seed=0, num_train=args.num_train,
                                                     num_val=args.num_val, size=(256, 256)))
    else:
        data_root = demo.prepare_val_data(None, opts.num_val)
    ann_file, _ = (demo.coco_val_subset(data_root, opts.num_val, out)
                   if spec.dataset == 'coco' else ('', opts.num_val))
    checkpoint = demo._resolve(spec.checkpoint)
    sha = demo.sha256_file(checkpoint)
    base_cfg = demo.mimiq_config(spec)
    recipe = demo.RECIPES[{'mimiq': 'ptq_mimiq', 'gaussian': 'ptq_gaussian',
                           'real': 'ptq_real'}[args.calib]]
    settings = demo.synthesis_settings(spec, recipe, opts, dict(base_cfg.synthesis),
                                       data_root if need_train else None)
    synth_dir = demo.synthetic_dir(Path(args.out) / 'synthetic', settings, sha)
    base_q = demo.quant_cfg_for(recipe, opts, base_cfg.quant_cfg.to_dict())
    timer = demo.StageTimer()
    rows = []
    for name in args.variants:
        desc, changes = VARIANTS[name]
        q = merge(base_q, changes)
        tag = f'{name}_{args.calib}_{args.bits.lower()}'
        stage_dir = out / tag
        fingerprint = dict(task=args.task, q=demo.quant_fingerprint(q), sha=sha, calib=args.calib,
                           opts=dataclasses.asdict(opts), synth=str(synth_dir))
        cached = demo.cached_stage(stage_dir, fingerprint, False)
        if cached is None:
            cfg = demo.stage_config(spec, recipe, opts, data_root, ann_file, checkpoint,
                                    stage_dir, synth_dir, settings)
            cfg.quant_cfg = q
            cfg.model.quant_cfg = q
            start = time.perf_counter()
            result = demo.run_quant(spec, recipe, cfg, stage_dir, synth_dir, timer, name)
            result['seconds'] = time.perf_counter() - start
            result['fingerprint'] = demo.canonical(fingerprint)
            result['quant_cfg'] = q
            write_json(stage_dir / demo.RESULT_FILE, result)
            cached = result
        m = cached['metrics']
        row = dict(variant=name, description=desc, **{k: round(100 * v, 1) for k, v in m.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    md = [f'# PTQ sensitivity: {args.task}, {args.bits}, calibrated on {args.calib} images',
          '', f'{opts.num_images} calibration images'
          + (f' ({opts.synth_iters} synthesis iterations)' if args.calib == 'mimiq' else '')
          + f', {opts.num_val} demo val images. Machine: {_machine_line(args.device)}.', '',
          *([args.note, ''] if args.note else []),
          '| variant | ' + ' | '.join(k for k in rows[0] if k not in ('variant', 'description'))
          + ' | what |', '|---|' + '---:|' * (len(rows[0]) - 2) + '---|']
    for r in rows:
        vals = [str(v) for k, v in r.items() if k not in ('variant', 'description')]
        md.append(f'| {r["variant"]} | ' + ' | '.join(vals) + f' | {r["description"]} |')
    (out / f'sensitivity_{args.calib}_{args.bits.lower()}.md').write_text('\n'.join(md) + '\n')
    print('\n'.join(md))


if __name__ == '__main__':
    main()
