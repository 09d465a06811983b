"""SR-Sinkhorn (one matrix, and sharded over ranks as under ZeRO) and SinkGD against an independent float64 reference
and the properties they must have; the paper's split on model.py's and on transformers' LLaMA."""
import collections
import copy
import fnmatch
import math
import re
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model import CONFIGS

from sinkgd import SinkGD, describe_split, sinkgd_param_groups, sr_sinkhorn, sr_sinkhorn_paper
from tools.bench_optimizer import ZeroPathSinkGD, sr_sinkhorn_multinorm, swan, whiten
from sinkgd_zero import Partition, Piece, ZeroSinkGD, all_reduce_over, sr_sinkhorn_sharded, zero_partitions


@pytest.fixture(params=[False, True], ids=["eager", "cpu_kernel"])
def both_cpu_steps(request, monkeypatch):
    """The test twice: SinkGD's eager step (what a GPU runs, here on the CPU) and sinkgd_cpu's C++ kernel (what the
    CPU runs by default; True: it must build). Sets the default of SinkGD's cpu_kernel, its last argument."""
    defaults = SinkGD.__init__.__defaults__
    monkeypatch.setattr(SinkGD.__init__, "__defaults__", (*defaults[:-1], request.param))
    return request.param


def reference(g, num_iters):
    """Alternating normalisation written out naively in numpy float64, one row/column at a time."""
    x = torch.as_tensor(g).double().numpy().copy()
    m, n = x.shape
    for _ in range(num_iters):
        for i in range(m):
            norm = math.sqrt(sum(v * v for v in x[i]))
            x[i] = x[i] * math.sqrt(n) / norm if norm > 0 else 0.0
        for j in range(n):
            norm = math.sqrt(sum(v * v for v in x[:, j]))
            x[:, j] = x[:, j] * math.sqrt(m) / norm if norm > 0 else 0.0
    return torch.from_numpy(x)


def uneven(m, n, seed=0, dtype=torch.float64):
    """A random matrix whose rows and columns have very different scales."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g *= torch.exp(2 * torch.randn(m, 1, generator=gen, dtype=torch.float64))
    g *= torch.exp(2 * torch.randn(1, n, generator=gen, dtype=torch.float64))
    return g.to(dtype)


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_entrywise(out, expected, rtol, atol=0.0):
    """Every entry against its own reference value: exactly zero where the reference is, within rtol of it elsewhere
    (a max-normalised error would leave entries far below the largest unchecked); atol: for expected entries below
    the output dtype's normal range, which round there."""
    out, expected = torch.as_tensor(out).double(), torch.as_tensor(expected).double()
    zero = expected == 0
    assert (out[zero] == 0).all(), out[zero]
    err = ((out - expected).abs() - atol).clamp_min(0) / expected.abs()
    worst = err[~zero].max().item() if (~zero).any() else 0.0
    assert worst < rtol, worst


@pytest.mark.parametrize("num_iters", [1, 2, 5])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (16, 16), (33, 4), (1, 9), (9, 1)])
def test_matches_float64_reference(shape, num_iters):
    g = uneven(*shape, seed=num_iters)
    out = sr_sinkhorn(g, num_iters)
    assert out.dtype == torch.float64
    assert_entrywise(out, reference(g, num_iters), 1e-13)


@pytest.mark.parametrize("num_iters", [1, 5])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (33, 4), (1, 9), (9, 1), (3, 6, 4)])
def test_fast_form_equals_the_paper_form(shape, num_iters):
    """sr_sinkhorn against sr_sinkhorn_paper (Alg. 3 as written) entrywise in float64, zero rows and columns
    included; and the paper form against the independent reference, so neither is checked only by the other."""
    g = torch.stack([uneven(*shape[-2:], seed=k) for k in range(math.prod(shape[:-2]))]).view(shape)
    if min(shape[-2:]) > 1:
        g[..., 1, :] = 0  # a zero row
        g[..., :, -1] = 0  # a zero column
    fast, paper = sr_sinkhorn(g, num_iters), sr_sinkhorn_paper(g, num_iters)
    assert_entrywise(fast, paper, 1e-13)
    for x, matrix in zip(paper.view(-1, *shape[-2:]), g.view(-1, *shape[-2:])):
        assert_entrywise(x, reference(matrix, num_iters), 1e-13)


def test_multinorm_instance_matches_reference():
    g = uneven(12, 20)
    x = sr_sinkhorn_multinorm(g, num_iters=3)
    assert rel_err(x, reference(g, 3)) < 1e-12


def test_fixed_point_has_the_target_norms():
    m, n = 24, 40
    x = sr_sinkhorn(uneven(m, n, seed=3), num_iters=100)
    np.testing.assert_allclose(x.norm(dim=1), math.sqrt(n), rtol=1e-6)
    np.testing.assert_allclose(x.norm(dim=0), math.sqrt(m), rtol=1e-6)
    # and it is a fixed point: more iterations change nothing
    assert rel_err(sr_sinkhorn(x, 5), x) < 1e-6


def test_last_step_normalises_columns():
    m, n = 6, 11
    x = sr_sinkhorn(uneven(m, n, seed=4), num_iters=1)
    np.testing.assert_allclose(x.norm(dim=0), math.sqrt(m), rtol=1e-12)
    assert np.abs(x.norm(dim=1).numpy() - math.sqrt(n)).max() > 1e-3  # rows are not yet exact


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 7.5, 1e6, 1e30])
def test_invariant_to_positive_scaling(scale):
    g = uneven(10, 14, seed=5)
    assert rel_err(sr_sinkhorn(scale * g), sr_sinkhorn(g)) < 1e-12


def test_keeps_signs():
    g = uneven(9, 13, seed=6)
    assert torch.equal(torch.sign(sr_sinkhorn(g)), torch.sign(g))


def test_vectors_come_out_as_signs():
    # 1 x n: each column has one entry, normalised to |1|; m x 1 likewise after the row step.
    g = uneven(1, 8)
    torch.testing.assert_close(sr_sinkhorn(g), torch.sign(g), rtol=1e-15, atol=0)
    torch.testing.assert_close(sr_sinkhorn(g.T), torch.sign(g.T), rtol=1e-15, atol=0)


