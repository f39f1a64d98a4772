"""Attention adapters: adapted forward == library forward (fp32, atol 1e-5), the products go
through qk_matmul / av_matmul, restore gives back the original module, unsupported attention
is refused with a useful message. Real mmdet / mmseg / timm / torch modules, CPU."""
import copy

import pytest
import torch
from torch import nn

from mimiq_mm.attention import (AttentionAdapter, AttentionRecorder, UnsupportedAttentionError,
                                adapt_attention_, find_attention_modules, get_adapter,
                                is_adapted, register_adapter, restore_attention_)
from mimiq_mm.quant.modules import MatMul
from mimiq_mm.testing import randomize_parameters_

ATOL = 1e-5  # fp32 tolerance for adapted vs library forward



def _shift_mask(num_windows: int, num_tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    blocked = torch.rand(num_windows, num_tokens, num_tokens, generator=gen) > 0.7
    blocked.diagonal(dim1=1, dim2=2).fill_(False)
    return torch.zeros(blocked.shape).masked_fill(blocked, -100.0)


def _window_modules():
    from mmdet.models.backbones.swin import WindowMSA as MMDetWindowMSA
    from mmseg.models.backbones.swin import WindowMSA as MMSegWindowMSA
    from timm.models.swin_transformer import WindowAttention
    return {
        'mmdet': lambda: MMDetWindowMSA(32, 4, (3, 4), attn_drop_rate=0.1),
        'mmseg': lambda: MMSegWindowMSA(32, 4, (3, 4), attn_drop_rate=0.1),
        'timm': lambda: WindowAttention(32, 4, window_size=(3, 4), attn_drop=0.1),
    }


@pytest.mark.parametrize('family', ['mmdet', 'mmseg', 'timm'])
@pytest.mark.parametrize('with_mask', [False, True])
def test_window_attention_matches_library(family, with_mask):
    module = randomize_parameters_(_window_modules()[family]()).eval()
    original = copy.deepcopy(module)
    keys = list(module.state_dict())
    x = torch.randn(2 * 3, 12, 32)  # batch 3, 2 windows of 3x4 tokens
    mask = _shift_mask(2, 12) if with_mask else None

    assert adapt_attention_(module) is module
    assert is_adapted(module) and isinstance(module, type(original))
    assert type(module.qk_matmul) is MatMul and type(module.av_matmul) is MatMul
    assert list(module.state_dict()) == keys  # MatMul has no state

    calls = []
    module.qk_matmul.register_forward_hook(lambda m, a, o: calls.append('qk'))
    module.av_matmul.register_forward_hook(lambda m, a, o: calls.append('av'))
    torch.testing.assert_close(module(x, mask), original(x, mask), atol=ATOL, rtol=0)
    assert calls == ['qk', 'av']


def test_window_attention_train_mode_dropout_same_rng():
    """attn_drop is the module's own Dropout: same RNG stream, same result in training."""
    module = randomize_parameters_(_window_modules()['mmdet']()).train()
    original = copy.deepcopy(module)
    adapt_attention_(module)
    x = torch.randn(4, 12, 32)
    torch.manual_seed(3)
    expected = original(x)
    torch.manual_seed(3)
    torch.testing.assert_close(module(x), expected, atol=ATOL, rtol=0)


def _grads(module, loss_fn):
    module.zero_grad()
    loss_fn(module).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize('family', ['mmdet', 'timm', 'mha'])
def test_gradients_match_library(family):
    """The student is trained through the adapted forward: parameter gradients must match."""
    if family == 'mha':
        module = randomize_parameters_(nn.MultiheadAttention(32, 4, batch_first=True))
        x = torch.randn(2, 6, 32)
        loss = lambda m: m(x, x, x)[0].pow(2).sum()  # noqa: E731
    else:
        module = randomize_parameters_(_window_modules()[family]())
        x, mask = torch.randn(4, 12, 32), _shift_mask(2, 12)
        loss = lambda m: m(x, mask).pow(2).sum()  # noqa: E731
    module.eval()
    expected = _grads(module, loss)
    if family == 'mha':  # adapted parameter names: in_proj_weight -> in_proj.weight
        expected = {n.replace('in_proj_', 'in_proj.'): g for n, g in expected.items()}
    got = _grads(adapt_attention_(module), loss)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-5)


