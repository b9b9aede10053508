/* Part of the driver (csrc/driver.h): the speculative sweep under a channel guess of a rule variant whose
   projected direction is stored in the state (RULE_STORES_PROJECTED: SGDP's project_momentum), b below
   being the state tensor RULE_PROJECTED_STATE, which after sweep A *is* the direction.

   Sweep B of such a row overwrites both w and b, and a wrong guess must bring both back to their state after
   sweep A (w_old, b_A). Neither is copied: both are recomputed from what the row holds, d = b_A - c w_old
   (the new b) and w_new = FMA(d, ss, f w_old):
       w_old = FMA(d, -ss, w_new) [/ f when decayed],  b_A = d + c w_old,
   which gives the old bits back for most elements, not where a rounding lost bits (a binade crossed, a tie,
   cancellation, NaN). Those elements are found before the row is written, by computing the recovery itself
   and comparing bits, and logged in the row's own slice of the spare block: the value and the index (~j for
   b), at most C/2 of them. The traffic of a written row is then the rule's own (read w, g, b; write w, b)
   plus the log; a row with more exceptions is left as after sweep A and stepped once the guess is confirmed.
   A recovered value that is NaN always counts as an exception: equal bits on a non-NaN result are equal bits
   in any evaluation of the same operations, a NaN's payload need not be. */
#if defined(__AVX512F__)
#define PM_VBYTES 64
#elif defined(__AVX__) && defined(__FMA__)
#define PM_VBYTES 32
#endif
#ifdef PM_VBYTES
typedef T FN(pm_vec) __attribute__((vector_size(PM_VBYTES)));
/* FMA of vectors: the intrinsic of the element type (sizeof(T) is a constant: one branch is compiled away) */
INL FN(pm_vec) FN(pm_fma)(FN(pm_vec) a, FN(pm_vec) b, FN(pm_vec) c) {
#if PM_VBYTES == 64
    if (sizeof(T) == 4) return (FN(pm_vec))_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
    return (FN(pm_vec))_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#else
    if (sizeof(T) == 4) return (FN(pm_vec))_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
    return (FN(pm_vec))_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#endif
}
#endif

/* the old w of one element of a written row, from the new w and d (the stored b) */
INL T FN(pm_w_old)(T ss, T f, T pn, T d, const int dec) {
    T q = FMA(d, -ss, pn);
    return dec ? q / f : q;
}

/* elements [0, len) of a written row back to their state after sweep A: w, then b from it, each followed by
   its logged exceptions (the recovery recomputes what pm_row checked, operation for operation) */
static void FN(pm_restore)(const FN(ten_t) * x, T* restrict p, T* restrict b, int64_t len, T c, int dec,
                           const T* restrict val, const int32_t* restrict idx, int64_t n) {
    const T ss = x->ss, f = x->f;
    if (dec) {
#pragma omp simd
        for (int64_t j = 0; j < len; j++) p[j] = FN(pm_w_old)(ss, f, p[j], b[j], 1);
    } else {
#pragma omp simd
        for (int64_t j = 0; j < len; j++) p[j] = FN(pm_w_old)(ss, f, p[j], b[j], 0);
    }
    for (int64_t k = 0; k < n; k++)
        if (idx[k] >= 0) p[idx[k]] = val[k];
#pragma omp simd
    for (int64_t j = 0; j < len; j++) b[j] = b[j] + c * p[j];
    for (int64_t k = 0; k < n; k++)
        if (idx[k] < 0) b[~idx[k]] = val[k];
}

/* the log of a row of C elements in its slice of the spare block: the values in [0, C/2), their indices after */
#define PM_VAL(log, C) (log)
#define PM_IDX(log, C) ((int32_t*)((log) + (C) / 2))

/* the written row [o, o + C) back to its state after sweep A, from its log of n exceptions */
static void FN(pm_undo)(const FN(ten_t) * x, int64_t o, int64_t C, T c, int dec, T* log, int64_t n) {
    FN(pm_restore)(x, x->p + o, x->s[RULE_PROJECTED_STATE] + o, C, c, dec, PM_VAL(log, C), PM_IDX(log, C), n);
}

