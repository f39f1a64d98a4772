#!/usr/bin/env python
"""Speed of MimiQ pixel optimisation: image-iterations/s and achieved TFLOP/s.

One iteration = forward of a transformer backbone under an attention recorder, L_sim over
all its attention layers + TV, backward to the input pixels, and the AdamW step on the pixels
(teacher weights get no gradients), run through ``MimiQSynthesis.step_terms`` with the
variant's synthesis settings (see ``parse_variant``: fp32 / tf32 / bf16, ``+compile-loss``,
``+compile-full``, ``+autotune``, ``+nochunk``; ``+backbone-only`` is the reference without
the MimiQ terms). FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` for one
eager forward+backward.

Backbones (``--backbones``, default ``swin_t``; see ``BACKBONES``): ``swin_t``, the Mask R-CNN
Swin-T (upstream ``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``, init_cfg removed,
random weights); ``dinov2_vits14``, the timm DINOv2 ViT-S/14 of
``mimiq_mm.models.DINOv2Pyramid`` with the converted pretrained weights (``make setup``);
``vit_b_mmseg``, mmseg's ViT-B/16 (upstream
``mmseg::vit/vit_vit-b16_mln_upernet_8xb2-80k_ade20k-512x512.py``, named
``vit_upernet_vit-b16_mln_512x512_80k_ade20k.py`` before mmseg 1.x; init_cfg / pretrained
removed, random weights; attention through ``nn.MultiheadAttention``). Every attention module
of the backbone is adapted (``mimiq_mm.attention.adapt_attention_``), so the recorder and
L_sim see all of them.

Ratio column: a row's TFLOP/s divided by that of the ``backbone-only`` row of the same
backbone, batch, size and precision in the same run (see ``reference_ratios``); blank when no
such reference was measured.

    python benchmarks/bench_synthesis.py            # CUDA: batch 16/64/128 x 224/512 px, fp32
    python benchmarks/bench_synthesis.py --small    # CPU: tiny sizes
    python benchmarks/bench_synthesis.py --variants bf16 bf16+compile-full \
        --batches 64 128 --sizes 224 --time-budget 200
    python benchmarks/bench_synthesis.py --backbones swin_t dinov2_vits14 vit_b_mmseg \
        --variants bf16+compile-full bf16+compile-full+backbone-only

Adds a run (machine, card, commit, rows) to ``benchmarks/results/bench_synthesis_<device>.json``
and rewrites the ``.md`` from all runs, newest first (``--replace`` drops the earlier runs;
hand-written notes after the generated part are kept). Results are written after every row.
"""
import argparse
import datetime
import gc
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

FULL = dict(batches=(16, 64, 128), sizes=(224, 512), iterations=10, warmup=3)
SMALL = dict(batches=(1, 2), sizes=(64, 96), iterations=3, warmup=1)
TERA = 1e12


#: --backbones: name -> the ``mimiq_mm.testing.UPSTREAM`` config whose backbone it is, or
#: None for the DINOv2 ViT-S/14 (``mimiq_mm.models.DINOv2Pyramid``, converted weights)
BACKBONES = {'swin_t': 'maskrcnn_swin', 'dinov2_vits14': None, 'vit_b_mmseg': 'upernet_vit'}
DEFAULT_BACKBONES = ('swin_t',)
DINOV2_WEIGHTS = 'dinov2_vits14_imgfocus'


