"""benchmarks/bench_synthesis.py: the backbone-only reference variant times the plain backbone
(forward, sum of squares of its outputs, backward to the pixels) with the variant's settings;
the --backbones ViTs (DINOv2 ViT-S/14 with its converted weights, mmseg ViT-B/16) are built
with every attention layer adapted and step; the ratio column divides by the right reference.

The ViTs are the real ones at tiny image sizes (CPU); the DINOv2 weights come from
`make setup` in the default cache (nothing is downloaded)."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('mimiq_bench_synthesis',
                                                  ROOT / 'benchmarks/bench_synthesis.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TwoStages(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 2, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.a(x)
        return (y, self.b(y))


def test_backbone_only_variant(bench):
    settings = bench.parse_variant('fp32+backbone-only')
    assert settings['backbone_only'] is True and settings['bf16'] is False
    torch.manual_seed(0)
    model = TwoStages().requires_grad_(False)
    teacher = SimpleNamespace(model=model)
    method = bench.build_method(teacher, 'fp32+backbone-only', batch=2, size=8)
    assert isinstance(method, bench.BackboneOnly)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = method.step_terms(x, x, None)['loss']
    expected = sum(o.square().mean() for o in model(x))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # teacher weights get none
    # the timed step (AdamW on the pixels) moves the pixels
    before = x.detach().clone()
    bench.make_step(method, x)()
    assert not torch.equal(before, x.detach())


# ---------------------------------------------------------------- the ViT backbones
# (real models; tiny images: DINOv2Pyramid's stride-32 map needs >= 3 patches a side)
TINY_SIZE = {'dinov2_vits14': 42, 'vit_b_mmseg': 32}


@pytest.fixture(scope='module')
def teachers(bench):
    """name -> teacher, each built once for the module (ViT-B takes seconds on CPU)."""
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            built[name] = bench.build_teacher(torch.device('cpu'), name)
        return built[name]
    return get


@pytest.mark.parametrize('name', sorted(TINY_SIZE))
def test_vit_backbones_adapt_and_record_every_attention_layer(teachers, name):
    from mimiq_mm.attention import AttentionRecorder, find_attention_modules, is_adapted
    teacher = teachers(name)
    attention = find_attention_modules(teacher.model)
    assert len(attention) == 12 and all(is_adapted(m) for m in attention.values())
    if name == 'vit_b_mmseg':   # the real ViT-B/16, attention through nn.MultiheadAttention
        assert all(isinstance(m, torch.nn.MultiheadAttention) for m in attention.values())
        assert teacher.model.patch_embed.projection.weight.shape == (768, 3, 16, 16)
    else:
        assert type(teacher.model).__name__ == 'DINOv2Pyramid'
        assert teacher.model.patch_size == 14 and teacher.model.embed_dim == 384
    assert not any(p.requires_grad for p in teacher.model.parameters())
    size = TINY_SIZE[name]
    with AttentionRecorder(teacher.attention_scope) as rec:
        teacher.features(torch.randn(1, 3, size, size))
    assert sorted(r.name for r in rec.records) == sorted(attention)
    grid = (size + 13) // 14 if name == 'dinov2_vits14' else size // 16
    assert all(r.num_prefix_tokens == 1 and r.grid == (grid, grid) for r in rec.records)


def test_dinov2_weights_are_the_converted_ones(bench, teachers):
    from mimiq_mm.models.pretrained import load_pretrained_state
    ref = load_pretrained_state(bench.DINOV2_WEIGHTS)
    state = teachers('dinov2_vits14').model.vit.state_dict()
    assert set(ref) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in ref.items())


@pytest.mark.parametrize('name', sorted(TINY_SIZE))
def test_vit_backbone_rows_step(bench, teachers, name):
    teacher = teachers(name)
    size = TINY_SIZE[name]
    flops = {}
    rows = [bench.bench_one(teacher, variant, 1, size, torch.device('cpu'), iterations=1,
                            warmup=1, flops_cache=flops, backbone=name)
            for variant in ('fp32', 'fp32+backbone-only')]
    for row in rows:
        assert row['backbone'] == name and row['batch'] == 1 and row['size'] == size
        assert row['gflop_per_iter'] > 0 and row['tflops'] > 0
        assert torch.isfinite(torch.tensor([row['first_loss'], row['loss']])).all()
    assert set(flops) == {(name, 1, size, False, False), (name, 1, size, False, True)}
    # the MimiQ step differs from the plain backbone's (its loss is L_sim + TV)
    assert rows[0]['first_loss'] != rows[1]['first_loss']
    # the timed step moves the pixels through the recorder and L_sim
    method = bench.build_method(teacher, 'fp32', 1, size)
    x = torch.randn(1, 3, size, size, requires_grad=True)
    before = x.detach().clone()
    loss = bench.make_step(method, x)()
    assert torch.isfinite(loss) and not torch.equal(before, x.detach())


def test_missing_dinov2_weights_is_a_clear_error(bench, tmp_path, monkeypatch, capsys):
    from mimiq_mm.models.pretrained import CACHE_ENV, PretrainedWeightsError
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'empty-cache'))
    with pytest.raises(PretrainedWeightsError, match='make setup') as err:
        bench.build_backbone(torch.device('cpu'), 'dinov2_vits14')
    assert 'python tools/fetch_pretrained.py' in str(err.value)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as exit_:
        bench.main(['--small', '--backbones', 'dinov2_vits14', '--out', str(out)])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert '--backbones dinov2_vits14' in stderr and 'make setup' in stderr
    assert 'tools/fetch_pretrained.py' in stderr
    assert not out.exists()   # stopped before any row


# ---------------------------------------------------------------- the ratio column
def _row(variant, tflops, backbone='swin_t', batch=2, size=64, **extra):
    row = dict(backbone=backbone, variant=variant, batch=batch, size=size,
               seconds_per_iter=1.0, image_iters_per_s=float(batch), gflop_per_iter=tflops * 1e3,
               tflops=tflops)
    row.update(extra)
    return row


def test_reference_ratios_match_backbone_batch_size_precision(bench):
    rows = [
        _row('bf16', 2.0),
        _row('bf16+compile-full', 6.0),
        _row('bf16+backbone-only', 4.0),
        _row('bf16+compile-full+backbone-only', 8.0),
        _row('fp32', 1.0),                                  # no fp32 reference: blank
        _row('bf16', 3.0, backbone='dinov2_vits14'),        # other backbone: its own ref
        _row('bf16+backbone-only', 5.0, backbone='dinov2_vits14'),
        _row('bf16', 3.0, batch=4),                         # other batch: none
        _row('bf16', 3.0, size=96),                         # other size: none
        _row('bf16+compile-loss', 5.0),                     # no same-flag ref: the fastest
        dict(backbone='swin_t', variant='bf16+nochunk+backbone-only', batch=2, size=64,
             error='OOM'),                                  # a failed reference is none
        _row('bf16+nochunk', 2.0),
    ]
    got = bench.reference_ratios(rows)
    assert got[0] == (0.5, 'bf16+backbone-only')
    assert got[1] == (0.75, 'bf16+compile-full+backbone-only')
    assert got[2] == (1.0, 'bf16+backbone-only')
    assert got[3] == (1.0, 'bf16+compile-full+backbone-only')
    assert got[4] == (None, None)
    assert got[5] == (0.6, 'bf16+backbone-only')
    assert got[7] == got[8] == (None, None)
    assert got[9] == (5.0 / 8.0, 'bf16+compile-full+backbone-only')
    assert got[10] == (None, None)
    assert got[11] == (2.0 / 8.0, 'bf16+compile-full+backbone-only')
    # a legacy row (no backbone, no variant) is Swin-T fp32
    legacy = [dict(batch=2, size=64, bf16=False, compile=False, seconds_per_iter=1.0,
                   image_iters_per_s=2.0, gflop_per_iter=1.0, tflops=1.5),
              _row('fp32+backbone-only', 3.0)]
    assert bench.reference_ratios(legacy)[0] == (0.5, 'fp32+backbone-only')


def test_markdown_has_backbone_and_ratio_columns(bench):
    rows = [_row('fp32', 1.0), _row('fp32+backbone-only', 4.0),
            _row('bf16', 1.0, backbone='vit_b_mmseg'),
            dict(backbone='vit_b_mmseg', variant='bf16', batch=4, size=64, error='OOM'),
            dict(batch=1, size=64, bf16=False, compile=False, seconds_per_iter=1.0,
                 image_iters_per_s=1.0, gflop_per_iter=1.0, tflops=0.5)]   # legacy row
    md = bench.run_to_markdown(dict(machine={}, rows=rows))
    lines = [line for line in md.splitlines() if line.startswith('| ')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header[:2] == ['backbone', 'variant'] and 'ratio' in header
    cells = {i: [c.strip() for c in line.strip('|').split('|')]
             for i, line in enumerate(lines[1:])}
    assert all(len(c) == len(header) for c in cells.values())
    at = header.index('ratio')
    assert cells[0][:2] == ['swin_t', 'fp32'] and cells[0][at] == '0.25'
    assert cells[1][at] == '1.00'
    assert cells[2][:2] == ['vit_b_mmseg', 'bf16'] and cells[2][at] == ''
    assert cells[3][0] == 'vit_b_mmseg' and 'OOM' in cells[3]
    assert cells[4][:2] == ['swin_t', 'fp32'] and cells[4][at] == ''


def test_main_runs_the_dinov2_rows_with_ratios(bench, tmp_path):
    import json
    out = tmp_path / 'out'
    bench.main(['--small', '--backbones', 'dinov2_vits14', '--variants', 'fp32', 'tf32',
                'fp32+backbone-only', '--batches', '1', '--sizes', '42', '--iterations', '1',
                '--warmup', '1', '--out', str(out)])
    rows = json.loads((out / 'bench_synthesis_cpu.json').read_text())['runs'][-1]['rows']
    assert [(r['backbone'], r['variant']) for r in rows] == [
        ('dinov2_vits14', 'fp32'), ('dinov2_vits14', 'tf32'),
        ('dinov2_vits14', 'fp32+backbone-only')]
    fp32, tf32, ref = rows
    # the reference was measured after the row it serves: filled in afterwards
    assert fp32['ratio'] == pytest.approx(fp32['tflops'] / ref['tflops'])
    assert fp32['ratio_reference'] == 'fp32+backbone-only'
    assert ref['ratio'] == 1.0
    assert tf32['ratio'] is None and tf32['ratio_reference'] is None   # no tf32 reference
    md = (out / 'bench_synthesis_cpu.md').read_text()
    assert '| dinov2_vits14 | fp32 | 1 | 42 |' in md
    assert f"| {fp32['ratio']:.2f} |" in md


@pytest.mark.parametrize('name', sorted(TINY_SIZE))
def test_full_compile_of_the_vit_backbones_has_no_graph_break(bench, teachers, name, tmp_path):
    """--graph-breaks: the real ViT-B/16 (nn.MultiheadAttention inside mmcv's wrapper) and the
    DINOv2 ViT-S/14 trace into one graph (the ViT-B had one break per data-pointer
    comparison of its self-attention test before)."""
    row = bench.count_graph_breaks(teachers(name), name, TINY_SIZE[name])
    assert (row['graph_breaks'], row['graphs'], row['reasons']) == (0, 1, [])
    bench.write_graph_breaks(tmp_path, torch.device('cpu'), [row])
    saved = json.loads((tmp_path / 'graph_breaks_cpu.json').read_text())
    assert saved['rows'][0]['backbone'] == name
    assert f'| {name} | {TINY_SIZE[name]} | 0 | 1 |' in (tmp_path / 'graph_breaks_cpu.md').read_text()


def test_triton_variant_selects_the_fused_lsim(bench):
    assert bench.parse_variant('bf16+compile-full+triton') == dict(
        bf16=True, tf32=False, compile='full', lsim_kernel='triton')
    assert bench.parse_variant('bf16+triton+rows8') == dict(
        bf16=True, tf32=False, lsim_kernel='triton', lsim_rows=8)
    with pytest.raises(ValueError, match='need triton'):
        bench.parse_variant('bf16+rows4')
