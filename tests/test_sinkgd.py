"""SR-Sinkhorn (one matrix, and sharded over ranks as under ZeRO) and SinkGD against an independent float64 reference
and the properties they must have; the paper's split on model.py's and on transformers' LLaMA."""
import collections
import copy
import math
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model import CONFIGS

from sinkgd import SinkGD, sinkgd_param_groups, sr_sinkhorn
from tools.bench_optimizer import multinorm, normalize_columns, normalize_rows, swan, whiten
from zero import Partition, Piece, sr_sinkhorn_sharded


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


@pytest.mark.parametrize("num_iters", [1, 2, 5])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (16, 16), (33, 4), (1, 9), (9, 1)])
def test_matches_float64_reference(shape, num_iters):
    g = uneven(*shape, seed=num_iters)
    out = sr_sinkhorn(g, num_iters)
    assert out.dtype == torch.float64
    assert rel_err(out, reference(g, num_iters)) < 1e-10


def test_multinorm_instance_matches_reference():
    g = uneven(12, 20)
    x = multinorm(g, [normalize_rows, normalize_columns], num_iters=3)
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
    assert rel_err(out, reference(g, 5)) < 1e-10
    assert (sr_sinkhorn(torch.zeros(4, 3)) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_input_is_computed_in_float32(dtype):
    g = uneven(20, 30, seed=8, dtype=dtype)
    out = sr_sinkhorn(g)
    assert out.dtype == torch.float32
    assert rel_err(out, reference(g.double(), 5)) < 1e-5


THRESHOLD = 2.0**-63  # sr_sinkhorn's docstring: entries at most this times their row's largest magnitude count as 0


def below_threshold_zeroed(g):
    """g with the entries that sr_sinkhorn documents as treated as zero set to zero (float32 squares)."""
    row_max = g.abs().amax(dim=1, keepdim=True)
    return torch.where((g / row_max) ** 2 > torch.finfo(torch.float32).tiny, g, 0.0)


def test_entries_below_the_documented_threshold_count_as_zero():
    g = uneven(9, 12, seed=13)
    row_max = g.abs().amax(dim=1)
    g[0, 3] = 0.5 * THRESHOLD * row_max[0]  # below: zero
    g[1, 4] = -4 * THRESHOLD * row_max[1]  # above: kept
    g[:, 7] = 1e-3 * THRESHOLD * row_max * torch.sign(g[:, 7])  # a whole column below: a zero column, not sqrt(m)
    g = g.float()
    expected = below_threshold_zeroed(g.double())
    assert expected[0, 3] == 0 and expected[1, 4] != 0 and (expected[:, 7] == 0).all()
    for num_iters in (1, 5):
        out = sr_sinkhorn(g, num_iters)
        assert (out[expected == 0] == 0).all()
        assert rel_err(out, reference(expected, num_iters)) < 1e-6
        assert out[1, 4] != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_finite_input_follows_the_documented_result(dtype):
    big, tiny = torch.finfo(dtype).max / 4, torch.finfo(dtype).tiny
    g = torch.tensor([[big, -big, 1.0, tiny], [1e-30, 2e-30, -1e-30, 0.0], [big, tiny, 0.0, 1.0]]).to(dtype)
    expected = below_threshold_zeroed(g.double())
    assert (expected[[0, 2], 2:] == 0).all() and expected[2, 1] == 0  # 1 and tiny next to big: below the threshold
    for num_iters in (1, 5, 50):
        out = sr_sinkhorn(g, num_iters)
        assert torch.isfinite(out).all() and (out[expected == 0] == 0).all()
        assert rel_err(out, reference(expected, num_iters)) < 1e-6
    huge = uneven(6, 5, seed=9) * 1e30
    assert rel_err(sr_sinkhorn(huge.float()), reference(huge / 1e30, 5)) < 1e-5


def test_wide_dynamic_range_against_the_reference():
    """Random float32 matrices whose entries span up to 26 orders of magnitude: exact on what the threshold leaves."""
    gen, zeroed = torch.Generator().manual_seed(0), 0
    for spread in (5.0, 20.0, 60.0):
        for _ in range(20):
            m, n = torch.randint(1, 12, (2,), generator=gen).tolist()
            g = torch.randn(m, n, generator=gen, dtype=torch.float64)
            g = (g * torch.exp(spread * torch.rand(m, n, generator=gen, dtype=torch.float64) - spread)).float()
            expected = below_threshold_zeroed(g.double())
            zeroed += int((expected == 0).sum())
            out = sr_sinkhorn(g)
            assert torch.isfinite(out).all() and (out[expected == 0] == 0).all()
            assert rel_err(out, reference(expected, 5)) < 1e-6
    assert zeroed > 10  # the threshold was exercised


def test_non_contiguous_input():
    g = uneven(9, 6, seed=10)
    assert rel_err(sr_sinkhorn(g.T), reference(g.T, 5)) < 1e-10


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        sr_sinkhorn(torch.ones(5))


# --- fragments over ranks -----------------------------------------------------------------------


def run_ranks(num_ranks, fn):
    """Run fn(rank, all_reduce) in one thread per rank, with an all-reduce over the threads."""
    barrier, slots, results = threading.Barrier(num_ranks), [None] * num_ranks, [None] * num_ranks

    def all_reduce_for(rank):
        def all_reduce(t, op):
            slots[rank] = t.clone()
            barrier.wait()
            stacked = torch.stack(slots)
            t.copy_(stacked.sum(0) if op == "sum" else stacked.amax(0))
            barrier.wait()
        return all_reduce

    def target(rank):
        results[rank] = fn(rank, all_reduce_for(rank))

    threads = [threading.Thread(target=target, args=(k,)) for k in range(num_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
        return sr_sinkhorn_sharded(flat[lo:hi], part, 5, all_reduce)

    whole = torch.cat(run_ranks(num_ranks, rank_fn))
    assert whole.shape == flat.shape
    for k, g in enumerate(mats):
        assert rel_err(whole[starts[k]:starts[k + 1]].view(g.shape), reference(g, 5)) < 1e-10
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
    ref = torch.optim.AdamW(ref_vecs, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for step in range(4):
        with_grads(vecs, seed=step)
        with_grads(ref_vecs, seed=step)
        opt.step()
        ref.step()
    for p, q in zip(vecs, ref_vecs):
        assert torch.equal(p, q)


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
    with pytest.raises(ValueError, match=r"2-D matrices only, got shapes \[\(4,\)\].*sinkgd=False"):
        SinkGD(mats + vecs[:1])


def test_bad_hyperparameters_fail():
    mats, _ = make_params()
    with pytest.raises(ValueError, match="lr"):
        SinkGD(mats, lr=0.0)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        SinkGD(mats, sinkhorn_iters=0)


def test_params_without_grad_are_skipped():
    mats, vecs = make_params()
    opt = SinkGD([dict(params=mats, sinkgd=True), dict(params=vecs, sinkgd=False)])
    with_grads(mats[:1] + vecs[:1])
    frozen = [mats[1].detach().clone(), vecs[1].detach().clone()]
    opt.step()
    assert torch.equal(mats[1], frozen[0]) and torch.equal(vecs[1], frozen[1])
    assert vecs[1] not in opt.state


def test_non_finite_gradient_raises_and_touches_nothing():
    mats, vecs = make_params()
    opt = SinkGD([dict(params=mats, sinkgd=True), dict(params=vecs, sinkgd=False)])
    with_grads(mats + vecs)
    vecs[1].grad[0, 1] = float("nan")
    before = [p.detach().clone() for p in mats + vecs]
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(mats + vecs, before))


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
    with pytest.raises(ValueError, match="2-D"):
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
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


# Operations that make the host wait for the device (or copy host data to it) on a GPU.
WAITS_ON_HOST = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
                 "aten.repeat_interleave.Tensor", "aten.segment_reduce.default", "aten.masked_select.default",
                 "aten._unique2.default", "aten.equal.default", "aten.is_nonzero.default", "aten.lift_fresh.default",
                 "aten._to_copy.default"}


def llama_block_matrices(name, num_layers=2):
    cfg = CONFIGS[name]
    d, f = cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator().manual_seed(0)
    shapes = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
    params = [nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(num_layers) for shape in shapes]
    with_grads(params)
    return params


@pytest.mark.parametrize("name", ["llama_60m", "llama_1b"])
def test_one_device_step_is_launch_light_and_syncs_once(name):
    params = llama_block_matrices(name, num_layers=1 if name == "llama_1b" else 2)
    opt = SinkGD(params, sinkhorn_iters=5)
    with OpCounter() as counter:
        opt.step()
    assert counter.ops["aten._local_scalar_dense.default"] == 1  # the finiteness decision, once for the step
    assert sum(counter.ops[op] for op in WAITS_ON_HOST) == 1, counter.ops
    assert sum(counter.ops.values()) <= 60 * len(params), counter.ops


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
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    assert optimizer.param_groups[1]["lr"] < 1e-3  # the schedule drove our optimizer down its cosine
