"""SinkGD's step on the CPU as one C++ kernel per matrix: what ZeRO-Offload and FSDP2's CPU
offload wait for. sinkgd.py's fast form is the definition; this is the same arithmetic in fewer
passes over memory, tested entrywise against it (tests/test_sinkgd_cpu.py).

Per matrix, sinkgd.py's eager step makes about 2L + 18 passes over matrix-sized arrays (each
torch op reads and writes its operands once). Here:
  pass 1       per row: its largest magnitude, B_i = (G_i / row max)^2, (B v)_i with v = 1,
               u_i, and u_i B_i added to B^T u, while the row is in cache.
  passes 2..L  per 4 rows: (B v)_i, u_i and their share of B^T u; B is read once, not twice.
  update       W <- (1 - lr wd) W - lr r_i G_ij c_j; X is never written.
G is read twice, W read and written once, and B (one matrix, in cache when it fits) written once
and read L - 1 times.

Built on first use with torch.utils.cpp_extension (a C++ compiler with OpenMP; tens of seconds
once, then cached under TORCH_EXTENSIONS_DIR). `kernel()` is None where it does not build, and
SinkGD then steps with the eager fast form."""
import functools
import hashlib
import os
import warnings

import torch
from torch import Tensor

SOURCE = r"""
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

template <typename T> static T finite_or_zero(T x) { return std::isfinite(x) ? x : T(0); }

template <typename T>  // t_r = sum_j b_rj v_j for R rows of b (R chains of vector FMAs)
static void dot_rows(const T* __restrict__ b, const T* __restrict__ v, int64_t n, int R, T* t) {
  T t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  const T *b0 = b, *b1 = b + n, *b2 = b + 2 * n, *b3 = b + 3 * n;
  if (R == 4) {
#pragma omp simd reduction(+:t0, t1, t2, t3)
    for (int64_t j = 0; j < n; ++j) {
      t0 += b0[j] * v[j];
      t1 += b1[j] * v[j];
      t2 += b2[j] * v[j];
      t3 += b3[j] * v[j];
    }
    t[0] = t0, t[1] = t1, t[2] = t2, t[3] = t3;
    return;
  }
  for (int r = 0; r < R; ++r) {
    T tr = 0;
#pragma omp simd reduction(+:tr)
    for (int64_t j = 0; j < n; ++j) tr += b[r * n + j] * v[j];
    t[r] = tr;
  }
}

template <typename T>  // s += sum_r u_r b_r over R rows of b: s is read and written once
static void axpy_rows(const T* u, const T* __restrict__ b, int64_t n, int R, T* __restrict__ s) {
  if (R == 4) {
    const T *b0 = b, *b1 = b + n, *b2 = b + 2 * n, *b3 = b + 3 * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      s[j] += u[0] * b0[j] + u[1] * b1[j] + u[2] * b2[j] + u[3] * b3[j];
    return;
  }
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] += u[r] * b[r * n + j];
  }
}

template <typename T>  // max_j |g_j|
static T abs_max(const T* __restrict__ g, int64_t n) {
  T top = 0;
#pragma omp simd reduction(max:top)
  for (int64_t j = 0; j < n; ++j) top = std::max(top, std::abs(g[j]));
  return top;
}

template <typename T>  // b = (g / d)^2, zero below the normal range; returns sum_j b_j
static T prescale_row(const T* __restrict__ g, T d, T* __restrict__ b, int64_t n) {
  const T tiny = std::numeric_limits<T>::min();
  T t = 0;
#pragma omp simd reduction(+:t)
  for (int64_t j = 0; j < n; ++j) {
    T x = g[j] / d;
    x = x * x;
    b[j] = x > tiny ? x : T(0);
    t += b[j];
  }
  return t;
}

template <typename T>  // w = k w + a (g r) c
static void update_row(const T* __restrict__ g, T r, const T* __restrict__ c, T k, T a,
                       T* __restrict__ w, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) w[j] = w[j] * k + a * (g[j] * r * c[j]);
}

// One matrix G (m, n): L iterations of sinkgd.sinkhorn on B = (G / row max)^2, then W's update.
// The rows are cut into one block per thread; each block sums its share of B^T u on its own.
template <typename T>
static void step(const T* G, T* W, T* B, int64_t m, int64_t n, int64_t iters, T k, T a) {
  const T floor = std::numeric_limits<T>::min() * std::numeric_limits<T>::epsilon();
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m));
  std::vector<T> row_max(m), u(m), v(n), parts(P * n);
  T *rm = row_max.data(), *uu = u.data(), *vv = v.data(), *s = parts.data();
  for (int64_t it = 0; it < iters; ++it) {
    at::parallel_for(0, P, 1, [=](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        T* sp = s + p * n;
        std::fill(sp, sp + n, T(0));
        const int64_t end = m * (p + 1) / P;
        for (int64_t i = m * p / P; i < end; i += 4) {  // 4 rows at a time, in cache
          const int R = (int)std::min<int64_t>(4, end - i);
          T t[4];
          if (it > 0) dot_rows(B + i * n, vv, n, R, t);
          for (int r = 0; r < R && it == 0; ++r) {  // B v with v = 1: B's row sum
            rm[i + r] = abs_max(G + (i + r) * n, n);
            t[r] = prescale_row(G + (i + r) * n, std::max(rm[i + r], floor), B + (i + r) * n, n);
          }
          for (int r = 0; r < R; ++r) uu[i + r] = finite_or_zero(T(n) / t[r]);  // u_i (B v)_i = n
          axpy_rows(uu + i, B + i * n, n, R, sp);
        }
      }
    });
    for (int64_t p = 1; p < P; ++p)  // s = B^T u
      for (int64_t j = 0; j < n; ++j) s[j] += s[p * n + j];
    // v_j (B^T u)_j = m; up to the gauge (the largest s_j) before the last iteration
    const T target = it == iters - 1 ? T(m) : *std::max_element(s, s + n);
    for (int64_t j = 0; j < n; ++j) vv[j] = finite_or_zero(target / s[j]);
  }
  for (int64_t j = 0; j < n; ++j) vv[j] = std::sqrt(vv[j]);  // c
  at::parallel_for(0, m, 16, [=](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)  // r_i = sqrt(u_i) / row max
      update_row(G + i * n, std::sqrt(uu[i]) / std::max(rm[i], floor), vv, k, a, W + i * n, n);
  });
}

// Each of `count` matrices (m, n), end to end at G and W; B holds one. k: 1 - lr wd; a: -lr.
void step_matrices(int64_t G, int64_t W, int64_t B, int64_t count, int64_t m, int64_t n,
                   int64_t iters, bool float64, double k, double a) {
  for (int64_t e = 0; e < count; ++e) {
    if (float64)
      step((const double*)G + e * m * n, (double*)W + e * m * n, (double*)B, m, n, iters, k, a);
    else
      step((const float*)G + e * m * n, (float*)W + e * m * n, (float*)B, m, n, iters, (float)k,
           (float)a);
  }
}

// ZeRO: a rank's flat partition holds blocks of rows of many matrices, their rows and columns
// stacked end to end. A block is (first stacked row, first stacked column, rows, columns, offset
// in the partition, whether its rows are whole); blocks never share a row. The sums of a row cut
// by the partition's edges are all-reduced between the passes (sinkgd_cpu.step_partition).
struct Blocks {
  const int64_t* at;
  int64_t count;
  int64_t operator()(int64_t b, int k) const { return at[6 * b + k]; }
};

template <typename T>  // row_max[r + i] = max_j |G_ij|, then B = (G / row max)^2: a whole row's
static void prescale_blocks(const T* G, T* B, Blocks blocks, T* row_max, bool cut_rows) {
  const T floor = std::numeric_limits<T>::min() * std::numeric_limits<T>::epsilon();
  for (int64_t b = 0; b < blocks.count; ++b) {  // at once, a cut row's after its max's all-reduce
    const int64_t r = blocks(b, 0), h = blocks(b, 2), w = blocks(b, 3), o = blocks(b, 4);
    const bool whole = blocks(b, 5);
    if (cut_rows && whole) continue;
    at::parallel_for(0, h, 16, [=](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if (!cut_rows) row_max[r + i] = abs_max(G + o + i * w, w);
        if (cut_rows || whole)
          prescale_row(G + o + i * w, std::max(row_max[r + i], floor), B + o + i * w, w);
      }
    });
  }
}

template <typename T>  // one iteration's pass: u for every row held, then this rank's B^T u
static void pass_blocks(const T* B, Blocks blocks, const T* v, const T* n, const T* row_sums,
                        T* u, T* col_sums) {
  const int64_t threads = at::get_num_threads();
  for (int64_t b = 0; b < blocks.count; ++b) {
    const int64_t r = blocks(b, 0), c = blocks(b, 1), h = blocks(b, 2), w = blocks(b, 3);
    const T* Bb = B + blocks(b, 4);
    const bool whole = blocks(b, 5);
    const int64_t P = std::max<int64_t>(1, std::min<int64_t>(threads, h / 16));
    std::vector<T> parts(P * w);
    T* s = parts.data();
    at::parallel_for(0, P, 1, [=](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        T* sp = s + p * w;
        std::fill(sp, sp + w, T(0));
        const int64_t end = h * (p + 1) / P;
        for (int64_t i = h * p / P; i < end; i += 4) {
          const int R = (int)std::min<int64_t>(4, end - i);
          T t[4];
          if (whole) dot_rows(Bb + i * w, v + c, w, R, t);  // (B v)_i, held whole here
          for (int q = 0; q < R && !whole; ++q) t[q] = row_sums[r + i + q];  // all-reduced
          for (int q = 0; q < R; ++q) u[r + i + q] = finite_or_zero(n[r + i + q] / t[q]);
          axpy_rows(u + r + i, Bb + i * w, w, R, sp);
        }
      }
    });
    for (int64_t p = 0; p < P; ++p)
      for (int64_t j = 0; j < w; ++j) col_sums[c + j] += s[p * w + j];
  }
}

template <typename T>  // row_sums[r] = this rank's share of (B v)_r, for the rows cut by its edges
static void cut_row_sums(const T* B, Blocks blocks, const T* v, T* row_sums) {
  for (int64_t b = 0; b < blocks.count; ++b)
    for (int64_t i = 0; i < blocks(b, 2) && !blocks(b, 5); ++i) {
      T t[1];
      dot_rows(B + blocks(b, 4) + i * blocks(b, 3), v + blocks(b, 1), blocks(b, 3), 1, t);
      row_sums[blocks(b, 0) + i] = t[0];
    }
}

template <typename T>  // W <- k W + a diag(r) G diag(c), block by block; c = sqrt(v)
static void update_blocks(const T* G, T* W, Blocks blocks, const T* row_max, const T* u,
                          const T* c, T k, T a) {
  const T floor = std::numeric_limits<T>::min() * std::numeric_limits<T>::epsilon();
  for (int64_t b = 0; b < blocks.count; ++b) {
    const int64_t r = blocks(b, 0), col = blocks(b, 1), w = blocks(b, 3), o = blocks(b, 4);
    at::parallel_for(0, blocks(b, 2), 16, [=](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        update_row(G + o + i * w, std::sqrt(u[r + i]) / std::max(row_max[r + i], floor), c + col,
                   k, a, W + o + i * w, w);
    });
  }
}

// The partition functions, by phase; every pointer is to float64 data if float64, else float32.
void blocks_call(const std::string& phase, int64_t blocks, int64_t count, bool float64,
                 int64_t X, int64_t Y, int64_t Z, int64_t P, int64_t Q, int64_t R, double k,
                 double a) {
  const Blocks bl{(const int64_t*)blocks, count};
  auto run = [&](auto zero) {
    using T = decltype(zero);
    if (phase == "prescale" || phase == "prescale_cut_rows")  // G, B, row_max
      prescale_blocks((const T*)X, (T*)Y, bl, (T*)Z, phase == "prescale_cut_rows");
    else if (phase == "cut_row_sums")  // B, v, row_sums
      cut_row_sums((const T*)X, bl, (const T*)Y, (T*)Z);
    else if (phase == "pass")  // B, v, n, row_sums, u, col_sums
      pass_blocks((const T*)X, bl, (const T*)Y, (const T*)Z, (const T*)P, (T*)Q, (T*)R);
    else if (phase == "update")  // G, W, row_max, u, c
      update_blocks((const T*)X, (T*)Y, bl, (const T*)Z, (const T*)P, (const T*)Q, (T)k, (T)a);
  };
  if (float64) run(double(0)); else run(float(0));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("step_matrices", &step_matrices);
  module.def("blocks_call", &blocks_call);
}
"""


