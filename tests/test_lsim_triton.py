"""The fused Triton L_sim kernels against the PyTorch L_sim: same loss and gradient, also
through torch.compile (custom ops: no graph break).

Where a CUDA device is present the kernels run on it, compiled; elsewhere Triton's interpreter
(``TRITON_INTERPRET=1``) runs them on the CPU. The interpreter flag is read when triton is
imported, so the comparison runs in a subprocess with it set (or cleared)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CHECK = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
DEV = sys.argv[2]
from mimiq_mm.losses.attention_similarity import (SSIM_C1, SSIM_C2, _pair_loss_sum,
                                                  inter_head_similarity_loss)
from mimiq_mm.losses.lsim_triton import fused_pair_loss_sum

def compare(x, scale=1.7):
    x = x.to(DEV)
    a = x.detach().clone().requires_grad_(True)
    b = x.detach().clone().requires_grad_(True)
    la, lb = _pair_loss_sum(a, SSIM_C1, SSIM_C2), fused_pair_loss_sum(b, SSIM_C1, SSIM_C2)
    (la * scale).backward()
    (lb * scale).backward()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=1e-4, atol=1e-6)
    assert b.grad.dtype == x.dtype

g = torch.Generator().manual_seed(0)
compare(torch.randn(2, 3, 5, 7, generator=g) * 3)             # one chunk of keys
compare(torch.randn(2, 4, 3, 70, generator=g) * 3)            # three chunks, padded
swin = torch.randn(1, 6, 4, 49, generator=g) * 3              # a Swin window, 6 heads
swin[..., -9:] -= 100.0                                        # shifted-window mask
compare(swin)
ties = torch.randn(1, 3, 2, 12, generator=g)
ties[0, 0, 0] = 0.5                                            # a constant row
ties[0, 1, 1, :3] = ties[0, 1, 1].max() + 1.0                  # a max shared by 3 keys
compare(ties)
# a view without the class token (strides, not a copy), and bf16 logits
full = torch.randn(2, 5, 9, 9, generator=g) * 2
compare(full[:, :, 1:, 1:])
compare((torch.randn(1, 4, 6, 40, generator=g) * 3).bfloat16())
# several query rows per program, the last program partly empty (rows = 2 * 7 = 14)
from mimiq_mm.losses import lsim_triton
lsim_triton.ROWS_PER_PROGRAM = 4
compare(torch.randn(2, 3, 7, 12, generator=g) * 3)
compare(swin)
lsim_triton.ROWS_PER_PROGRAM = 1
# the layer loss the synthesis calls, fused or not
recs = [(torch.randn(2, 4, 16, 16, generator=g) * 2).to(DEV),
        torch.randn(2, 3, 8, 8, generator=g).to(DEV)]
torch.testing.assert_close(inter_head_similarity_loss(recs, fused=True),
                           inter_head_similarity_loss(recs), rtol=1e-5, atol=1e-6)
# under torch.compile the kernels are custom ops: one graph, no break, same gradient
def f(x):
    return inter_head_similarity_loss([x * 2.0], fused=True)
x = torch.randn(2, 4, 16, 16, generator=g).to(DEV)
assert torch._dynamo.explain(f)(x).graph_break_count == 0
a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
torch.compile(f, backend='aot_eager' if DEV == 'cpu' else 'inductor')(a).backward()
inter_head_similarity_loss([b * 2.0]).backward()
torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
print('ok')
'''


def test_fused_lsim_matches_the_pytorch_loss_and_gradient():
    """Compiled on a CUDA device where there is one, else under the interpreter."""
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    env = dict(os.environ)
    if dev == 'cpu':
        env['TRITON_INTERPRET'] = '1'
    else:
        env.pop('TRITON_INTERPRET', None)
    out = subprocess.run([sys.executable, '-c', CHECK, str(ROOT), dev], env=env, text=True,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith('ok')


def test_fused_lsim_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    from mimiq_mm.losses.lsim_triton import fused_pair_loss_sum
    with pytest.raises(RuntimeError, match="lsim_kernel='torch'"):
        fused_pair_loss_sum(torch.randn(1, 2, 3, 4), 1e-4, 9e-4)
    from mimiq_mm.synthesis import SynthesisConfig
    assert SynthesisConfig(lsim_kernel='triton').lsim_kernel == 'triton'
    with pytest.raises(ValueError, match='lsim_kernel must be one of'):
        SynthesisConfig(lsim_kernel='cuda')


@pytest.mark.parametrize('dtype, rows', [('bf16', 1), ('fp32', 1), ('bf16', 4)])
@pytest.mark.parametrize('h_pad', [4, 8, 32])   # Swin-T's 3 / 6 / 24 heads, DINOv2's 6
def test_fused_lsim_kernels_compile_for_hopper(dtype, rows, h_pad):
    """The interpreter runs what the compiler refuses (a loop-carried name that changes
    type ran there and failed on an H200): both kernels go through Triton's real compiler
    for sm_90, ahead of time, which needs no GPU (ptxas ships with triton)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mimiq_mm.losses import lsim_triton as L
    consts = dict(H_PAD=h_pad, BK=L.BLOCK_K, BQ=rows)
    floats = {'margin', 'eps', 'c1', 'c2'}
    kernels = ((L._lsim_fwd_kernel, {'x_ptr': f'*{dtype}', 'out_ptr': '*fp32'}),
               (L._lsim_bwd_kernel, {'x_ptr': f'*{dtype}', 'gx_ptr': f'*{dtype}',
                                     'g_ptr': '*fp32'}))
    for fn, ptrs in kernels:
        sig = {n: 'constexpr' if n in consts else ptrs.get(n, 'fp32' if n in floats else 'i32')
               for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget('cuda', 90, 32))
        assert compiled.asm['cubin'], fn.__name__
