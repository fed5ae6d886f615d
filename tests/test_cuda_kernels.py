"""CUDA kernels of normpass against a float64 reference.

Every check draws fresh random inputs and asserts that normpass's error against float64 is no larger
than the error of torch's own op (or the eager composite, for variants torch has no op for) in the
same dtype, plus a small margin. Skipped without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from backward_op import backward_op
from devices import CUDA_MARKS

pytest.importorskip("normpass._C")  # registers torch.ops.normpass

pytestmark = CUDA_MARKS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 2048 (fp32) and 4096 (16-bit): rows of 128 threads, one per backward CTA of 128. 2048 (16-bit):
# rows of 64 threads, four per backward CTA, each with a barrier of its own in LayerNorm. 3072 and 5120:
# rows of whole warps that are no power of two (96 and 160 threads in 16-bit, 192 and 320 in fp32).
# 2560: a 16-bit forward row rounded up to whole warps (320 vectors on 96 threads).
# LayerNorm forward rows of 257-512 threads run in a 256-thread CTA over two tiles: fp32 5120 and
# 8192, 16-bit 12288 (the second tile half full) and 3001 (scalar accesses, 376 threads).
# Backward rows of 513-768 threads' worth, which 2 x 512 would leave with empty item slots, on
# 3 x 256: fp32 12288 (768) and 16-bit 20480 (640). On an H100, forward rows that fill a cluster
# of 3-8 512-thread CTAs walk one tile: 16-bit 49152 (3) and 65536 (4), fp32 49152 (6) and 65536 (8).
NS = [1, 3, 255, 1024, 2048, 2560, 3001, 3072, 4096, 4099, 5120, 8192, 12288, 20480]
NS += [49152, 65536, 262144, 1 << 20]  # rows of clusters, and split rows
# Absolute slack on top of 1.25 x torch's relative error.
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 1.5e-3}
EPS = 1e-5
ops = torch.ops.normpass


def rows_for(n: int) -> int:
    """Enough rows to exercise several row blocks and dweight partials; odd to leave a ragged tail."""
    return max(3, min(515, (1 << 21) // n) | 1)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.double()
    assert torch.isfinite(a).all(), "non-finite output"
    # Degenerate references (N = 1 LayerNorm: y = b, dx = 0) are compared on an absolute scale.
    return ((a - ref).norm() / ref.norm().clamp_min(1e-3 * ref.numel() ** 0.5)).item()


def check(name: str, ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, dtype, terms=None) -> None:
    """terms: the float64 |terms| of a sum over rows (dweight, dbias). Where they cancel, a rounding
    error relative to the sum is larger by sum|terms| / |sum|, and so is the floor."""
    e_ours, e_theirs = rel(ours, ref), rel(theirs, ref)
    cond = 1.0 if terms is None else max(1.0, (terms.norm() / ref.norm().clamp_min(1e-30)).item())
    bound = 1.25 * e_theirs + FLOOR[dtype] * cond
    assert e_ours <= bound, f"{name}: normpass error {e_ours:.3g} > {bound:.3g} (torch {e_theirs:.3g})"


def norm_math(h, w, b, eps, center, k, offset):
    """The normalization in whatever dtype h is (float64 for the reference, fp32 for eager)."""
    hs = h[..., :k]
    mean = hs.mean(-1, keepdim=True) if center else torch.zeros_like(hs[..., :1])
    var = (hs - mean).pow(2).mean(-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if w is not None:
        y = y * (w.to(h.dtype) + offset)
    if b is not None:
        y = y + b.to(h.dtype)
    return y


def reference(x, r, w, b, dy, ds, eps, center, k, offset):
    """float64 forward and gradients (dx includes grad_sum). h = round(x + r) as eager would."""
    h = x if r is None else x + r
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_() if w is not None else None
    b64 = b.double().requires_grad_() if b is not None else None
    y = norm_math(h64, w64, b64, eps, center, k, offset)
    leaves = [t for t in (h64, w64, b64) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy.double())
    dx = grads[0] + (ds.double() if ds is not None else 0)
    dw = grads[1] if w is not None else None
    db = grads[-1] if b is not None else None
    return y.detach(), h, dx, dw, db


def torch_side(x, r, w, b, dy, ds, eps, center, k, offset, native: bool):
    """torch's own op (native) or the eager fp32-upcast composite, in x's dtype, and its gradients."""
    h = (x if r is None else x + r).detach().requires_grad_()
    wl = w.detach().requires_grad_() if w is not None else None
    bl = b.detach().requires_grad_() if b is not None else None
    n = x.shape[-1]
    if native and center:
        y = F.layer_norm(h, (n,), wl, bl, eps)
    elif native:
        y = F.rms_norm(h, (n,), wl, eps)
    else:
        y = norm_math(h.float(), wl, bl, eps, center, k, offset).to(dy.dtype)
    leaves = [t for t in (h, wl, bl) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    dx = grads[0] + (ds if ds is not None else 0)
    return y.detach(), dx, grads[1] if w is not None else None, grads[-1] if b is not None else None


def run_normpass(x, r, w, b, dy, ds, eps, center, p, offset, out_dtype=None):
    """The forward op, then the backward op both ways: reading the statistics `norm_with_stats` saved
    (as autograd calls it) and recomputing them. Returns y, the sum, and the two (dx, dweight, dbias)."""
    kw = dict(normalized_ndim=1, weight_offset=offset, out_dtype=out_dtype)
    if center:
        y = ops.add_layer_norm(x, r, w, b, eps, **kw) if r is not None else ops.layer_norm(x, w, b, eps, **kw)
    else:
        y = (
            ops.add_rms_norm(x, r, w, eps, b, p=p, **kw)
            if r is not None
            else ops.rms_norm(x, w, eps, b, p=p, **kw)
        )
    y, s = y if r is not None else (y, None)
    y2, s2, stats = ops.norm_with_stats(x, r, w, b, eps, center=center, p=p, **kw)
    assert torch.equal(y2, y), "norm_with_stats must give the forward op's bits"
    assert r is None or torch.equal(s2, s)
    backward = ops.layer_norm_backward if center else ops.rms_norm_backward
    bkw = dict(
        has_bias=b is not None, normalized_ndim=1, weight_offset=offset, **({} if center else {"p": p})
    )
    h = s if r is not None else x
    saved = backward(dy, h, w, ds, eps, None, stats, **bkw)
    recomputed = backward(dy, h, w, ds, eps, **bkw)
    return y, s, saved, recomputed


def run_case(
    m,
    n,
    dtype,
    center,
    *,
    residual=False,
    weight=True,
    bias=None,
    p=1.0,
    offset=0.0,
    grad_sum=False,
    param_dtype=None,
    strided=False,
    out_dtype=None,
    x_mean=0.0,
    first=0.0,
):
    dev = "cuda"
    bias = center if bias is None else bias
    k = max(1, math.ceil(p * n))  # the statistics columns, as the front end counts them
    # torch has an op for plain LayerNorm and weight-only RMSNorm; other variants compare with eager.
    pd = param_dtype or dtype
    native = p == 1.0 and offset == 0.0 and not residual and (center or not bias) and out_dtype is None
    native = native and pd == dtype  # F.layer_norm rejects mixed dtypes

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dt)

    if strided:  # rows of a wider tensor: x[:, :n], row stride n + 3
        x = rand(m, n + 3)[:, :n]
        dy = rand(m, n + 5, dt=out_dtype or dtype)[:, 1 : n + 1]
    else:
        x, dy = rand(m, n), rand(m, n, dt=out_dtype or dtype)
    if x_mean:
        assert not strided, "x_mean would make the strided x contiguous"
        x = (x.float() + x_mean).to(dtype)
    if first:
        x[:, 0] += first
    r = rand(m, n) if residual else None
    w = (1 + 0.5 * rand(n, dt=torch.float32)).to(pd) if weight else None
    b = rand(n, dt=pd) if bias else None
    ds = rand(m, n) if grad_sum else None

    y, s, *grads = run_normpass(x, r, w, b, dy, ds, EPS, center, p, offset, out_dtype)
    torch.cuda.synchronize()
    y_ref, h, dx_ref, dw_ref, db_ref = reference(x, r, w, b, dy, ds, EPS, center, k, offset)
    y_t, dx_t, dw_t, db_t = torch_side(x, r, w, b, dy, ds, EPS, center, k, offset, native)

    assert y.dtype == (out_dtype or dtype) and y.shape == x.shape
    check("y", y, y_t, y_ref, dtype)
    if residual:
        assert torch.equal(s, h), "sum must equal x + residual rounded to the input dtype"
    xhat = norm_math(h.double(), None, None, EPS, center, k, 0.0)
    dy64 = dy.double()
    for how, (dx, dw, db) in zip(("saved stats", "recomputed stats"), grads, strict=True):
        check(f"dx ({how})", dx, dx_t, dx_ref, dtype)
        if weight:
            assert dw.dtype == pd
            check(f"dweight ({how})", dw, dw_t, dw_ref, dtype, terms=(dy64 * xhat).abs().sum(0))
        if bias:
            check(f"dbias ({how})", db, db_t, db_ref, dtype, terms=dy64.abs().sum(0))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_parity(center, dtype, n):
    run_case(rows_for(n), n, dtype, center)


@pytest.mark.parametrize("n", [255, 1024, 4099, 65536])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_strided_rows(center, dtype, n):
    run_case(rows_for(n), n, dtype, center, strided=True)


@pytest.mark.parametrize("n", [3, 1024, 8192, 262144])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_residual(center, dtype, n):
    run_case(rows_for(n), n, dtype, center, residual=True)


@pytest.mark.parametrize("n", [255, 4096, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_offset_and_grad_sum(dtype, n):
    run_case(rows_for(n), n, dtype, False, offset=1.0, grad_sum=True)
    run_case(rows_for(n), n, dtype, True, offset=0.5, grad_sum=True, residual=True)


# Statistics columns that end inside a 16-byte vector (p = 0.1 mostly) take the vector kernels'
# per-element column test. Backward rows: 16384 in one 512-thread CTA (bf16) or a cluster of two
# (fp32); 32768 in a cluster of two 512-thread CTAs (bf16) or of eight 256-thread CTAs (fp32); 65536
# and 262144 in clusters of 256-thread CTAs. Forward rows of 1024 threads (fp32 16384, bf16 32768):
# one 512-thread CTA at 8 vectors on an H100 (`fwd_row_deep`), a 512-thread CTA over two tiles elsewhere.
@pytest.mark.parametrize("n", [7, 1000, 4096, 16384, 32768, 65536, 262144])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_partial_rms(dtype, p, n):
    run_case(rows_for(n), n, dtype, False, p=p)


# An fp32 output's gradient is read as fp32 (16-bit rows: the kernels of fp32 gradients). 4099:
# scalar accesses; 65536: a cluster; 262144: split rows (LayerNorm), 1 << 20: split (RMSNorm too).
@pytest.mark.parametrize("n", [1024, 4099, 16384, 65536, 262144, 1 << 20])
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_fp32_gradients_of_16_bit_rows(center, n):
    m = min(rows_for(n), 67)
    run_case(m, n, torch.bfloat16, center, out_dtype=torch.float32, param_dtype=torch.float32)
    run_case(m, n, torch.float16, center, out_dtype=torch.float32, residual=True, grad_sum=True)
    run_case(m, n, torch.bfloat16, center, out_dtype=torch.float32, strided=True, weight=False)
    # The fp32 gradient is not rounded to 16 bits on the way (the bound above is too loose to tell):
    # dweight as the fp32 kernels give it on x widened (rounding dy first moves it by ~2^-9), dx
    # within its one rounding to bf16.
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    dy, w = torch.randn(m, n, device="cuda"), torch.randn(n, device="cuda")
    op = backward_op(center)
    dx, dw, _ = op(dy, x, w, None, EPS)
    dx_wide, dw_wide, _ = op(dy, x.float(), w, None, EPS)
    torch.testing.assert_close(dw, dw_wide, rtol=1e-4, atol=1e-4 * dw_wide.abs().max().item())
    bound = torch.finfo(torch.bfloat16).eps * dx_wide.abs() + 1e-5 * dx_wide.abs().max()
    assert ((dx.float() - dx_wide).abs() <= bound).all()


@pytest.mark.parametrize("n", [1024, 4099, 12288, 65536, 262144])
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_16_bit_output_and_gradient_of_fp32_rows(center, n):
    """autocast's fp32 norms, whose output a projection casts (normpass.fold_casts folds the casts):
    a 16-bit output and a 16-bit gradient on fp32 rows, resident, in clusters and split."""
    m = min(rows_for(n), 67)
    run_case(m, n, torch.float32, center, out_dtype=torch.bfloat16)
    run_case(m, n, torch.float32, center, out_dtype=torch.float16, residual=True, grad_sum=True)
    run_case(m, n, torch.float32, center, out_dtype=torch.bfloat16, strided=True, weight=False)
    # Exactly the casts folded: the fp32 output rounded once, the gradient widened losslessly; and
    # by normpass's kernels alone (no cast or copy kernel around them).
    x, w, ds = (
        torch.randn(m, n, device="cuda"),
        torch.randn(n, device="cuda"),
        torch.randn(m, n, device="cuda"),
    )
    stats = ops.norm_with_stats(x, None, w, None, EPS, center=center)[2]
    op = backward_op(center)

    def norm(**kw):
        return ops.layer_norm(x, w, None, EPS, **kw) if center else ops.rms_norm(x, w, EPS, **kw)

    for dtype in (torch.bfloat16, torch.float16):
        with only_normpass_kernels():
            y = norm(out_dtype=dtype)
        assert torch.equal(y, norm().to(dtype))
        dy = torch.randn(m, n, device="cuda").to(dtype)
        for saved, grad_sum in ((None, None), (stats, ds)):
            with only_normpass_kernels():
                read = op(dy, x, w, grad_sum, EPS, None, saved)
            widened = op(dy.float(), x, w, grad_sum, EPS, None, saved)
            for name, e, o in zip(("dx", "dweight", "dbias"), widened, read, strict=True):
                assert torch.equal(e, o), f"{name} ({dtype}, saved={saved is not None})"


@pytest.mark.parametrize("n", [1001, 4096, 12288, 65536, 262144])
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_16_bit_residual_of_fp32_rows(center, n):
    """autocast's residual add, fp32 stream + a 16-bit projection: the kernels widen the residual as
    they load it (resident, cluster and tiled rows; 1001 and a strided residual: scalar loads), with
    the bits of the widened residual and of eager's promoted sum, and no cast kernel."""
    m = min(rows_for(n), 67)
    x, w, b = (torch.randn(m, n, device="cuda"), torch.randn(n, device="cuda"), torch.randn(n, device="cuda"))
    b = b if center else None
    for dtype in (torch.bfloat16, torch.float16):
        dense, odd, wide = (torch.randn(m, k, device="cuda").to(dtype) for k in (n, n + 3, n + 8))
        # odd: rows of n + 3 (scalar loads); wide[:, 4:]: 8-byte vectors at 8, not 16, bytes'
        # alignment, rows of n + 8 (vector loads of another row stride than n)
        for r in (dense, odd[:, :n], wide[:, 4 : n + 4]):
            for out_dtype in (None, dtype):  # the output's cast folded too, as under autocast
                with only_normpass_kernels():
                    got = ops.norm_with_stats(x, r, w, b, EPS, center=center, out_dtype=out_dtype)
                # The widened residual in r's layout: scalar rows reduce in another order than
                # vector rows, so only the same access path gives the same bits.
                r32 = torch.empty_strided(r.shape, r.stride(), device="cuda").copy_(r)
                wide = ops.norm_with_stats(x, r32, w, b, EPS, center=center, out_dtype=out_dtype)
                for name, e, o in zip(("out", "sum", "stats"), wide, got, strict=True):
                    assert torch.equal(e, o), f"{name} ({dtype}, {out_dtype}, stride {r.stride(0)})"
                assert torch.equal(got[1], x + r)