def _cpu_flags() -> str:  # -march=native code runs on this kind of CPU only
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def kernel(required: bool = False):
    """The built extension; where it does not build, None (warned once) or, if required, the
    build's error."""
    if required and _kernel() is None:
        raise RuntimeError(f"sinkgd_cpu: the fused CPU step did not build: {_build_error}")
    return _kernel()


_build_error = None


@functools.cache
def _kernel():
    global _build_error
    from torch.utils.cpp_extension import _get_build_directory, load
    tag = hashlib.sha256((SOURCE + _cpu_flags()).encode()).hexdigest()[:12]
    name = f"sinkgd_cpu_{tag}"
    try:
        source = os.path.join(_get_build_directory(name, verbose=False), "sinkgd_cpu.cpp")
        if not os.path.exists(source):
            with open(source + f".{os.getpid()}", "w") as f:
                f.write(SOURCE)
            os.replace(source + f".{os.getpid()}", source)
        return load(name, [source], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001  (no compiler, no OpenMP, a read-only cache)
        _build_error = e
        warnings.warn(f"sinkgd_cpu: the fused CPU step did not build ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); SinkGD steps with "
                      "the eager fast form", stacklevel=2)
        return None


# sinkgd.py's fast form and update as this kernel computes them: a hash of their source. An edit
# there (README: the one place to change the algorithm) makes SinkGD step eagerly, with a warning.
FAST_FORM = "d2ccfa61c084"


@functools.cache
def _follows(*functions) -> bool:
    import inspect
    source = "".join(inspect.getsource(f) for f in functions)
    if hashlib.sha256(source.encode()).hexdigest()[:12] == FAST_FORM:
        return True
    warnings.warn("sinkgd_cpu: sinkgd.py's fast form is not the one the kernel computes (edited?); "
                  "SinkGD steps with the eager fast form", stacklevel=3)
    return False


def follows_fast_form() -> bool:
    """Whether sinkgd.py's row_abs_max, prescale, sinkhorn, rebuild and SinkGD._apply are the ones
    the kernel computes (tests/test_sinkgd_cpu.py fails when they change: check the kernel)."""
    import sinkgd
    return _follows(sinkgd.row_abs_max, sinkgd.prescale, sinkgd.sinkhorn, sinkgd.rebuild,
                    sinkgd.SinkGD._apply)


def step_stack(optimizer, stack, grads, weights, workspace, group, found_inf) -> bool:
    """SinkGD's step of a stack in the kernel, if it applies (False: step it eagerly)."""
    if (optimizer.cpu_kernel is False or hasattr(stack[0], "placements")  # DTensors: eager
            or not all(map(applies, grads, weights)) or workspace.dtype != grads[0].dtype
            or not follows_fast_form() or kernel() is None):
        return False
    if found_inf is None or not found_inf.item():  # on the CPU: no device sync
        for G, W in zip(grads, weights):
            step(G, W, workspace, group["sinkhorn_iters"], group["lr"], group["weight_decay"])
    return True


def step_partition(optimizer, flat: Tensor, part, group: dict, all_reduce, workspace,
                   whole_matrices: bool = True) -> bool:
    """ZeroSinkGD's step of a rank's flat partition in the kernel, if it applies (False: step it
    eagerly): a matrix held whole here as SinkGD's, the others by blocks of rows with
    sinkgd_zero.sr_sinkhorn_sharded's collectives (the same on every rank), one pass over B per
    iteration, the update without X. whole_matrices=False: every matrix by blocks (as at ZeRO-3,
    where each rank holds a piece of each; for tools/bench_optimizer)."""
    G, W = flat.grad, flat.data
    if (optimizer.cpu_kernel is False or not applies(G.view(1, -1), W.view(1, -1))
            or workspace.dtype != G.dtype or not follows_fast_form() or kernel() is None):
        return False
    if getattr(part, "kernel_layout", None) != whole_matrices:  # made once
        whole_rows = [b[3] == int(part.n[b[0]]) for b in part.blocks]  # columns: the matrix's n
        alone = [whole_matrices and whole and b[2] == int(part.m[b[1]])  # others add nothing
                 for b, whole in zip(part.blocks, whole_rows)]
        part.kernel_matrices = [(o, h, w) for (_, _, h, w, o), a in zip(part.blocks, alone) if a]
        # The other blocks: (row, column, rows, columns, offset, whether its rows are whole)
        part.kernel_blocks = torch.tensor([(*b, whole) for b, whole, a in
                                           zip(part.blocks, whole_rows, alone) if not a],
                                          dtype=torch.int64).reshape(-1, 6)
        part.kernel_layout = whole_matrices
    lr, weight_decay, iters = group["lr"], group["weight_decay"], group["sinkhorn_iters"]
    for o, h, w in part.kernel_matrices:  # in cache through its L iterations
        step(G[o:o + h * w].view(h, w), W[o:o + h * w].view(h, w), workspace, iters, lr,
             weight_decay)
    # The rest, with every rank's collectives: the same sequence as sr_sinkhorn_sharded's
    blocks, f64 = part.kernel_blocks, G.dtype == torch.float64

    def call(phase, *tensors, k=1.0, a=0.0):
        ptrs = [t.data_ptr() for t in tensors] + [0] * (6 - len(tensors))
        kernel().blocks_call(phase, blocks.data_ptr(), len(blocks), f64, *ptrs, k, a)
    n, m, row_max = part.n.to(G.dtype), part.m.to(G.dtype), G.new_zeros(part.num_rows)
    call("prescale", G, workspace, row_max)  # whole rows; the cut ones' maxima
    all_reduce(row_max, "max")
    call("prescale_cut_rows", G, workspace, row_max)
    u, v = G.new_zeros(part.num_rows), G.new_ones(part.num_cols)
    for i in range(iters):
        row_sums, col_sums = G.new_zeros(part.num_rows), G.new_zeros(part.num_cols)
        call("cut_row_sums", workspace, v, row_sums)
        all_reduce(row_sums, "sum")
        call("pass", workspace, v, n, row_sums, u, col_sums)
        all_reduce(col_sums, "sum")
        v = torch.div(m if i == iters - 1 else col_sums.amax(), col_sums).nan_to_num_(posinf=0.0)
    call("update", G, W, row_max, u, v.sqrt(), k=1 - lr * weight_decay, a=-lr)
    return True


def applies(G: Tensor, W: Tensor) -> bool:
    """The kernel takes row-major float32 or float64 matrices (or stacks) on the CPU, G and W
    alike; anything else (a GPU, bf16 weights, transposed=True's views) steps eagerly."""
    return (G.device.type == "cpu" and W.device.type == "cpu" and G.dtype == W.dtype
            and G.dtype in (torch.float32, torch.float64) and G.shape == W.shape
            and G.is_contiguous() and W.is_contiguous() and G.dim() >= 2)


def step(G: Tensor, W: Tensor, workspace: Tensor, num_iters: int, lr: float,
         weight_decay: float) -> None:
    """W <- (1 - lr * weight_decay) W - lr * sr_sinkhorn(G, num_iters), for every trailing (m, n)
    matrix of G, in place. workspace: at least one matrix of G's dtype (B)."""
    m, n = G.shape[-2:]
    if not (applies(G, W) and workspace.dtype == G.dtype and workspace.numel() >= m * n):
        raise ValueError("sinkgd_cpu.step takes contiguous float32/float64 CPU matrices G, W of "
                         "one shape and dtype, and a workspace of one matrix")
    kernel().step_matrices(G.data_ptr(), W.data_ptr(), workspace.data_ptr(), G.numel() // (m * n)
                           if m * n else 0, m, n, num_iters, G.dtype == torch.float64,
                           1 - lr * weight_decay, -lr)
