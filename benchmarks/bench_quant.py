"""Training-step time of a W4/A4 fake-quantized vs float Mask R-CNN Swin-T.

The model is the real upstream mmdet config ``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``
with every ``init_cfg`` / ``pretrained`` removed (random weights, nothing downloaded). The
quantized copy is ``quantize_(model, QuantConfig())`` (MimiQ defaults: W4/A4, backbone scope,
both attention products) calibrated on one batch. One training step = forward in ``'loss'``
mode on a synthetic batch with boxes and masks, backward, SGD step.

    python benchmarks/bench_quant.py --small          # CPU: scaled-down model and image
    python benchmarks/bench_quant.py --device cuda    # CUDA: Swin-T at 2x800x1216

Writes ``benchmarks/results/bench_quant_<device>.json`` and ``.md`` (machine and card named).
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mimiq_mm.quant import (QuantConfig, calibration_mode, count_quant_modules,  # noqa: E402
                            quantize_)
from mimiq_mm.testing import (UPSTREAM, build_model_from_cfg, load_upstream_config,  # noqa: E402
                              replace_sync_bn, strip_pretrained)

FULL_IMAGE = (800, 1216)
SMALL_IMAGE = (128, 192)
BATCH = 2
BOXES_PER_IMAGE = 4
# synthetic boxes: corner in the first BOX_CORNER_FRACTION of the image, size up to
# BOX_SIZE_FRACTION of it plus MIN_BOX_SIZE pixels
BOX_CORNER_FRACTION = 0.6
BOX_SIZE_FRACTION = 0.3
MIN_BOX_SIZE = 16
NUM_CLASSES = 80
# --small: Swin widths / depths scaled down (component types unchanged)
SMALL_EMBED_DIMS = 32
SMALL_DEPTHS = [2, 2, 2, 2]
SMALL_HEADS = [1, 2, 4, 8]
SMALL_NECK_CHANNELS = 64
SMALL_FC_CHANNELS = 128
SMALL_RCNN_SAMPLES = 128
SMALL_PROPOSALS = 300
LR = 1e-4
CPU_THREADS = 1
RESULTS = REPO / 'benchmarks' / 'results'


def build_model(small: bool):
    cfg = load_upstream_config(UPSTREAM['maskrcnn_swin'])
    strip_pretrained(cfg.model)
    replace_sync_bn(cfg.model)
    if small:
        m = cfg.model
        m.backbone.update(embed_dims=SMALL_EMBED_DIMS, depths=SMALL_DEPTHS,
                          num_heads=SMALL_HEADS, convert_weights=False)
        m.neck.update(in_channels=[SMALL_EMBED_DIMS * 2 ** i for i in range(4)],
                      out_channels=SMALL_NECK_CHANNELS)
        m.rpn_head.update(in_channels=SMALL_NECK_CHANNELS, feat_channels=SMALL_NECK_CHANNELS)
        for key in ('bbox_roi_extractor', 'mask_roi_extractor'):
            m.roi_head[key].update(out_channels=SMALL_NECK_CHANNELS)
        m.roi_head.bbox_head.update(in_channels=SMALL_NECK_CHANNELS,
                                    fc_out_channels=SMALL_FC_CHANNELS)
        m.train_cfg.rpn_proposal.update(max_per_img=SMALL_PROPOSALS)
        m.train_cfg.rcnn.sampler.update(num=SMALL_RCNN_SAMPLES)
        m.roi_head.mask_head.update(in_channels=SMALL_NECK_CHANNELS,
                                    conv_out_channels=SMALL_NECK_CHANNELS)
    return build_model_from_cfg(cfg.model, 'mmdet'), cfg


def make_batch(image_hw, device, seed=0):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    inputs = torch.randn(BATCH, 3, h, w, generator=g).to(device)
    samples = []
    for _ in range(BATCH):
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([w, h]) \
            * BOX_CORNER_FRACTION
        wh = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([w, h]) \
            * BOX_SIZE_FRACTION + MIN_BOX_SIZE
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(BOXES_PER_IMAGE, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        inst = InstanceData(bboxes=boxes.to(device),
                            labels=torch.randint(0, NUM_CLASSES, (BOXES_PER_IMAGE,),
                                                 generator=g).to(device),
                            masks=BitmapMasks(masks.numpy(), h, w))
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                        batch_input_shape=(h, w), scale_factor=(1.0, 1.0)))
        s.gt_instances = inst
        samples.append(s)
    return inputs, samples


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_train_steps(model, batch, device, warmup, steps):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR,
                          momentum=0.9)
    inputs, samples = batch
    times = []
    for i in range(warmup + steps):
        torch.manual_seed(i)  # same proposals/sampling for float and quantized
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = model(inputs, samples, mode='loss')
        loss, _ = model.parse_losses(losses)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise RuntimeError(f'non-finite loss at step {i}')
    return times


def machine_info(device):
    info = dict(platform=platform.platform(), machine=platform.machine(),
                processor=platform.processor() or platform.machine(),
                python=platform.python_version(), torch=torch.__version__,
                cpu_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                load_avg_1min=round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg')
                else None)
    if device.type == 'cuda':
        info['card'] = torch.cuda.get_device_name(device)
        info['cuda'] = torch.version.cuda
    else:
        info['card'] = 'none (CPU)'
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--small', action='store_true',
                        help=f'scaled-down Swin (embed {SMALL_EMBED_DIMS}) at '
                             f'{BATCH}x{SMALL_IMAGE[0]}x{SMALL_IMAGE[1]}')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--out-dir', type=Path, default=RESULTS)
    parser.add_argument('--threads', type=int, default=CPU_THREADS,
                        help='torch CPU threads (default 1: on a shared/loaded machine '
                             'OpenMP spinning across threads dominates CPU timings)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    image_hw = SMALL_IMAGE if args.small else FULL_IMAGE

    torch.manual_seed(0)
    float_model, _ = build_model(args.small)
    float_model.to(device)
    quant_model = copy.deepcopy(float_model)
    batch = make_batch(image_hw, device)
    quant_cfg = QuantConfig()
    quantize_(quant_model, quant_cfg)
    with torch.no_grad(), calibration_mode(quant_model):
        quant_model.extract_feat(batch[0])
    counts = count_quant_modules(quant_model)

    t_float = time_train_steps(float_model, batch, device, args.warmup, args.steps)
    t_quant = time_train_steps(quant_model, batch, device, args.warmup, args.steps)
    f_ms, q_ms = statistics.median(t_float) * 1e3, statistics.median(t_quant) * 1e3
    result = dict(
        benchmark='train step, Mask R-CNN Swin-T, W4A4 fake-quant vs float',
        config=UPSTREAM['maskrcnn_swin'] + ' (init_cfg/pretrained removed'
               + (f'; small: embed_dims={SMALL_EMBED_DIMS}, depths={SMALL_DEPTHS}, '
                  f'heads {SMALL_HEADS}, neck/RoI {SMALL_NECK_CHANNELS} ch, bbox fc '
                  f'{SMALL_FC_CHANNELS}, {SMALL_PROPOSALS} proposals, {SMALL_RCNN_SAMPLES} '
                  'RoIs sampled)' if args.small else ')'),
        quant_config='QuantConfig() defaults: W4 per-channel min-max, A4 per-tensor LSQ, '
                     'scope backbone, q.k^T and attn.v quantized, input float',
        quant_modules=counts, device=str(device), small=args.small,
        input_shape=[BATCH, 3, *image_hw], warmup=args.warmup, steps=args.steps,
        float_ms_median=round(f_ms, 2), quant_ms_median=round(q_ms, 2),
        float_ms_all=[round(t * 1e3, 2) for t in t_float],
        quant_ms_all=[round(t * 1e3, 2) for t in t_quant],
        ratio_quant_over_float=round(q_ms / f_ms, 3),
        date_utc=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M'),
        **machine_info(device))

    rows = [('model', 'median step (ms)'), ('float', f'{f_ms:.1f}'),
            ('W4A4 fake-quant', f'{q_ms:.1f}'), ('ratio quant/float', f'{q_ms / f_ms:.3f}')]
    table = '\n'.join(f'| {a} | {b} |' for a, b in rows[:1]) + '\n|---|---|\n' + \
        '\n'.join(f'| {a} | {b} |' for a, b in rows[1:])
    print(table)
    tag = device.type
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f'bench_quant_{tag}.json').write_text(json.dumps(result, indent=2) + '\n')
    md = (f'# bench_quant ({tag})\n\n{result["benchmark"]}.\n\n'
          f'- config: `{result["config"]}`\n- quantization: {result["quant_config"]}\n'
          f'- quantized modules: {counts}\n'
          f'- input: {result["input_shape"]}, {args.warmup} warm-up + {args.steps} timed steps'
          f' (median)\n- machine: {result["platform"]}, {result["processor"]}, '
          f'{result["cpu_count"]} CPUs, {result["cpu_threads"]} torch threads, load average '
          f'{result["load_avg_1min"]} at the end (shared machine: timings are noisy)\n'
          f'- card: {result["card"]}\n'
          f'- torch {result["torch"]}, {result["date_utc"]} UTC\n\n{table}\n')
    (args.out_dir / f'bench_quant_{tag}.md').write_text(md)
    return result


if __name__ == '__main__':
    main()
