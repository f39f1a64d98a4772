#!/usr/bin/env python
"""Speed of MimiQ pixel optimisation: image-iterations/s and achieved TFLOP/s.

One iteration = forward of the Mask R-CNN Swin-T backbone (the real upstream config
``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``, init_cfg removed) under an attention
recorder, L_sim over all its attention layers + TV, backward to the input pixels, and the
AdamW step on the pixels (teacher weights get no gradients); ``--compile`` compiles the
L_sim computation as ``synthesis.compile=True`` does. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` for one forward+backward.

    python benchmarks/bench_synthesis.py            # CUDA: batch 16/64/128 x 224/512 px
    python benchmarks/bench_synthesis.py --small    # CPU: tiny sizes

Writes ``benchmarks/results/bench_synthesis_<device>.{json,md}``.
"""
import argparse
import copy
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

UPSTREAM = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
FULL = dict(batches=(16, 64, 128), sizes=(224, 512), iterations=10, warmup=3)
SMALL = dict(batches=(1, 2), sizes=(64, 96), iterations=3, warmup=1)
TERA = 1e12


def build_backbone(device):
    from mmengine.hub import get_config
    from mmengine.registry import DefaultScope

    import mmdet.models  # noqa: F401  (registers)
    from mmdet.registry import MODELS
    cfg = get_config(UPSTREAM, pretrained=False)
    backbone_cfg = copy.deepcopy(cfg.model.backbone)
    backbone_cfg.pop('init_cfg', None)
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = MODELS.build(backbone_cfg)
    backbone.init_weights()
    backbone.eval()
    backbone.to(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone, cfg.model.data_preprocessor


def make_step(backbone, x, bf16: bool, compile_: bool):
    from mimiq_mm.attention import AttentionRecorder
    from mimiq_mm.losses.attention_similarity import inter_head_similarity_loss
    from mimiq_mm.losses.tv import total_variation_l2
    optimizer = torch.optim.AdamW([x], lr=0.1, betas=(0.9, 0.999), weight_decay=1e-6)

    def loss_fn(inp, compiled=False):
        with torch.autocast(inp.device.type, dtype=torch.bfloat16, enabled=bf16):
            with AttentionRecorder(backbone) as rec:
                backbone(inp)
            loss = inter_head_similarity_loss(rec.records, compiled=compiled)
        return loss + 2.5e-5 * total_variation_l2(inp)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, compile_)
        loss.backward()
        optimizer.step()
        return loss
    return step, loss_fn


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bench_one(backbone, batch, size, device, iterations, warmup, bf16, compile_):
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(batch, 3, size, size, device=device, requires_grad=True)
    step, eager_loss = make_step(backbone, x, bf16, compile_)
    with FlopCounterMode(display=False) as counter:
        eager_loss(x).backward()
    flops = counter.get_total_flops()
    x.grad = None
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iterations):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    row = dict(batch=batch, size=size, bf16=bf16, compile=compile_, iterations=iterations,
               seconds_per_iter=seconds / iterations,
               image_iters_per_s=batch * iterations / seconds,
               gflop_per_iter=flops / 1e9,
               tflops=flops * iterations / seconds / TERA,
               loss=float(loss.detach()))
    if device.type == 'cuda':
        row['peak_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def machine_info(device):
    info = dict(host=platform.node(), platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, cpu=_cpu_name(),
                threads=torch.get_num_threads(), device=str(device))
    if device.type == 'cuda':
        info['card'] = torch.cuda.get_device_name(device)
    else:
        info['card'] = 'none (CPU)'
    return info


def _fmt_mem(gib):
    return '-' if gib is None else f'{gib:.2f}'


def _cpu_name():
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_markdown(info, rows):
    lines = [f"# bench_synthesis ({info['device']}, {info['card']})", '',
             f"machine: {info['host']} / {info['platform']} / {info['cpu']}, "
             f"{info['threads']} threads; torch {info['torch']}; {info['date']}", '',
             'One iteration: Swin-T backbone (Mask R-CNN config) forward under the attention '
             'recorder + L_sim + TV, backward to the pixels, AdamW step.',
             *([f"note: {info['note']}"] if info.get('note') else []), '',
             '| batch | px | bf16 | compile | s/iter | img-iter/s | GFLOP/iter | TFLOP/s | peak GiB |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if 'error' in r:
            lines.append(f"| {r['batch']} | {r['size']} | {r['bf16']} | {r['compile']} | "
                         f"{r['error']} | | | | |")
            continue
        lines.append(f"| {r['batch']} | {r['size']} | {r['bf16']} | {r['compile']} | "
                     f"{r['seconds_per_iter']:.4f} | {r['image_iters_per_s']:.2f} | "
                     f"{r['gflop_per_iter']:.1f} | {r['tflops']:.3f} | "
                     f"{_fmt_mem(r.get('peak_mem_gib'))} |")
    return '\n'.join(lines) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--small', action='store_true', help='tiny sizes (CPU)')
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    parser.add_argument('--bf16', action='store_true', help='also run with bf16 autocast')
    parser.add_argument('--compile', action='store_true',
                        help='also run with L_sim through torch.compile')
    parser.add_argument('--out', default=str(HERE / 'results'))
    parser.add_argument('--note', default='', help='free text for the report (e.g. load)')
    args = parser.parse_args(argv)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type != 'cuda' and not args.small:
        parser.error('the full benchmark needs CUDA; use --small on CPU')
    grid = SMALL if args.small else FULL
    from mimiq_mm.attention import adapt_attention_
    backbone, _ = build_backbone(device)
    adapt_attention_(backbone)
    variants = [(False, False)]
    if args.bf16:
        variants.append((True, False))
    if args.compile:
        variants.append((variants[-1][0], True))
    rows = []
    for bf16, compile_ in variants:
        for size in grid['sizes']:
            for batch in grid['batches']:
                try:
                    row = bench_one(backbone, batch, size, device, grid['iterations'],
                                    grid['warmup'], bf16, compile_)
                except torch.cuda.OutOfMemoryError:
                    row = dict(batch=batch, size=size, bf16=bf16, compile=compile_, error='OOM')
                gc.collect()
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                      flush=True)
    info = machine_info(device)
    info['date'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    info['mode'] = 'small' if args.small else 'full'
    info['note'] = args.note
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f'bench_synthesis_{device.type}'
    (out / f'{stem}.json').write_text(json.dumps(dict(machine=info, rows=rows), indent=2) + '\n')
    md = to_markdown(info, rows)
    (out / f'{stem}.md').write_text(md)
    print(md)


if __name__ == '__main__':
    main()
