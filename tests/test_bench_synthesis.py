"""benchmarks/bench_synthesis.py: the backbone-only reference variant times the plain backbone
(forward, sum of squares of its outputs, backward to the pixels) with the variant's settings;
the --backbones ViTs (DINOv2 ViT-S/14 with its converted weights, mmseg ViT-B/16) are built
with every attention layer adapted and step.

The ViTs are the real ones at tiny image sizes (CPU); the DINOv2 weights come from
`make setup` in the default cache (nothing is downloaded)."""
import importlib.util
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
