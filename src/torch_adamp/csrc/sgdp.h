/* SGDP's direction and sweeps, for one element type T (instantiated by kernels.c), over rows.h. */
/* ================================ SGDP ================================ */
/* SGDP's direction costs no square root or division, so every projectable tensor takes two sweeps: A updates
   the buffer and sums, per row, <w,g>, ||w||^2, ||g||^2 and <w,d> (all the decision and both views need:
   no extra sweep for the layer view); B re-derives d from the stored buffer, projects and steps. Measured,
   this beats a read-only first pass on every parameter set: sweep A mixes reads and writes, which stream
   faster than reads alone, and B reads from the cache for all but the largest tensors. Those (above
   stage_bytes) are speculated from their second step: sweep B of each row right after its sweep A, under the
   view of the last step (sgd_speculate). */

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
    ROW_SWEEP(p, g, C, h->sgn, h->gs, out, FN(sgd_d)(h, gj, b + j, nest, 1), (void)0);
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
            d = nest ? h->sgn * (g[j] * h->gs) + h->mom * b[j] : b[j];
        else
            d = FN(sgd_d)(h, g[j] * h->gs, b + j, nest, 1);
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

/* ---- speculation under a channel guess with the projected direction stored in the buffer (PM) ----
   Sweep B of such a row overwrites both w and b, and a wrong guess must bring both back to their state after
   sweep A (w_old, b_A). Neither is copied: both are recomputed from what the row holds, d = b_A - c w_old
   (the new buffer) and w_new = FMA(d, -lr, f w_old):
       w_old = FMA(d, lr, w_new) [/ f when decayed],  b_A = d + c w_old,
   which gives the old bits back for most elements, not where a rounding lost bits (a binade crossed, a tie,
   cancellation, NaN). Those elements are found before the row is written, by computing the recovery itself
   and comparing bits, and logged in the row's own slice of the spare block: the value and the index (~j for
   b), at most C/2 of them. The traffic of a written row is then torch's (read w, g, b; write w, b) plus the
   log; a row with more exceptions is left as after sweep A and stepped once the guess is confirmed. A
   recovered value that is NaN always counts as an exception: equal bits on a non-NaN result are equal bits
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

/* the old w of one element of a written row, from the new w and d (the stored buffer) */
INL T FN(pm_w_old)(const FN(hyp_t) * h, T pn, T d, const int dec) {
    T q = FMA(d, -h->ss, pn);
    return dec ? q / h->f : q;
}

/* elements [0, len) of a written row back to their state after sweep A: w, then b from it, each followed by
   its logged exceptions (the recovery recomputes what sgd_pm_row checked, operation for operation) */
static void FN(sgd_pm_restore)(const FN(hyp_t) * h, T* restrict p, T* restrict b, int64_t len, T c, int dec,
                               const T* restrict val, const int32_t* restrict idx, int64_t n) {
    if (dec) {
#pragma omp simd
        for (int64_t j = 0; j < len; j++) p[j] = FN(pm_w_old)(h, p[j], b[j], 1);
    } else {
#pragma omp simd
        for (int64_t j = 0; j < len; j++) p[j] = FN(pm_w_old)(h, p[j], b[j], 0);
    }
    for (int64_t k = 0; k < n; k++)
        if (idx[k] >= 0) p[idx[k]] = val[k];
#pragma omp simd
    for (int64_t j = 0; j < len; j++) b[j] = b[j] + c * p[j];
    for (int64_t k = 0; k < n; k++)
        if (idx[k] < 0) b[~idx[k]] = val[k];
}

