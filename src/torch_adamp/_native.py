"""The CPU kernels of the fused path: C source, build (once per machine, cached) and ctypes binding.

Why a hand-written kernel rather than ``torch.compile`` on CPU (measured on the
2-core AMD EPYC development machine, 1 thread, see docs/performance.md):

* compiling the functional step with inductor takes minutes for a ResNet-50
  parameter list (gcc -O3 on one C++ function with thousands of loops), and
  the generated code ran 2.5-3x slower than torch's fused AdamW: it computes
  ``u = m / (sqrt(v) / sqrt(bc2) + eps)`` in both passes (square root and
  division bound the step on CPU as much as memory does) and re-evaluates the
  decision's scalar chain inside the inner loops;
* this kernel computes ``u`` once per element and moves the fewest bytes the
  cache allows. The scale-invariance test needs ``<w,g>``, ``||w||^2`` and
  ``||g||^2`` of every row (and their totals) before ``w`` may change. AdamP,
  tensors up to ``_fused.STAGE_BYTES``: sweep A updates the moments, stages
  ``u`` in a scratch buffer and sums the row statistics and ``<w,u>``; sweep B
  projects and steps from the staged ``u`` while it is still in cache. Larger
  AdamP tensors are **speculated**: the kernel remembers the view each one took
  at its last step (keyed by its data pointer) and sweeps it once, row by row,
  under that view: stage the row (moments, ``u`` in a per-thread row buffer,
  the four row sums), copy the old row to a spare block with non-temporal
  stores, step it. When the decision, taken at the end from the same row sums,
  differs (or a row fails a guessed channel test), the written rows are
  stepped again from the copy under the decided view; the result is bitwise
  the staged scheme's either way, only slower. Tensors above
  ``_fused.SPECULATE_MAX_BYTES`` (64 MiB) are not speculated, which bounds the
  spare block kept between steps. Views rarely change between
  steps (measured, 600 AdamP steps of the Fashion-MNIST BatchNorm CNN: the
  guess was right in 2379 of 2388 sweeps; the conv weights never changed view,
  the classifier's weight sometimes moved between "none" and "layer"), so the
  steady state is one sweep plus the copy. Without a guess (first step, the
  layer view, half-precision parameters) the two-pass scheme runs: pass 1 reads
  only ``w`` and ``g``; pass 2 goes row by row, keeping ``u`` of the row in a
  per-thread buffer while it sums ``<w,u>``, then projects and steps (the row
  is still in L1/L2); only the layer view needs a sweep for the whole-tensor
  ``<w,u>`` first. ``scale_invariant="channel"`` needs no guess and no copy: one
  sweep. SGDP (whose direction costs no division): sweep A (buffer update, row
  sums and ``<w,d>``) then sweep B; tensors above the same threshold are
  speculated the same way (sweep A then B per row, the old row copied), except
  under a channel guess when the projected direction is stored in the buffer
  (the default ``project_momentum=True`` without nesterov): the buffer would
  need a copy too, and that measured slower than the two sweeps. Tensors
  that are never projected take one sweep, like torch's fused kernels. Traffic
  from memory for tensors larger than the cache, per parameter: AdamP 32 bytes
  when the guess holds (AdamW: 28; the copy adds 4), 36 without a guess (``w``
  and ``g`` read twice), up to 44 when the guess is wrong; SGDP 24 when
  speculated, 28-32 otherwise (SGD: 20).

The operation order mirrors the reference package element by element (``m *
b1`` then a fused multiply-add like ``add_(alpha=)``, the same scalar roundings
of step size and decay factor, ``eps`` added after the bias-corrected square
root), compiled with ``-ffp-contract=off`` so that the compiler adds no fused
operations of its own; the projection uses the batched form of
:func:`torch_adamp.projection.projection_coefficients` (``u - c w`` with
``c = <w,u> / (||w|| + eps)^2``). Results match the reference to float32
rounding (about 1e-7 relative over 100 steps), like the multi-tensor path.
Any thread count gives identical bits (row sums are formed per row by one
thread and added in row order); AdamP's two schemes do the same arithmetic
in different loops (bitwise equal with the GCC 12 build measured here).

Build: the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``), 3-5
seconds, once per machine; the shared object is cached under
``$TORCH_ADAMP_CACHE_DIR`` (default ``~/.cache/torch_adamp``), keyed by the
source, the flags, the compiler and the CPU. ``TORCH_ADAMP_NATIVE=0`` disables
it. When no compiler works, :func:`load` returns ``None`` and the callers fall
back (the default path to the multi-tensor implementation).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HEAD = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#define omp_thread() (nt > 1 ? omp_get_thread_num() : 0) /* 0 in the serial branch of PFOR, even when
                                                               called from inside some outer OpenMP region */
#else
#define omp_thread() 0
#endif
#define INL static inline __attribute__((always_inline))
#define PAR_MIN 32768
#define BLOCK 16384
#define MODE_NEVER 0
#define MODE_AUTO 1
#define MODE_CHANNEL 2
#define MODE_LAYER 3
#define VIEW_NONE 0
#define VIEW_CHANNEL 1
#define VIEW_LAYER 2
#define FMAX(a, b) ((a) < (b) ? (b) : (a)) /* propagates NaN like clamp_min */

/* channel view of tensor i: R rows of C (R = 0: never projected, C = numel) */
INL void shape_of(const int64_t* meta, int64_t n, int64_t i, int64_t* R, int64_t* C) {
    int64_t numel = meta[i], rows = meta[n + i];
    *R = rows > 0 && numel > 0 ? rows : 0;
    *C = *R > 0 ? numel / rows : numel;
}
/* for (VAR = 0; VAR < COUNT; VAR++) BODY, on nt OpenMP threads when PAR holds; no OpenMP call otherwise */
#ifdef _OPENMP
#define PFOR(PAR, VAR, COUNT, ...)                                         \
    do {                                                                   \
        if (PAR) {                                                         \
            _Pragma("omp parallel for num_threads(nt) schedule(static)")   \
            for (int64_t VAR = 0; VAR < (COUNT); VAR++) __VA_ARGS__        \
        } else {                                                           \
            for (int64_t VAR = 0; VAR < (COUNT); VAR++) __VA_ARGS__        \
        }                                                                  \
    } while (0)
#else
#define PFOR(PAR, VAR, COUNT, ...)                                         \
    do {                                                                   \
        for (int64_t VAR = 0; VAR < (COUNT); VAR++) __VA_ARGS__            \
    } while (0)
#endif
/* ---- speculation support (AdamP tensors too large to stage) ----
   hints: the view each such tensor took at its last step, keyed by its data pointer; the guess of the
   speculative sweep. A wrong or stale guess costs time, never correctness (the sweep verifies it).
   Direct-mapped: a collision overwrites. spare: one scratch block kept between calls for the copy of the
   rows written under a guess (fresh pages would fault on every step). Both guarded by one mutex. */
#define HINT_SLOTS 4096
static uintptr_t hint_key[HINT_SLOTS];
static signed char hint_view[HINT_SLOTS];
static void* spare;
static size_t spare_bytes;
static pthread_mutex_t spec_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t hint_slot(const void* key) {
    return (size_t)((((uintptr_t)key >> 4) * 0x9E3779B97F4A7C15ull) >> 40) & (HINT_SLOTS - 1);
}
/* views[i] = the hint of keys[i] (-1: none), for i < n */
static void hints_get(const int64_t* keys, int64_t n, signed char* views) {
    pthread_mutex_lock(&spec_lock);
    for (int64_t i = 0; i < n; i++) {
        size_t k = hint_slot((const void*)keys[i]);
        views[i] = keys[i] != 0 && hint_key[k] == (uintptr_t)keys[i] ? hint_view[k] : -1;
    }
    pthread_mutex_unlock(&spec_lock);
}
/* record views[i] (the view decided at this step) as the hint of keys[i], then free keys and guess (the
   arrays of hints_alloc); views == NULL: only free them */
static void hints_put(int64_t* keys, signed char* guess, int64_t n, const int64_t* views) {
    if (views != NULL) {
        pthread_mutex_lock(&spec_lock);
        for (int64_t i = 0; i < n; i++) {
            if (keys[i] == 0) continue;
            size_t k = hint_slot((const void*)keys[i]);
            hint_key[k] = (uintptr_t)keys[i];
            hint_view[k] = (signed char)views[i];
        }
        pthread_mutex_unlock(&spec_lock);
    }
    free(keys);
    free(guess);
}
/* the arrays of one call: hint keys (0: not a candidate) and guessed views; -1 when out of memory */
static int hints_alloc(int64_t n, int64_t** keys, signed char** guess) {
    *keys = (int64_t*)calloc(n > 0 ? (size_t)n : 1, sizeof(int64_t));
    *guess = (signed char*)malloc(n > 0 ? (size_t)n : 1);
    if (*keys != NULL && *guess != NULL) return 0;
    hints_put(*keys, *guess, n, NULL);
    return -1;
}
/* bytes of the largest tensor with a CHANNEL or NONE guess: the spare block the call needs */
static size_t guessed_bytes(const int64_t* meta, int64_t n, const signed char* guess, size_t item) {
    size_t most = 0;
    int64_t R, C;
    for (int64_t i = 0; i < n; i++) {
        if (guess[i] != VIEW_CHANNEL && guess[i] != VIEW_NONE) continue;
        shape_of(meta, n, i, &R, &C);
        if ((size_t)(R * C) * item > most) most = (size_t)(R * C) * item;
    }
    return most;
}
/* forget every hint and free the spare block (tests; memory pressure) */
void torch_adamp_forget(void) {
    pthread_mutex_lock(&spec_lock);
    memset(hint_key, 0, sizeof hint_key);
    free(spare);
    spare = NULL;
    spare_bytes = 0;
    pthread_mutex_unlock(&spec_lock);
}
/* speculative sweeps since the library was loaded: out[0] guessed right, out[1] guessed wrong */
static int64_t spec_right, spec_wrong;
void torch_adamp_spec_counts(int64_t* out) {
    out[0] = __atomic_load_n(&spec_right, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&spec_wrong, __ATOMIC_RELAXED);
}
size_t torch_adamp_spare_bytes(void) {
    pthread_mutex_lock(&spec_lock);
    size_t b = spare_bytes;
    pthread_mutex_unlock(&spec_lock);
    return b;
}
/* a block of at least *bytes (64-byte aligned): the spare one if large enough, else a new one */
static void* spare_take(size_t* bytes) {
    void* p = NULL;
    pthread_mutex_lock(&spec_lock);
    if (spare != NULL && spare_bytes >= *bytes) {
        p = spare;
        *bytes = spare_bytes;
        spare = NULL;
        spare_bytes = 0;
    }
    pthread_mutex_unlock(&spec_lock);
    if (p == NULL) {
        *bytes = (*bytes + 63) / 64 * 64;
        p = aligned_alloc(64, *bytes);
    }
    return p;
}
/* keep the larger of the returned block and the spare one */
static void spare_give(void* p, size_t bytes) {
    if (p == NULL) return;
    pthread_mutex_lock(&spec_lock);
    if (spare == NULL || spare_bytes < bytes) {
        void* old = spare;
        spare = p;
        spare_bytes = bytes;
        p = old;
    }
    pthread_mutex_unlock(&spec_lock);
    free(p);
}
/* dst[0:n] = src[0:n] with non-temporal stores where the CPU has them: the copy of a written row is
   read back only when the guess was wrong, so it should not evict the data of the sweep */
#if defined(__AVX512F__)
#define STREAM_F32(d, s) _mm512_stream_ps(d, _mm512_loadu_ps(s))
#define STREAM_F64(d, s) _mm512_stream_pd(d, _mm512_loadu_pd(s))
#define STREAM_BYTES 64
#elif defined(__AVX__)
#define STREAM_F32(d, s) _mm256_stream_ps(d, _mm256_loadu_ps(s))
#define STREAM_F64(d, s) _mm256_stream_pd(d, _mm256_loadu_pd(s))
#define STREAM_BYTES 32
#elif defined(__SSE2__)
#define STREAM_F32(d, s) _mm_stream_ps(d, _mm_loadu_ps(s))
#define STREAM_F64(d, s) _mm_stream_pd(d, _mm_loadu_pd(s))
#define STREAM_BYTES 16
#endif
#ifdef STREAM_BYTES
#define STREAM_FENCE() _mm_sfence()
#define DEFINE_STREAM_COPY(NAME, TYPE, STORE)                                                   \
    static void NAME(TYPE* restrict dst, const TYPE* restrict src, int64_t n) {                 \
        const int64_t w = STREAM_BYTES / (int64_t)sizeof(TYPE);                                 \
        int64_t j = 0;                                                                          \
        for (; j < n && ((uintptr_t)(dst + j) % STREAM_BYTES) != 0; j++) dst[j] = src[j];       \
        for (; j + w <= n; j += w) STORE(dst + j, src + j);                                     \
        for (; j < n; j++) dst[j] = src[j];                                                     \
    }
#else
#define STREAM_FENCE() ((void)0)
#define DEFINE_STREAM_COPY(NAME, TYPE, STORE)                                                   \
    static void NAME(TYPE* restrict dst, const TYPE* restrict src, int64_t n) { memcpy(dst, src, sizeof(TYPE) * n); }
#endif
DEFINE_STREAM_COPY(stream_copy_f32, float, STREAM_F32)
DEFINE_STREAM_COPY(stream_copy_f64, double, STREAM_F64)
"""