def build_backbone(device, name: str = 'swin_t'):
    """(frozen backbone in eval mode on ``device``, its input mean / std in 0..255 units).

    The upstream backbones get random weights. The DINOv2 weights are read from the converted
    file; without it ``init_weights`` raises ``PretrainedWeightsError`` naming ``make setup``
    and ``python tools/fetch_pretrained.py``."""
    if name not in BACKBONES:
        raise ValueError(f'unknown backbone {name!r}; valid: {sorted(BACKBONES)}')
    if BACKBONES[name] is None:
        from mimiq_mm.models.dinov2 import DINOv2Pyramid
        from mimiq_mm.synthesis.teacher import IMAGENET_MEAN, IMAGENET_STD
        backbone = DINOv2Pyramid(pretrained=DINOV2_WEIGHTS)
        backbone.init_weights()
        stats = dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    else:
        from mimiq_mm.testing import build_upstream_backbone
        backbone, preprocessor = build_upstream_backbone(BACKBONES[name])
        stats = dict(mean=list(preprocessor['mean']), std=list(preprocessor['std']))
    backbone.eval()
    backbone.to(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone, stats


def build_teacher(device, name: str = 'swin_t'):
    """The backbone with every attention module adapted (explicit q·kᵀ / attn·v the recorder
    sees; an attention module without an adapter is an error), as a synthesis teacher. Both
    upstream preprocessors convert BGR files to RGB, DINOv2 takes RGB."""
    from mimiq_mm.attention import adapt_attention_
    from mimiq_mm.synthesis.teacher import SynthesisTeacher
    backbone, stats = build_backbone(device, name)
    adapt_attention_(backbone, require=True)
    return SynthesisTeacher(backbone, mean=stats['mean'], std=stats['std'], kind='backbone',
                            channel_order='rgb', description=dict(backbone=name))


# ---------------------------------------------------------------- variants
PRECISIONS = ('fp32', 'tf32', 'bf16')
VARIANT_FLAGS = {'compile-loss': ('compile', 'loss'), 'compile-full': ('compile', 'full'),
                 'autotune': ('compile_mode', 'max-autotune-no-cudagraphs'),
                 'cudagraphs': ('compile_mode', 'reduce-overhead'),
                 'nochunk': ('max_chunk_elements', 1 << 62),
                 'triton': ('lsim_kernel', 'triton'),
                 'rows4': ('lsim_rows', 4), 'rows8': ('lsim_rows', 8),
                 'backbone-only': ('backbone_only', True)}
DEFAULT_VARIANTS = ('fp32',)


def parse_variant(name: str) -> dict:
    """'bf16+compile-full+autotune' -> SynthesisConfig settings.

    First part: fp32 | tf32 (fp32 with TF32 matmuls) | bf16 (autocast). Then any of
    compile-loss (synthesis.compile='loss'), compile-full ('full'), autotune
    (compile_mode='max-autotune-no-cudagraphs'), cudagraphs (compile_mode='reduce-overhead':
    the compiled graphs replayed as CUDA graphs), nochunk (no L_sim query chunks, hence no
    activation checkpointing of them), triton (L_sim through the fused Triton kernels of
    mimiq_mm.losses.lsim_triton), rows4 / rows8 (with triton: query rows per Triton program,
    default 1), backbone-only (a reference, not a synthesis step: the
    plain backbone forward with nothing recorded, a sum of squares of its outputs as the loss,
    backward to the pixels and AdamW; with compile-full it is compiled as one graph. Its FLOPs
    are counted on that step, so its TFLOP/s is the rate the backbone alone reaches).
    """
    precision, *flags = name.split('+')
    if precision not in PRECISIONS:
        raise ValueError(f'variant {name!r}: first part must be one of {PRECISIONS}')
    settings = dict(bf16=precision == 'bf16', tf32=precision == 'tf32')
    for flag in flags:
        if flag not in VARIANT_FLAGS:
            raise ValueError(f'variant {name!r}: unknown part {flag!r}; valid: '
                             f'{sorted(VARIANT_FLAGS)}')
        key, value = VARIANT_FLAGS[flag]
        settings[key] = value
    if 'compile_mode' in settings and settings.get('compile', 'none') == 'none':
        raise ValueError(f'variant {name!r}: autotune/cudagraphs need compile-loss or '
                         'compile-full')
    if sum(flag in ('autotune', 'cudagraphs') for flag in flags) > 1:
        raise ValueError(f'variant {name!r}: autotune and cudagraphs are exclusive')
    if 'lsim_rows' in settings and settings.get('lsim_kernel') != 'triton':
        raise ValueError(f'variant {name!r}: rows4 / rows8 need triton')
    return settings


def build_method(teacher, variant: str, batch: int, size: int):
    from mimiq_mm.synthesis import SynthesisConfig
    from mimiq_mm.synthesis import build_method as build
    from mimiq_mm.losses import lsim_triton
    settings = parse_variant(variant)
    lsim_triton.ROWS_PER_PROGRAM = settings.pop('lsim_rows', 1)
    if settings.pop('backbone_only', False):
        return BackboneOnly(teacher, settings)
    cfg = SynthesisConfig(batch_size=batch, image_size=size, progress=False, figures=False,
                          **settings)
    return build(cfg, teacher, attention=True)


class BackboneOnly:
    """The ``backbone-only`` reference: ``step_terms`` = the teacher backbone's forward (no
    attention records, no L_sim) and a sum of squares of its outputs, so the benchmark times
    what the backbone alone costs with the same precision / compile settings. It runs the
    same (adapted) attention modules as the MimiQ step, with nothing recording."""

    def __init__(self, teacher, settings: dict):
        self.teacher = teacher
        self.bf16 = bool(settings.get('bf16'))
        fn = self._loss
        if settings.get('compile', 'none') != 'none':
            fn = torch.compile(fn, dynamic=False,
                               mode=settings.get('compile_mode') or None)
        self.fn = fn

    def _loss(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outs = self.teacher.model(x)
        return sum(o.float().square().mean() for o in outs)

    def step_terms(self, x, _pixels, _generator):
        return dict(loss=self.fn(x))


def make_step(method, x):
    """One iteration of the synthesis loop without augmentation: the method's own step
    (eager, L_sim compiled, or the whole step compiled), backward, AdamW on the pixels."""
    optimizer = torch.optim.AdamW([x], lr=0.1, betas=(0.9, 0.999), weight_decay=1e-6)
    generator = torch.Generator(device=x.device).manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = method.step_terms(x, x, generator)['loss']
        loss.backward()
        optimizer.step()
        return loss
    return step


def count_flops(teacher, batch, size, device, settings):
    """FLOPs of one eager forward+backward (the same math as every variant; with L_sim query
    chunks the checkpoint recomputation is included)."""
    from torch.utils.flop_counter import FlopCounterMode
    eager = build_method(teacher, 'fp32' + ('+nochunk' if settings.get('max_chunk_elements')
                                            else '')
                         + ('+backbone-only' if settings.get('backbone_only') else ''),
                         batch, size)
    x = torch.randn(batch, 3, size, size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        eager.step_terms(x, x, None)['loss'].backward()
    return counter.get_total_flops()


GEMM_MARKERS = ('gemm', 'cutlass', 'wgmma', 'sm90_', 'sm80_', 'cublas', 'xmma', 'mm_', 'bmm',
                'conv', 'dgrad', 'wgrad')


def kernel_category(name: str) -> str:
    """'gemm' (matrix-multiply / convolution kernels: cuBLAS, CUTLASS, Triton mm templates),
    'triton' (Inductor's fused element-wise / reduction kernels), or 'other' (eager
    element-wise, copies, reductions)."""
    low = name.lower()
    if low.startswith('triton_tem'):   # Inductor's matmul templates
        return 'gemm'
    if low.startswith('triton'):       # fused kernels ('..._fused_convolution_...' too)
        return 'triton'
    return 'gemm' if any(m in low for m in GEMM_MARKERS) else 'other'


def profile_steps(step, device, steps: int, flops_per_step: float, top: int = 8) -> dict:
    """GPU time of ``steps`` calls of ``step`` by kernel category (torch.profiler), the
    matmul FLOP rate inside the matmul kernels alone, and the most expensive kernels."""
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    per_kernel = {}
    for evt in prof.key_averages():
        us = getattr(evt, 'device_time_total', None)
        if us is None:
            us = getattr(evt, 'cuda_time_total', 0.0)
        if us and evt.key:
            per_kernel[evt.key] = per_kernel.get(evt.key, 0.0) + us
    total_us = sum(per_kernel.values()) or float('nan')
    cats = {}
    for name, us in per_kernel.items():
        cat = kernel_category(name)
        cats[cat] = cats.get(cat, 0.0) + us
    gemm_s = cats.get('gemm', 0.0) / 1e6 / steps
    top_kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return dict(
        steps=steps, gpu_ms_per_step=total_us / 1e3 / steps,
        share={k: v / total_us for k, v in sorted(cats.items())},
        ms_per_step={k: v / 1e3 / steps for k, v in sorted(cats.items())},
        gemm_tflops=(flops_per_step / gemm_s / TERA) if gemm_s > 0 else None,
        top_kernels=[dict(name=n[:120], ms_per_step=us / 1e3 / steps, share=us / total_us,
                          category=kernel_category(n)) for n, us in top_kernels])


def count_graph_breaks(teacher, name: str, size: int) -> dict:
    """Graph breaks and graphs of one compile='full' synthesis step (dynamo only: no code
    generation, so it runs anywhere in seconds)."""
    from mimiq_mm.synthesis import SynthesisConfig
    from mimiq_mm.synthesis import build_method as build_synthesis_method
    method = build_synthesis_method(SynthesisConfig(image_size=size, compile='full', bf16=True),
                                    teacher, True)
    x = torch.randn(1, 3, size, size, device=teacher_device(teacher), requires_grad=True)
    torch._dynamo.reset()
    start = time.perf_counter()
    with teacher.frozen(), method.recorder() as rec:
        explained = torch._dynamo.explain(method._full_step)(x * 1.0, x, torch.Generator(), rec)
    reasons = sorted({str(r.reason).splitlines()[0][:120] for r in explained.break_reasons})
    row = dict(backbone=name, size=size, graph_breaks=explained.graph_break_count,
               graphs=explained.graph_count, reasons=reasons,
               seconds=round(time.perf_counter() - start, 1))
    print(f"{name} {size}px: {row['graph_breaks']} graph breaks, {row['graphs']} graph(s)"
          + (f" ({'; '.join(reasons)})" if reasons else ''))
    return row


def teacher_device(teacher):
    return next(teacher.model.parameters()).device


def write_graph_breaks(out: Path, device, rows, note: str = '') -> None:
    info = machine_info(device)
    where = (f"{info['card'] if device.type == 'cuda' else info['cpu']}, "
             f"torch {torch.__version__}")
    md = ['# Graph breaks of the compile=\'full\' synthesis step', '',
          f'`python benchmarks/bench_synthesis.py --graph-breaks --backbones '
          f'{" ".join(r["backbone"] for r in rows)}` (torch._dynamo.explain of one bf16 step, '
          f'batch 1). Machine: {where}; commit {git_commit()}.', '',
          *([note, ''] if note else []),
          '| backbone | size | graph breaks | graphs | reasons |', '|---|---:|---:|---:|---|']
    md += [f"| {r['backbone']} | {r['size']} | {r['graph_breaks']} | {r['graphs']} | "
           f"{'; '.join(r['reasons']) or '-'} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f'graph_breaks_{device.type}'
    stem.with_suffix('.json').write_text(json.dumps(dict(machine=info, commit=git_commit(),
                                                         rows=rows), indent=1) + '\n')
    stem.with_suffix('.md').write_text('\n'.join(md) + '\n')
    print('\n'.join(md))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bench_one(teacher, variant, batch, size, device, iterations, warmup, flops_cache,
              profile=0, backbone='swin_t'):
    """One row: ``variant`` on ``teacher`` (the ``backbone`` of that name) at ``batch`` x
    ``size`` px."""
    from mimiq_mm.synthesis.methods import float32_matmul_precision
    settings = parse_variant(variant)
    key = (backbone, batch, size, 'max_chunk_elements' in settings, 'backbone_only' in settings)
    if key not in flops_cache:
        flops_cache[key] = count_flops(teacher, batch, size, device, settings)
    flops = flops_cache[key]
    torch._dynamo.reset()
    method = build_method(teacher, variant, batch, size)
    gen = torch.Generator(device=device).manual_seed(batch * 1000 + size)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen).requires_grad_(True)
    step = make_step(method, x)
    with float32_matmul_precision('high' if settings['tf32'] else None):
        sync(device)
        start = time.perf_counter()
        first_loss = float(step().detach())   # same pixels in every variant: compare this
        for _ in range(warmup - 1):           # torch.compile compiles in the first step
            step()
        sync(device)
        warmup_s = time.perf_counter() - start
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(iterations):
            loss = step()
        sync(device)
        seconds = time.perf_counter() - start
    row = dict(backbone=backbone, variant=variant, batch=batch, size=size,
               bf16=settings['bf16'], tf32=settings['tf32'],
               compile=settings.get('compile', 'none'),
               compile_mode=settings.get('compile_mode'), iterations=iterations,
               warmup_s=warmup_s,
               seconds_per_iter=seconds / iterations,
               image_iters_per_s=batch * iterations / seconds,
               gflop_per_iter=flops / 1e9,
               tflops=flops * iterations / seconds / TERA,
               first_loss=first_loss, loss=float(loss.detach()))
    if device.type == 'cuda':
        row['peak_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2**30
        if profile:
            with float32_matmul_precision('high' if settings['tf32'] else None):
                row['profile'] = profile_steps(step, device, profile, flops)
    return row


def _legacy_variant(row):
    name = 'bf16' if row.get('bf16') else 'fp32'
    if row.get('compile') in (True, 'loss'):
        name += '+compile-loss'
    return name


def row_backbone(row) -> str:
    """A row's backbone (rows from before --backbones were all Swin-T)."""
    return row.get('backbone') or 'swin_t'


def row_variant(row) -> str:
    return row.get('variant') or _legacy_variant(row)


def reference_ratios(rows):
    """Per row, ``(ratio, reference variant)``: its TFLOP/s divided by the TFLOP/s of the
    ``backbone-only`` row of the same backbone, batch, size and precision (fp32 / tf32 / bf16)
    among ``rows`` (one run); ``(None, None)`` when there is no such measured row. With
    several references of that key, the one with the row's other settings (``bf16+compile-
    full`` -> ``bf16+compile-full+backbone-only``) is used, else the fastest."""
    def key(row):
        variant = row_variant(row)
        return row_backbone(row), row['batch'], row['size'], variant.split('+')[0]

    def other_flags(row):
        return set(row_variant(row).split('+')[1:]) - {'backbone-only'}

    refs = {}
    for row in rows:
        if 'error' not in row and row.get('tflops') and \
                'backbone-only' in row_variant(row).split('+')[1:]:
            refs.setdefault(key(row), []).append(row)
    out = []
    for row in rows:
        candidates = refs.get(key(row), []) if 'error' not in row else []
        if not candidates:
            out.append((None, None))
            continue
        same = [ref for ref in candidates if other_flags(ref) == other_flags(row)]
        ref = same[0] if same else max(candidates, key=lambda r: r['tflops'])
        out.append((row['tflops'] / ref['tflops'], row_variant(ref)))
    return out


def fill_ratios(rows) -> None:
    """Store ``reference_ratios`` in the rows (``ratio``, ``ratio_reference``), in place:
    called after every row, since a reference may be measured after the rows it serves."""
    for row, (ratio, ref) in zip(rows, reference_ratios(rows)):
        if 'error' in row:
            continue
        row['ratio'], row['ratio_reference'] = ratio, ref


def git_commit(default='unknown'):
    import subprocess
    try:
        sha = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE.parent,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--',
                                'mimiq_mm', 'benchmarks/bench_synthesis.py'], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ('-dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return default


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


GENERATED_BEGIN = '<!-- bench_synthesis runs (generated, newest first) -->'
GENERATED_END = '<!-- end of generated runs; notes below are kept -->'


def run_to_markdown(run):
    info, rows = run['machine'], run['rows']
    lines = [f"## {info.get('date', '?')}: {info.get('card', '?')}, commit "
             f"{info.get('commit', '?')}, torch {info.get('torch', '?')}", '',
             f"machine: {info.get('host', '?')} / {info.get('platform', '?')} / "
             f"{info.get('cpu', '?')}, {info.get('threads', '?')} threads "
             f"({info.get('device', '?')}, {info.get('card', '?')})",
             *([f"note: {info['note']}"] if info.get('note') else []), '',
             '| backbone | variant | batch | px | s/iter | img-iter/s | GFLOP/iter | TFLOP/s '
             '| ratio | peak GiB | warm-up s | loss, step 1 |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r, (ratio, _) in zip(rows, reference_ratios(rows)):
        variant, backbone = row_variant(r), row_backbone(r)
        if 'error' in r:
            lines.append(f"| {backbone} | {variant} | {r['batch']} | {r['size']} | "
                         f"{r['error']} | | | | | | | |")
            continue
        warm, first = r.get('warmup_s'), r.get('first_loss')
        lines.append(f"| {backbone} | {variant} | {r['batch']} | {r['size']} | "
                     f"{r['seconds_per_iter']:.4f} | {r['image_iters_per_s']:.2f} | "
                     f"{r['gflop_per_iter']:.1f} | {r['tflops']:.3f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} | "
                     f"{_fmt_mem(r.get('peak_mem_gib'))} | "
                     f"{'-' if warm is None else f'{warm:.1f}'} | "
                     f"{'-' if first is None else f'{first:.6f}'} |")
    profiled = [r for r in rows if r.get('profile')]
    if profiled:
        lines += ['', 'GPU time by kernel category (torch.profiler; matmul = cuBLAS/CUTLASS/'
                  'Triton-template matmul and convolution kernels, fused = Inductor Triton '
                  'kernels; matmul TFLOP/s = the counted FLOPs / time inside matmul kernels):',
                  '', '| backbone | variant | batch | px | GPU ms/step | matmul % | fused % '
                  '| other % | matmul TFLOP/s | top kernels (ms/step) |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for r in profiled:
            prof = r['profile']
            share = prof.get('share', {})
            tops = '; '.join(f"{k['name'][:48]} ({k['ms_per_step']:.2f})"
                             for k in prof.get('top_kernels', [])[:4]).replace('|', '/')
            gemm = prof.get('gemm_tflops')
            lines.append(f"| {row_backbone(r)} | {r.get('variant')} | {r['batch']} | "
                         f"{r['size']} | {prof['gpu_ms_per_step']:.2f} | "
                         f"{100 * share.get('gemm', 0):.0f} | "
                         f"{100 * share.get('triton', 0):.0f} | {100 * share.get('other', 0):.0f}"
                         f" | {'-' if gemm is None else f'{gemm:.0f}'} | {tops} |")
    return '\n'.join(lines) + '\n'


def to_markdown(runs, device_type, kept=''):
    head = [f'# bench_synthesis ({device_type})', '',
            'One iteration: the backbone forward under the attention recorder + L_sim + TV, '
            'backward to the pixels, AdamW step on the pixels, through the synthesis '
            "method's own step (`MimiQSynthesis.step_terms`). Backbones: `swin_t` = Swin-T "
            '(Mask R-CNN config, random weights), `dinov2_vits14` = DINOv2 ViT-S/14 (timm, '
            '`DINOv2Pyramid`, converted pretrained weights), `vit_b_mmseg` = mmseg ViT-B/16 '
            '(UperNet ADE20K config, `nn.MultiheadAttention`, random weights); rows without '
            'a backbone are Swin-T. Variants: fp32, '
            'tf32 (fp32 with TF32 matmuls), bf16 (autocast; L_sim statistics in fp32); '
            "`+compile-loss` = `synthesis.compile='loss'` (L_sim only), `+compile-full` = "
            "`synthesis.compile='full'` (forward + L_sim + TV and the backward), `+autotune` = "
            "`compile_mode='max-autotune-no-cudagraphs'`, `+nochunk` = no L_sim query chunks, "
            '`+backbone-only` = the reference: the plain backbone forward (same adapted '
            'attention modules, nothing recorded), a sum of squares of its outputs, backward '
            'to the pixels and AdamW, no MimiQ terms. FLOPs: `torch.utils.flop_counter` on '
            'the eager step (the same for every variant of a step); TFLOP/s = those FLOPs / '
            'measured time. Ratio = TFLOP/s / TFLOP/s of the backbone-only row of the same '
            'backbone, batch, size and precision in the same run (the one with the same other '
            'settings, else the fastest; blank: none measured). Warm-up s: the warm-up '
            'iterations, torch.compile included.', '', GENERATED_BEGIN, '']
    body = [run_to_markdown(run) for run in reversed(runs)]
    tail = [GENERATED_END, '']
    if kept.strip():
        tail.append(kept.strip() + '\n')
    return '\n'.join(head) + '\n'.join(body) + '\n' + '\n'.join(tail)


def load_runs(json_path: Path):
    """Earlier runs of the results file ({'runs': [...]}, or the old {'machine', 'rows'})."""
    if not json_path.is_file():
        return []
    data = json.loads(json_path.read_text())
    if 'runs' in data:
        return list(data['runs'])
    return [dict(machine=data.get('machine', {}), rows=data.get('rows', []))]


def kept_notes(md_path: Path) -> str:
    """Hand-written text of the markdown file: after the generated part (or, in a file from
    before the markers, from its first '## ' section on)."""
    if not md_path.is_file():
        return ''
    text = md_path.read_text()
    if GENERATED_END in text:
        return text.split(GENERATED_END, 1)[1]
    if GENERATED_BEGIN in text:
        return ''
    return text[text.index('\n## ') + 1:] if '\n## ' in text else ''


def write_results(out: Path, device_type: str, runs) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f'bench_synthesis_{device_type}'
    md_path = out / f'{stem}.md'
    kept = kept_notes(md_path)
    (out / f'{stem}.json').write_text(json.dumps(dict(runs=runs), indent=2) + '\n')
    md_path.write_text(to_markdown(runs, device_type, kept))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--small', action='store_true', help='tiny sizes (CPU)')
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    parser.add_argument('--variants', nargs='+', default=None, metavar='VARIANT',
                        help='e.g. fp32 tf32 bf16 bf16+compile-loss bf16+compile-full '
                             'bf16+compile-full+autotune bf16+compile-full+nochunk '
                             f'(default: {" ".join(DEFAULT_VARIANTS)}, plus --bf16/--compile)')
    parser.add_argument('--backbones', nargs='+', default=list(DEFAULT_BACKBONES),
                        choices=sorted(BACKBONES), metavar='BACKBONE',
                        help=f'{", ".join(sorted(BACKBONES))} (default: '
                             f'{" ".join(DEFAULT_BACKBONES)}); each runs every variant')
    parser.add_argument('--bf16', action='store_true', help='also run bf16 (old flag)')
    parser.add_argument('--compile', action='store_true',
                        help="also run with synthesis.compile='loss' (old flag)")
    parser.add_argument('--batches', nargs='+', type=int, default=None)
    parser.add_argument('--sizes', nargs='+', type=int, default=None)
    parser.add_argument('--iterations', type=int, default=None)
    parser.add_argument('--warmup', type=int, default=None,
                        help='warm-up iterations (torch.compile compiles in the first)')
    parser.add_argument('--time-budget', type=float, default=None, metavar='SECONDS',
                        help='start no new row after this many seconds, nor a compiled row '
                             'predicted (from the longest earlier row with the same compile '
                             'setting) to end after it; rows not run are listed as skipped. '
                             'Results are written after every row')
    parser.add_argument('--out', default=str(HERE / 'results'))
    parser.add_argument('--replace', action='store_true',
                        help='drop the earlier runs of the results file (default: keep them '
                             'and add this run)')
    parser.add_argument('--profile', type=int, default=0, metavar='STEPS',
                        help='CUDA: after timing, profile STEPS more steps of each row '
                             '(torch.profiler) and report the GPU time by kernel category '
                             '(matmul / fused Triton / other), the FLOP rate inside the matmul '
                             'kernels and the top kernels')
    parser.add_argument('--graph-breaks', action='store_true',
                        help="only count torch.compile graph breaks of the compile='full' "
                             "synthesis step (torch._dynamo.explain, bf16, batch 1, the first "
                             "--sizes value or 224) for each --backbones; runs on CPU; writes "
                             "graph_breaks_<device>.{json,md}")
    parser.add_argument('--note', default='', help='free text for the report (e.g. load)')
    parser.add_argument('--commit', default=None,
                        help='commit to tag the run with (default: git rev-parse, if any)')
    args = parser.parse_args(argv)
    if args.warmup is not None and args.warmup < 1:
        parser.error('--warmup must be >= 1')
    t0 = time.perf_counter()
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.graph_breaks:
        size = (args.sizes or [224])[0]
        rows = [count_graph_breaks(build_teacher(device, name), name, size)
                for name in args.backbones]
        write_graph_breaks(Path(args.out), device, rows, args.note)
        return
    if device.type != 'cuda' and not args.small:
        parser.error('the full benchmark needs CUDA; use --small on CPU')
    grid = dict(SMALL if args.small else FULL)
    for key in ('batches', 'sizes', 'iterations', 'warmup'):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    variants = list(args.variants or DEFAULT_VARIANTS)
    if args.variants is None:
        if args.bf16:
            variants.append('bf16')
        if args.compile:
            variants.append(('bf16' if args.bf16 else 'fp32') + '+compile-loss')
    for variant in variants:
        try:
            parse_variant(variant)
        except ValueError as err:
            parser.error(str(err))

    from mimiq_mm.models.pretrained import PretrainedWeightsError
    backbones = list(dict.fromkeys(args.backbones))
    teachers = {}
    for name in backbones:    # all built first: a missing weights file stops before any row
        try:
            teachers[name] = build_teacher(device, name)
        except PretrainedWeightsError as err:
            parser.error(f'--backbones {name}: {err}')
    info = machine_info(device)
    info['date'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    info['mode'] = 'small' if args.small else 'full'
    info['commit'] = args.commit or git_commit()
    info['note'] = args.note
    out = Path(args.out)
    runs = [] if args.replace else load_runs(out / f'bench_synthesis_{device.type}.json')
    run = dict(machine=info, rows=[])
    runs.append(run)
    flops_cache = {}
    row_seconds = {}       # (backbone, compile setting) -> longest row so far (s)
    print(f"device {device} ({info['card']}), commit {info['commit']}", flush=True)
    for backbone, variant, size, batch in itertools.product(backbones, variants,
                                                            grid['sizes'], grid['batches']):
        elapsed = time.perf_counter() - t0
        # a row of a compiled variant is predicted to take as long as the longest earlier
        # row of the backbone with the same compile setting (the compile dominates)
        scope = (backbone, parse_variant(variant).get('compile', 'none'))
        predicted = row_seconds.get(scope, 0.0) if scope[1] != 'none' else 0.0
        if args.time_budget is not None and elapsed + predicted > args.time_budget:
            row = dict(backbone=backbone, variant=variant, batch=batch, size=size,
                       error=f'skipped (time budget {args.time_budget:g} s)')
        else:
            try:
                row = bench_one(teachers[backbone], variant, batch, size, device,
                                grid['iterations'], grid['warmup'], flops_cache, args.profile,
                                backbone=backbone)
            except torch.cuda.OutOfMemoryError:
                row = dict(backbone=backbone, variant=variant, batch=batch, size=size,
                           error='OOM')
            except Exception as err:   # e.g. a compile failure: report, go on
                first = (str(err).strip().splitlines() or [''])[0][:160]
                row = dict(backbone=backbone, variant=variant, batch=batch, size=size,
                           error=f'{type(err).__name__}: {first}'.replace('|', '/'))
                if 'out of memory' in str(err).lower():
                    row['error'] = 'OOM'
            gc.collect()
            if device.type == 'cuda':
                torch.cuda.empty_cache()
        row['elapsed_s'] = time.perf_counter() - t0
        if 'error' not in row:
            row_seconds[scope] = max(row_seconds.get(scope, 0.0), row['elapsed_s'] - elapsed)
        run['rows'].append(row)
        fill_ratios(run['rows'])
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
              flush=True)
        write_results(out, device.type, runs)
    print(run_to_markdown(run))


if __name__ == '__main__':
    main()
