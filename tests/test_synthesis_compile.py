"""synthesis.compile='full': the teacher forward under the attention recorder + L_sim + TV as
one torch.compile'd function gives the eager loss and pixel gradient, without graph breaks and
without a recompile per batch.

The compiled functions use backend='aot_eager' (dynamo + AOTAutograd, the same traced forward
and backward graphs inductor gets, without inductor's code generation): inductor's C++ compile
of these graphs takes about 2 minutes on this 2-core CPU. benchmarks/bench_synthesis.py --small
runs the inductor path.
"""
import pytest
import torch

from mimiq_mm.attention import adapt_attention_
from mimiq_mm.synthesis import BatchContext, SynthesisConfig, as_teacher, build_method
from mimiq_mm.synthesis.teacher import SynthesisTeacher
from mimiq_mm.testing import build_upstream_backbone, randomize_parameters_, tiny_timm_vit

SIZE = 32


def _tiny_mmdet_swin():
    """mmdet's SwinTransformer scaled down: 2 stages, window 4 (W-MSA + SW-MSA), 2/4 heads."""
    from mmdet.models.backbones import SwinTransformer
    backbone = SwinTransformer(embed_dims=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                               strides=(4, 2, 2, 2), out_indices=(0, 1), drop_path_rate=0.0)
    randomize_parameters_(backbone, std=0.1)
    backbone.eval()      # (mmdet's Swin.train() returns None, so no chaining)
    return SynthesisTeacher(backbone, mean=(123.675, 116.28, 103.53),
                            std=(58.395, 57.12, 57.375), kind='backbone')


def _tiny_timm_vit():
    return as_teacher(tiny_timm_vit(img_size=SIZE))


def _tiny_mmseg_vit():
    """mmseg's VisionTransformer (the UperNet ViT-B/16 backbone, attention through
    nn.MultiheadAttention inside mmcv's wrapper) scaled down: 2 layers, 2 heads."""
    backbone, pre = build_upstream_backbone('upernet_vit', img_size=(SIZE, SIZE),
                                            patch_size=8, embed_dims=32, num_layers=2,
                                            num_heads=2, mlp_ratio=2, out_indices=(0, 1),
                                            drop_path_rate=0.0)
    randomize_parameters_(backbone, std=0.1)
    backbone.eval()
    return SynthesisTeacher(backbone, mean=tuple(pre.mean), std=tuple(pre.std),
                            kind='backbone')


MODELS = {'mmdet_swin': _tiny_mmdet_swin, 'timm_vit': _tiny_timm_vit,
          'mmseg_vit': _tiny_mmseg_vit}


@pytest.fixture(scope='module', params=sorted(MODELS))
def teacher(request):
    torch.manual_seed(0)
    teacher = MODELS[request.param]()
    adapt_attention_(teacher.attention_scope)
    with teacher.frozen():
        yield teacher


def _terms_and_grad(method, x0, compiled):
    x = x0.clone().requires_grad_(True)
    x_aug = x * 1.05 + 0.01          # stands in for the augmentation (differentiable)
    gen = torch.Generator().manual_seed(0)
    if compiled:
        with method.recorder() as rec:
            terms = method.compiled_step(backend='aot_eager')(x_aug, x, gen, rec)
            assert rec.records == []     # the logits did not leak out of the graph
    else:
        terms = method.step_terms(x_aug, x, gen)
    terms['loss'].backward()
    return {k: v.detach() for k, v in terms.items()}, x.grad


def test_compile_setting_values():
    assert SynthesisConfig().compile_scope == 'none'
    assert SynthesisConfig(compile=True).compile_scope == 'loss'     # the old meaning
    assert SynthesisConfig(compile='full').compile_scope == 'full'
    assert SynthesisConfig.from_dict(dict(compile='none', compile_mode='max-autotune-no-cudagraphs',
                                          tf32=True)).tf32
    with pytest.raises(ValueError, match="'full'"):
        SynthesisConfig(compile='whole')
    with pytest.raises(ValueError, match='compile_mode'):
        SynthesisConfig(compile='full', compile_mode='fastest')