BODY = r"""
typedef struct {
    T b1, b2, c1, c2, eps, sbc2, ss, f, sgn, mom, damp1;
} FN(hyp_t);

/* per-row statistics of the scale-invariance test: <p,g>, ||p||^2, ||g||^2 */
INL void FN(row_stats)(const T* restrict p, const T* restrict g, int64_t C, T sgn, T* restrict out) {
    T pg = 0, pp = 0, gg = 0;
#pragma omp simd reduction(+ : pg, pp, gg)
    for (int64_t j = 0; j < C; j++) {
        T pj = p[j], gj = g[j];
        pg += pj * gj;
        pp += pj * pj;
        gg += gj * gj;
    }
    out[0] = sgn * pg;
    out[1] = pp;
    out[2] = gg;
}

/* The scale-invariance decision (VIEW_NONE, VIEW_CHANNEL or VIEW_LAYER) from the row sums
   stats[4r+0..2] = <w,g>, ||w||^2, ||g||^2 of each row; tot[0..2] receive their totals. */
/* whether one row (or the whole tensor: the totals) passes: |cos(w, g)| < thr; NaN fails */
INL int FN(passes)(const T* st, T eps, T thr) {
    T cos = FABS(st[0]) / (FMAX(SQRT(st[2]), eps) * FMAX(SQRT(st[1]), eps));
    return cos < thr;
}
static int FN(decide_from)(const T* stats, int64_t R, int64_t C, T eps, double delta, int mode, T* tot) {
    T chan_thr = (T)(delta / sqrt((double)C)), layer_thr = (T)(delta / sqrt((double)(R * C)));
    int64_t fails = 0;
    if (mode == MODE_AUTO) { /* per row, element-wise: vectorised across rows (the same bits) */
#pragma omp simd reduction(+ : fails)
        for (int64_t r = 0; r < R; r++) fails += !FN(passes)(stats + 4 * r, eps, chan_thr);
    }
    tot[0] = tot[1] = tot[2] = 0;
    for (int64_t r = 0; r < R; r++) { /* in row order, whatever the thread count */
        tot[0] += stats[4 * r];
        tot[1] += stats[4 * r + 1];
        tot[2] += stats[4 * r + 2];
    }
    if (mode == MODE_CHANNEL) return VIEW_CHANNEL;
    if (mode == MODE_LAYER) return VIEW_LAYER;
    if (fails == 0) return VIEW_CHANNEL;
    return FN(passes)(tot, eps, layer_thr) ? VIEW_LAYER : VIEW_NONE;
}

/* AdamP's pass 1 (reads w and g only): the row sums, then the decision; stats[4r+3] is left free */
static int FN(decide)(const T* p, const T* g, int64_t R, int64_t C, T sgn, T eps, double delta, int mode,
                      T* stats, T* tot, int nt) {
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, { FN(row_stats)(p + r * C, g + r * C, C, sgn, stats + 4 * r); });
    return FN(decide_from)(stats, R, C, eps, delta, mode, tot);
}

/* c = <w,u> / (||w|| + eps)^2: the projected update is u - c w */
INL T FN(coef)(T wu, T ww, T eps) {
    T nrm = SQRT(ww) + eps;
    return wu / (nrm * nrm);
}

/* the channel view's coefficient of every row, in place of <w,u> (stats[4r+3]); vectorised across rows */
static void FN(channel_coefs)(T* stats, int64_t R, T eps) {
#pragma omp simd
    for (int64_t r = 0; r < R; r++) stats[4 * r + 3] = FN(coef)(stats[4 * r + 3], stats[4 * r + 1], eps);
}

/* ================================ AdamP ================================ */

/* moments of one element (stored back when STORE) and the update direction u */
INL T FN(adam_u)(const FN(hyp_t) * h, T gj, T* restrict mj_p, T* restrict vj_p, const int nest, const int store) {
    gj = h->sgn * gj;
    T mj = FMA(gj, h->c1, *mj_p * h->b1); /* m.mul_(b1).add_(g, alpha=1-b1) */
    T vj = *vj_p * h->b2 + h->c2 * gj * gj; /* v.mul_(b2).addcmul_(g, g, value=1-b2) */
    if (store) {
        *mj_p = mj;
        *vj_p = vj;
    }
    T d = SQRT(vj) / h->sbc2 + h->eps; /* (sqrt(v) / sqrt(bc2)).add_(eps) */
    return nest ? (h->b1 * mj + h->c1 * gj) / d : mj / d;
}

/* sum_j w_j u_j, storing nothing (the layer view needs it over the whole tensor first) */
INL T FN(adam_wu)(const FN(hyp_t) * h, const T* restrict p, const T* restrict g, T* restrict m, T* restrict v,
                  int64_t N, const int nest) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < N; j++) acc += p[j] * FN(adam_u)(h, g[j], m + j, v + j, nest, 0);
    return acc;
}

/* one sweep: moments, u <- u - c w (PROJ), w <- f w - s u */
INL void FN(adam_sweep)(const FN(hyp_t) * h, T* restrict p, const T* restrict g, T* restrict m, T* restrict v,
                        int64_t N, T c, const int nest, const int dec, const int proj) {
#pragma omp simd
    for (int64_t j = 0; j < N; j++) {
        T pj = p[j];
        T u = FN(adam_u)(h, g[j], m + j, v + j, nest, 1);
        if (proj) u = u - c * pj;
        T p1 = dec ? pj * h->f : pj;
        p[j] = FMA(u, h->ss, p1); /* p.mul_(f) then p.add_(u, alpha=-step_size) */
    }
}

/* channel view, one row: sweep A stores the moments and u (in buf) and sums w*u; sweep B projects and steps
   while the row is still in cache, so u is computed once per element */
INL void FN(adam_row)(const FN(hyp_t) * h, T* restrict p, const T* restrict g, T* restrict m, T* restrict v,
                      int64_t N, T* restrict buf, T ww, const int nest, const int dec) {
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < N; j++) {
        T u = FN(adam_u)(h, g[j], m + j, v + j, nest, 1);
        buf[j] = u;
        acc += p[j] * u;
    }
    T c = FN(coef)(acc, ww, h->eps);
#pragma omp simd
    for (int64_t j = 0; j < N; j++) {
        T pj = p[j];
        T u = buf[j] - c * pj;
        T p1 = dec ? pj * h->f : pj;
        p[j] = FMA(u, h->ss, p1);
    }
}

/* the same with nesterov / decay as compile-time constants (one specialised loop each) */
#define SPECIALISE2(CALL)                       \
    do {                                        \
        if (nest) {                             \
            if (dec) CALL(1, 1); else CALL(1, 0); \
        } else {                                \
            if (dec) CALL(0, 1); else CALL(0, 0); \
        }                                       \
    } while (0)

static void FN(adam_row_any)(const FN(hyp_t) * h, T* p, const T* g, T* m, T* v, int64_t N, T* buf, T ww, int nest,
                             int dec) {
#define CALL(a, b) FN(adam_row)(h, p, g, m, v, N, buf, ww, a, b)
    SPECIALISE2(CALL);
#undef CALL
}

static void FN(adam_sweep_any)(const FN(hyp_t) * h, T* p, const T* g, T* m, T* v, int64_t N, T c, int nest, int dec,
                               int proj) {
    if (proj) {
#define CALL(a, b) FN(adam_sweep)(h, p, g, m, v, N, c, a, b, 1)
        SPECIALISE2(CALL);
#undef CALL
    } else {
#define CALL(a, b) FN(adam_sweep)(h, p, g, m, v, N, c, a, b, 0)
        SPECIALISE2(CALL);
#undef CALL
    }
}

static T FN(adam_wu_any)(const FN(hyp_t) * h, const T* p, const T* g, T* m, T* v, int64_t N, int nest) {
    return nest ? FN(adam_wu)(h, p, g, m, v, N, 1) : FN(adam_wu)(h, p, g, m, v, N, 0);
}

/* Staged tensors (up to stage_bytes, set by torch_adamp._fused.STAGE_BYTES: most tensors): sweep A stores the
   moments, stages u in a scratch buffer and sums <w,g>, ||w||^2, ||g||^2 and <w,u> per row (everything the
   decision and both views need, so the layer view costs no extra sweep); sweep B steps from the staged u,
   still in the last-level cache. Either way u is computed once per element. */
INL void FN(adam_stage)(const FN(hyp_t) * h, const T* restrict p, const T* restrict g, T* restrict m, T* restrict v,
                        T* restrict U, int64_t C, T* restrict out, const int nest) {
    T pg = 0, pp = 0, gg = 0, pu = 0;
#pragma omp simd reduction(+ : pg, pp, gg, pu)
    for (int64_t j = 0; j < C; j++) {
        T pj = p[j], gj = g[j];
        T u = FN(adam_u)(h, gj, m + j, v + j, nest, 1);
        U[j] = u;
        pg += pj * gj;
        pp += pj * pj;
        gg += gj * gj;
        pu += pj * u;
    }
    out[0] = h->sgn * pg;
    out[1] = pp;
    out[2] = gg;
    out[3] = pu;
}

INL void FN(adam_apply)(const FN(hyp_t) * h, T* restrict p, const T* restrict U, int64_t N, T c, const int dec,
                        const int proj) {
#pragma omp simd
    for (int64_t j = 0; j < N; j++) {
        T pj = p[j];
        T u = U[j];
        if (proj) u = u - c * pj;
        T p1 = dec ? pj * h->f : pj;
        p[j] = FMA(u, h->ss, p1);
    }
}

static void FN(adam_stage_any)(const FN(hyp_t) * h, const T* p, const T* g, T* m, T* v, T* U, int64_t C, T* out,
                               int nest) {
    if (nest)
        FN(adam_stage)(h, p, g, m, v, U, C, out, 1);
    else
        FN(adam_stage)(h, p, g, m, v, U, C, out, 0);
}

static void FN(adam_apply_any)(const FN(hyp_t) * h, T* p, const T* U, int64_t N, T c, int dec, int proj) {
    if (dec) {
        if (proj) FN(adam_apply)(h, p, U, N, c, 1, 1); else FN(adam_apply)(h, p, U, N, c, 1, 0);
    } else {
        if (proj) FN(adam_apply)(h, p, U, N, c, 0, 1); else FN(adam_apply)(h, p, U, N, c, 0, 0);
    }
}

/* Recovery after a wrong guess: rows stepped from their old values src (the copy of a written row, or the
   row itself: src may be p), with u re-derived from the stored moments (adam_u's arithmetic: the same bits) */
INL void FN(adam_redo)(const FN(hyp_t) * h, T* p, const T* src, const T* restrict g, const T* restrict m,
                       const T* restrict v, int64_t N, T c, const int nest, const int dec, const int proj) {
#pragma omp simd
    for (int64_t j = 0; j < N; j++) {
        T pj = src[j];
        T d = SQRT(v[j]) / h->sbc2 + h->eps;
        T u = nest ? (h->b1 * m[j] + h->c1 * (h->sgn * g[j])) / d : m[j] / d;
        if (proj) u = u - c * pj;
        T p1 = dec ? pj * h->f : pj;
        p[j] = FMA(u, h->ss, p1);
    }
}

static void FN(adam_redo_any)(const FN(hyp_t) * h, T* p, const T* src, const T* g, const T* m, const T* v,
                              int64_t N, T c, int nest, int dec, int proj) {
    if (proj) {
#define CALL(a, b) FN(adam_redo)(h, p, src, g, m, v, N, c, a, b, 1)
        SPECIALISE2(CALL);
#undef CALL
    } else {
#define CALL(a, b) FN(adam_redo)(h, p, src, g, m, v, N, c, a, b, 0)
        SPECIALISE2(CALL);
#undef CALL
    }
}

/* (The row sums come from adam_stage_any, the very function of the staged scheme: a separate loop, even one
   doing the same sums, may be vectorised with another summation order, and the decision would depend on the
   guess.)
   The speculative sweep of a tensor too large to stage, under the guessed view `spec` (CHANNEL or NONE: the
   view it took at its last step, or CHANNEL when forced): each row is staged (moments stored, u in the
   thread's row buffer, the four row sums) and, while the guess holds, stepped at once, its old values first
   streamed to bak when the guess can be wrong (`check`). A CHANNEL guess fails at the first row that fails
   the channel test (later rows are only staged); a NONE guess is known right only at the end. Right: one
   sweep from memory instead of two. Wrong: the rows are stepped again, from their old values, under the
   view decided from the same row sums, so the result does not depend on the guess. Returns that view. */
static int FN(adam_speculate)(const FN(hyp_t) * h, T* p, const T* g, T* m, T* v, int64_t R, int64_t C, int spec,
                              int check, double lr, double wd, double delta, double wd_ratio, int mode, int nest,
                              T* buf, int64_t max_c, T* bak, char* written, T* stats, int nt) {
    const int dec = wd > 0;
    const T chan_thr = (T)(delta / sqrt((double)C));
    FN(hyp_t) hs = *h;
    hs.f = (T)(1 - lr * wd * (spec != VIEW_NONE ? wd_ratio : 1.0));
    int stop = 0;
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
        int64_t o = r * C;
        T* st = stats + 4 * r;
        T* u = buf + max_c * omp_thread();
        FN(adam_stage_any)(&hs, p + o, g + o, m + o, v + o, u, C, st, nest);
        int write = !__atomic_load_n(&stop, __ATOMIC_RELAXED);
        if (write && check && spec == VIEW_CHANNEL && !FN(passes)(st, hs.eps, chan_thr)) {
            __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
            write = 0;
        }
        if (write) {
            if (check) STREAM_COPY(bak + o, p + o, C);
            T c = spec == VIEW_CHANNEL ? FN(coef)(st[3], st[1], hs.eps) : 0;
            FN(adam_apply_any)(&hs, p + o, u, C, c, dec, spec == VIEW_CHANNEL);
        }
        written[r] = (char)write;
    });
    /* The recovery below re-reads each copied row on the thread that copied it (the same static schedule
       over the same rows), so program order covers the non-temporal stores; the fence orders them for
       everything after this call. */
    STREAM_FENCE();
    T tot[3];
    int view = FN(decide_from)(stats, R, C, hs.eps, delta, mode, tot);
    if (check) __atomic_add_fetch(view == spec ? &spec_right : &spec_wrong, 1, __ATOMIC_RELAXED);
    if (view == spec) return view; /* every row was written: a CHANNEL guess stops only when the view is not */
    hs.f = (T)(1 - lr * wd * (view != VIEW_NONE ? wd_ratio : 1.0));
    T coef_l = 0;
    if (view == VIEW_LAYER) {
        T wu = 0;
        for (int64_t r = 0; r < R; r++) wu += stats[4 * r + 3];
        coef_l = FN(coef)(wu, tot[1], hs.eps);
    }
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
        int64_t o = r * C;
        T c = view == VIEW_CHANNEL ? FN(coef)(stats[4 * r + 3], stats[4 * r + 1], hs.eps) : coef_l;
        FN(adam_redo_any)(&hs, p + o, written[r] ? bak + o : p + o, g + o, m + o, v + o, C, c, nest, dec,
                          view != VIEW_NONE);
    });
    return view;
}

/* ptrs: n params, n grads, n exp_avgs, n exp_avg_sqs, n step counters (float32), in that order;
   meta: n numels, then n row counts (0: never projected) */
int FN(torch_adamp_adamp)(int64_t n, const int64_t* ptrs, const int64_t* meta, double lr, double b1, double b2,
                            double eps, double wd, double delta, double wd_ratio, int nest, int maximize, int mode,
                            int64_t* views, int nt, int64_t stage_bytes, int64_t spec_max_bytes) {
    const int64_t stage_max = stage_bytes / (int64_t)sizeof(T);
    int64_t max_r = 1, max_c = 1, max_stage = 0, R, C;
    if (nt < 1) nt = 1;
    /* tensors too large to stage, under MODE_AUTO: their hint keys (0: none) and guessed views (-1: none) */
    int64_t* keys;
    signed char* guess;
    if (hints_alloc(n, &keys, &guess) != 0) return -1;
    for (int64_t i = 0; i < n; i++) {
        shape_of(meta, n, i, &R, &C);
        if (R > max_r) max_r = R;
        if (R > 0 && mode != MODE_NEVER) {
            if (R * C <= stage_max) {
                if (R * C > max_stage) max_stage = R * C;
            } else {
                if (C > max_c) max_c = C;
                if (mode == MODE_AUTO && (int64_t)sizeof(T) * R * C <= spec_max_bytes) keys[i] = ptrs[i];
            }
        }
    }
    hints_get(keys, n, guess);
    size_t bak_bytes = guessed_bytes(meta, n, guess, sizeof(T)); /* stepped under a guess that can be wrong */
    T* stats = (T*)malloc(sizeof(T) * 4 * max_r);
    T* buf = (T*)malloc(sizeof(T) * max_c * nt); /* a row of u per thread, for tensors too large to stage */
    T* staged = max_stage > 0 ? (T*)malloc(sizeof(T) * max_stage) : NULL;
    char* written = (char*)malloc((size_t)max_r);
    T* bak = bak_bytes > 0 ? (T*)spare_take(&bak_bytes) : NULL;
    if (!stats || !buf || !written || (max_stage > 0 && !staged) || (bak_bytes > 0 && !bak)) {
        /* nothing modified yet */
        free(stats);
        free(buf);
        free(staged);
        free(written);
        spare_give(bak, bak_bytes);
        hints_put(keys, guess, n, NULL);
        return -1;
    }
    FN(hyp_t) h;
    h.b1 = (T)b1; h.b2 = (T)b2; h.c1 = (T)(1 - b1); h.c2 = (T)(1 - b2); h.eps = (T)eps;
    h.sgn = maximize ? (T)-1 : (T)1;
    const int dec = wd > 0;
    for (int64_t i = 0; i < n; i++) {
        T* p = (T*)ptrs[i];
        const T* g = (const T*)ptrs[n + i];
        T* m = (T*)ptrs[2 * n + i];
        T* v = (T*)ptrs[3 * n + i];
        float* step_p = (float*)ptrs[4 * n + i];
        float step_f = *step_p + 1.0f; /* state_steps[i] += 1 */
        *step_p = step_f;
        double step = (double)step_f;
        double bc1 = 1 - pow(b1, step);
        h.sbc2 = (T)sqrt(1 - pow(b2, step));
        h.ss = (T)(-(lr / bc1));
        shape_of(meta, n, i, &R, &C);
        int view = VIEW_NONE;
        T coef_l = 0, tot[3];
        if (R > 0 && mode != MODE_NEVER && R * C <= stage_max) {
            PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                int64_t o = r * C;
                FN(adam_stage_any)(&h, p + o, g + o, m + o, v + o, staged + o, C, stats + 4 * r, nest);
            });
            view = FN(decide_from)(stats, R, C, h.eps, delta, mode, tot);
            views[i] = view;
            h.f = (T)(1 - lr * wd * (view != VIEW_NONE ? wd_ratio : 1.0));
            if (view == VIEW_CHANNEL) {
                FN(channel_coefs)(stats, R, h.eps);
                PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                    int64_t o = r * C;
                    FN(adam_apply_any)(&h, p + o, staged + o, C, stats[4 * r + 3], dec, 1);
                });
            } else {
                if (view == VIEW_LAYER) {
                    T wu = 0;
                    for (int64_t r = 0; r < R; r++) wu += stats[4 * r + 3];
                    coef_l = FN(coef)(wu, tot[1], h.eps);
                }
                int64_t N = R * C, nblk = (N + BLOCK - 1) / BLOCK;
                PFOR(nt > 1 && N >= PAR_MIN, k, nblk, {
                    int64_t o = k * BLOCK;
                    int64_t len = N - o < BLOCK ? N - o : BLOCK;
                    FN(adam_apply_any)(&h, p + o, staged + o, len, coef_l, dec, view == VIEW_LAYER);
                });
            }
            continue;
        }
        if (R > 0 && (mode == MODE_CHANNEL || guess[i] == VIEW_CHANNEL || guess[i] == VIEW_NONE)) {
            int spec = mode == MODE_CHANNEL ? VIEW_CHANNEL : guess[i];
            views[i] = FN(adam_speculate)(&h, p, g, m, v, R, C, spec, mode == MODE_AUTO, lr, wd, delta, wd_ratio,
                                          mode, nest, buf, max_c, bak, written, stats, nt);
            continue;
        }
        if (R > 0 && mode != MODE_NEVER) { /* too large to stage, no guess: pass 1 reads w and g only */
            view = FN(decide)(p, g, R, C, h.sgn, h.eps, delta, mode, stats, tot, nt);
            if (view == VIEW_LAYER) {
                PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                    int64_t o = r * C;
                    stats[4 * r + 3] = FN(adam_wu_any)(&h, p + o, g + o, m + o, v + o, C, nest);
                });
                T wu = 0;
                for (int64_t r = 0; r < R; r++) wu += stats[4 * r + 3];
                coef_l = FN(coef)(wu, tot[1], h.eps);
            }
        } else {
            C = (R > 0 ? R : 1) * C;
            R = 1;
        }
        views[i] = view;
        h.f = (T)(1 - lr * wd * (view != VIEW_NONE ? wd_ratio : 1.0));
        int64_t N = R * C;
        if (view == VIEW_CHANNEL) {
            PFOR(nt > 1 && R > 1 && N >= PAR_MIN, r, R, {
                int64_t o = r * C;
                FN(adam_row_any)(&h, p + o, g + o, m + o, v + o, C, buf + max_c * omp_thread(), stats[4 * r + 1],
                                 nest, dec);
            });
        } else {
            int64_t nblk = (N + BLOCK - 1) / BLOCK;
            PFOR(nt > 1 && N >= PAR_MIN, k, nblk, {
                int64_t o = k * BLOCK;
                int64_t len = N - o < BLOCK ? N - o : BLOCK;
                FN(adam_sweep_any)(&h, p + o, g + o, m + o, v + o, len, coef_l, nest, dec, view == VIEW_LAYER);
            });
        }
    }
    hints_put(keys, guess, n, views);
    free(stats);
    free(buf);
    free(staged);
    free(written);
    spare_give(bak, bak_bytes);
    return 0;
}

/* ================================ SGDP ================================ */
/* SGDP's direction costs no square root or division, so every projectable tensor takes two sweeps: A updates
   the buffer and sums, per row, <w,g>, ||w||^2, ||g||^2 and <w,d> (all the decision and both views need:
   no extra sweep for the layer view); B re-derives d from the stored buffer, projects and steps. Measured,
   this beats a read-only first pass on every parameter set: sweep A mixes reads and writes, which stream
   faster than reads alone, and B reads from the cache for all but the largest tensors. */

/* buffer of one element (stored back when STORE) and the direction d */
INL T FN(sgd_d)(const FN(hyp_t) * h, T gj, T* restrict bj_p, const int nest, const int store) {
    gj = h->sgn * gj;
    T bj = FMA(gj, h->damp1, *bj_p * h->mom); /* buf.mul_(momentum).add_(g, alpha=1-dampening) */
    if (store) *bj_p = bj;
    return nest ? gj + h->mom * bj : bj; /* grad + momentum * buf */
}

/* sweep A, one row: buffer stored; out[0..3] = <w,g>, ||w||^2, ||g||^2, <w,d> */
INL void FN(sgd_stats)(const FN(hyp_t) * h, const T* restrict p, const T* restrict g, T* restrict b, int64_t C,
                       T* restrict out, const int nest) {
    T pg = 0, pp = 0, gg = 0, pd = 0;
#pragma omp simd reduction(+ : pg, pp, gg, pd)
    for (int64_t j = 0; j < C; j++) {
        T pj = p[j], gj = g[j];
        T d = FN(sgd_d)(h, gj, b + j, nest, 1);
        pg += pj * gj;
        pp += pj * pj;
        gg += gj * gj;
        pd += pj * d;
    }
    out[0] = h->sgn * pg;
    out[1] = pp;
    out[2] = gg;
    out[3] = pd;
}

/* sweep B (STORED: the buffer is already updated) or the only sweep of a tensor that is never projected:
   d <- d - c w (PROJ; the buffer receives it with PM), w <- f w - lr d */
INL void FN(sgd_step)(const FN(hyp_t) * h, T* restrict p, const T* restrict g, T* restrict b, int64_t N, T c,
                      const int nest, const int dec, const int proj, const int pm, const int stored) {
#pragma omp simd
    for (int64_t j = 0; j < N; j++) {
        T pj = p[j];
        T d;
        if (stored)
            d = nest ? h->sgn * g[j] + h->mom * b[j] : b[j];
        else
            d = FN(sgd_d)(h, g[j], b + j, nest, 1);
        if (proj) {
            d = d - c * pj;
            if (pm) b[j] = d;
        }
        T p1 = dec ? pj * h->f : pj;
        p[j] = FMA(d, h->ss, p1); /* p.mul_(f) then p.add_(d, alpha=-lr) */
    }
}

#define SPECIALISE3(CALL)                                   \
    do {                                                    \
        if (nest) {                                         \
            if (dec) CALL(1, 1, 0); else CALL(1, 0, 0);     \
        } else if (pm) {                                    \
            if (dec) CALL(0, 1, 1); else CALL(0, 0, 1);     \
        } else {                                            \
            if (dec) CALL(0, 1, 0); else CALL(0, 0, 0);     \
        }                                                   \
    } while (0)

static void FN(sgd_stats_any)(const FN(hyp_t) * h, const T* p, const T* g, T* b, int64_t C, T* out, int nest) {
    if (nest)
        FN(sgd_stats)(h, p, g, b, C, out, 1);
    else
        FN(sgd_stats)(h, p, g, b, C, out, 0);
}

#define KIND_PLAIN 0 /* the only sweep of a tensor that is never projected */
#define KIND_AFTER 1 /* after sweep A (buffer updated): not projected */
#define KIND_AFTER_PROJ 2 /* after sweep A: projected with c */

static void FN(sgd_step_any)(const FN(hyp_t) * h, T* p, const T* g, T* b, int64_t N, T c, int nest, int dec, int pm,
                             int kind) {
    switch (kind) {
#define CALL(a, d, q) FN(sgd_step)(h, p, g, b, N, c, a, d, 0, q, 0)
        case KIND_PLAIN: SPECIALISE3(CALL); break;
#undef CALL
#define CALL(a, d, q) FN(sgd_step)(h, p, g, b, N, c, a, d, 0, q, 1)
        case KIND_AFTER: SPECIALISE3(CALL); break;
#undef CALL
#define CALL(a, d, q) FN(sgd_step)(h, p, g, b, N, c, a, d, 1, q, 1)
        default: SPECIALISE3(CALL); break;
#undef CALL
    }
}

/* ptrs: n params, n grads, n momentum buffers; meta as for AdamP */
/* The speculative sweep of SGDP (tensors above spec_bytes under MODE_AUTO, guessed view CHANNEL or NONE, and
   the buffer not receiving the projected direction under that view): per row, sweep A then, while the guess
   holds, sweep B at once, the old row first streamed to bak. Wrong guess: the written rows are restored
   (the buffer is as after sweep A) and the caller runs sweep B under the decided view. Either way bitwise
   the two-sweep result. Returns whether the guess held (*view: the decided view; tot: the totals). */
static int FN(sgd_speculate)(const FN(hyp_t) * h, T* p, const T* g, T* b, int64_t R, int64_t C, int spec,
                             double lr, double wd, double momentum, double delta, double wd_ratio, int mode, int nest,
                             int pm, T* bak, char* written, T* stats, T* tot, int nt, int* view) {
    const int dec = wd > 0;
    const T chan_thr = (T)(delta / sqrt((double)C));
    FN(hyp_t) hs = *h;
    hs.f = (T)(1 - lr * wd * (spec != VIEW_NONE ? wd_ratio : 1.0) / (1 - momentum));
    int stop = 0;
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
        int64_t o = r * C;
        T* st = stats + 4 * r;
        FN(sgd_stats_any)(&hs, p + o, g + o, b + o, C, st, nest);
        int write = !__atomic_load_n(&stop, __ATOMIC_RELAXED);
        if (write && spec == VIEW_CHANNEL && !FN(passes)(st, hs.eps, chan_thr)) {
            __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
            write = 0;
        }
        if (write) {
            STREAM_COPY(bak + o, p + o, C);
            T c = spec == VIEW_CHANNEL ? FN(coef)(st[3], st[1], hs.eps) : 0;
            FN(sgd_step_any)(&hs, p + o, g + o, b + o, C, c, nest, dec, pm,
                             spec == VIEW_CHANNEL ? KIND_AFTER_PROJ : KIND_AFTER);
        }
        written[r] = (char)write;
    });
    STREAM_FENCE();
    *view = FN(decide_from)(stats, R, C, hs.eps, delta, mode, tot);
    __atomic_add_fetch(*view == spec ? &spec_right : &spec_wrong, 1, __ATOMIC_RELAXED);
    if (*view == spec) return 1;
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
        if (written[r]) {
            int64_t o = r * C;
            memcpy(p + o, bak + o, sizeof(T) * C);
        }
    });
    return 0;
}

/* ptrs: n params, n grads, n momentum buffers; meta as for AdamP; tensors above spec_bytes are speculated */
int FN(torch_adamp_sgdp)(int64_t n, const int64_t* ptrs, const int64_t* meta, double lr, double momentum,
                           double dampening, double wd, double eps, double delta, double wd_ratio, int nest,
                           int maximize, int project_momentum, int mode, int64_t* views, int nt, int64_t spec_bytes,
                           int64_t spec_max_bytes) {
    const int pm = project_momentum && !nest;
    int64_t max_r = 1, R, C;
    if (nt < 1) nt = 1;
    int64_t* keys;
    signed char* guess;
    if (hints_alloc(n, &keys, &guess) != 0) return -1;
    for (int64_t i = 0; i < n; i++) {
        shape_of(meta, n, i, &R, &C);
        if (R > max_r) max_r = R;
        const int64_t bytes = (int64_t)sizeof(T) * R * C;
        if (R > 0 && mode == MODE_AUTO && bytes > spec_bytes && bytes <= spec_max_bytes) keys[i] = ptrs[i];
    }
    hints_get(keys, n, guess);
    /* a channel guess with the projected direction stored in the buffer would copy the buffer too: measured
       slower than the two sweeps (ResNet-50 shapes: 1.52-1.61 x torch's fused SGD, against 1.44-1.46), so
       those tensors keep the two sweeps */
    for (int64_t i = 0; i < n; i++)
        if (pm && guess[i] == VIEW_CHANNEL) guess[i] = -1;
    size_t bak_bytes = guessed_bytes(meta, n, guess, sizeof(T)); /* the old rows of the largest one */
    T* stats = (T*)malloc(sizeof(T) * 4 * max_r);
    char* written = (char*)malloc((size_t)max_r);
    T* bak = bak_bytes > 0 ? (T*)spare_take(&bak_bytes) : NULL;
    if (!stats || !written || (bak_bytes > 0 && !bak)) { /* nothing modified yet */
        free(stats);
        free(written);
        spare_give(bak, bak_bytes);
        hints_put(keys, guess, n, NULL);
        return -1;
    }
    FN(hyp_t) h;
    h.eps = (T)eps; h.mom = (T)momentum; h.damp1 = (T)(1 - dampening); h.ss = (T)(-lr);
    h.sgn = maximize ? (T)-1 : (T)1;
    const int dec = wd > 0;
    for (int64_t i = 0; i < n; i++) {
        T* p = (T*)ptrs[i];
        const T* g = (const T*)ptrs[n + i];
        T* b = (T*)ptrs[2 * n + i];
        shape_of(meta, n, i, &R, &C);
        int view = VIEW_NONE, kind = KIND_PLAIN;
        T coef_l = 0, tot[3];
        if (R > 0 && (guess[i] == VIEW_CHANNEL || guess[i] == VIEW_NONE)) {
            if (FN(sgd_speculate)(&h, p, g, b, R, C, guess[i], lr, wd, momentum, delta, wd_ratio, mode, nest, pm,
                                  bak, written, stats, tot, nt, &view)) {
                views[i] = view;
                continue;
            } /* wrong guess: the rows are as after sweep A; sweep B below */
            kind = view == VIEW_NONE ? KIND_AFTER : KIND_AFTER_PROJ;
            if (view == VIEW_LAYER) {
                T wd_sum = 0;
                for (int64_t r = 0; r < R; r++) wd_sum += stats[4 * r + 3];
                coef_l = FN(coef)(wd_sum, tot[1], h.eps);
            }
        } else if (R > 0 && mode != MODE_NEVER) { /* sweep A: the buffer, and the four row sums */
            PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                int64_t o = r * C;
                FN(sgd_stats_any)(&h, p + o, g + o, b + o, C, stats + 4 * r, nest);
            });
            view = FN(decide_from)(stats, R, C, h.eps, delta, mode, tot);
            kind = view == VIEW_NONE ? KIND_AFTER : KIND_AFTER_PROJ;
            if (view == VIEW_LAYER) {
                T wd_sum = 0;
                for (int64_t r = 0; r < R; r++) wd_sum += stats[4 * r + 3];
                coef_l = FN(coef)(wd_sum, tot[1], h.eps);
            }
        } else {
            C = (R > 0 ? R : 1) * C;
            R = 1;
        }
        views[i] = view;
        h.f = (T)(1 - lr * wd * (view != VIEW_NONE ? wd_ratio : 1.0) / (1 - momentum));
        int64_t N = R * C;
        if (view == VIEW_CHANNEL) {
            FN(channel_coefs)(stats, R, h.eps);
            PFOR(nt > 1 && R > 1 && N >= PAR_MIN, r, R, {
                int64_t o = r * C;
                FN(sgd_step_any)(&h, p + o, g + o, b + o, C, stats[4 * r + 3], nest, dec, pm, kind);
            });
        } else {
            int64_t nblk = (N + BLOCK - 1) / BLOCK;
            PFOR(nt > 1 && N >= PAR_MIN, k, nblk, {
                int64_t o = k * BLOCK;
                int64_t len = N - o < BLOCK ? N - o : BLOCK;
                FN(sgd_step_any)(&h, p + o, g + o, b + o, len, coef_l, nest, dec, pm, kind);
            });
        }
    }
    hints_put(keys, guess, n, views);
    free(stats);
    free(written);
    spare_give(bak, bak_bytes);
    return 0;
}
"""