def test_zero_rows_and_columns_stay_zero():
    g = uneven(8, 10, seed=7)
    g[2] = 0
    g[:, [0, 7]] = 0
    out = sr_sinkhorn(g)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all() and (out[:, [0, 7]] == 0).all()
    assert_entrywise(out, reference(g, 5), 1e-13)
    assert (sr_sinkhorn(torch.zeros(4, 3)) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_input_is_computed_in_float32(dtype):
    g = uneven(20, 30, seed=8, dtype=dtype)
    out = sr_sinkhorn(g)
    assert out.dtype == torch.float32
    assert_entrywise(out, reference(g.double(), 5), 1e-5)


THRESHOLD = 2.0**-63  # sr_sinkhorn's docstring: entries at most this times their row's largest magnitude count as 0


def below_threshold_zeroed(g, dtype=torch.float32):
    """g with the entries that sr_sinkhorn documents as left out of the sums set to zero (their squares)."""
    row_max = g.abs().amax(dim=1, keepdim=True)
    return torch.where((g / row_max) ** 2 > torch.finfo(dtype).tiny, g, 0.0)


def documented(g, num_iters, dtype=torch.float32):
    """sr_sinkhorn's documented result in float64: Alg. 3's row and column scalings of g with the entries below the
    threshold zeroed (each step's factors multiplied up, one row or column at a time), applied to g itself: those
    entries are scaled as their row and column are."""
    x = below_threshold_zeroed(g.double(), dtype).numpy().copy()
    m, n = x.shape
    r, c = np.ones(m), np.ones(n)
    for _ in range(num_iters):
        for i in range(m):
            norm = math.sqrt(sum(v * v for v in x[i]))
            f = math.sqrt(n) / norm if norm > 0 else 0.0
            x[i], r[i] = x[i] * f, r[i] * f
        for j in range(n):
            norm = math.sqrt(sum(v * v for v in x[:, j]))
            f = math.sqrt(m) / norm if norm > 0 else 0.0
            x[:, j], c[j] = x[:, j] * f, c[j] * f
    return torch.from_numpy(r[:, None] * g.double().numpy() * c[None, :])


FLOAT32_TINY = torch.finfo(torch.float32).tiny


def test_entries_below_the_documented_threshold_are_left_out_of_the_sums():
    g = uneven(9, 12, seed=13)
    row_max = g.abs().amax(dim=1)
    g[0, 3] = 0.5 * THRESHOLD * row_max[0]  # below: out of the sums, scaled as its row and column
    g[1, 4] = -4 * THRESHOLD * row_max[1]  # above: kept
    g[:, 7] = 1e-3 * THRESHOLD * row_max * torch.sign(g[:, 7])  # a whole column below: a zero column, not sqrt(m)
    g = g.float()
    zeroed = below_threshold_zeroed(g.double())
    assert zeroed[0, 3] == 0 and zeroed[1, 4] != 0 and (zeroed[:, 7] == 0).all()
    for num_iters in (1, 5):
        out = sr_sinkhorn(g, num_iters)
        expected = documented(g, num_iters)
        assert (expected[:, 7] == 0).all() and expected[0, 3] != 0
        assert_entrywise(out, expected, 1e-5, atol=FLOAT32_TINY)
        # the kept entries are Alg. 3 of the matrix with those entries zero
        kept = zeroed != 0
        assert_entrywise(out[kept], reference(zeroed, num_iters)[kept], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_finite_input_follows_the_documented_result(dtype):
    big, tiny = torch.finfo(dtype).max / 4, torch.finfo(dtype).tiny
    g = torch.tensor([[big, -big, 1.0, tiny], [1e-30, 2e-30, -1e-30, 0.0], [big, tiny, 0.0, 1.0]]).to(dtype)
    zeroed = below_threshold_zeroed(g.double())
    assert (zeroed[[0, 2], 2:] == 0).all() and zeroed[2, 1] == 0  # 1 and tiny next to big: below the threshold
    for num_iters in (1, 5, 50):
        out = sr_sinkhorn(g, num_iters)
        assert torch.isfinite(out).all()
        assert_entrywise(out, documented(g, num_iters), 1e-5, atol=FLOAT32_TINY)
    huge = uneven(6, 5, seed=9) * 1e30
    assert_entrywise(sr_sinkhorn(huge.float()), reference(huge.float().double() / 1e30, 5), 1e-5)


def test_wide_dynamic_range_against_the_reference():
    """Random float32 matrices whose entries span up to 26 orders of magnitude: exact on what the threshold leaves."""
    gen, zeroed = torch.Generator().manual_seed(0), 0
    for spread in (5.0, 20.0, 60.0):
        for _ in range(20):
            m, n = torch.randint(1, 12, (2,), generator=gen).tolist()
            g = torch.randn(m, n, generator=gen, dtype=torch.float64)
            g = (g * torch.exp(spread * torch.rand(m, n, generator=gen, dtype=torch.float64) - spread)).float()
            zeroed += int((below_threshold_zeroed(g.double()) == 0).sum())
            out = sr_sinkhorn(g)
            assert torch.isfinite(out).all()
            assert_entrywise(out, documented(g, 5), 1e-5, atol=FLOAT32_TINY)
    assert zeroed > 10  # the threshold was exercised


def test_float64_threshold_is_2_to_the_minus_511():
    g = uneven(7, 9, seed=21)
    row_max = g.abs().amax(dim=1)
    g[0, 2] = 0.5 * 2.0**-511 * row_max[0]  # squares below float64's normal range: out of the sums
    g[1, 3] = 4 * 2.0**-511 * row_max[1]  # kept, though below float32's threshold by far
    assert below_threshold_zeroed(g, torch.float64)[0, 2] == 0 and below_threshold_zeroed(g, torch.float64)[1, 3]
    assert_entrywise(sr_sinkhorn(g), documented(g, 5, torch.float64), 1e-10)


def test_non_contiguous_input():
    g = uneven(9, 6, seed=10)
    assert not g.T.is_contiguous()
    assert_entrywise(sr_sinkhorn(g.T), reference(g.T, 5), 1e-13)


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="a matrix or a stack of matrices"):
        sr_sinkhorn(torch.ones(5))


# --- stacks: (..., m, n), each trailing matrix on its own ------------------------------------------


def test_stack_is_each_matrix_against_the_reference():
    stack = torch.stack([uneven(7, 5, seed=k) for k in range(6)]).view(2, 3, 7, 5)  # e.g. 2 layers x 3 experts
    out = sr_sinkhorn(stack, 4)
    assert out.shape == stack.shape
    for i in range(2):
        for j in range(3):
            assert_entrywise(out[i, j], reference(stack[i, j], 4), 1e-10)


def test_changing_one_matrix_of_a_stack_leaves_the_others_alone():
    stack = torch.stack([uneven(9, 6, seed=k, dtype=torch.float32) for k in range(4)])
    scaled = stack.clone()
    scaled[1] = uneven(9, 6, seed=99, dtype=torch.float32) * 1e-20  # another matrix, at another scale
    scaled[2, 3, 4] *= 1e15  # one entry of a third
    a, b = sr_sinkhorn(stack), sr_sinkhorn(scaled)
    assert torch.equal(a[[0, 3]], b[[0, 3]])
    assert not torch.equal(a[2], b[2])


@pytest.mark.usefixtures("both_cpu_steps")
def test_stacked_step_equals_matrix_by_matrix():
    """SinkGD's stacks (same-shape matrices batched) against one matrix at a time and the float64 reference, every
    entry of every update: float64 weights starting at zero and lr 1/2, so that each weight is exactly -X / 2."""
    shapes = [(12, 8)] * 5 + [(8, 12)] * 3 + [(12, 8)]
    runs = []
    for stack_bytes in ({"cpu": 0}, {"cpu": 3 * 12 * 8 * 8}, {"cpu": 2**30}):  # lone, stacks of 3, one stack
        params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
        with_grads(params)
        SinkGD(params, lr=0.5, stack_bytes=stack_bytes).step()
        for p in params:
            assert_entrywise(-2 * p.detach(), reference(p.grad, 5), 1e-13)
        runs.append([p.detach() for p in params])
    for other in runs[1:]:
        assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(runs[0], other))


# --- fragments over ranks -----------------------------------------------------------------------