@pytest.mark.parametrize('bf16, chunk', [(False, None), (True, 2048)],
                         ids=['fp32', 'bf16-chunked'])
def test_full_compile_matches_eager_loss_and_pixel_gradient(teacher, bf16, chunk):
    extra = dict(max_chunk_elements=chunk) if chunk else {}
    eager = build_method(SynthesisConfig(image_size=SIZE, bf16=bf16, **extra), teacher, True)
    full = build_method(SynthesisConfig(image_size=SIZE, bf16=bf16, compile='full', **extra),
                        teacher, True)
    torch._dynamo.reset()
    x0 = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    want, want_grad = _terms_and_grad(eager, x0, compiled=False)
    got, got_grad = _terms_and_grad(full, x0, compiled=True)
    assert set(got) == set(want) == {'sim', 'tv', 'loss'}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    assert float(want_grad.abs().max()) > 0
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4,
                               atol=1e-4 * float(want_grad.abs().max()))


@pytest.mark.parametrize('chunk', [None, 2048], ids=['whole', 'checkpointed-chunks'])
def test_full_step_has_no_graph_break(teacher, chunk):
    extra = dict(max_chunk_elements=chunk) if chunk else {}
    method = build_method(SynthesisConfig(image_size=SIZE, compile='full', bf16=True, **extra),
                          teacher, True)
    torch._dynamo.reset()
    x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    with method.recorder() as rec:
        explained = torch._dynamo.explain(method._full_step)(x * 1.0, x, torch.Generator(), rec)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_generate_compiles_once_per_batch_shape_and_matches_eager(teacher):
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(example_inputs[0].shape) if example_inputs else ())
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(
            gm, example_inputs)

    settings = dict(image_size=SIZE, iterations=3, log_interval=1, progress=False)
    eager = build_method(SynthesisConfig(**settings), teacher, True)
    full = build_method(SynthesisConfig(compile='full', **settings), teacher, True)
    torch._dynamo.reset()
    full.compiled_step(backend=counting_backend)
    for batch in (2, 2, 1):          # e.g. 5 images in batches of 2: the last one is smaller
        results = []
        for method in (eager, full):
            gen = torch.Generator().manual_seed(batch)
            ctx = BatchContext(0, batch, batch, gen, torch.device('cpu'), list(range(batch)))
            results.append(method.generate(ctx))
        torch.testing.assert_close(results[1].x, results[0].x, rtol=1e-4, atol=1e-4)
        assert results[1].losses['sim'] == pytest.approx(results[0].losses['sim'], rel=1e-4)
    assert len(graphs) == 2, graphs      # one graph for batch 2 (reused), one for batch 1


def test_full_compile_with_a_task_term_matches_eager():
    """task_loss='classifier' draws labels from the generator: dynamo breaks the graph there
    (the step still compiles in parts) and the values stay those of eager."""
    torch.manual_seed(0)
    teacher = _tiny_timm_vit()
    adapt_attention_(teacher.attention_scope)
    results = []
    with teacher.frozen():
        torch._dynamo.reset()
        for compile_ in (False, 'full'):
            method = build_method(SynthesisConfig(image_size=SIZE, compile=compile_,
                                                  task_loss='classifier'), teacher, True)
            if compile_:
                method.compiled_step(backend='aot_eager')
            x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
            x.requires_grad_(True)
            terms = method.step_terms(x * 1.0, x, torch.Generator().manual_seed(5))
            terms['loss'].backward()
            results.append(({k: v.detach() for k, v in terms.items()}, x.grad))
    (want, want_grad), (got, got_grad) = results
    assert set(got) == {'sim', 'task', 'tv', 'loss'}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4,
                               atol=1e-4 * float(want_grad.abs().max()))