INSTANCES = (("float", "f32", "f"), ("double", "f64", ""))


def source() -> str:
    """The full C source: :data:`BODY` instantiated for float32 and float64."""
    parts = [HEAD]
    for ctype, sfx, f in INSTANCES:
        parts.append(
            f"#define T {ctype}\n#define SQRT sqrt{f}\n#define FMA fma{f}\n#define FABS fabs{f}\n"
            f"#define FN(name) name##_{sfx}\n#define STREAM_COPY stream_copy_{sfx}\n{BODY}\n"
            "#undef T\n#undef SQRT\n#undef FMA\n#undef FABS\n#undef FN\n#undef STREAM_COPY\n"
        )
    return "".join(parts)


BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
#: tried in order: OpenMP threads + SIMD; SIMD pragmas only; no pragmas (still correct, slower)
FLAG_SETS = (("-march=native", "-fopenmp"), ("-march=native", "-fopenmp-simd"), ("-fopenmp-simd",), ())

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
#: why the kernels are unavailable (``None`` while they are, or before the first attempt)
failure: str | None = None
#: seconds the last build took (0.0 when the cached object was loaded)
build_seconds: float | None = None
#: path of the loaded shared object
library_path: Path | None = None


def enabled() -> bool:
    return os.environ.get("TORCH_ADAMP_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    env = os.environ.get("TORCH_ADAMP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_adamp"


def _compilers() -> list[str]:
    found = []
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name) and name not in found:
            found.append(name)
    return found


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    ident = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    ident.append(line.strip())
                if len(ident) >= 4:
                    break
    except OSError:
        pass
    return "\n".join(ident)


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(directory: Path | None = None, force: bool = False) -> tuple[Path, float]:
    """Compile the kernels (or find them in the cache); returns ``(path, seconds spent compiling)``."""
    src = source()
    errors = []
    for cc in _compilers():
        version = _compiler_version(cc)
        for extra in FLAG_SETS:
            flags = (*BASE_FLAGS, *extra)
            key = hashlib.sha256("\0".join((src, cc, version, *flags, _cpu_id(), sys.platform)).encode()).hexdigest()
            out_dir = directory if directory is not None else cache_dir()
            target = out_dir / f"torch_adamp_kernels_{key[:20]}.so"
            if target.exists() and not force:
                return target, 0.0
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                c_file = Path(tmp) / "kernels.c"
                c_file.write_text(src)
                so_tmp = Path(tmp) / target.name
                start = time.perf_counter()
                res = subprocess.run(
                    [cc, *flags, str(c_file), "-o", str(so_tmp), "-lm"], capture_output=True, text=True, timeout=600
                )
                seconds = time.perf_counter() - start
                if res.returncode == 0:
                    os.replace(so_tmp, target)  # atomic: concurrent builders race harmlessly
                    return target, seconds
                errors.append(f"{cc} {' '.join(extra)}: {res.stderr.strip()[-300:]}")
    raise RuntimeError("could not compile the torch_adamp CPU kernels: " + ("; ".join(errors) or "no C compiler found"))