/* one element of sgd_pm_row; on overflow (more than cap exceptions) jumps to `overflow`, nothing written */
#define PM_ONE(J)                                                                     \
    do {                                                                              \
        T s_pj = p[J], s_bj = b[J], s_t = c * s_pj;                                   \
        T s_d = s_bj - s_t, s_back = s_d + s_t;                                       \
        T s_pn = FMA(s_d, h->ss, dec ? s_pj * h->f : s_pj);                           \
        T s_wr = FN(pm_w_old)(h, s_pn, s_d, dec);                                     \
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

/* Sweep B of a row written under a channel guess with PM, in one pass over the cached row: sgd_step's
   arithmetic (d = b - c w, b <- d, w <- FMA(d, -lr, f w)) and the exception log (val, idx; at most cap),
   prefetching the next row (pf_*; NULL: none) so that memory keeps streaming while this runs from the cache.
   Returns the number of exceptions, or -1 when more than cap: the row is then as after sweep A. */
INL int64_t FN(sgd_pm_row)(const FN(hyp_t) * h, T* restrict p, T* restrict b, int64_t C, T c, const int dec,
                           T* restrict val, int32_t* restrict idx, int64_t cap, const T* pf_p, const T* pf_g,
                           const T* pf_b) {
    int64_t n = 0, j = 0, at = 0;
#ifdef PM_VBYTES
    enum { VL = PM_VBYTES / sizeof(T) };
    typedef __typeof__((FN(pm_vec)){0} != (FN(pm_vec)){0}) mask_t;
    FN(pm_vec) cv, fv, sv, lv;
    for (int k = 0; k < VL; k++) {
        cv[k] = c;
        fv[k] = h->f;
        sv[k] = h->ss;
        lv[k] = -h->ss;
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
    (void)pf_p, (void)pf_g, (void)pf_b;
#endif
    for (; j < C; j++) PM_ONE(j);
    return n;
overflow: /* elements [0, at) written, their exceptions logged */
    FN(sgd_pm_restore)(h, p, b, at, c, dec, val, idx, n);
    return -1;
}
#undef PM_ONE

/* ptrs: n params, n grads, n momentum buffers; meta as for AdamP */
/* The speculative sweep of SGDP (tensors above stage_bytes under MODE_AUTO, guessed view CHANNEL or NONE): per
   row, sweep A then, while the guess holds, sweep B at once, the old row first streamed to bak; under a channel
   guess with PM nothing is copied: sgd_pm_row logs, in the row's slice of bak, what the restore cannot
   recompute (exn[r]: how many; -1: the row was left as after sweep A, and is stepped once the guess holds).
   Wrong guess: the written rows are restored (the buffer is as after sweep A) and the caller runs sweep B under
   the decided view. Either way bitwise the two-sweep result. Returns whether the guess held (*view: the
   decided view; tot: the totals). */
static int FN(sgd_speculate)(const FN(hyp_t) * h, T* p, const T* g, T* b, int64_t R, int64_t C, int spec,
                             double lr, double wd, double momentum, double delta, double wd_ratio, int mode, int nest,
                             int pm, T* bak, char* written, int64_t* exn, T* stats, T* tot, int nt, int* view,
                             int64_t* counts) {
    const int dec = wd > 0;
    const T chan_thr = (T)(delta / sqrt((double)C));
    const int pm_chan = pm && spec == VIEW_CHANNEL;
    FN(hyp_t) hs = *h;
    hs.f = FN(decay)(lr, wd, wd_ratio, 1 - momentum, spec);
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
        T c = spec == VIEW_CHANNEL ? FN(coef)(st[3], st[1], hs.eps) : 0;
        if (write && pm_chan) { /* the log: values in bak[o, o + C/2), indices after them */
            T* val = bak + o;
            int32_t* idx = (int32_t*)(bak + o + C / 2);
            const int pf = r + 1 < R; /* the next row, fetched while this one is stepped from the cache */
            const T *pp = pf ? p + o + C : NULL, *pg = g + o + C, *pb = b + o + C;
            exn[r] = dec ? FN(sgd_pm_row)(&hs, p + o, b + o, C, c, 1, val, idx, C / 2, pp, pg, pb)
                         : FN(sgd_pm_row)(&hs, p + o, b + o, C, c, 0, val, idx, C / 2, pp, pg, pb);
            write = exn[r] >= 0;
        } else if (write) {
            STREAM_COPY(bak + o, p + o, C);
            FN(sgd_step_any)(&hs, p + o, g + o, b + o, C, c, nest, dec, pm,
                             spec == VIEW_CHANNEL ? KIND_AFTER_PROJ : KIND_AFTER);
        }
        written[r] = (char)write;
    });
    STREAM_FENCE();
    *view = FN(decide_from)(stats, R, C, hs.eps, delta, mode, tot);
    counts[*view == spec ? 0 : 1]++;
    if (*view == spec) {
        if (pm_chan) /* the rows left as after sweep A (too many exceptions): sweep B under the confirmed view */
            PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                if (!written[r]) {
                    int64_t o = r * C;
                    T c = FN(coef)(stats[4 * r + 3], stats[4 * r + 1], hs.eps);
                    FN(sgd_step_any)(&hs, p + o, g + o, b + o, C, c, nest, dec, pm, KIND_AFTER_PROJ);
                }
            });
        return 1;
    }
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
        if (written[r]) {
            int64_t o = r * C;
            if (pm_chan) {
                T c = FN(coef)(stats[4 * r + 3], stats[4 * r + 1], hs.eps);
                FN(sgd_pm_restore)(&hs, p + o, b + o, C, c, dec, bak + o, (const int32_t*)(bak + o + C / 2), exn[r]);
            } else {
                memcpy(p + o, bak + o, sizeof(T) * C);
            }
        }
    });
    return 0;
}

