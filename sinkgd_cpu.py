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
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) { module.def("step_matrices", &step_matrices); }
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