def run_ranks(num_ranks, fn):
    """Run fn(rank, all_reduce) in one thread per rank, with an all-reduce over the threads."""
    barrier, slots, results = threading.Barrier(num_ranks), [None] * num_ranks, [None] * num_ranks

    def all_reduce_for(rank):
        def all_reduce(t, op):
            slots[rank] = t.clone()
            barrier.wait(timeout=60)  # a rank that skips a collective breaks the barrier instead of hanging
            stacked = torch.stack(slots)
            t.copy_(stacked.sum(0) if op == "sum" else stacked.amax(0))
            barrier.wait(timeout=60)
        return all_reduce

    def target(rank):
        results[rank] = fn(rank, all_reduce_for(rank))

    threads = [threading.Thread(target=target, args=(k,)) for k in range(num_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a simulated rank hung"
    return results


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 5])
def test_sharded_equals_whole_matrix(num_ranks):
    # Matrices laid end to end in one flat buffer, then alignment padding, cut at arbitrary offsets as ZeRO does.
    shapes = [(7, 5), (3, 11), (1, 4), (6, 1), (4, 4)]
    mats = [uneven(m, n, seed=k) for k, (m, n) in enumerate(shapes)]
    mats[4][1] = 0  # a zero row, which some ranks hold no part of
    starts = [0] + np.cumsum([g.numel() for g in mats]).tolist()
    flat = torch.cat([g.reshape(-1) for g in mats] + [torch.full((9,), 7.0, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(num_ranks)
    cuts = [0] + sorted(torch.randint(0, flat.numel() + 1, (num_ranks - 1,), generator=gen).tolist()) + [flat.numel()]

    def rank_fn(rank, all_reduce):
        lo, hi = cuts[rank], cuts[rank + 1]
        pieces = []
        for k, g in enumerate(mats):
            a, b = max(lo, starts[k]), min(hi, starts[k + 1])
            pieces.append(Piece(tuple(g.shape), a - starts[k], a - lo, b - a) if a < b
                          else Piece(tuple(g.shape), 0, 0, 0))
        part = Partition(pieces, None, "cpu", torch.float64)
        # half the ranks write into a larger workspace full of NaN, as ZeroSinkGD's after another partition's X
        out = torch.full((hi - lo + 3,), math.nan, dtype=torch.float64) if (rank + num_ranks) % 2 else None
        X = sr_sinkhorn_sharded(flat[lo:hi], part, 5, all_reduce, out=out)
        assert out is None or X.data_ptr() == out.data_ptr()
        return X

    whole = torch.cat(run_ranks(num_ranks, rank_fn))
    assert whole.shape == flat.shape
    for k, g in enumerate(mats):
        assert_entrywise(whole[starts[k]:starts[k + 1]].view(g.shape), reference(g, 5), 1e-13)
    assert (whole[starts[-1]:] == 0).all()  # padding gets no update


# --- SWAN ---------------------------------------------------------------------------------------


def polar(x):
    u, _, vt = torch.linalg.svd(x, full_matrices=False)
    return u @ vt


def test_swan_rows_are_standardised_then_whitened():
    g = uneven(8, 32, seed=11)
    x = swan(g, ns_iters=40).double()
    standardised = (g - g.mean(1, keepdim=True)) / g.std(1, correction=0, keepdim=True)
    assert rel_err(x, polar(standardised)) < 1e-4
    np.testing.assert_allclose(x @ x.T, np.eye(8), atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
def test_whiten_is_the_polar_factor(shape):
    g = uneven(*shape, seed=12)
    assert rel_err(whiten(g, ns_iters=60), polar(g)) < 1e-6


# --- the optimizer ------------------------------------------------------------------------------


def with_grads(params, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mats = [nn.Parameter(torch.randn(6, 4, generator=gen)), nn.Parameter(torch.randn(3, 5, generator=gen))]
    vecs = [nn.Parameter(torch.randn(4, generator=gen)), nn.Parameter(torch.randn(2, 3, generator=gen))]
    return mats, vecs


@pytest.mark.usefixtures("both_cpu_steps")
def test_sinkgd_step_is_stateless_and_exact():
    mats, vecs = make_params()
    opt = SinkGD([dict(params=mats, sinkgd=True), dict(params=vecs, sinkgd=False)], lr=0.1)
    before = [p.detach().clone().double() for p in mats]
    with_grads(mats + vecs)
    opt.step()
    for p, w in zip(mats, before):
        expected = w - 0.1 * reference(p.grad.double(), 5)
        assert rel_err(p.detach(), expected) < 1e-6
        assert p not in opt.state
    assert all(p in opt.state for p in vecs)


def test_adamw_groups_are_torch_adamw():
    mats, vecs = make_params()
    ref_vecs = [nn.Parameter(p.detach().clone()) for p in vecs]
    opt = SinkGD([dict(params=vecs, sinkgd=False)], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_vecs, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, fused=True)
    for step in range(4):
        with_grads(vecs, seed=step)
        with_grads(ref_vecs, seed=step)
        opt.step()
        ref.step()
    for p, q in zip(vecs, ref_vecs):
        assert torch.equal(p, q)


@pytest.mark.usefixtures("both_cpu_steps")
def test_weight_decay_is_decoupled():
    mats, _ = make_params()
    opt = SinkGD(mats, lr=0.1, weight_decay=0.5, sinkhorn_iters=2)
    before = [p.detach().clone().double() for p in mats]
    with_grads(mats)
    opt.step()
    for p, w in zip(mats, before):
        assert rel_err(p.detach(), (1 - 0.05) * w - 0.1 * reference(p.grad.double(), 2)) < 1e-6


def test_vector_in_sinkgd_group_fails_at_construction():
    mats, vecs = make_params()
    with pytest.raises(ValueError, match=r"matrices only, got shapes \[\(4,\)\].*sinkgd=False"):
        SinkGD(mats + vecs[:1])


def test_matrices_flattened_or_resized_by_a_wrapper_are_refused():
    """DeepSpeed ZeRO-1/2 (and FSDP1) swap a group's matrices for one flat partition after the optimizer is built;
    SR-Sinkhorn of that (1, N) stack is sign(G). The step raises before anything changes; a resized matrix too."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(3, 6))
    optimizer = SinkGD([a, b], lr=0.1)
    flat = nn.Parameter(torch.cat([a.detach().flatten(), b.detach().flatten()]))
    flat.grad = torch.randn(42)
    optimizer.param_groups[0]["params"] = [flat]
    before = flat.detach().clone()
    with pytest.raises(RuntimeError, match=r"matrices \[\(4, 6\), \(3, 6\)\] became tensors shaped \[\(42,\)\]; "
                                           r"SR-Sinkhorn of flat .* use sinkgd_zero.ZeroSinkGD"):
        optimizer.step()
    assert torch.equal(flat, before)
    optimizer = SinkGD([a], lr=0.1)
    a.data, a.grad = a.data[:2], torch.randn(2, 6)
    with pytest.raises(RuntimeError, match=r"matrices \[\(4, 6\)\] became tensors shaped \[\(2, 6\)\]"):
        optimizer.step()


def test_bad_hyperparameters_fail():
    mats, _ = make_params()
    with pytest.raises(ValueError, match="lr"):
        SinkGD(mats, lr=0.0)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        SinkGD(mats, sinkhorn_iters=0)
    with pytest.raises(ValueError, match=r"weight_decay >= 0; .* weight_decay=-0.1$"):
        SinkGD(mats, weight_decay=-0.1)


@pytest.mark.usefixtures("both_cpu_steps")
def test_params_without_grad_are_skipped():
    mats, vecs = make_params()
    opt = SinkGD([dict(params=mats, sinkgd=True), dict(params=vecs, sinkgd=False)])
    with_grads(mats[:1] + vecs[:1])
    frozen = [mats[1].detach().clone(), vecs[1].detach().clone()]
    opt.step()
    assert torch.equal(mats[1], frozen[0]) and torch.equal(vecs[1], frozen[1])
    assert vecs[1] not in opt.state


@pytest.mark.usefixtures("both_cpu_steps")
def test_non_finite_gradient_raises_and_touches_nothing():
    mats, vecs = make_params()
    opt = SinkGD([dict(params=mats, sinkgd=True), dict(params=vecs, sinkgd=False)])
    with_grads(mats + vecs)
    vecs[1].grad[0, 1] = float("nan")
    before = [p.detach().clone() for p in mats + vecs]
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(mats + vecs, before))


@pytest.mark.usefixtures("both_cpu_steps")
def test_state_dict_round_trip_continues_identically():
    def run(steps, resume_at=None):
        mats, vecs = make_params()
        groups = lambda: [dict(params=mats, sinkgd=True, lr=0.01), dict(params=vecs, sinkgd=False)]
        opt = SinkGD(groups(), lr=0.1)
        for step in range(steps):
            if step == resume_at:
                saved = opt.state_dict()
                opt = SinkGD(groups(), lr=123.0)  # wrong lr on purpose: loading must restore it
                opt.load_state_dict(saved)
            with_grads(mats + vecs, seed=step)
            opt.step()
        return [p.detach().clone() for p in mats + vecs], opt

    straight, _ = run(5)
    resumed, opt = run(5, resume_at=3)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]


def test_state_loads_onto_the_parameters_device():
    """A resume loads the checkpoint to the CPU, then into an optimizer whose parameters are elsewhere (CUDA; here the
    meta device): torch moves exp_avg there but leaves `step` behind unless the group is fused or capturable, and
    fused AdamW then refuses the mix. Every state tensor must follow its parameter."""
    mats, vecs = make_params()
    opt = SinkGD([dict(params=mats, sinkgd=True), dict(params=vecs, sinkgd=False)])
    with_grads(mats + vecs)
    opt.step()
    saved = opt.state_dict()
    moved = [nn.Parameter(torch.empty_like(p, device="meta")) for p in mats + vecs]
    elsewhere = SinkGD([dict(params=moved[:2], sinkgd=True), dict(params=moved[2:], sinkgd=False)])
    elsewhere.load_state_dict(saved)
    assert len(elsewhere.state) == 2 and {k for s in elsewhere.state.values() for k in s} == {
        "step", "exp_avg", "exp_avg_sq"}
    assert all(value.is_meta for state in elsewhere.state.values() for value in state.values())
    assert all(value.device.type == "cpu" for state in saved["state"].values() for value in state.values())


@pytest.fixture
def restore_matmul_precision():
    yield
    torch.set_float32_matmul_precision("highest")


def test_products_follow_the_float32_matmul_precision_as_documented(restore_matmul_precision):
    """SinkGD's docstring: at torch's default "highest" X is Alg. 3 to float32 rounding; a lowered precision leaves
    about 1e-3 in X (bf16 matmuls at "medium" on a CPU with AVX512-BF16 or AMX; TF32 at "high" on CUDA)."""
    g = uneven(96, 64, dtype=torch.float32)
    expected = reference(g, 5)
    assert rel_err(sr_sinkhorn(g), expected) < 1e-5
    torch.set_float32_matmul_precision("medium")
    lowered = rel_err(sr_sinkhorn(g), expected)
    if lowered < 1e-5:
        pytest.skip("this CPU multiplies float32 in float32 at 'medium' too")
    assert lowered < 1e-2


def test_stack_bytes_is_a_number_or_a_dict_per_device_type():
    params = llama_block_matrices("llama_tiny", device="meta")
    ops = {}
    for name, stack_bytes in [("number", 2**20), ("dict", {"meta": 2**20}), ("other device", {"cuda": 2**20})]:
        with OpCounter() as counter:
            SinkGD(params, stack_bytes=stack_bytes).step()
        ops[name] = len(counter.sequence)
    assert ops["number"] == ops["dict"] < ops["other device"]  # a budget for another device: one matrix at a time
    for bad in ["64M", -1, 1.5, True, {"cuda": "64M"}, {"cuda": -1}]:
        with pytest.raises(ValueError, match=r"^stack_bytes must be a number of bytes >= 0 or a dict of them per "
                                             r"device type, e\.g\. \{'cuda': 64 << 20\}; got "):
            SinkGD(params, stack_bytes=bad)


@pytest.mark.usefixtures("both_cpu_steps")
def test_lr_scheduler_drives_the_update():
    mats, _ = make_params()
    opt = SinkGD(mats, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for step in range(3):
        before = [p.detach().clone().double() for p in mats]
        with_grads(mats, seed=step)
        opt.step()
        for p, w in zip(mats, before):
            assert rel_err(p.detach(), w - 0.1 * 0.5 ** step * reference(p.grad.double(), 5)) < 1e-6
        sched.step()


def test_zero_grad_and_add_param_group():
    mats, vecs = make_params()
    opt = SinkGD(mats[:1])
    opt.add_param_group(dict(params=vecs, sinkgd=False, lr=0.5))
    with pytest.raises(ValueError, match="matrices only"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.ones(3))]))
    with_grads(mats[:1] + vecs)
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in mats[:1] + vecs)
    assert opt.param_groups[1]["lr"] == 0.5 and not opt.param_groups[1]["sinkgd"]


# --- the paper's split, on the LLaMA of model.py ---------------------------------------------------


def tiny_llama():
    from model import Llama, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_hidden_layers=2, max_position_embeddings=64)
    return Llama(cfg)


def test_paper_split_puts_embedding_norms_and_head_in_adamw():
    model = tiny_llama()
    groups = sinkgd_param_groups(model, model.model.layers, lr=0.02, alpha=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    sink = sorted(names[id(p)] for p in groups[0]["params"])
    adam = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["sinkgd"] and not groups[1]["sinkgd"]
    assert groups[0]["lr"] == pytest.approx(1e-3) and groups[1]["lr"] == 0.02
    proj = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sink == sorted(f"model.layers.{i}.{p}.weight" for i in range(2) for p in proj)
    assert "lm_head.weight" in adam and "model.embed_tokens.weight" in adam and "model.norm.weight" in adam
    assert len(sink) + len(adam) == len(names)


@pytest.mark.usefixtures("both_cpu_steps")
def test_a_few_steps_lower_the_loss():
    model = tiny_llama()
    opt = SinkGD(sinkgd_param_groups(model, model.model.layers, lr=0.02))
    batch = torch.randint(0, 128, (8, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.5
    assert not opt.state.keys() & set(opt.param_groups[0]["params"])


@pytest.mark.usefixtures("both_cpu_steps")
def test_skip_nonfinite_leaves_everything_and_sets_overflow():
    mats, vecs = make_params()
    opt = SinkGD([dict(params=mats, sinkgd=True), dict(params=vecs, sinkgd=False)], skip_nonfinite=True)
    with_grads(mats + vecs)
    opt.step()  # AdamW state exists from here on
    before = copy.deepcopy(([p.detach().clone() for p in mats + vecs], opt.state_dict()))
    with_grads(mats + vecs, seed=1)
    mats[0].grad[2, 1] = -math.inf
    opt.step()
    assert opt.overflow
    assert all(torch.equal(p, b) for p, b in zip(mats + vecs, before[0]))
    assert_same_state(opt.state_dict(), before[1])
    with_grads(mats + vecs, seed=1)
    opt.step()
    assert not opt.overflow and not torch.equal(mats[0], before[0][0])


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys() and all(assert_same_state(a[k], b[k]) is None for k in a)
    else:
        assert a == b


# --- cost of a step: aten operations and host syncs, counted with a dispatch mode (the same on any device) -------


class OpCounter(TorchDispatchMode):
    """Every aten operation, in order. On the meta device (shapes without data, so llama_1b costs no memory) the
    host's read of a scalar has no value to read: it is recorded and answered with 0."""

    def __init__(self):
        super().__init__()
        self.sequence = []

    @property
    def ops(self):
        return collections.Counter(self.sequence)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        moves = func is torch.ops.aten._to_copy.default and kwargs.get("device", args[0].device) != args[0].device
        self.sequence.append("host copy" if moves else str(func))
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return 0
        return func(*args, **kwargs)


# Operations that make the host wait for the device (or copy host data to it) on a GPU.
WAITS_ON_HOST = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
                 "aten.repeat_interleave.Tensor", "aten.segment_reduce.default", "aten.masked_select.default",
                 "aten._unique2.default", "aten.equal.default", "aten.is_nonzero.default", "aten.lift_fresh.default",
                 "host copy"}


def llama_block_matrices(name, device="cpu"):
    cfg = CONFIGS[name]
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
    params = [nn.Parameter(torch.empty(shape, device=device)) for _ in range(cfg.num_hidden_layers) for shape in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


# aten operations of one SinkGD step over every block matrix, at L = 5: (before stacks, budget with 64 MiB stacks)
OPS_BUDGET = {"llama_60m": (2866, 400), "llama_1b": (8578, 8578)}


@pytest.mark.parametrize("name", ["llama_60m", "llama_1b"])
def test_one_device_step_is_launch_light_and_syncs_once_at_the_end(name):
    params = llama_block_matrices(name, device="meta")
    opt = SinkGD(params, sinkhorn_iters=5, stack_bytes={"meta": 64 * 2**20})
    with OpCounter() as counter:
        opt.step()
    aten = [op for op in counter.sequence if not op.startswith("profiler.")]
    assert [op for op in aten if op in WAITS_ON_HOST] == ["aten._local_scalar_dense.default"]  # the finiteness flag
    assert aten[-1] == "aten._local_scalar_dense.default"  # read after every kernel of the step is queued
    assert len(aten) <= OPS_BUDGET[name][1], counter.ops
    lone = SinkGD(params, sinkhorn_iters=5, stack_bytes={"meta": 0})  # negative control: one matrix at a time
    with OpCounter() as counter:
        lone.step()
    assert len(counter.sequence) > OPS_BUDGET[name][1]


@pytest.mark.parametrize("num_ranks", [1, 3])
def test_sharded_step_is_launch_light_and_never_waits(num_ranks):
    shapes = [(48, 32)] * 4 + [(96, 32), (96, 32), (32, 96)]
    mats = [uneven(m, n, seed=k, dtype=torch.float32) for k, (m, n) in enumerate(shapes)]
    flat = torch.cat([g.reshape(-1) for g in mats])
    per_rank = -(-flat.numel() // num_ranks)
    starts = [0] + np.cumsum([g.numel() for g in mats]).tolist()
    collectives = [0] * num_ranks

    def rank_fn(rank, all_reduce):
        lo, hi = rank * per_rank, min((rank + 1) * per_rank, flat.numel())
        pieces = [Piece(tuple(g.shape), max(lo, a) - a, max(lo, a) - lo, max(0, min(hi, b) - max(lo, a)))
                  for g, a, b in zip(mats, starts, starts[1:])]
        part = Partition(pieces, None, "cpu")

        def counted_all_reduce(t, op):
            collectives[rank] += 1
            all_reduce(t, op)
        with OpCounter() as counter:
            sr_sinkhorn_sharded(flat[lo:hi], part, 5, counted_all_reduce)
        return counter.ops

    for ops in run_ranks(num_ranks, rank_fn):
        assert not any(ops[op] for op in WAITS_ON_HOST), ops
        assert sum(ops.values()) <= 60 * len(mats), ops
    assert collectives == [2 * 5 + 1] * num_ranks  # row maxima, then a row and a column round per iteration


# --- transient memory of a step: tensor storage made inside it, tracked with a dispatch mode -----------------------


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage that operations made inside the mode and that are still held, and their peak. A
    storage counts from the op that made it until the last tensor seen holding it (views included) is freed; storage
    that existed before (weights, gradients, in-place results) never counts. Thread-local, like every dispatch mode."""

    def __init__(self):
        super().__init__()
        self.holders, self.nbytes, self.live, self.peak = collections.Counter(), {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.nbytes:
                if key in given:  # an input's storage, made before the mode
                    continue
                self.nbytes[key] = t.untyped_storage().nbytes()
                self.live += self.nbytes[key]
                self.peak = max(self.peak, self.live)
            self.holders[key] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key):
        self.holders[key] -= 1
        if not self.holders[key]:
            self.live -= self.nbytes.pop(key)


def transient_bytes(step) -> int:
    with LiveBytes() as meter:
        step()
    assert meter.live == 0  # all freed by the end: the meter saw every holder
    return meter.peak


def test_transient_memory_is_bounded_by_stack_bytes_or_the_largest_matrix():
    """The README's bound: a step's extra memory is at most stack_bytes (a stack's float32 X; a GPU's stacks add a
    copy of their gradients, the CPU reads them where they lie), or one float32 matrix when a matrix alone exceeds it,
    plus O(k (m + n)) vectors."""
    shapes = [(64, 128)] * 8 + [(128, 64)] * 2 + [(256, 96)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    with_grads(params)
    vectors = 4 * 4 * sum(m + n for m, n in shapes)  # four float32 (m + n)-vectors per matrix: u, v, row maxima
    four = 4 * 64 * 128 * 4  # four (64, 128) float32 X (on a GPU: two, and their gradients' copy)

    peak = transient_bytes(SinkGD(params, stack_bytes=four).step)
    assert four * 3 // 4 < peak <= four + vectors  # the budget is used, and held to
    peak = transient_bytes(SinkGD(params, stack_bytes=0).step)  # one at a time: X of the largest, no copy
    assert 256 * 96 * 4 <= peak <= 256 * 96 * 4 + vectors
    # Negative control: a step that ignores its budget (all eight (64, 128) matrices at once) breaks the bound.
    ignored = SinkGD(params, stack_bytes=four)
    ignored.stack_bytes = 2**30
    assert transient_bytes(ignored.step) > four + vectors


@pytest.mark.parametrize("cpu_kernel", [None, False])
def test_bench_optimizers_zero_path_row_steps_as_sinkgd(cpu_kernel):
    """tools.bench_optimizer's "ZeRO's path" rows time sinkgd_zero's step on one flat partition, by the kernel and
    eagerly: the same update as SinkGD."""
    shapes = [(6, 9), (9, 6), (6, 9)]
    params = [nn.Parameter(uneven(m, n, seed=k, dtype=torch.float32)) for k, (m, n) in enumerate(shapes)]
    for k, p in enumerate(params):
        p.grad = uneven(*p.shape, seed=10 + k, dtype=torch.float32)
    zero_path = ZeroPathSinkGD(params, lr=0.1, cpu_kernel=cpu_kernel)
    with OpCounter() as counter:
        zero_path.step()
    assert (counter.ops["aten.addmv_.default"] > 0) == (cpu_kernel is False)  # the kernel makes no products in torch
    SinkGD(params, lr=0.1).step()
    assert torch.allclose(zero_path.weight, torch.cat([p.detach().reshape(-1) for p in params]), atol=1e-6)


class Copies(TorchDispatchMode):
    """The largest output of aten.cat or aten.stack inside the mode, in elements."""

    def __enter__(self):
        self.largest = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.cat.default, torch.ops.aten.stack.default):
            self.largest = max(self.largest, out.numel())
        return out


def test_the_cpu_step_reads_each_gradient_where_it_lies_and_masks_only_a_skipped_step():
    """On the CPU a stack's gradients are not copied into one tensor (no cat), so stack_bytes buys float32 X alone,
    and the finiteness flag, read at no cost there, spares the pass that zeroes X on a step that is not skipped."""
    params = [nn.Parameter(torch.zeros(64, 128)) for _ in range(8)]
    with_grads(params)
    opt = SinkGD(params, stack_bytes=4 * 64 * 128 * 4, skip_nonfinite=True, cpu_kernel=False)  # four X
    with OpCounter() as counter, Copies() as copies:
        opt.step()
    assert copies.largest < 64 * 128  # row maxima and flags are concatenated, never a gradient
    assert counter.ops["aten.bmm.default"] == 2 * 5 * 2  # two stacks of four, L = 5, two products each
    assert "aten.masked_fill_.Scalar" not in counter.ops and "aten.masked_fill_.Tensor" not in counter.ops
    params[3].grad[1, 2] = float("nan")
    before = [p.detach().clone() for p in params]
    with OpCounter() as counter:
        opt.step()
    assert opt.overflow and all(torch.equal(b, p) for b, p in zip(before, params))
    assert counter.ops["aten.masked_fill_.Tensor"] + counter.ops["aten.masked_fill_.Scalar"] == 2  # per stack


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_sharded_transient_memory_is_the_ranks_partition(num_ranks):
    """Under ZeRO a rank's extra memory is its own partition of the matrices in float32 plus the stacked scaling
    vectors (Sigma m + Sigma n each), never a whole matrix gathered."""
    shapes = [(96, 64), (64, 96), (128, 128)]
    flat = torch.cat([uneven(m, n, seed=k, dtype=torch.float32).reshape(-1) for k, (m, n) in enumerate(shapes)])
    starts = [0] + np.cumsum([m * n for m, n in shapes]).tolist()
    vectors = 8 * 4 * sum(m + n for m, n in shapes)

    def peak_on(rank, num_ranks, all_reduce):
        per_rank = -(-flat.numel() // num_ranks)
        lo, hi = rank * per_rank, min((rank + 1) * per_rank, flat.numel())
        pieces = [Piece(s, max(lo, a) - a, max(lo, a) - lo, max(0, min(hi, b) - max(lo, a)))
                  for s, a, b in zip(shapes, starts, starts[1:])]
        part = Partition(pieces, None, "cpu")

        def in_place_all_reduce(t, op):  # as a real one is: the simulation's copies are not the step's memory
            with torch.utils._python_dispatch._disable_current_modes():
                all_reduce(t, op)
        return hi - lo, transient_bytes(lambda: sr_sinkhorn_sharded(flat[lo:hi], part, 5, in_place_all_reduce))

    for held, peak in run_ranks(num_ranks, lambda rank, all_reduce: peak_on(rank, num_ranks, all_reduce)):
        assert 4 * held <= peak <= 4 * held + vectors
    # Negative control: one rank holding all of every matrix (what gathering would cost) breaks a rank's bound.
    whole, = run_ranks(1, lambda rank, all_reduce: peak_on(rank, 1, all_reduce))
    assert whole[1] > 4 * -(-flat.numel() // num_ranks) + vectors


def test_sharded_collectives_run_on_the_communication_device(monkeypatch):
    """Under ZeRO-Offload the partition is on the CPU while NCCL takes GPU tensors: each tensor handed to a collective
    is on the partition's communication device, and the matrix work stays with the partition. Simulated with fake
    tensors, where "meta" stands for the GPU and any op that mixes devices raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    handed = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op, group: handed.append(t.device))
    shapes, offsets = [(7, 5), (3, 11)], [0, 35]
    with FakeTensorMode():
        grad = torch.randn(35 + 33)
        part = Partition([Piece(s, 0, o, s[0] * s[1]) for s, o in zip(shapes, offsets)], None, "cpu",
                         comm_device="meta")
        update = sr_sinkhorn_sharded(grad, part, 5, all_reduce_over(part))
    assert update.device == torch.device("cpu")
    assert handed == [torch.device("meta")] * (1 + 2 * 5)


def test_zero_sinkgd_keeps_one_workspace_for_its_partitions(monkeypatch):
    """X's memory is made once, for the largest partition, and reused by each partition in turn (ZeRO-3's sub-groups)
    and at every step: on the CPU a fresh one is mapped anew each step. Each update still equals a fresh
    sr_sinkhorn_sharded, and the padding, whose gradient is not zero, is not updated."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op, group: None)  # one rank
    layouts = [[((4, 6), 0), ((3, 5), 24)], [((2, 3), 0)]]  # (shape, offset) per matrix; 3 and 2 elements of padding
    flats = [torch.zeros(42), torch.zeros(8)]
    optimizer = ZeroSinkGD([dict(params=[nn.Parameter(torch.zeros(s)) for s in [(4, 6), (3, 5), (2, 3)]])], lr=0.1,
                           cpu_kernel=False)  # the eager path's X (the kernel's B: test_sinkgd_cpu.py)
    optimizer.param_groups[0]["params"] = flats  # as ZeRO hands them over
    parts = [Partition([Piece(s, 0, o, s[0] * s[1]) for s, o in layout], None, "cpu") for layout in layouts]
    optimizer.partitions, optimizer.attached = {id(f): p for f, p in zip(flats, parts)}, True
    gen = torch.Generator().manual_seed(0)
    workspace = None
    for _ in range(2):
        for flat in flats:
            flat.grad = torch.randn(flat.shape, generator=gen)
        before = [f.clone() for f in flats]
        optimizer.step()
        assert optimizer.workspace.numel() == 42 and workspace in (None, optimizer.workspace.data_ptr())
        workspace = optimizer.workspace.data_ptr()
        for flat, old, part in zip(flats, before, parts):
            X = sr_sinkhorn_sharded(flat.grad, part, 5, lambda t, op: None)
            assert torch.equal(flat, old.add(X, alpha=-0.1)) and X[-2:].eq(0).all() and flat[-2:].eq(0).all()


def test_zero_partitions_read_expert_stacks_and_refuse_resized_matrices(monkeypatch):
    """A fake ZeRO-1/2 optimizer whose rank holds the first 70 of the 84 elements of [a (4, 6) matrix, a (3, 5, 4)
    expert stack]: the stack is 3 (5, 4) matrices in the partition, the collectives go where DeepSpeed's accelerator
    is, and matrices held in other shapes than the group was built with (tensor parallelism) are refused."""
    import deepspeed.accelerator
    from types import SimpleNamespace
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: SimpleNamespace(
        current_device_name=lambda: "meta"))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    weights = [nn.Parameter(torch.zeros(4, 6)), nn.Parameter(torch.zeros(3, 5, 4))]
    optimizer = ZeroSinkGD([dict(params=weights)], lr=0.1)
    flat = torch.zeros(70)

    def zero_optimizer(shapes):
        return SimpleNamespace(single_partition_of_fp32_groups=[flat], real_dp_process_group=[None],
                               partition_size=[70], round_robin_bit16_offsets=[[0, 24]],
                               round_robin_bit16_meta=[[torch.empty(s, device="meta") for s in shapes]])
    part = zero_partitions(zero_optimizer([(4, 6), (3, 5, 4)]), optimizer)[id(flat)]
    assert part.comm_device == torch.device("meta") and flat.device == torch.device("cpu")
    assert (part.num_rows, part.num_cols) == (4 + 3 * 5, 6 + 3 * 4)
    # (first stacked row, first stacked column, rows, columns, offset): the third expert's first row and a half
    assert part.blocks == [(0, 0, 4, 6, 0), (4, 6, 5, 4, 24), (9, 10, 5, 4, 44), (14, 14, 1, 4, 64),
                           (15, 14, 1, 2, 68)]
    with pytest.raises(ValueError, match=r"holds param group 0's matrices as \[\(4, 3\)\], not as the group was built"):
        zero_partitions(zero_optimizer([(4, 3), (3, 5, 4)]), optimizer)
    optimizer.param_groups[0]["experts"] = 2  # declared a flattened stack of 2 (2, 6) experts: not read under ZeRO
    with pytest.raises(ValueError, match=r"param group 0 holds expert stacks flattened along the rows \(experts=E\)"):
        zero_partitions(zero_optimizer([(4, 6), (3, 5, 4)]), optimizer)


# --- the paper's split on transformers' LlamaForCausalLM: what a user of another training loop builds -------------


def test_split_of_a_transformers_llama_and_a_few_steps():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    optimizer = SinkGD(sinkgd_param_groups(model, model.model.layers, lr=0.02))  # as in the README
    names = {id(p): n for n, p in model.named_parameters()}
    sink = sorted(names[id(p)] for p in optimizer.param_groups[0]["params"])
    adam = sorted(names[id(p)] for p in optimizer.param_groups[1]["params"])
    linears = sorted(f"{n}.weight" for n, m in model.model.layers.named_modules(prefix="model.layers")
                     if isinstance(m, nn.Linear))
    assert len(linears) == 2 * 7 and sink == linears
    assert adam == sorted(n for n in names.values() if n not in linears)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} < set(adam)
    assert all(n.endswith("layernorm.weight") for n in adam if n.startswith("model.layers."))
    batch = torch.randint(0, 128, (8, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        loss = model(input_ids=batch, labels=batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5
    assert not optimizer.state.keys() & set(optimizer.param_groups[0]["params"])  # the matrices keep no state


def test_hugging_face_trainer_steps_sinkgd(tmp_path):
    """The README's recipe for transformers.Trainer: optimizers=(SinkGD over the paper's split, a schedule)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (64, 33), generator=gen)]
    optimizer = SinkGD(sinkgd_param_groups(model, model.model.layers, lr=0.02))
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=20)
    args = transformers.TrainingArguments(tmp_path, max_steps=20, per_device_train_batch_size=8, logging_steps=5,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, scheduler))
    trainer.train()
    logged = [record for record in trainer.state.log_history if "loss" in record]
    assert len(logged) == 4 and logged[-1]["loss"] < logged[0]["loss"] - 0.3, logged
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * (step - 2) / 18))  # after 2 warmup steps, to 0 at step 20
    for record in logged:  # the Trainer logs group 0's lr (SinkGD's, alpha * lr) of the step it just took
        assert record["learning_rate"] == pytest.approx(0.05 * 0.02 * cosine(record["step"] - 1), rel=1e-6), record
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * optimizer.param_groups[1]["lr"]) == 0