def test_idempotent_and_restore_window():
    module = randomize_parameters_(_window_modules()['timm']())
    original_class = type(module)
    keys = list(module.state_dict())
    params = {n: p for n, p in module.named_parameters()}
    adapt_attention_(module)
    adapted_class, qk = type(module), module.qk_matmul
    adapt_attention_(module)
    assert type(module) is adapted_class and module.qk_matmul is qk
    assert len([m for m in module.modules() if isinstance(m, MatMul)]) == 2
    restore_attention_(module)
    assert type(module) is original_class
    assert not hasattr(module, 'qk_matmul') and not hasattr(module, 'av_matmul')
    assert list(module.state_dict()) == keys
    assert all(p is params[n] for n, p in module.named_parameters())
    restore_attention_(module)  # nothing adapted: no-op
    assert type(module) is original_class


def test_restore_refuses_quantized_matmul():

    class OtherMatMul(MatMul):
        pass

    module = adapt_attention_(_window_modules()['mmseg']())
    module.qk_matmul = OtherMatMul()
    with pytest.raises(RuntimeError, match='dequantize_'):
        restore_attention_(module)
    assert is_adapted(module)


# --- timm ViT Attention --------------------------------------------------------------------


def _timm_attention(**kwargs):
    from timm.layers import Attention
    return Attention(32, num_heads=4, qkv_bias=True, **kwargs)


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(qk_norm=True, norm_layer=nn.LayerNorm),
    dict(scale_norm=True, norm_layer=nn.LayerNorm),
])
@pytest.mark.parametrize('fused', [True, False])
def test_timm_attention_matches_library(kwargs, fused):
    module = randomize_parameters_(_timm_attention(**kwargs)).eval()
    module.fused_attn = fused  # the adapted forward is always the explicit one
    original = copy.deepcopy(module)
    adapt_attention_(module)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(module(x), original(x), atol=ATOL, rtol=0)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(module(x, attn_mask=causal), original(x, attn_mask=causal),
                               atol=ATOL, rtol=0)
    float_mask = torch.randn(2, 1, 7, 7)
    torch.testing.assert_close(module(x, attn_mask=float_mask),
                               original(x, attn_mask=float_mask), atol=ATOL, rtol=0)


def test_timm_attention_gated_if_available():
    import inspect

    from timm.layers import Attention
    gated = 'gated' in inspect.signature(Attention.__init__).parameters
    module = randomize_parameters_(_timm_attention(**(dict(gated=True) if gated else {}))).eval()
    assert (getattr(module, 'gate', None) is not None) == gated
    original = copy.deepcopy(module)
    adapt_attention_(module)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(module(x), original(x), atol=ATOL, rtol=0)


# --- torch.nn.MultiheadAttention -----------------------------------------------------------


@pytest.mark.parametrize('batch_first', [False, True])
@pytest.mark.parametrize('bias', [True, False])
def test_multihead_attention_matches_torch(batch_first, bias):
    module = randomize_parameters_(nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first))
    module.eval()
    original = copy.deepcopy(module)
    adapt_attention_(module)
    shape = (2, 6, 32) if batch_first else (6, 2, 32)
    x, mem = torch.randn(shape), torch.randn(shape)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -2:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    cases = [
        ((x, x, x), {}),
        ((x, x, x), dict(need_weights=False)),
        ((x, x, x), dict(average_attn_weights=False)),
        ((x, mem, mem), dict(key_padding_mask=pad)),  # cross-attention, key is value
        ((x, mem, x), dict(attn_mask=causal)),  # cross-attention, all distinct
        ((x, x, x), dict(attn_mask=torch.randn(8, 6, 6), key_padding_mask=pad)),
        ((x[:, 0] if not batch_first else x[0], ) * 3, {}),  # unbatched
    ]
    for args, kwargs in cases:
        out, weights = module(*args, **kwargs)
        ref_out, ref_weights = original(*args, **kwargs)
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
        if ref_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, ref_weights, atol=ATOL, rtol=0)