@contextlib.contextmanager
def only_normpass_kernels():
    """Asserts that the CUDA kernels launched inside are normpass's (and fills or memsets: a split
    row's counters start at zero), with no cast or copy among them. Not under compute-sanitizer
    (NORMPASS_NO_PROFILER=1), where the profiler sees no kernels."""
    if os.environ.get("NORMPASS_NO_PROFILER") == "1":
        warnings.warn("NORMPASS_NO_PROFILER=1: the launched kernels are not checked", stacklevel=3)
        yield
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    zeroing = ("FillFunctor", "Memset")
    assert kernels and all("normpass" in k or any(z in k for z in zeroing) for k in kernels), kernels


@pytest.mark.parametrize("n", [1024, 5000, 65536])
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_fp32_params_bf16_input(center, n):
    run_case(rows_for(n), n, torch.bfloat16, center, param_dtype=torch.float32)
    run_case(rows_for(n), n, torch.float16, center, param_dtype=torch.float32, residual=True)


@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_params_of_another_16_bit_dtype(center):
    """bf16 weights on fp32 or fp16 rows run as fp32 weights; dweight comes back in bf16."""
    run_case(rows_for(4096), 4096, torch.float32, center, param_dtype=torch.bfloat16)
    run_case(rows_for(4096), 4096, torch.float16, center, param_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_split_rows_accumulate(center, dtype):
    # Rows whose partials would cost a cluster occupancy run split over CTAs (meeting in one
    # cooperative launch); more rows than groups of CTAs, so each group's partials add up several rows.
    run_case(67, 1 << 20, dtype, center)


# Split rows of more CTAs than run at once (512 of 256 threads; an H100/H200 holds ~264) cannot meet
# in one launch: their two phases run as two launches.
@pytest.mark.parametrize("dtype, n", [(torch.float32, 1 << 21), (torch.bfloat16, 1 << 22)], ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
def test_split_rows_in_two_launches(center, dtype, n):
    run_case(5, n, dtype, center)


@pytest.mark.parametrize("n", [1024, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_far_from_zero(dtype, n):
    # Rows whose mean is 64x their spread: the shifted moments must stay as accurate as torch's.
    run_case(rows_for(n), n, dtype, True, x_mean=64.0)
    run_case(rows_for(n), n, dtype, True, x_mean=64.0, residual=True, grad_sum=True)


@pytest.mark.parametrize("n", [65536, 65537, 1 << 20])  # 65537: scalar accesses
@pytest.mark.parametrize("residual", [False, True], ids=["x", "x+r"])
def test_rows_starting_far_from_their_mean(residual, n):
    # The first element 6 standard deviations out. LayerNorm's one-pass moments are shifted by the
    # mean of the row's first 8 elements; a shift by x[0] alone lost 37x the sums' rounding error.
    run_case(rows_for(n), n, torch.float32, True, first=6.0, residual=residual)


# Forward rows of exactly 1024 threads at 4 vectors run on an H100 in one 512-thread CTA at 8 vectors
# (`fwd_row_deep`), elsewhere over two tiles (LayerNorm) or in one 1024-thread CTA (RMSNorm): fp32
# 16384 and 16-bit 32768 full, fp32 16380 and 16-bit 32760 with the last thread's vectors ragged.
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
@pytest.mark.parametrize(
    "dtype, n",
    [(torch.float32, 16384), (torch.float32, 16380), (torch.bfloat16, 32768), (torch.float16, 32760)],
    ids=str,
)
def test_rows_of_two_ctas(dtype, n, center):
    m = rows_for(n)
    run_case(m, n, dtype, center)
    run_case(m, n, dtype, center, param_dtype=torch.float32, strided=True)
    run_case(m, n, dtype, center, weight=False, x_mean=3.0)
    if dtype != torch.float32:
        run_case(m, n, dtype, center, out_dtype=torch.float32)


# Backward rows: 16384 in one 512-thread CTA, 32768 in a cluster of two, 65536 in a cluster of eight
# 256-thread CTAs; 12289 (scalar accesses, 1537 threads) in a cluster of seven.
@pytest.mark.parametrize("n", [64, 4096, 12289, 16384, 32768, 65536])
def test_variants(n):
    m = rows_for(n)
    run_case(m, n, torch.bfloat16, False, weight=False)  # no weight
    run_case(m, n, torch.bfloat16, False, bias=True)  # RMSNorm with bias
    run_case(m, n, torch.bfloat16, True, weight=False, bias=True)  # LayerNorm, bias only
    run_case(m, n, torch.bfloat16, True, out_dtype=torch.float32)
    run_case(m, n, torch.bfloat16, False, out_dtype=torch.float16)  # computed in fp32, cast


def test_unaligned_base():
    # A view starting one element in: the kernels must drop to scalar accesses.
    base = torch.randn(65, 1025, device="cuda", dtype=torch.bfloat16)
    x = base.view(-1)[1 : 1 + 64 * 1024].view(64, 1024)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    y = ops.rms_norm(x, w, EPS)
    ref = norm_math(x.double(), w.double(), None, EPS, False, 1024, 0.0)
    theirs = F.rms_norm(x, (1024,), w, EPS)
    check("y", y, theirs, ref, torch.bfloat16)


@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
# 2048 and 3072 (16-bit): several rows per backward CTA, each at its own barrier (LayerNorm), over
# many row blocks per CTA, so the alternating reduction buffers are reused under those barriers.
@pytest.mark.parametrize("n", [1024, 2048, 3072, 16384, 262144, 1 << 20])
def test_dweight_deterministic(center, n):
    m = max(64, (1 << 24) // n)
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    bwd = ops.layer_norm_backward if center else ops.rms_norm_backward
    kw = {} if center else {"p": 1.0}

    def once():
        return bwd(dy, x, w, None, EPS, has_bias=center, normalized_ndim=1, weight_offset=0.0, **kw)

    first = [t.clone() for t in once()]
    for _ in range(3):
        for a, b in zip(first, once(), strict=True):
            assert torch.equal(a, b), "backward is not bitwise deterministic"


# Rows past 2^31 elements (and past 2^31 bytes): their offsets need 64 bits. 4096: rows of one
# 128-thread CTA; 1 << 20: split rows. The rows around each boundary and the last rows against
# float64; dweight and dbias, sums over every row, against a float64 sum taken in chunks.
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
@pytest.mark.parametrize("n", [4096, 1 << 20])
def test_past_2_31_elements(center, n):
    torch.cuda.empty_cache()  # the earlier cases' blocks, which mem_get_info counts as taken
    if torch.cuda.mem_get_info()[0] < 48 << 30:
        pytest.skip("needs 48 GiB of free GPU memory")
    dtype = torch.bfloat16
    m = (1 << 31) // n + 3
    x = torch.randn(m, n, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    w = (1 + 0.5 * torch.randn(n, device="cuda")).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if center else None
    kw = dict(normalized_ndim=1, weight_offset=0.0)
    y, _, stats = ops.norm_with_stats(x, None, w, b, EPS, center=center, p=1.0, out_dtype=None, **kw)
    backward = ops.layer_norm_backward if center else ops.rms_norm_backward
    dx, dw, db = backward(
        dy, x, w, None, EPS, None, stats, has_bias=center, **kw, **({} if center else {"p": 1.0})
    )
    assert x.numel() > 1 << 31 and y.shape == x.shape

    edges = [(1 << 30) // n, (1 << 31) // n]
    rows = sorted({0, m - 1, m - 2} | {e + d for e in edges for d in (-1, 0, 1)})
    rows = torch.tensor(rows, device="cuda")
    xs, dys = x[rows], dy[rows]
    y_ref, _, dx_ref, _, _ = reference(xs, None, w, b, dys, None, EPS, center, n, 0.0)
    y_t, dx_t, _, _ = torch_side(xs, None, w, b, dys, None, EPS, center, n, 0.0, native=True)
    check("y", y[rows], y_t, y_ref, dtype)
    check("dx", dx[rows], dx_t, dx_ref, dtype)
    del y, dx

    dw_ref, dw_terms = torch.zeros(n, device="cuda", dtype=torch.float64), 0
    db_ref, db_terms = torch.zeros_like(dw_ref), 0
    chunk = max(1, (1 << 25) // n)
    for i in range(0, m, chunk):
        dy64 = dy[i : i + chunk].double()
        g = dy64 * norm_math(x[i : i + chunk].double(), None, None, EPS, center, n, 0.0)
        dw_ref, dw_terms = dw_ref + g.sum(0), dw_terms + g.abs().sum(0)
        db_ref, db_terms = db_ref + dy64.sum(0), db_terms + dy64.abs().sum(0)
    _, _, dw_t, db_t = torch_side(x, None, w, b, dy, None, EPS, center, n, 0.0, native=True)
    check("dweight", dw, dw_t, dw_ref, dtype, terms=dw_terms)
    if center:
        check("dbias", db, db_t, db_ref, dtype, terms=db_terms)


# 262144: LayerNorm's rows split over CTAs (one cooperative launch)
@pytest.mark.parametrize("n, m", [(4096, 512), (262144, 16)])
def test_cuda_graph_capture(n, m):
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    dy = torch.randn_like(x)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)

    def step():
        y, s = ops.add_layer_norm(x, r, w, b, EPS)
        dx, dw, db = ops.layer_norm_backward(
            dy, s, w, None, EPS, has_bias=True, normalized_ndim=1, weight_offset=0.0
        )
        z = ops.rms_norm(x, w, EPS)
        dz = ops.rms_norm_backward(
            dy, x, w, None, EPS, has_bias=False, normalized_ndim=1, weight_offset=0.0, p=1.0
        )
        return y, s, dx, dw, db, z, *dz

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):  # fresh inputs, then replay
        for t in (x, r, dy, w, b):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for c, e in zip(captured, eager, strict=True):
            if c.numel():
                assert torch.equal(c, e), "graph replay differs from eager call"


@pytest.mark.parametrize("terms", [1, 2, 3])  # 3: more than the kernel sums, added up front
# 4099: the scalar (unaligned) path; 12288: fp32 rows on 3 x 256; 262144: rows walked in two tiles
@pytest.mark.parametrize("n", [1024, 4099, 12288, 16384, 262144])
@pytest.mark.parametrize("center", [False, True], ids=["rms", "ln"])
@pytest.mark.parametrize("saved", [False, True], ids=["recomputed", "saved"])
@pytest.mark.parametrize(
    "x_dtype, grad_dtype",
    # bf16 terms of fp32 rows: autocast's casts of an fp32 norm's output, summed in fp32
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
    ],
    ids=str,
)
def test_extra_grad_outs(center, n, terms, saved, x_dtype, grad_dtype):
    """The backward sums the output's gradient terms as it loads them, in the wider of their dtype
    and x's: the same bits as summing first, with no other kernel where the kernel sums them. With
    saved statistics also a grad_sum (a residual norm's backward, as in a Llama step)."""
    m = rows_for(n)
    x = torch.randn(m, n, device="cuda", dtype=x_dtype)
    ds = torch.randn(m, n, device="cuda", dtype=x_dtype) if saved else None
    dy = torch.randn(m, n, device="cuda", dtype=grad_dtype)
    w = torch.randn(n, device="cuda", dtype=x_dtype)
    extra = [torch.randn(m, n, device="cuda", dtype=grad_dtype) for _ in range(terms)]
    summed = dy.to(torch.promote_types(x_dtype, grad_dtype))
    for term in extra:
        summed = summed + term
    op = backward_op(center)
    stats = ops.norm_with_stats(x, None, w, None, EPS, center=center)[2] if saved else None
    expected = op(summed, x, w, ds, EPS, None, stats)
    in_kernel = terms < 3 and grad_dtype != torch.float32
    with only_normpass_kernels() if in_kernel else contextlib.nullcontext():
        got = op(dy, x, w, ds, EPS, extra, stats)
    for name, e, o in zip(("dx", "dweight", "dbias"), expected, got, strict=True):
        assert torch.equal(e, o), name


def test_misaligned_stats():
    """Statistics whose rows are not 8-byte aligned are copied first, not read misaligned."""
    m, n = 33, 1024
    x, dy = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    stats = ops.norm_with_stats(x, None, w, None, EPS, center=True)[2]
    odd = torch.empty(2 * m + 1, device="cuda")[1:].view(m, 2)  # 4 bytes past an 8-byte boundary
    odd.copy_(stats)
    kw = dict(has_bias=True, normalized_ndim=1, weight_offset=0.0)
    want = ops.layer_norm_backward(dy, x, w, None, EPS, None, stats, **kw)
    got = ops.layer_norm_backward(dy, x, w, None, EPS, None, odd, **kw)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
