/* AdamP's direction and sweeps, for one element type T (instantiated by kernels.c), over rows.h. */
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
    for (int64_t j = 0; j < N; j++) acc += p[j] * FN(adam_u)(h, g[j] * h->gs, m + j, v + j, nest, 0);
    return acc;
}

/* one sweep: moments, u <- u - c w (PROJ), w <- f w - s u */
INL void FN(adam_sweep)(const FN(hyp_t) * h, T* restrict p, const T* restrict g, T* restrict m, T* restrict v,
                        int64_t N, T c, const int nest, const int dec, const int proj) {
#pragma omp simd
    for (int64_t j = 0; j < N; j++) {
        T pj = p[j];
        T u = FN(adam_u)(h, g[j] * h->gs, m + j, v + j, nest, 1);
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
        T u = FN(adam_u)(h, g[j] * h->gs, m + j, v + j, nest, 1);
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
INL void FN(adam_stage)(const FN(hyp_t) * hp, const T* restrict p, const T* restrict g, T* restrict m, T* restrict v,
                        T* restrict U, int64_t C, T* restrict out, const int nest) {
    const FN(hyp_t) hl = *hp, *h = &hl; /* a local copy: the stores of the loop cannot alias it */
    ROW_SWEEP(p, g, C, h->sgn, h->gs, out, FN(adam_u)(h, gj, m + j, v + j, nest, 1), U[j] = u);
}

INL void FN(adam_apply)(const FN(hyp_t) * hp, T* restrict p, const T* restrict U, int64_t N, T c, const int dec,
                        const int proj) {
    const FN(hyp_t) hl = *hp, *h = &hl;
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

/* adam_apply in blocks of PF_BLOCK elements, each block first streamed to bak when bak is not NULL (the old
   values of a row written under a guess that can fail), and one cache line of each of four other arrays
   prefetched per block at pf + (e0 + j) / 4 when pf0 is not NULL (the next rows of a speculative sweep,
   read from memory while this runs from the cache). Element-wise: the same bits as adam_apply. */
INL void FN(adam_apply_pf)(const FN(hyp_t) * h, T* restrict p, const T* restrict U, int64_t N, T c, const int dec,
                           const int proj, T* restrict bak, int64_t e0, const T* pf0, const T* pf1, const T* pf2,
                           const T* pf3) {
    int64_t j = 0;
    for (; j < N; j += PF_BLOCK) {
        const int64_t len = N - j < PF_BLOCK ? N - j : PF_BLOCK;
        if (pf0 != NULL) {
            const int64_t q = (e0 + j) / 4;
            __builtin_prefetch(pf0 + q);
            __builtin_prefetch(pf1 + q);
            __builtin_prefetch(pf2 + q);
            __builtin_prefetch(pf3 + q);
        }
        if (bak != NULL) STREAM_COPY(bak + j, p + j, len);
        FN(adam_apply)(h, p + j, U + j, len, c, dec, proj);
    }
}

static void FN(adam_apply_pf_any)(const FN(hyp_t) * h, T* p, const T* U, int64_t N, T c, int dec, int proj, T* bak,
                                  int64_t e0, const T* pf0, const T* pf1, const T* pf2, const T* pf3) {
#define CALL(a, b) FN(adam_apply_pf)(h, p, U, N, c, a, b, bak, e0, pf0, pf1, pf2, pf3)
    if (dec) {
        if (proj) CALL(1, 1); else CALL(1, 0);
    } else {
        if (proj) CALL(0, 1); else CALL(0, 0);
    }
#undef CALL
}

/* Recovery after a wrong guess: rows stepped from their old values src (the copy of a written row, or the
   row itself: src may be p), with u re-derived from the stored moments (adam_u's arithmetic: the same bits) */
INL void FN(adam_redo)(const FN(hyp_t) * h, T* p, const T* src, const T* restrict g, const T* restrict m,
                       const T* restrict v, int64_t N, T c, const int nest, const int dec, const int proj) {
#pragma omp simd
    for (int64_t j = 0; j < N; j++) {
        T pj = src[j];
        T d = SQRT(v[j]) / h->sbc2 + h->eps;
        T u = nest ? (h->b1 * m[j] + h->c1 * (h->sgn * (g[j] * h->gs))) / d : m[j] / d;
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
   view it took at its last step, or CHANNEL when forced), in groups of rows of about SPEC_GROUP elements
   (short rows: memory streams longer runs between the cached sweeps): each row of a group is staged
   (moments stored, u in the thread's buffer, the four row sums), then, while the guess holds, stepped from
   the cache, its old values first streamed to bak when the guess can be wrong (`check`), the first quarter
   of the next group prefetched meanwhile (adam_apply_pf). A CHANNEL guess fails at the first row that fails
   the channel test (later rows are only staged); a NONE guess is known right only at the end. Right: one
   sweep from memory instead of two. Wrong: the rows are stepped again, from their old values, under the
   view decided from the same row sums, so the result does not depend on the guess. Returns that view. */
static int FN(adam_speculate)(const FN(hyp_t) * h, T* p, const T* g, T* m, T* v, int64_t R, int64_t C, int spec,
                              int check, double lr, double wd, double delta, double wd_ratio, int mode, int nest,
                              T* buf, int64_t max_u, T* bak, char* written, T* stats, int nt,
                              int64_t* counts) {
    const int dec = wd > 0;
    const T chan_thr = (T)(delta / sqrt((double)C));
    FN(hyp_t) hs = *h;
    hs.f = FN(decay)(lr, wd, wd_ratio, 1.0, spec);
    int stop = 0;
    const int64_t per = spec_rows(C), G = (R + per - 1) / per;
    PFOR(nt > 1 && G > 1 && R * C >= PAR_MIN, k, G, {
        const int64_t r0 = k * per, r1 = r0 + per < R ? r0 + per : R;
        /* the next group's first quarter (at most per * C / 4 elements) prefetched, when it has them */
        const int pf = r0 + per < R && per <= 4 * (R - r0 - per);
        const int64_t q = pf ? (r0 + per) * C : 0;
        T* u = buf + max_u * omp_thread();
        for (int64_t r = r0; r < r1; r++)
            FN(adam_stage_any)(&hs, p + r * C, g + r * C, m + r * C, v + r * C, u + (r - r0) * C, C, stats + 4 * r,
                               nest);
        for (int64_t r = r0; r < r1; r++) {
            int64_t o = r * C;
            T* st = stats + 4 * r;
            int write = !__atomic_load_n(&stop, __ATOMIC_RELAXED);
            if (write && check && spec == VIEW_CHANNEL && !FN(passes)(st, hs.eps, chan_thr)) {
                __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
                write = 0;
            }
            if (write) {
                T c = spec == VIEW_CHANNEL ? FN(coef)(st[3], st[1], hs.eps) : 0;
                FN(adam_apply_pf_any)(&hs, p + o, u + (r - r0) * C, C, c, dec, spec == VIEW_CHANNEL,
                                      check ? bak + o : NULL, (r - r0) * C, pf ? p + q : NULL, g + q, m + q, v + q);
            }
            written[r] = (char)write;
        }
    });
    /* The recovery below re-reads each copied row on the thread that copied it (the same static schedule
       over the same rows), so program order covers the non-temporal stores; the fence orders them for
       everything after this call. */
    STREAM_FENCE();
    T tot[3];
    int view = FN(decide_from)(stats, R, C, hs.eps, delta, mode, tot);
    if (check) counts[view == spec ? 0 : 1]++;
    if (view == spec) return view; /* every row was written: a CHANNEL guess stops only when the view is not */
    hs.f = FN(decay)(lr, wd, wd_ratio, 1.0, view);
    T coef_l = 0;
    if (view == VIEW_LAYER) {
        coef_l = FN(layer_coef)(stats, R, tot[1], hs.eps);
    }
    PFOR(nt > 1 && G > 1 && R * C >= PAR_MIN, k, G, {
        const int64_t r0 = k * per, r1 = r0 + per < R ? r0 + per : R;
        for (int64_t r = r0; r < r1; r++) {
            int64_t o = r * C;
            T c = view == VIEW_CHANNEL ? FN(coef)(stats[4 * r + 3], stats[4 * r + 1], hs.eps) : coef_l;
            FN(adam_redo_any)(&hs, p + o, written[r] ? bak + o : p + o, g + o, m + o, v + o, C, c, nest, dec,
                              view != VIEW_NONE);
        }
    });
    return view;
}

/* the guesses of one call (see keep_guesses): tensors too large to stage, under MODE_AUTO, up to spec_max_bytes */
static size_t FN(adamp_guesses)(const ta_args* a, signed char* guess, int64_t limit) {
    const int64_t stage_max = a->stage_bytes / (int64_t)sizeof(T);
    int64_t R, C;
    for (int64_t i = 0; i < a->n; i++) {
        shape_of(a->meta, a->n, i, &R, &C);
        int cand = R > 0 && a->mode == MODE_AUTO && R * C > stage_max && (int64_t)sizeof(T) * R * C <= a->spec_max_bytes;
        guess[i] = cand ? caller_guess(a, i) : -1;
    }
    return keep_guesses(a->meta, a->n, guess, sizeof(T), limit);
}

int64_t FN(torch_adamp_adamp_spare)(const ta_args* a) {
    signed char* guess = (signed char*)malloc(a->n > 0 ? (size_t)a->n : 1);
    if (guess == NULL) return 0; /* the step will not speculate either when it cannot allocate */
    int64_t bytes = (int64_t)FN(adamp_guesses)(a, guess, -1);
    free(guess);
    return bytes;
}

/* One AdamP step of a->n tensors (see torch_adamp.h for the arguments). */
int FN(torch_adamp_adamp)(ta_args* a) {
    if (amp_skip(a)) return 0;
    const int64_t n = a->n, *ptrs = a->ptrs, *meta = a->meta;
    const double lr = a->lr, b1 = a->rule.adamp.beta1, b2 = a->rule.adamp.beta2, eps = a->eps, wd = a->weight_decay;
    const double delta = a->delta, wd_ratio = a->wd_ratio;
    const int nest = a->rule.adamp.nesterov != 0, maximize = a->maximize != 0, mode = a->mode;
    int64_t* views = a->views;
    const int nt = a->threads < 1 ? 1 : a->threads;
    const int64_t stage_max = a->stage_bytes / (int64_t)sizeof(T);
    int64_t max_r = 1, max_u = 1, max_stage = 0, R, C;
    int64_t counts[2] = {0, 0};
    for (int64_t i = 0; i < n; i++) {
        shape_of(meta, n, i, &R, &C);
        if (R > max_r) max_r = R;
        if (R > 0 && mode != MODE_NEVER) {
            if (R * C <= stage_max) {
                if (R * C > max_stage) max_stage = R * C;
            } else {
                int64_t grp = spec_rows(C) * C;
                if (grp > max_u) max_u = grp;
            }
        }
    }
    signed char* guess = (signed char*)malloc(n > 0 ? (size_t)n : 1);
    size_t bak_bytes = guess != NULL ? FN(adamp_guesses)(a, guess, a->spare != NULL ? a->spare_bytes : 0) : 0;
    T* bak = bak_bytes > 0 ? (T*)a->spare : NULL; /* the old rows of tensors stepped under a guess that can fail */
    T* stats = (T*)malloc(sizeof(T) * 4 * max_r);
    T* buf = (T*)malloc(sizeof(T) * max_u * nt); /* rows of u per thread, for tensors too large to stage */
    T* staged = max_stage > 0 ? (T*)malloc(sizeof(T) * max_stage) : NULL;
    char* written = (char*)malloc((size_t)max_r);
    if (!guess || !stats || !buf || !written || (max_stage > 0 && !staged)) { /* nothing modified yet */
        free(guess);
        free(stats);
        free(buf);
        free(staged);
        free(written);
        return -1;
    }
    FN(hyp_t) h;
    h.b1 = (T)b1; h.b2 = (T)b2; h.c1 = (T)(1 - b1); h.c2 = (T)(1 - b2); h.eps = (T)eps;
    h.sgn = maximize ? (T)-1 : (T)1;
    h.gs = (T)amp_inv_scale(a);
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
            h.f = FN(decay)(lr, wd, wd_ratio, 1.0, view);
            if (view == VIEW_CHANNEL) {
                FN(channel_coefs)(stats, R, h.eps);
                PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                    int64_t o = r * C;
                    FN(adam_apply_any)(&h, p + o, staged + o, C, stats[4 * r + 3], dec, 1);
                });
            } else {
                if (view == VIEW_LAYER) {
                    coef_l = FN(layer_coef)(stats, R, tot[1], h.eps);
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
                                          mode, nest, buf, max_u, bak, written, stats, nt, counts);
            continue;
        }
        if (R > 0 && mode != MODE_NEVER) { /* too large to stage, no guess: pass 1 reads w and g only */
            view = FN(decide)(p, g, R, C, h.sgn, h.gs, h.eps, delta, mode, stats, tot, nt);
            if (view == VIEW_LAYER) {
                PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                    int64_t o = r * C;
                    stats[4 * r + 3] = FN(adam_wu_any)(&h, p + o, g + o, m + o, v + o, C, nest);
                });
                coef_l = FN(layer_coef)(stats, R, tot[1], h.eps);
            }
        } else {
            C = (R > 0 ? R : 1) * C;
            R = 1;
        }
        views[i] = view;
        h.f = FN(decay)(lr, wd, wd_ratio, 1.0, view);
        int64_t N = R * C;
        if (view == VIEW_CHANNEL) {
            PFOR(nt > 1 && R > 1 && N >= PAR_MIN, r, R, {
                int64_t o = r * C;
                FN(adam_row_any)(&h, p + o, g + o, m + o, v + o, C, buf + max_u * omp_thread(), stats[4 * r + 1],
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
    a->spec_right = counts[0];
    a->spec_wrong = counts[1];
    free(guess);
    free(stats);
    free(buf);
    free(staged);
    free(written);
    return 0;
}

