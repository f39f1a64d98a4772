"""benchmarks/bench_synthesis.py: the backbone-only reference variant times the plain backbone
(forward, sum of squares of its outputs, backward to the pixels) with the variant's settings."""
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