def _bind(lib: ctypes.CDLL) -> None:
    i64, f64, i32, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
    lib.torch_adamp_forget.restype = None
    lib.torch_adamp_forget.argtypes = []
    lib.torch_adamp_spare_bytes.restype = ctypes.c_size_t
    lib.torch_adamp_spare_bytes.argtypes = []
    lib.torch_adamp_spec_counts.restype = None
    lib.torch_adamp_spec_counts.argtypes = [ctypes.c_void_p]
    for sfx in ("f32", "f64"):
        fn = getattr(lib, f"torch_adamp_adamp_{sfx}")
        fn.restype = i32  # 0, or -1 when the scratch allocation failed (nothing modified)
        # n, ptrs, meta, lr, b1, b2, eps, wd, delta, wd_ratio, nesterov, maximize, mode, views, threads, stage,
        # largest speculated tensor (bytes)
        fn.argtypes = [i64, ptr, ptr, f64, f64, f64, f64, f64, f64, f64, i32, i32, i32, ptr, i32, i64, i64]
        fn = getattr(lib, f"torch_adamp_sgdp_{sfx}")
        fn.restype = i32
        # n, ptrs, meta, lr, momentum, dampening, wd, eps, delta, wd_ratio, nesterov, maximize, pm, mode, views,
        # threads, speculation threshold, largest speculated tensor (bytes)
        fn.argtypes = [i64, ptr, ptr, f64, f64, f64, f64, f64, f64, f64, i32, i32, i32, i32, ptr, i32, i64, i64]