def test_multihead_attention_dropout_training_same_rng():
    module = randomize_parameters_(nn.MultiheadAttention(32, 4, dropout=0.2, batch_first=True)).train()
    original = copy.deepcopy(module)
    adapt_attention_(module)
    x = torch.randn(2, 5, 32)
    torch.manual_seed(0)
    expected = original(x, x, x)
    torch.manual_seed(0)
    got = module(x, x, x)
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=0)


def test_multihead_attention_in_proj_is_linear_with_same_parameters():
    module = nn.MultiheadAttention(32, 4)
    weight, bias = module.in_proj_weight, module.in_proj_bias
    keys = list(module.state_dict())
    original_state = copy.deepcopy(module.state_dict())
    adapt_attention_(module)
    assert type(module.in_proj) is nn.Linear
    assert module.in_proj.weight is weight and module.in_proj.bias is bias
    assert module.in_proj_weight is weight  # attribute access still works
    # documented key change while adapted
    assert list(module.state_dict()) == ['out_proj.weight', 'out_proj.bias', 'in_proj.weight',
                                         'in_proj.bias']
    assert sum(1 for p in module.parameters() if p is weight) == 1
    # a checkpoint of the original module still loads into the adapted one
    with torch.no_grad():
        weight.zero_()
    module.load_state_dict(original_state, strict=True)
    torch.testing.assert_close(module.in_proj.weight, original_state['in_proj_weight'])
    restore_attention_(module)
    assert type(module) is nn.MultiheadAttention and 'in_proj' not in module._modules
    assert list(module.state_dict()) == keys
    assert module.in_proj_weight is weight and module.in_proj_bias is bias


@pytest.mark.parametrize('kwargs, what', [
    (dict(kdim=16, vdim=16), 'separate q/k/v'),
    (dict(add_bias_kv=True), 'add_bias_kv'),
    (dict(add_zero_attn=True), 'add_zero_attn'),
])
def test_multihead_attention_unsupported_options(kwargs, what):
    module = nn.Sequential(nn.MultiheadAttention(32, 4, **kwargs))
    with pytest.raises(UnsupportedAttentionError, match=what):
        adapt_attention_(module)
    assert not is_adapted(module[0])


def test_mmcv_multihead_attention_wrapper():
    """mmcv's MultiheadAttention (batch_first, used by mmseg ViT) wraps nn.MultiheadAttention;
    the inner module is adapted and the wrapper's output is unchanged."""
    from mmcv.cnn.bricks.transformer import MultiheadAttention
    wrapper = randomize_parameters_(MultiheadAttention(32, 4, batch_first=True)).eval()
    original = copy.deepcopy(wrapper)
    assert list(find_attention_modules(wrapper)) == ['attn']
    adapt_attention_(wrapper)
    assert is_adapted(wrapper.attn) and not is_adapted(wrapper)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(wrapper(x), original(x), atol=ATOL, rtol=0)
    # self-attention through mmcv's transposed views takes the packed path: one in_proj call
    calls = []
    wrapper.attn.in_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    wrapper(x)
    assert len(calls) == 1


def test_mmcv_wrapper_compiles_without_graph_break_and_keeps_the_packed_path():
    """Under torch.compile the self-attention test cannot read data pointers (a graph break
    per call, 13 in mmseg's ViT-B): it compares the views' base tensor instead. mmcv's
    transposed views of one tensor still take the packed projection (one in_proj call);
    q and k sliced out of one packed tensor are still told apart."""
    from mmcv.cnn.bricks.transformer import MultiheadAttention
    from mimiq_mm.attention.adapters import _same_tensor
    wrapper = randomize_parameters_(MultiheadAttention(32, 4, batch_first=True)).eval()
    adapt_attention_(wrapper)
    x = torch.randn(2, 9, 32)
    want = wrapper(x)
    calls = []
    wrapper.attn.in_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(wrapper)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(wrapper, backend='eager', fullgraph=True)
    calls.clear()
    torch.testing.assert_close(compiled(x), want, atol=ATOL, rtol=0)
    assert len(calls) == 1

    def same(kind, t):
        if kind == 'transposed':
            return _same_tensor(t.transpose(0, 1), t.transpose(0, 1))
        packed = t.repeat(1, 1, 2)
        return _same_tensor(packed[..., :32], packed[..., 32:])
    for kind, expected in (('transposed', True), ('sliced', False)):
        assert same(kind, x) is expected
        torch._dynamo.reset()
        assert torch.compile(lambda t: torch.tensor(same(kind, t)), backend='eager',
                             fullgraph=True)(x).item() is expected


