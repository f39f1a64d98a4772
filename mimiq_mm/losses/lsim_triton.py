"""A fused Triton kernel for L_sim's per-query statistics (forward and backward).

:func:`mimiq_mm.losses.attention_similarity._pair_loss_sum` computes, for every query row
``(b, q)`` of the logits ``(B', H, Nq, K)``:
- the min-max normalised head rows (masked keys map to 0);
- their means and the ``H x H`` covariance over the keys;
- the SSIM of every head pair, summed as ``1 - SSIM_ij^2`` over ``i < j``.

In PyTorch this is several passes over a float32 copy of the logits, plus the autograd
tensors for the backward pass. Here one program handles one query row:
- it streams the ``H x K`` block through registers in chunks of keys;
- the forward pass writes only one partial loss per row;
- the backward pass recomputes the row's statistics and writes the gradient of the
  logits directly.

The extra memory is O(B' Nq). The gradient matches autograd of the PyTorch code, including
where the min and max pass theirs (split evenly between ties, as ``amax`` / ``amin`` do).

Use :func:`fused_pair_loss_sum` on CUDA tensors. The two kernels are wrapped as custom ops
(``torch.library``) with a registered autograd formula, so ``torch.compile`` (e.g.
``synthesis.compile='full'``) keeps each as one opaque call, without a graph break. The
kernels also run under ``TRITON_INTERPRET=1`` on the CPU, which is how the tests check them.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

#: keys per chunk streamed through registers
BLOCK_K = 32
#: query rows per program, handled in turn: fewer, longer programs for the many small rows
#: of Swin windows. Timed on an H200 (Swin-T, bf16 eager, batch 128, 224 px, same call):
#: 1 row 0.0866 s/iter, 4 rows 0.0881, 8 rows 0.0895 (``bench_synthesis_cuda.md``), so 1.
ROWS_PER_PROGRAM = 1


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _chunk(x_ptr, sh, sk, H, K, k0, other, H_PAD: tl.constexpr, BK: tl.constexpr):
        """Keys ``k0 .. k0 + BK`` of every head of one query row, as float32 (padding:
        ``other``), with their validity mask and offsets."""
        offs_h = tl.arange(0, H_PAD)
        offs_k = k0 + tl.arange(0, BK)
        valid = (offs_h < H)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_h[:, None] * sh + offs_k[None, :] * sk, mask=valid,
                    other=other).to(tl.float32)
        return x, valid, offs_h, offs_k

    @triton.jit
    def _normalise(x, high, low, r, margin):
        """The min-max normalised chunk (masked keys: 0) and the masked keys."""
        masked = x < high[:, None] - margin
        return tl.where(masked, 0.0, (x - low[:, None]) / r[:, None]), masked

    @triton.jit
    def _row_stats(x_ptr, sh, sk, H, K, margin, eps,
                   H_PAD: tl.constexpr, BK: tl.constexpr):
        """Per head of one query row: max, min over the unmasked keys, range, mean and the
        H x H covariance of the normalised row."""
        hmask = tl.arange(0, H_PAD) < H
        high = tl.full((H_PAD,), float('-inf'), tl.float32)
        for k0 in range(0, K, BK):
            x, valid, offs_h, offs_k = _chunk(x_ptr, sh, sk, H, K, k0, float('-inf'),
                                              H_PAD, BK)
            high = tl.maximum(high, tl.max(x, 1))
        high = tl.where(hmask, high, 0.0)
        low = tl.full((H_PAD,), float('inf'), tl.float32)
        for k0 in range(0, K, BK):
            x, valid, offs_h, offs_k = _chunk(x_ptr, sh, sk, H, K, k0, float('inf'),
                                              H_PAD, BK)
            x = tl.where(x < high[:, None] - margin, float('inf'), x)
            low = tl.minimum(low, tl.min(x, 1))
        low = tl.where(hmask, low, 0.0)
        span = high - low
        r = tl.maximum(span, eps)
        total = tl.zeros((H_PAD,), tl.float32)
        for k0 in range(0, K, BK):
            x, valid, offs_h, offs_k = _chunk(x_ptr, sh, sk, H, K, k0, 0.0, H_PAD, BK)
            m, masked = _normalise(x, high, low, r, margin)
            total += tl.sum(tl.where(valid, m, 0.0), 1)
        mean = total / K
        cov = tl.zeros((H_PAD, H_PAD), tl.float32)
        for k0 in range(0, K, BK):
            x, valid, offs_h, offs_k = _chunk(x_ptr, sh, sk, H, K, k0, 0.0, H_PAD, BK)
            m, masked = _normalise(x, high, low, r, margin)
            c = tl.where(valid, m - mean[:, None], 0.0)
            cov += tl.sum(c[:, None, :] * c[None, :, :], 2)
        cov = cov / K
        return high, low, span, r, mean, cov

    @triton.jit
    def _pair_terms(mean, cov, H, c1, c2, H_PAD: tl.constexpr):
        offs_i = tl.arange(0, H_PAD)
        eye = offs_i[:, None] == offs_i[None, :]
        var = tl.sum(tl.where(eye, cov, 0.0), 1)
        mi, mj = mean[:, None], mean[None, :]
        num_a = 2.0 * mi * mj + c1
        den_a = mi * mi + mj * mj + c1
        a = num_a / den_a
        den_s = var[:, None] + var[None, :] + c2
        s = (2.0 * cov + c2) / den_s
        valid = (offs_i[:, None] < H) & (offs_i[None, :] < H)
        upper = valid & (offs_i[:, None] < offs_i[None, :])
        return a, s, num_a, den_a, den_s, upper, valid, eye

    @triton.jit
    def _lsim_fwd_row(x_ptr, out_ptr, row, NQ, sb, sh, sq, sk, H, K, margin, eps, c1, c2,
                      H_PAD: tl.constexpr, BK: tl.constexpr):
        b = row // NQ
        q = row % NQ
        base = x_ptr + b * sb + q * sq
        high, low, span, r, mean, cov = _row_stats(base, sh, sk, H, K, margin, eps, H_PAD, BK)
        a, s, num_a, den_a, den_s, upper, valid, eye = _pair_terms(mean, cov, H, c1, c2,
                                                                   H_PAD)
        ssim = a * s
        loss = tl.sum(tl.sum(tl.where(upper, 1.0 - ssim * ssim, 0.0), 1), 0)
        tl.store(out_ptr + row, loss)

    @triton.jit
    def _lsim_fwd_kernel(x_ptr, out_ptr, NROWS, NQ, sb, sh, sq, sk, H, K, margin, eps, c1,
                         c2, H_PAD: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr):
        """Query rows ``BQ * pid .. BQ * pid + BQ - 1``, one after the other."""
        for i in tl.static_range(BQ):
            row = tl.program_id(0) * BQ + i
            if row < NROWS:
                _lsim_fwd_row(x_ptr, out_ptr, row, NQ, sb, sh, sq, sk, H, K, margin, eps,
                              c1, c2, H_PAD, BK)

    @triton.jit
    def _lsim_bwd_kernel(x_ptr, gx_ptr, g_ptr, NROWS, NQ, sb, sh, sq, sk, gsb, gsh, gsq, gsk,
                         H, K, margin, eps, c1, c2, H_PAD: tl.constexpr, BK: tl.constexpr,
                         BQ: tl.constexpr):
        """Query rows ``BQ * pid .. BQ * pid + BQ - 1``, one after the other."""
        for i in tl.static_range(BQ):
            row = tl.program_id(0) * BQ + i
            if row < NROWS:
                _lsim_bwd_row(x_ptr, gx_ptr, g_ptr, row, NQ, sb, sh, sq, sk, gsb, gsh, gsq,
                              gsk, H, K, margin, eps, c1, c2, H_PAD, BK)

    @triton.jit
    def _lsim_bwd_row(x_ptr, gx_ptr, g_ptr, row, NQ, sb, sh, sq, sk, gsb, gsh, gsq, gsk,
                      H, K, margin, eps, c1, c2, H_PAD: tl.constexpr, BK: tl.constexpr):
        b = row // NQ
        q = row % NQ
        base = x_ptr + b * sb + q * sq
        gbase = gx_ptr + b * gsb + q * gsq
        grad = tl.load(g_ptr + row).to(tl.float32)
        high, low, span, r, mean, cov = _row_stats(base, sh, sk, H, K, margin, eps, H_PAD, BK)
        # (pair names: Triton keeps a name's type through the key loops below)
        a, s, num_a, den_a, den_s, upper, pair, eye = _pair_terms(mean, cov, H, c1, c2,
                                                                  H_PAD)
        ssim = a * s
        g = tl.where(upper, -2.0 * ssim * grad, 0.0)
        gs = g + tl.trans(g)                                   # both orders of each pair
        mi, mj = mean[:, None], mean[None, :]
        da_dmi = (2.0 * mj * den_a - num_a * 2.0 * mi) / (den_a * den_a)
        g_mean = tl.sum(tl.where(pair & ~eye, gs * s * da_dmi, 0.0), 1)
        w = tl.where(pair & ~eye, gs * a * 2.0 / den_s, 0.0)  # d/dcov_ij, i != j
        g_var = tl.sum(tl.where(pair & ~eye, gs * a * (-(2.0 * cov + c2)) /
                                (den_s * den_s), 0.0), 1)
        w = w + tl.where(eye, 2.0 * g_var[:, None], 0.0)      # d/dcov_ii (times 2 c_i)
        active = span > eps                                    # else r = eps: no gradient
        act = active.to(tl.float32)
        g_low = tl.zeros((H_PAD,), tl.float32)
        g_high = tl.zeros((H_PAD,), tl.float32)
        n_low = tl.zeros((H_PAD,), tl.float32)
        n_high = tl.zeros((H_PAD,), tl.float32)
        # pass 1: gradient of every visible key, and what the min / max receive
        for k0 in range(0, K, BK):
            x, valid, offs_h, offs_k = _chunk(base, sh, sk, H, K, k0, 0.0, H_PAD, BK)
            m, masked = _normalise(x, high, low, r, margin)
            c = tl.where(valid, m - mean[:, None], 0.0)
            dm = tl.sum(w[:, :, None] * c[None, :, :], 1) / K + g_mean[:, None] / K
            free = valid & ~masked
            # m = (x - low) / r: dm/dlow = (m - 1) / r, dm/dhigh = -m / r (the parts
            # through r vanish where r is clamped at eps)
            g_low += tl.sum(tl.where(free, dm * (m * act[:, None] - 1.0), 0.0), 1) / r
            g_high += tl.sum(tl.where(free, -dm * m, 0.0), 1) * act / r
            n_high += tl.sum(tl.where(valid & (x == high[:, None]), 1.0, 0.0), 1)
            n_low += tl.sum(tl.where(free & (x == low[:, None]), 1.0, 0.0), 1)
            goffs = offs_h[:, None] * gsh + offs_k[None, :] * gsk
            tl.store(gbase + goffs, tl.where(free, dm / r[:, None], 0.0), mask=valid)
        # pass 2: the min and max elements (ties share) get theirs
        add_high = g_high / tl.maximum(n_high, 1.0)
        add_low = g_low / tl.maximum(n_low, 1.0)
        for k0 in range(0, K, BK):
            x, valid, offs_h, offs_k = _chunk(base, sh, sk, H, K, k0, 0.0, H_PAD, BK)
            masked = x < high[:, None] - margin
            extra = (tl.where(x == high[:, None], add_high[:, None], 0.0)
                     + tl.where(~masked & (x == low[:, None]), add_low[:, None], 0.0))
            gptrs = gbase + offs_h[:, None] * gsh + offs_k[None, :] * gsk
            old = tl.load(gptrs, mask=valid, other=0.0)
            tl.store(gptrs, old + tl.where(valid, extra, 0.0), mask=valid)


def _launch_args(logits: Tensor):
    from .attention_similarity import MASK_MARGIN, MINMAX_EPS
    b, h, nq, k = logits.shape
    h_pad = max(2, triton.next_power_of_2(h))
    return b, h, nq, k, h_pad, float(MASK_MARGIN), float(MINMAX_EPS)


@torch.library.custom_op('mimiq_mm::lsim_rows', mutates_args=())
def _lsim_rows(logits: Tensor, c1: float, c2: float) -> Tensor:
    """Per query row ``(b, q)``: the sum over head pairs of ``1 - SSIM^2`` (float32,
    shape ``(B' * Nq,)``). A custom op, so ``torch.compile`` keeps it as one opaque call
    (no graph break) and its backward is :func:`_lsim_rows_backward`."""
    b, h, nq, k, h_pad, margin, eps = _launch_args(logits)
    out = torch.empty(b * nq, device=logits.device, dtype=torch.float32)
    if out.numel():
        bq = ROWS_PER_PROGRAM
        _lsim_fwd_kernel[(triton.cdiv(b * nq, bq),)](
            logits, out, b * nq, nq, *logits.stride(), h, k, margin, eps, float(c1),
            float(c2), H_PAD=h_pad, BK=BLOCK_K, BQ=bq)
    return out


@_lsim_rows.register_fake
def _(logits, c1, c2):
    return logits.new_empty(logits.shape[0] * logits.shape[2], dtype=torch.float32)


@torch.library.custom_op('mimiq_mm::lsim_rows_backward', mutates_args=())
def _lsim_rows_backward(logits: Tensor, grad_rows: Tensor, c1: float, c2: float) -> Tensor:
    b, h, nq, k, h_pad, margin, eps = _launch_args(logits)
    grad = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
    g = grad_rows.to(torch.float32).contiguous()
    if grad.numel():
        bq = ROWS_PER_PROGRAM
        _lsim_bwd_kernel[(triton.cdiv(b * nq, bq),)](
            logits, grad, g, b * nq, nq, *logits.stride(), *grad.stride(), h, k, margin, eps,
            float(c1), float(c2), H_PAD=h_pad, BK=BLOCK_K, BQ=bq)
    return grad.to(logits.dtype)


@_lsim_rows_backward.register_fake
def _(logits, grad_rows, c1, c2):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, c1, c2 = inputs
    ctx.save_for_backward(logits)
    ctx.c = (c1, c2)


def _backward(ctx, grad_rows):
    (logits,) = ctx.saved_tensors
    return _lsim_rows_backward(logits, grad_rows, *ctx.c), None, None


_lsim_rows.register_autograd(_backward, setup_context=_setup_context)


def fused_pair_loss_sum(logits: Tensor, c1: float, c2: float) -> Tensor:
    """``sum over (b, q, i<j) of 1 - SSIM_ij^2`` of ``logits`` (B', H, Nq, K), the same
    value and gradient as ``attention_similarity._pair_loss_sum``, in two Triton kernels."""
    if triton is None:
        raise RuntimeError('the fused L_sim kernel needs triton (it ships with CUDA builds '
                           'of torch); use the PyTorch path (fused=False)')
    if logits.dim() != 4:
        raise ValueError(f'logits must be (B, H, Nq, K), got {tuple(logits.shape)}')
    if not logits.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        raise RuntimeError(f"the fused L_sim kernel (synthesis.lsim_kernel='triton') runs on "
                           f"CUDA tensors, got a {logits.device.type} tensor; use "
                           f"lsim_kernel='torch' there")
    return _lsim_rows(logits, float(c1), float(c2)).sum()