def load() -> ctypes.CDLL | None:
    """The kernels, built on first use; ``None`` (and :data:`failure` set) when unavailable."""
    global _lib, _tried, failure, build_seconds, library_path
    if _lib is not None or _tried:
        return _lib
    with _lock:
        if _lib is not None or _tried:
            return _lib
        _tried = True
        if not enabled():
            failure = "disabled by TORCH_ADAMP_NATIVE=0"
            return None
        try:
            try:
                path, build_seconds = build()
            except OSError:  # unwritable cache directory: build in a private temporary one
                path, build_seconds = build(Path(tempfile.mkdtemp(prefix="torch_adamp_")))
            lib = ctypes.CDLL(str(path))
            _bind(lib)
        except Exception as exc:  # no compiler, failed build, unloadable object
            failure = f"{type(exc).__name__}: {exc}"
            return None
        library_path = path
        _lib = lib
        return _lib


def forget() -> None:
    """Drop every view hint of the speculative sweep and free its spare block (no-op without the kernels)."""
    lib = load()
    if lib is not None:
        lib.torch_adamp_forget()


def spare_bytes() -> int:
    """Bytes of the spare block the speculative sweep keeps between steps (the largest tensor it copied)."""
    lib = load()
    return int(lib.torch_adamp_spare_bytes()) if lib is not None else 0