# --- unsupported / registry ---------------------------------------------------------------


class _HomeMadeAttention(nn.Module):

    def __init__(self, dim=16, num_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.num_heads)**-0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_unsupported_attention_error_names_class_and_decorator():
    model = nn.Sequential(nn.Linear(16, 16), _HomeMadeAttention())
    assert list(find_attention_modules(model)) == ['1']
    with pytest.raises(UnsupportedAttentionError) as info:
        adapt_attention_(model)
    message = str(info.value)
    assert '_HomeMadeAttention' in message and '1:' in message
    assert '@register_adapter(_HomeMadeAttention)' in message
    assert type(model[1]) is _HomeMadeAttention  # nothing was modified


class _HFStyleAttention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.num_attention_heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x):
        return torch.softmax(self.query(x) @ self.key(x).transpose(-2, -1), -1) @ self.value(x)


class _NHeadsAttention(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.n_heads = 2
        self.to_qkv = nn.Linear(dim, dim * 3)

    def forward(self, x):
        q, k, v = self.to_qkv(x).chunk(3, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize('cls', [_HFStyleAttention, _NHeadsAttention])
def test_other_head_count_names_are_recognised_not_silently_left_float(cls):
    from mimiq_mm.quant import quantize_
    model = nn.Sequential(nn.Linear(16, 16), cls())
    assert list(find_attention_modules(model)) == ['1']
    with pytest.raises(UnsupportedAttentionError, match=cls.__name__):
        quantize_(model)


def test_atomic_when_one_module_is_unsupported():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), _HomeMadeAttention())
    with pytest.raises(UnsupportedAttentionError):
        adapt_attention_(model)
    assert type(model[0]) is nn.MultiheadAttention and 'in_proj' not in model[0]._modules


def test_subclass_overriding_forward_is_not_covered_by_parent_adapter():
    from timm.layers import Attention

    class Plain(Attention):
        pass

    class Different(Attention):

        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x) * 2

    assert get_adapter(Plain) is get_adapter(Attention) is not None
    assert get_adapter(Different) is None
    with pytest.raises(UnsupportedAttentionError, match='overrides forward'):
        adapt_attention_(Different(16, 2))
    adapt_attention_(Plain(16, 2))


def test_require_flag_and_non_attention_models():
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    assert adapt_attention_(convnet) is convnet  # nothing to do
    with pytest.raises(UnsupportedAttentionError, match='no attention module'):
        adapt_attention_(convnet, require=True)
    with pytest.raises(ValueError, match='num_prefix_tokens'):
        adapt_attention_(convnet, num_prefix_tokens=-1)


def test_register_adapter_validates():
    with pytest.raises(TypeError, match='AttentionAdapter'):
        register_adapter(_HomeMadeAttention)(object)
    with pytest.raises(TypeError, match='at least one'):
        register_adapter()


def test_pickle_round_trip_of_adapted_model():
    import pickle
    model = nn.Sequential(randomize_parameters_(_timm_attention()), nn.MultiheadAttention(32, 4)).eval()
    adapt_attention_(model)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone[0]) is type(model[0]) and is_adapted(clone[1])
    x = torch.randn(1, 4, 32)
    torch.testing.assert_close(clone[0](x), model[0](x), atol=0, rtol=0)
    assert list(clone.state_dict()) == list(model.state_dict())
    restore_attention_(clone)
    assert type(clone[1]) is nn.MultiheadAttention


def test_deepcopy_of_adapted_model():
    model = nn.Sequential(randomize_parameters_(_timm_attention())).eval()
    adapt_attention_(model)
    clone = copy.deepcopy(model)
    assert is_adapted(clone[0]) and clone[0].qk_matmul is not model[0].qk_matmul
    x = torch.randn(1, 4, 32)
    torch.testing.assert_close(clone(x), model(x), atol=0, rtol=0)
    with AttentionRecorder(clone) as rec:
        model(x)
    assert rec.records == []  # the original model does not report to the clone's recorder
