/* Shared by every translation unit: includes, the thread loop, mode and view codes, the channel view of a
   tensor, the non-temporal copy of rows, the choice of guesses (speculative sweeps) and the ABI queries.
   Included once, before the typed headers. */
#ifndef TORCH_ADAMP_COMMON_H
#define TORCH_ADAMP_COMMON_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "torch_adamp.h"

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
#define TA_UNUSED __attribute__((unused)) /* not every translation unit calls it */
#define TA_CAT_(a, b) a##b
#define TA_CAT(a, b) TA_CAT_(a, b) /* pastes after expanding its arguments */
/* the ABI query `const ta_abi_field* NAME(void)` of the struct TA_ABI_STRUCT (a macro defined around the use)
   declared by FIELDS (see torch_adamp.h) */
#define TA_ABI_ENTRY(type, name) \
    {#name, (int64_t)offsetof(TA_ABI_STRUCT, name), (int64_t)sizeof(((TA_ABI_STRUCT*)0)->name)},
#define TA_ABI_QUERY(NAME, FIELDS)                                                                         \
    const ta_abi_field* NAME(void) {                                                                       \
        static const ta_abi_field fields[] = {                                                             \
            FIELDS(TA_ABI_ENTRY){NULL, (int64_t)sizeof(TA_ABI_STRUCT), (int64_t)_Alignof(TA_ABI_STRUCT)}}; \
        return fields;                                                                                     \
    }
#define PAR_MIN 32768
#define BLOCK 16384
#define PF_BLOCK 64     /* elements per block of a cached sweep that prefetches one line per stream */
#define SPEC_GROUP 8192 /* elements per group of rows in a speculative sweep (short rows are grouped) */
/* rows per group of a speculative sweep over rows of C elements */
INL int64_t spec_rows(int64_t C) { return C >= SPEC_GROUP ? 1 : SPEC_GROUP / C; }
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
    TA_UNUSED static void NAME(TYPE* restrict dst, const TYPE* restrict src, int64_t n) {       \
        const int64_t w = STREAM_BYTES / (int64_t)sizeof(TYPE);                                 \
        int64_t j = 0;                                                                          \
        for (; j < n && ((uintptr_t)(dst + j) % STREAM_BYTES) != 0; j++) dst[j] = src[j];       \
        for (; j + w <= n; j += w) STORE(dst + j, src + j);                                     \
        for (; j < n; j++) dst[j] = src[j];                                                     \
    }
#else
#define STREAM_FENCE() ((void)0)
#define DEFINE_STREAM_COPY(NAME, TYPE, STORE)                                                   \
    TA_UNUSED static void NAME(TYPE* restrict dst, const TYPE* restrict src, int64_t n) { memcpy(dst, src, sizeof(TYPE) * n); }
#endif
DEFINE_STREAM_COPY(stream_copy_f32, float, STREAM_F32)
DEFINE_STREAM_COPY(stream_copy_f64, double, STREAM_F64)
/* ---- speculation: which guesses a call uses ----
   g[i] holds, on entry, the caller's guess for tensor i where the rule may speculate on it (else -1). Kept:
   CHANNEL and NONE guesses (the views a one-sweep step can take) on tensors of at most `limit` bytes (the
   spare block the caller gave; -1: no limit); the others become -1. Returns the bytes of the largest tensor
   kept: the spare block the call needs for the copy of its old rows. */
TA_UNUSED static size_t keep_guesses(const int64_t* meta, int64_t n, signed char* g, size_t item, int64_t limit) {
    size_t most = 0;
    int64_t R, C;
    for (int64_t i = 0; i < n; i++) {
        if (g[i] != VIEW_CHANNEL && g[i] != VIEW_NONE) {
            g[i] = -1;
            continue;
        }
        shape_of(meta, n, i, &R, &C);
        size_t bytes = (size_t)(R * C) * item;
        if (limit >= 0 && bytes > (size_t)limit) {
            g[i] = -1;
            continue;
        }
        if (bytes > most) most = bytes;
    }
    return most;
}
INL signed char caller_guess(const ta_args* a, int64_t i) { return a->guess != NULL ? (signed char)a->guess[i] : -1; }
/* GradScaler's protocol: a call with *found_inf != 0 (NaN included) writes nothing but the views, which repeat
   the caller's guesses (the views of the last step), so that the next call's guesses stay good */
TA_UNUSED static int amp_skip(ta_args* a) {
    if (a->found_inf == NULL || *a->found_inf == 0.0f) return 0;
    for (int64_t i = 0; i < a->n; i++) a->views[i] = caller_guess(a, i) >= 0 ? caller_guess(a, i) : VIEW_NONE;
    a->spec_right = a->spec_wrong = 0;
    return 1;
}
/* the multiplier of every gradient load: GradScaler's inverse scale, rounded to float as torch rounds it (1 without) */
INL double amp_inv_scale(const ta_args* a) {
    return a->grad_scale != NULL ? (double)(float)(1.0 / (double)*a->grad_scale) : 1.0;
}
#endif