def speculation_counts() -> tuple[int, int]:
    """Speculative sweeps since the kernels were loaded: ``(guessed right, guessed wrong)``."""
    lib = load()
    if lib is None:
        return (0, 0)
    out = (ctypes.c_int64 * 2)()
    lib.torch_adamp_spec_counts(out)
    return int(out[0]), int(out[1])


def run(
    kind: str,
    dtype: Any,
    n: int,
    ptrs: int,
    meta: int,
    views: int,
    lr: float,
    common: Any,
    args: Any,
    *,
    threads: int,
    stage_bytes: int,
    spec_max_bytes: int,
) -> None:
    """Call the kernel of rule ``kind``; raise ``MemoryError`` if its scratch could not be allocated."""
    lib = load()
    assert lib is not None
    import torch

    fn = getattr(lib, f"torch_adamp_{kind}_{'f64' if dtype is torch.float64 else 'f32'}")
    eps, wd, delta, wd_ratio, maximize, mode = common
    if kind == "adamp":
        b1, b2, nest = args
        rc = fn(n, ptrs, meta, lr, b1, b2, eps, wd, delta, wd_ratio, int(nest), int(maximize), int(mode), views,
                threads, stage_bytes, spec_max_bytes)  # fmt: skip
    else:
        mom, damp, nest, pm = args
        rc = fn(n, ptrs, meta, lr, mom, damp, wd, eps, delta, wd_ratio, int(nest), int(maximize), int(pm), int(mode),
                views, threads, stage_bytes, spec_max_bytes)  # fmt: skip
    if rc != 0:
        raise MemoryError(f"torch_adamp: the fused {kind} kernel could not allocate its scratch (nothing was updated)")
