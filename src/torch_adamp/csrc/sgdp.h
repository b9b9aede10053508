/* SGDP's direction and sweeps, for one element type T (instantiated by kernels.c), over rows.h. */
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

/* ptrs: n params, n grads, n momentum buffers; meta as for AdamP */
/* The speculative sweep of SGDP (tensors above stage_bytes under MODE_AUTO, guessed view CHANNEL or NONE, and
   the buffer not receiving the projected direction under that view): per row, sweep A then, while the guess
   holds, sweep B at once, the old row first streamed to bak. Wrong guess: the written rows are restored
   (the buffer is as after sweep A) and the caller runs sweep B under the decided view. Either way bitwise
   the two-sweep result. Returns whether the guess held (*view: the decided view; tot: the totals). */
static int FN(sgd_speculate)(const FN(hyp_t) * h, T* p, const T* g, T* b, int64_t R, int64_t C, int spec,
                             double lr, double wd, double momentum, double delta, double wd_ratio, int mode, int nest,
                             int pm, T* bak, char* written, T* stats, T* tot, int nt, int* view, int64_t* counts) {
    const int dec = wd > 0;
    const T chan_thr = (T)(delta / sqrt((double)C));
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
    counts[*view == spec ? 0 : 1]++;
    if (*view == spec) return 1;
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
        if (written[r]) {
            int64_t o = r * C;
            memcpy(p + o, bak + o, sizeof(T) * C);
        }
    });
    return 0;
}

/* the guesses of one call (see keep_guesses): tensors above stage_bytes, under MODE_AUTO, up to spec_max_bytes.
   A channel guess with the projected direction stored in the buffer (pm) would need a copy of the buffer
   too: measured slower than the two sweeps, so those tensors keep the two sweeps. */
static size_t FN(sgdp_guesses)(const ta_args* a, signed char* guess, int64_t limit) {
    const int pm = a->rule.sgdp.project_momentum && !a->rule.sgdp.nesterov;
    int64_t R, C;
    for (int64_t i = 0; i < a->n; i++) {
        shape_of(a->meta, a->n, i, &R, &C);
        const int64_t bytes = (int64_t)sizeof(T) * R * C;
        int cand = R > 0 && a->mode == MODE_AUTO && bytes > a->stage_bytes && bytes <= a->spec_max_bytes;
        guess[i] = cand ? caller_guess(a, i) : -1;
        if (pm && guess[i] == VIEW_CHANNEL) guess[i] = -1;
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
    if (!guess || !stats || !written) { /* nothing modified yet */
        free(guess);
        free(stats);
        free(written);
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
                                  bak, written, stats, tot, nt, &view, counts)) {
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
    return 0;
}