/* one element of pm_row; on overflow (more than cap exceptions) jumps to `overflow`, nothing written */
#define PM_ONE(J)                                                                     \
    do {                                                                              \
        T s_pj = p[J], s_bj = b[J], s_t = c * s_pj;                                   \
        T s_d = s_bj - s_t, s_back = s_d + s_t;                                       \
        T s_pn = FMA(s_d, ss, dec ? s_pj * f : s_pj);                                 \
        T s_wr = FN(pm_w_old)(ss, f, s_pn, s_d, dec);                                 \
        int s_exw = memcmp(&s_wr, &s_pj, sizeof s_pj) != 0 || s_wr != s_wr;           \
        int s_exb = memcmp(&s_back, &s_bj, sizeof s_bj) != 0 || s_back != s_back;     \
        if (n + s_exw + s_exb > cap) {                                                \
            at = (J);                                                                 \
            goto overflow;                                                            \
        }                                                                             \
        if (s_exw) {                                                                  \
            val[n] = s_pj;                                                            \
            idx[n++] = (int32_t)(J);                                                  \
        }                                                                             \
        if (s_exb) {                                                                  \
            val[n] = s_bj;                                                            \
            idx[n++] = ~(int32_t)(J);                                                 \
        }                                                                             \
        b[J] = s_d;                                                                   \
        p[J] = s_pn;                                                                  \
    } while (0)

/* Sweep B of the row [o, o + C) written under a channel guess, in one pass over the cached row: redo's
   arithmetic (d = b - c w, b <- d, w <- FMA(d, ss, f w)) and the exception log (in `log`, at most C/2),
   prefetching the next row (when `next`) so that memory keeps streaming while this runs from the cache.
   Returns the number of exceptions, or -1 when more than C/2: the row is then as after sweep A. */
INL int64_t FN(pm_row)(const FN(ten_t) * x, int64_t o, int64_t C, T c, T* log, int next, const int dec) {
    T* restrict p = x->p + o;
    T* restrict b = x->s[RULE_PROJECTED_STATE] + o;
    T* restrict val = PM_VAL(log, C);
    int32_t* restrict idx = PM_IDX(log, C);
    const T ss = x->ss, f = x->f;
    const int64_t cap = C / 2;
    int64_t n = 0, j = 0, at = 0;
#ifdef PM_VBYTES
    const T *pf_p = next ? p + C : NULL, *pf_g = x->g + o + C, *pf_b = b + C;
    enum { VL = PM_VBYTES / sizeof(T) };
    typedef __typeof__((FN(pm_vec)){0} != (FN(pm_vec)){0}) mask_t;
    FN(pm_vec) cv, fv, sv, lv;
    for (int k = 0; k < VL; k++) {
        cv[k] = c;
        fv[k] = f;
        sv[k] = ss;
        lv[k] = -ss;
    }
    for (; j + VL <= C; j += VL) {
        if (pf_p != NULL) {
            __builtin_prefetch(pf_p + j);
            __builtin_prefetch(pf_g + j);
            __builtin_prefetch(pf_b + j);
        }
        FN(pm_vec) pv, bv;
        memcpy(&pv, p + j, sizeof pv);
        memcpy(&bv, b + j, sizeof bv);
        FN(pm_vec) t = cv * pv;
        FN(pm_vec) d = bv - t, back = d + t;
        FN(pm_vec) pn = FN(pm_fma)(d, sv, dec ? pv * fv : pv);
        FN(pm_vec) q = FN(pm_fma)(d, lv, pn);
        FN(pm_vec) wr = dec ? q / fv : q;
        mask_t wi, pi, ki, bi, m;
        memcpy(&wi, &wr, sizeof wi);
        memcpy(&pi, &pv, sizeof pi);
        memcpy(&ki, &back, sizeof ki);
        memcpy(&bi, &bv, sizeof bi);
        m = (wi != pi) | (wr != wr) | (ki != bi) | (back != back);
        uint64_t any[PM_VBYTES / 8], acc = 0;
        memcpy(any, &m, sizeof any);
        for (int k = 0; k < PM_VBYTES / 8; k++) acc |= any[k];
        if (acc != 0) {
            for (int k = 0; k < VL; k++) PM_ONE(j + k);
            continue;
        }
        memcpy(b + j, &d, sizeof d);
        memcpy(p + j, &pn, sizeof pn);
    }
#else
    (void)next;
#endif
    for (; j < C; j++) PM_ONE(j);
    return n;
overflow: /* elements [0, at) written, their exceptions logged */
    FN(pm_restore)(x, p, b, at, c, dec, val, idx, n);
    return -1;
}
#undef PM_ONE

/* pm_row with the decay compiled in or out, picked once per call */
typedef int64_t (*FN(pm_fn))(const FN(ten_t) * x, int64_t o, int64_t C, T c, T* log, int next);
#if TA_STORES_PROJECTED_ANY
static int64_t FN(pm_row_0)(const FN(ten_t) * x, int64_t o, int64_t C, T c, T* log, int next) {
    return FN(pm_row)(x, o, C, c, log, next, 0);
}
static int64_t FN(pm_row_1)(const FN(ten_t) * x, int64_t o, int64_t C, T c, T* log, int next) {
    return FN(pm_row)(x, o, C, c, log, next, 1);
}
static const FN(pm_fn) FN(pm_row_tab)[2] = {FN(pm_row_0), FN(pm_row_1)};
#endif