def names_by_group(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]


def train_a_few_steps(model, optimizer, vocab_size, steps=10):
    batch = torch.randint(0, vocab_size, (8, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_split_of_a_transformers_gpt2_respects_conv1d_layout():
    """GPT-2's projections are Conv1D, weight stored (in, out): SinkGD must treat its transpose as the paper's W."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                                                 n_positions=64))
    # L = 1: the layout shows (Alg. 3 converges to the same scaling either way, but ends on the columns)
    optimizer = SinkGD(sinkgd_param_groups(model, model.transformer.h, lr=0.02), sinkhorn_iters=1)  # as in the README
    assert [g["transposed"] for g in optimizer.param_groups if g["sinkgd"]] == [True]
    sink, adam = names_by_group(model, optimizer)
    assert sink == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert "transformer.wte.weight" in adam and "transformer.h.0.attn.c_attn.bias" in adam
    c_fc = model.transformer.h[0].mlp.c_fc.weight  # (32, 128): in, out
    before = c_fc.detach().clone().double()
    losses = train_a_few_steps(model, optimizer, 128, steps=1)
    update = (before - c_fc.detach()) / (0.02 * 0.05)
    assert rel_err(update, reference(c_fc.grad.double().T, 1).T) < 1e-4
    assert rel_err(update, reference(c_fc.grad.double(), 1)) > 0.01  # negative control: the stored layout as is
    losses += train_a_few_steps(model, optimizer, 128)
    assert losses[-1] < losses[0] - 0.5


def test_split_of_a_transformers_moe_puts_each_expert_in_sinkgd_and_the_router_in_adamw():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.MixtralForCausalLM(config)
    optimizer = SinkGD(sinkgd_param_groups(model, model.model.layers, lr=0.02))
    sink, adam = names_by_group(model, optimizer)
    experts = [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")]
    assert set(experts) < set(sink) and not [n for n in sink if "gate.weight" in n or "norm" in n]
    assert {f"model.layers.{i}.mlp.gate.weight" for i in range(2)} < set(adam)  # the routers
    down = model.model.layers[0].mlp.experts.down_proj  # (experts, hidden, intermediate): each expert (out, in)
    before = down.detach().clone().double()
    losses = train_a_few_steps(model, optimizer, 128, steps=1)
    for e in range(4):  # each expert its own matrix
        update = (before[e] - down[e].detach()) / (0.02 * 0.05)
        assert rel_err(update, reference(down.grad[e].double(), 5)) < 1e-4
    losses += train_a_few_steps(model, optimizer, 128)
    assert losses[-1] < losses[0] - 0.5


TINY_MOE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
# family -> (model, its blocks, the routers and gates, named as in the model's parameters)
ROUTED = {
    "llama4": (lambda t: t.Llama4ForCausalLM(t.Llama4TextConfig(**TINY_MOE, intermediate_size_mlp=64, head_dim=8,
                                                                 num_local_experts=4, num_experts_per_tok=1)),
               lambda m: m.model.layers, "feed_forward.router.weight"),  # Llama4Router subclasses nn.Linear
    "phimoe": (lambda t: t.PhimoeForCausalLM(t.PhimoeConfig(**TINY_MOE, num_local_experts=4, num_experts_per_tok=2)),
               lambda m: m.model.layers, "mlp.router.weight"),  # so does PhimoeTopKRouter
    "qwen2_moe": (lambda t: t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(**TINY_MOE, num_experts=4, num_experts_per_tok=2,
                                                                   moe_intermediate_size=24,
                                                                   shared_expert_intermediate_size=48)),
                  lambda m: m.model.layers, "mlp.shared_expert_gate.weight"),  # nn.Linear(hidden, 1), a sigmoid gate
    "dbrx": (lambda t: t.DbrxForCausalLM(t.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128, rope_parameters={"rope_theta": 1e4},
        attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4})),
        lambda m: m.transformer.blocks, "ffn.router.layer.weight"),  # an nn.Linear inside the router; 4 experts
    "jetmoe": (lambda t: t.JetMoeForCausalLM(t.JetMoeConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=48,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)),
        lambda m: m.model.layers, "router.layer.weight"),  # in the MLP and in the attention experts
}


@pytest.mark.parametrize("family", ROUTED)
@pytest.mark.filterwarnings("ignore:sinkgd_param_groups. AdamW for")  # Llama4's and JetMoE's experts: see below
def test_routers_and_gates_go_to_adamw_whatever_their_class(family):
    """A router is an nn.Linear (or a subclass) with one output per expert of the model's config; a gate one with a
    single output (SR-Sinkhorn of a 1 x n matrix is sign(G)). Both AdamW; every other block Linear stays SinkGD."""
    transformers = pytest.importorskip("transformers")
    build, blocks, router = ROUTED[family]
    torch.manual_seed(0)
    model = build(transformers)
    sink, adam = names_by_group(model, SinkGD(sinkgd_param_groups(model, blocks(model), lr=0.02)))
    routers = [n for n, _ in model.named_parameters() if n.endswith(router)]
    assert len(routers) >= 2 and set(routers) <= set(adam) and not set(routers) & set(sink)
    linear = [f"{n}.weight" for n, m in blocks(model).named_modules() if isinstance(m, nn.Linear)]
    prefix = next(n for n, m in model.named_modules() if m is blocks(model)) + "."
    assert {prefix + n for n in linear} - set(routers) <= set(sink)


def test_the_split_is_described_by_kind():
    """Qwen2-MoE: attention and shared-expert linears, expert stacks, and per layer a bare router and a sigmoid
    gate; counted here by name."""
    transformers = pytest.importorskip("transformers")
    build, blocks, _ = ROUTED["qwen2_moe"]
    model = build(transformers)
    named = dict(model.named_parameters())
    kinds = {"matrices": [n for n in named if n.endswith(("_proj.weight",)) and ".experts." not in n],
             "expert stacks": [n for n in named if ".experts." in n],
             "routers and gates": [n for n in named if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]}
    kinds["other tensors"] = [n for n in named if not any(n in names for names in kinds.values())]
    size = {kind: f"{len(names)} {kind} ({sum(named[n].numel() for n in names) / 1e6:.2f}M params)"
            for kind, names in kinds.items()}
    assert len(kinds["expert stacks"]) == 4 and len(kinds["routers and gates"]) == 4
    assert describe_split(model, sinkgd_param_groups(model, blocks(model), lr=0.02)) == (
        f"SinkGD {size['matrices']}, {size['expert stacks']} | AdamW {size['routers and gates']}, "
        f"{size['other tensors']}")


# family -> (its expert stacks, the layout its forward uses): neither module sets transformers' is_transposed
UNDECLARED_EXPERTS = {"llama4": ("*.feed_forward.experts.*_proj", "experts_in_out"),  # bmm(x, W): (experts, in, out)
                      "jetmoe": ("*put_linear.weight", "experts_out_in")}  # F.linear per expert: (experts, out, in)


@pytest.mark.parametrize("family", UNDECLARED_EXPERTS)
def test_expert_stacks_of_unknown_layout_go_to_adamw_with_a_warning_until_declared(family):
    """A 3-D tensor whose module does not say how it is stored is never guessed: AdamW, named in a warning. Declared
    with `layouts`, each expert gets Alg. 3 of its gradient in the paper's orientation (rows = outputs), checked per
    expert at L = 1 against the float64 reference; the stored orientation as is would be 13-18% off there."""
    transformers = pytest.importorskip("transformers")
    build, blocks, _ = ROUTED[family]
    pattern, layout = UNDECLARED_EXPERTS[family]
    torch.manual_seed(0)
    model = build(transformers)
    stacks = [n for n, _ in model.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
    assert stacks
    with pytest.warns(UserWarning, match="AdamW for .*" + re.escape(stacks[0])):
        groups = sinkgd_param_groups(model, blocks(model), lr=0.02)
    assert set(stacks) <= set(names_by_group(model, SinkGD(groups))[-1])

    optimizer = SinkGD(sinkgd_param_groups(model, blocks(model), lr=0.02, layouts={pattern: layout}), sinkhorn_iters=1)
    transposed = layout == "experts_in_out"
    by_layout = {g["transposed"]: names for g, names in zip(optimizer.param_groups, names_by_group(model, optimizer))
                 if g["sinkgd"]}
    assert set(stacks) <= set(by_layout[transposed])
    weight = dict(model.named_parameters())[stacks[0]]
    before = weight.detach().clone().double()
    train_a_few_steps(model, optimizer, 128, steps=1)
    as_paper, as_other = ((lambda t: t.T), (lambda t: t))[::1 if transposed else -1]
    for e in range(weight.shape[0]):
        update = (before[e] - weight[e].detach().double()) / (0.02 * 0.05)
        assert rel_err(update, as_paper(reference(as_paper(weight.grad[e].double()), 1))) < 1e-4
        assert rel_err(update, as_other(reference(as_other(weight.grad[e].double()), 1))) > 0.01


def test_flattened_expert_stacks_are_named_until_declared():
    """DBRX's experts are 2-D, (experts x ffn, hidden), in a module of its own: AdamW and a warning naming them;
    declared, no warning (each expert's first update: test_every_parameter_of_each_family_and_its_first_update)."""
    transformers = pytest.importorskip("transformers")
    build, blocks, _ = ROUTED["dbrx"]
    model = build(transformers)
    with pytest.warns(UserWarning) as caught:
        sinkgd_param_groups(model, blocks(model), lr=0.02)
    named = str(caught[0].message).split(": ")[1]
    assert named == "AdamW for " + ", ".join(f"transformer.blocks.{i}.ffn.experts.mlp.{w}" for i in range(2)
                                             for w in ("w1", "v1", "w2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkgd_param_groups(model, blocks(model), lr=0.02, layouts=DBRX_EXPERTS)


def test_layouts_are_checked_and_can_send_anything_to_adamw():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    groups = sinkgd_param_groups(model, model[1], lr=1.0, layouts={"1.1.weight": "adamw"})
    assert [id(p) for g in groups if g["sinkgd"] for p in g["params"]] == [id(model[1][0].weight)]
    for layouts, message in [({"1.0.weight": "rows"}, "layouts['1.0.weight'] = 'rows'; choose one of"),
                             ({"2.*": "adamw"}, "layouts names '2.*', which matches no parameter"),
                             ({"1.0.weight": "experts_out_in"}, "makes 1.0.weight experts_out_in, but it is 2-D")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sinkgd_param_groups(model, model[1], lr=1.0, layouts=layouts)


def test_encoder_decoder_blocks_as_a_list_and_never_the_embedding_in_sinkgd():
    """T5 keeps its encoder's and decoder's layers apart: both go in as a list, each parameter in one group; the
    whole model is refused (its head is tied to the embedding)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    groups = sinkgd_param_groups(model, [model.encoder.block, model.decoder.block], lr=0.02)
    names = [n for g in names_by_group(model, SinkGD(groups)) for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter once
    sink = {n for g, ns in zip(groups, names_by_group(model, SinkGD(groups))) if g["sinkgd"] for n in ns}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".block." in n}
    assert sink == linear and "shared.weight" not in sink
    with pytest.raises(ValueError, match="holds the model's embedding or output head"):
        sinkgd_param_groups(model, model, lr=0.02)


DBRX_EXPERTS = {"*.experts.mlp.[wv]1": "experts_out_in", "*.experts.mlp.w2": "experts_in_out"}
ROUTED_EXPERTS = [("*.experts.gate_up_proj", "experts_out_in"), ("*.experts.down_proj", "experts_out_in"),
                  ("*.self_attn.*_proj.weight", "out_in")]
# family -> (model, blocks, layouts, [(parameter name pattern, how it is applied in the forward)], first match wins):
# every parameter's group follows, and each SinkGD tensor's first update is Alg. 3 of its gradient in that layout.
FAMILIES = {
    "llama": (lambda t: t.LlamaForCausalLM(t.LlamaConfig(**TINY_MOE)), lambda m: m.model.layers, None,
              [("*.self_attn.*_proj.weight", "out_in"), ("*.mlp.*_proj.weight", "out_in")]),
    "gpt2": (lambda t: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
             lambda m: m.transformer.h, None, [("*.c_attn.weight", "in_out"), ("*.c_proj.weight", "in_out"),
                                                ("*.c_fc.weight", "in_out")]),  # Conv1D: x W + b
    "bert": (lambda t: t.BertForMaskedLM(t.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=48)),
             lambda m: m.bert.encoder.layer, None, [("*LayerNorm*", "adamw"), ("bert.encoder.*.weight", "out_in")]),
    "mixtral": (lambda t: t.MixtralForCausalLM(t.MixtralConfig(**TINY_MOE, num_local_experts=4)),
                lambda m: m.model.layers, None, ROUTED_EXPERTS),
    "qwen3_moe": (lambda t: t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**TINY_MOE, num_experts=4, num_experts_per_tok=2,
                                                                   moe_intermediate_size=24)),
                  lambda m: m.model.layers, None, ROUTED_EXPERTS),
    "granitemoe": (lambda t: t.GraniteMoeForCausalLM(t.GraniteMoeConfig(**TINY_MOE, num_local_experts=4)),
                   lambda m: m.model.layers, None, ROUTED_EXPERTS),
    "gpt_oss": (lambda t: t.GptOssForCausalLM(t.GptOssConfig(**TINY_MOE, num_local_experts=4, head_dim=8)),
                lambda m: m.model.layers, None,  # experts applied as x @ W, said by is_transposed
                [("*.experts.*_proj", "experts_in_out"), ("*.self_attn.*_proj.weight", "out_in")]),
    "phimoe": ROUTED["phimoe"][:2] + (None, ROUTED_EXPERTS),
    "qwen2_moe": ROUTED["qwen2_moe"][:2] + (None, ROUTED_EXPERTS + [("*.shared_expert.*_proj.weight", "out_in")]),
    "llama4": ROUTED["llama4"][:2] + ({"*.feed_forward.experts.*_proj": "experts_in_out"},
                                      [("*.feed_forward.experts.*_proj", "experts_in_out"),
                                       ("*.shared_expert.*_proj.weight", "out_in"),
                                       ("*.self_attn.*_proj.weight", "out_in")]),
    "jetmoe": ROUTED["jetmoe"][:2] + ({"*put_linear.weight": "experts_out_in"},
                                      [("*put_linear.weight", "experts_out_in"), ("*.kv_proj.weight", "out_in")]),
    # DBRX's experts are 2-D, (experts x ffn, hidden), each expert's (ffn, hidden) applied as x @ W.T (w1, v1) or
    # x @ W (w2): AdamW unless declared
    "dbrx": ROUTED["dbrx"][:2] + (None, [("*.attn.Wqkv.weight", "out_in"), ("*.attn.out_proj.weight", "out_in")]),
    "dbrx-declared": ROUTED["dbrx"][:2] + (DBRX_EXPERTS, [*DBRX_EXPERTS.items(), ("*.attn.Wqkv.weight", "out_in"),
                                                          ("*.attn.out_proj.weight", "out_in")]),
    "t5": (lambda t: t.T5ForConditionalGeneration(t.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64,
                                                              num_layers=2, num_heads=4, decoder_start_token_id=0)),
           lambda m: [m.encoder.block, m.decoder.block], None,
           [("*Attention.[qkvo].weight", "out_in"), ("*.DenseReluDense.w[io].weight", "out_in")]),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.filterwarnings("ignore:sinkgd_param_groups. AdamW for")  # DBRX undeclared: tested above
def test_every_parameter_of_each_family_and_its_first_update(family):
    """Every parameter in the group its role calls for, and every SinkGD tensor's first update, matrix by matrix
    (expert by expert), Alg. 3 at L = 1 of its gradient in the orientation the forward applies it, against the
    float64 reference: W <- W - alpha lr X with lr 1."""
    transformers = pytest.importorskip("transformers")
    build, blocks, layouts, spec = FAMILIES[family]
    torch.manual_seed(0)
    model = build(transformers)
    kinds = {n: next((kind for pattern, kind in spec if fnmatch.fnmatchcase(n, pattern)), "adamw")
             for n, _ in model.named_parameters()}
    groups = sinkgd_param_groups(model, blocks(model), lr=1.0, layouts=layouts)
    def layout(group, p):  # as the split made it
        stack = "experts_" if p.dim() == 3 or group.get("experts") else ""
        return stack + ("in_out" if group["transposed"] else "out_in")
    layout_of = {id(p): layout(g, p) for g in groups if g["sinkgd"] for p in g["params"]}
    found = {n: layout_of.get(id(p), "adamw") for n, p in model.named_parameters()}
    assert found == kinds
    assert sum(len(g["params"]) for g in groups) == len(kinds)  # each parameter in one group
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    batch = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    SinkGD(groups, sinkhorn_iters=1).step()
    for name, p in model.named_parameters():
        if kinds[name] == "adamw":
            continue
        as_paper = (lambda t: t.T) if kinds[name].endswith("in_out") else (lambda t: t)
        updates, grads = (before[name] - p.detach().double()) / 0.05, p.grad.double()
        if kinds[name].startswith("experts") and p.dim() == 2:  # flattened along the rows: 4 experts
            updates, grads = updates.view(4, -1, p.shape[1]), grads.view(4, -1, p.shape[1])
        for update, grad in zip(*((updates, grads) if updates.dim() == 3 else ([updates], [grads]))):
            if not grad.any():  # an expert no token was routed to
                assert not update.any()
                continue
            assert rel_err(update, as_paper(reference(as_paper(grad), 1))) < 1e-4, name


def test_gates_without_a_config_go_to_adamw():
    """Without a config (no experts known) only the one-row or one-column rule applies: a Linear with 4 outputs in a
    model of our own is a matrix like any other."""
    block = nn.ModuleDict(dict(gate=nn.Linear(8, 1), up=nn.Linear(8, 4), column=nn.Linear(1, 8)))
    model = nn.Sequential(nn.Embedding(10, 8), block)
    groups = sinkgd_param_groups(model, block, lr=1.0)
    assert [id(p) for g in groups if g["sinkgd"] for p in g["params"]] == [id(block["up"].weight)]


def test_transposed_expert_tensors_follow_their_module():
    class Experts(nn.Module):  # transformers 5's convention: is_transposed means (experts, in, out)
        def __init__(self, is_transposed):
            super().__init__()
            self.is_transposed = is_transposed
            self.up = nn.Parameter(torch.randn(3, 4, 6))
    model = nn.Sequential(Experts(True), Experts(False), nn.LayerNorm(4))
    groups = sinkgd_param_groups(model, model, lr=1.0)
    assert [(g["params"], g.get("transposed", False)) for g in groups if g["sinkgd"]] == \
        [([model[1].up], False), ([model[0].up], True)]
    with pytest.raises(ValueError, match="no nn.Linear, Conv1D or 3-D expert weight inside the given LayerNorm"):
        sinkgd_param_groups(model, model[2], lr=1.0)


def test_pip_install_gives_the_optimizers_alone(tmp_path):
    """pyproject.toml builds a wheel holding the five sinkgd*.py modules, whose one dependency is torch; installed
    elsewhere, they import without DeepSpeed or transformers."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    modules = ["sinkgd.py", "sinkgd_cpu.py", "sinkgd_dtensor.py", "sinkgd_split.py", "sinkgd_zero.py"]
    for name in ("pyproject.toml", *modules, "README.md", "LICENSE"):
        shutil.copy(repo / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(tmp_path)], check=True, cwd=tmp_path, timeout=300)
    [wheel] = (tmp_path / "dist").glob("sinkgd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
        metadata = zf.read(next(f for f in files if f.endswith("METADATA"))).decode()
    assert sorted(f for f in files if ".dist-info/" not in f) == modules
    assert [line for line in metadata.splitlines() if line.startswith("Requires-Dist")] == ["Requires-Dist: torch>=2.4"]
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, timeout=300)
    elsewhere.mkdir()
    check = ("import sys, sinkgd, sinkgd_zero; sinkgd.sinkgd_param_groups; print(sinkgd_zero.__file__); "
             "print(sorted({'deepspeed', 'transformers', 'accelerate'} & sys.modules.keys()))")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {check}"],
                         cwd=elsewhere, capture_output=True, text=True, check=True, timeout=120).stdout.split("\n")
    assert out[:2] == [str(target / "sinkgd_zero.py"), "[]"]