/* the guesses of one call (see keep_guesses): tensors above stage_bytes, under MODE_AUTO, up to spec_max_bytes
   (the spare block: the copy of the old rows, or under a channel guess with PM the exception log, as large) */
static size_t FN(sgdp_guesses)(const ta_args* a, signed char* guess, int64_t limit) {
    int64_t R, C;
    for (int64_t i = 0; i < a->n; i++) {
        shape_of(a->meta, a->n, i, &R, &C);
        const int64_t bytes = (int64_t)sizeof(T) * R * C;
        int cand = R > 0 && a->mode == MODE_AUTO && bytes > a->stage_bytes && bytes <= a->spec_max_bytes;
        guess[i] = cand ? caller_guess(a, i) : -1;
    }
    return keep_guesses(a->meta, a->n, guess, sizeof(T), limit);
}

int64_t FN(torch_adamp_sgdp_spare)(const ta_args* a) {
    signed char* guess = (signed char*)malloc(a->n > 0 ? (size_t)a->n : 1);
    if (guess == NULL) return 0;
    int64_t bytes = (int64_t)FN(sgdp_guesses)(a, guess, -1);
    free(guess);
    return bytes;
}

/* One SGDP step of a->n tensors (see torch_adamp.h for the arguments). */
int FN(torch_adamp_sgdp)(ta_args* a) {
    if (amp_skip(a)) return 0;
    const int64_t n = a->n, *ptrs = a->ptrs, *meta = a->meta;
    const double lr = a->lr, momentum = a->rule.sgdp.momentum, dampening = a->rule.sgdp.dampening;
    const double eps = a->eps, wd = a->weight_decay, delta = a->delta, wd_ratio = a->wd_ratio;
    const int nest = a->rule.sgdp.nesterov != 0, maximize = a->maximize != 0, mode = a->mode;
    const int pm = a->rule.sgdp.project_momentum && !nest;
    int64_t* views = a->views;
    const int nt = a->threads < 1 ? 1 : a->threads;
    int64_t max_r = 1, R, C;
    int64_t counts[2] = {0, 0};
    for (int64_t i = 0; i < n; i++) {
        shape_of(meta, n, i, &R, &C);
        if (R > max_r) max_r = R;
    }
    signed char* guess = (signed char*)malloc(n > 0 ? (size_t)n : 1);
    size_t bak_bytes = guess != NULL ? FN(sgdp_guesses)(a, guess, a->spare != NULL ? a->spare_bytes : 0) : 0;
    T* bak = bak_bytes > 0 ? (T*)a->spare : NULL; /* the old rows of the tensors stepped under a guess */
    T* stats = (T*)malloc(sizeof(T) * 4 * max_r);
    char* written = (char*)malloc((size_t)max_r);
    int64_t* exn = (int64_t*)malloc(sizeof(int64_t) * max_r);
    if (!guess || !stats || !written || !exn) { /* nothing modified yet */
        free(guess);
        free(stats);
        free(written);
        free(exn);
        return -1;
    }
    FN(hyp_t) h;
    h.eps = (T)eps; h.mom = (T)momentum; h.damp1 = (T)(1 - dampening); h.ss = (T)(-lr);
    h.sgn = maximize ? (T)-1 : (T)1;
    h.gs = (T)amp_inv_scale(a);
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
                                  bak, written, exn, stats, tot, nt, &view, counts)) {
                views[i] = view;
                continue;
            } /* wrong guess: the rows are as after sweep A; sweep B below */
            kind = view == VIEW_NONE ? KIND_AFTER : KIND_AFTER_PROJ;
            if (view == VIEW_LAYER) {
                coef_l = FN(layer_coef)(stats, R, tot[1], h.eps);
            }
        } else if (R > 0 && mode != MODE_NEVER) { /* sweep A: the buffer, and the four row sums */
            PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                int64_t o = r * C;
                FN(sgd_stats_any)(&h, p + o, g + o, b + o, C, stats + 4 * r, nest);
            });
            view = FN(decide_from)(stats, R, C, h.eps, delta, mode, tot);
            kind = view == VIEW_NONE ? KIND_AFTER : KIND_AFTER_PROJ;
            if (view == VIEW_LAYER) {
                coef_l = FN(layer_coef)(stats, R, tot[1], h.eps);
            }
        } else {
            C = (R > 0 ? R : 1) * C;
            R = 1;
        }
        views[i] = view;
        h.f = FN(decay)(lr, wd, wd_ratio, 1 - momentum, view);
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
    a->spec_right = counts[0];
    a->spec_wrong = counts[1];
    free(guess);
    free(stats);
    free(written);
    free(exn);
    return 0;
}

