"""sinkgd_cpu.py's kernel against sinkgd.py's fast form (its definition), entrywise, over generated shapes, scales,
zero rows and columns and thread counts; and SinkGD's choice of it."""
import collections
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sinkgd_cpu
from sinkgd import SinkGD, prescale, row_abs_max, sr_sinkhorn

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-13}


def kernel_X(G, num_iters, threads=None):
    """X as the kernel makes it: the update of W = 0 with lr 1 is -X, exactly."""
    W = torch.zeros_like(G)
    workspace = torch.full((G.shape[-2] * G.shape[-1],), float("nan"), dtype=G.dtype)  # read before written: NaN
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        sinkgd_cpu.step(G, W, workspace, num_iters, lr=1.0, weight_decay=0.0)
    finally:
        torch.set_num_threads(before)
    return -W


@st.composite
def gradients(draw):
    """A stack of gradients (count, m, n) with rows and columns at scales 1e-30 to 1e30 and some of them zero."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    count, m, n = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 80))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    G = torch.randn(count, m, n, generator=gen, dtype=torch.float64)
    G *= 10.0 ** (draw(st.integers(-30, 30)) + 3 * torch.randn(count, m, 1, generator=gen, dtype=torch.float64))
    G *= 10.0 ** torch.randn(count, 1, n, generator=gen, dtype=torch.float64)
    G[:, torch.rand(m, generator=gen) < draw(st.sampled_from([0.0, 0.2]))] = 0  # zero rows
    G[..., torch.rand(n, generator=gen) < draw(st.sampled_from([0.0, 0.2]))] = 0  # zero columns
    return G.to(dtype)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # the same cases on every run
@given(G=gradients(), num_iters=st.integers(1, 6), threads=st.integers(1, 3))
def test_kernel_equals_the_eager_fast_form(G, num_iters, threads):
    """Entrywise (float32 1e-6, float64 1e-13), zeros exactly where the fast form has them, at any thread count (the
    kernel cuts the rows into one block per thread)."""
    X = sr_sinkhorn(G, num_iters)
    out = kernel_X(G, num_iters, threads)
    assert torch.equal(out == 0, X == 0)
    torch.testing.assert_close(out, X, rtol=TOLERANCE[G.dtype], atol=TOLERANCE[G.dtype])


def extreme_gradients():
    """sinkgd.py's hard cases: float32's largest and smallest next to 1, entries spanning 26 orders of magnitude
    (some below the threshold, where the gauge keeps u and v finite), and float64's 2^-511 threshold."""
    big, tiny = torch.finfo(torch.float32).max / 4, torch.finfo(torch.float32).tiny
    yield torch.tensor([[big, -big, 1.0, tiny], [1e-30, 2e-30, -1e-30, 0.0], [big, tiny, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    for spread in (5.0, 20.0, 60.0):
        for _ in range(20):
            m, n = torch.randint(1, 12, (2,), generator=gen).tolist()
            g = torch.randn(m, n, generator=gen, dtype=torch.float64)
            yield (g * torch.exp(spread * torch.rand(m, n, generator=gen, dtype=torch.float64) - spread)).float()
    g = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    g[0, 2], g[1, 3] = 0.5 * 2.0**-511 * g[0].abs().max(), 4 * 2.0**-511 * g[1].abs().max()
    yield g


@pytest.mark.parametrize("num_iters", [1, 5, 50])
def test_kernel_equals_the_eager_fast_form_at_the_extremes(num_iters):
    for G in extreme_gradients():
        X = sr_sinkhorn(G, num_iters)
        out = kernel_X(G, num_iters)
        assert torch.isfinite(out).all() and torch.equal(out == 0, X == 0)
        torch.testing.assert_close(out, X, rtol=TOLERANCE[G.dtype], atol=TOLERANCE[G.dtype])


@pytest.mark.parametrize("shape", [(1376, 512), (512, 1376), (768, 768)])
def test_kernel_equals_the_eager_fast_form_on_a_models_matrices(shape):
    """llama_60m's and llama_130m's shapes: long rows and columns sum many terms in another order than torch's."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    torch.testing.assert_close(kernel_X(G, 5), sr_sinkhorn(G, 5), rtol=1e-6, atol=1e-6)


def test_the_workspace_ends_holding_the_last_matrixs_B():
    """B = (G / row max)^2 with the entries below the normal range zero: sinkgd.prescale's, bitwise."""
    for G in extreme_gradients():
        workspace = torch.empty(G.numel(), dtype=G.dtype)
        sinkgd_cpu.step(G, torch.zeros_like(G), workspace, 1, lr=1.0, weight_decay=0.0)
        assert torch.equal(workspace.view(G.shape), prescale(G, row_abs_max(G)[..., None]))


def test_the_update_is_sinkgds_with_decoupled_weight_decay():
    """W <- (1 - lr wd) W - lr X, as SinkGD's eager step writes it (float64: to its rounding)."""
    gen = torch.Generator().manual_seed(1)
    G, W = torch.randn(2, 9, 13, generator=gen, dtype=torch.float64), torch.randn(2, 9, 13, generator=gen,
                                                                                  dtype=torch.float64)
    expected = (1 - 0.1 * 0.3) * W - 0.1 * sr_sinkhorn(G, 3)
    sinkgd_cpu.step(G, W, torch.empty(9 * 13, dtype=torch.float64), 3, lr=0.1, weight_decay=0.3)
    torch.testing.assert_close(W, expected, rtol=1e-15, atol=1e-15)


def test_bad_input_is_refused():
    G = torch.randn(4, 5)
    for W, workspace in [(torch.zeros(5, 4), torch.empty(20)), (torch.zeros(4, 5).double(), torch.empty(20)),
                         (torch.zeros(4, 5), torch.empty(19)), (torch.zeros(5, 4).T, torch.empty(20))]:
        with pytest.raises(ValueError, match="sinkgd_cpu.step takes"):
            sinkgd_cpu.step(G, W, workspace, 5, 0.1, 0.0)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def bmm_count(make, dtype=torch.float32):
    params = [nn.Parameter(torch.zeros(8, 6, dtype=dtype)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=dtype)
    opt = make(params)
    with Ops() as counter:
        opt.step()
    return counter.ops["aten.bmm.default"]


def test_sinkgd_steps_in_the_kernel_where_it_applies():
    """By default the CPU steps float32 and float64 row-major matrices in the kernel (no product through torch); with
    cpu_kernel=False, bf16 weights or transposed=True (column-major views) the eager fast form."""
    assert bmm_count(lambda ps: SinkGD(ps)) == 0
    assert bmm_count(lambda ps: SinkGD(ps, cpu_kernel=True), torch.float64) == 0
    assert bmm_count(lambda ps: SinkGD(ps, cpu_kernel=False)) == 2 * 5
    assert bmm_count(lambda ps: SinkGD(ps), torch.bfloat16) == 2 * 5
    assert bmm_count(lambda ps: SinkGD(ps, transposed=True)) == 2 * 5


def test_a_kernel_that_does_not_build(monkeypatch):
    """No compiler: by default a warning and the eager step, the same update; cpu_kernel=True: the build's error, when
    the optimizer is made."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    params = [nn.Parameter(torch.zeros(8, 6)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(p.shape)
    expected = [-1e-2 * sr_sinkhorn(p.grad) for p in params]
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    sinkgd_cpu._kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="did not build .*; SinkGD steps with the eager fast form"):
            SinkGD(params, lr=1e-2).step()
        assert all(torch.equal(p.detach(), x) for p, x in zip(params, expected))
        with pytest.raises(RuntimeError, match="did not build: Error building extension: c\\+\\+: not found"):
            SinkGD(params, lr=1e-2, cpu_kernel=True)  # at construction, before any step
    finally:
        sinkgd_cpu._kernel.cache_clear()


def test_the_kernel_computes_sinkgds_fast_form_as_it_is():
    """sinkgd.py's fast form and update are the ones the kernel was written for. An edit of them fails this test: check
    that the kernel computes the edited form, then update sinkgd_cpu.FAST_FORM."""
    assert sinkgd_cpu.follows_fast_form()


def test_an_edited_fast_form_steps_eagerly(monkeypatch):
    """sinkgd.sinkhorn edited (README: the one place to change the algorithm): SinkGD follows the edit, eagerly, and
    says so; the kernel would silently keep the old algorithm. End to end: tests/test_deepspeed.py's edit test."""
    import sinkgd

    def edited(sums, v, n, m, num_iters):  # the paper's iterations, then the rows normalized once more
        u, v = original(sums, v, n, m, num_iters)
        return torch.div(n, sums.rows(v)).nan_to_num_(posinf=0.0), v

    original = sinkgd.sinkhorn
    monkeypatch.setattr(sinkgd, "sinkhorn", edited)
    with pytest.warns(UserWarning, match="fast form is not the one the kernel computes"):
        assert bmm_count(lambda ps: SinkGD(ps)) == 2 * 5 + 1


@st.composite
def partitions(draw):
    """Matrices end to end in one flat buffer, then padding, cut over 1 to 6 ranks at arbitrary offsets (as ZeRO
    cuts them; a rank may hold nothing of a matrix, or nothing at all)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    shapes = draw(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mats = [torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (4 * torch.randn(s[0], 1, generator=gen))
            for s in shapes]
    if draw(st.booleans()):
        mats[0][0] = 0  # a zero row
    flat = torch.cat([g.reshape(-1) for g in mats] + [torch.zeros(draw(st.integers(0, 5)), dtype=torch.float64)])
    num_ranks = draw(st.integers(1, 6))
    cuts = sorted(draw(st.lists(st.integers(0, flat.numel()), min_size=num_ranks - 1, max_size=num_ranks - 1)))
    return mats, flat.to(dtype), [0, *cuts, flat.numel()], draw(st.integers(1, 5))


def zero_step(mats, flat_grad, cuts, num_iters, weights, lr, weight_decay, kernel_on, whole_matrices=True):
    """Each simulated rank steps its partition of `weights` (flat) in place, by ZeroSinkGD's kernel or eager path."""
    from test_sinkgd import run_ranks

    from sinkgd_zero import Partition, Piece, sr_sinkhorn_sharded
    starts = [0, *torch.tensor([g.numel() for g in mats]).cumsum(0).tolist()]

    def rank_fn(rank, all_reduce):
        lo, hi = cuts[rank], cuts[rank + 1]
        pieces = [Piece(tuple(g.shape), max(lo, a) - a, max(lo, a) - lo, min(hi, b) - max(lo, a))
                  if max(lo, a) < min(hi, b) else Piece(tuple(g.shape), 0, 0, 0)
                  for g, a, b in zip(mats, starts, starts[1:])]
        part = Partition(pieces, None, "cpu", torch.float64)
        flat = nn.Parameter(weights[lo:hi], requires_grad=False)  # a view: stepped in place
        flat.grad = flat_grad[lo:hi]
        workspace = torch.full((hi - lo + 3,), float("nan"), dtype=flat.dtype)
        group = dict(sinkhorn_iters=num_iters, lr=lr, weight_decay=weight_decay)
        if kernel_on:
            optimizer = types.SimpleNamespace(cpu_kernel=None)  # what step_partition reads of ZeroSinkGD
            assert sinkgd_cpu.step_partition(optimizer, flat, part, group, all_reduce, workspace, whole_matrices)
        else:
            X = sr_sinkhorn_sharded(flat.grad, part, num_iters, all_reduce, out=workspace)
            flat.data.mul_(1 - lr * weight_decay).add_(X, alpha=-lr)
    run_ranks(len(cuts) - 1, rank_fn)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=partitions(), whole_matrices=st.booleans())
def test_zero_partitions_step_in_the_kernel_as_one_process(case, whole_matrices):
    """ZeroSinkGD's kernel path over any cut of the matrices into ranks: each matrix's update equals one process's
    (W <- (1 - lr wd) W - lr X, X from the fast form of the whole matrix) entrywise, the padding stays as it was,
    and the eager sharded path agrees on the matrices. whole_matrices=False: the matrices a rank holds whole go by
    blocks too, as at ZeRO-3."""
    mats, flat, cuts, num_iters = case
    weights0 = torch.randn(flat.shape, dtype=flat.dtype, generator=torch.Generator().manual_seed(1))
    kernel_w, eager_w = weights0.clone(), weights0.clone()
    zero_step(mats, flat, cuts, num_iters, kernel_w, 0.1, 0.3, True, whole_matrices)
    zero_step(mats, flat, cuts, num_iters, eager_w, 0.1, 0.3, False)
    at, tol = 0, TOLERANCE[flat.dtype]
    for g in mats:
        expected = 0.97 * weights0[at:at + g.numel()] - 0.1 * sr_sinkhorn(flat[at:at + g.numel()].view(g.shape),
                                                                          num_iters).reshape(-1)
        torch.testing.assert_close(kernel_w[at:at + g.numel()], expected, rtol=tol, atol=tol)
        at += g.numel()
    assert torch.equal(kernel_w[at:], weights0[at:])  # ZeRO's padding: untouched (eager: decayed, zeros there)
    torch.testing.assert_close(kernel_w[:at], eager_w[:at], rtol=tol, atol=tol)
