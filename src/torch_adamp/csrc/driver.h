/* The kernel driver: the sweep scheme of every kernel rule, written once. Included by csrc/rule.c after the
   rule's header (csrc/rules/<rule>.h) and rows.h, once per element type T. What a rule's header provides:

     RULE                       its name (the exports are torch_adamp_<RULE>_*)
     ta_<rule>_args, RULE_ARGS, RULE_FIELDS
                                its argument struct (TA_STRUCT of its field list RULE_FIELDS, pointed to by
                                ta_args.rule; torch_adamp/optimizers/<rule>.py's kernel_fields in the same order)
     RULE_STATES                its state tensors (ptrs: n of each, after the params and grads)
     RULE_VARIANTS              the variants of its direction (e.g. nesterov): each is a compile-time constant
                                `var` of the element functions, 1 to 4 of them
     RULE_STAGES                1: sweep B reads the u that sweep A staged (u is expensive: staged tensors keep
                                it in a buffer, larger ones are speculated in groups of rows or take a read-only
                                first pass); 0: sweep B re-derives u from the updated state (rule_redir)
     RULE_REDERIVES             whether rule_redir exists: without it no guess is taken (a wrong one could
                                not be redone), and RULE_STAGES must be 1
     RULE_STORES_PROJECTED(var), RULE_PROJECTED_STATE
                                whether, in variant var, the direction after sweep A *is* state tensor
                                RULE_PROJECTED_STATE and the projected direction is written back into it
                                (SGDP's project_momentum); its speculative sweep then copies nothing and logs
                                what the recovery cannot recompute (below)
     FN(rule_t)                 its constants, typed
     int FN(rule_begin)(k, a, &wd_divisor)  per call: the constants of its arguments; returns the variant
     T FN(rule_tensor)(k, a, i)             per tensor: its constants (step counters, bias corrections);
                                            returns the step scale s of w <- f w + s u
     T FN(rule_dir)(k, g, s, j, var, store) element j: u from the gradient g (unscaled and signed) and
                                            the state s[0..RULE_STATES)[j], which it updates when STORE
     T FN(rule_redir)(k, g, s, j, var)      the same u from the already-updated state (bitwise)

   Per tensor, by its size, the mode, the guess and the rule's flags:
     never projected             one sweep: u, then w <- f w + s u
     staged (<= stage_bytes)     sweep A: state, u (staged when RULE_STAGES) and the four row sums per row;
                                 the decision; sweep B from the cache (staged u, or u re-derived)
     speculative                 (larger, with a channel/none guess, or under a forced channel view) one
                                 sweep under the guessed view, verified by the decision from the same row
                                 sums, the rows that were written wrongly redone from their old values: see
                                 FN(speculate)
     read-only first pass        (larger, no guess, RULE_STAGES) the row sums of w and g, the decision, then
                                 one sweep (channel view: each row staged and stepped from the cache)
     two sweeps from memory      (larger, no guess, !RULE_STAGES)
   The specialised row functions (variant, decay, projection: compile-time constants in their loops) are
   chosen once per call and view from tables, and called per row or block. */

#ifndef TA_DRIVER_H
#define TA_DRIVER_H
/* the exports of the rule RULE for the type suffix of FN */
#define TA_EXPORT(what) FN(TA_CAT(TA_CAT(torch_adamp_, RULE), what))
/* M(v, NAME) for each variant v of the rule */
#define TA_EACH_VARIANT(M, NAME) TA_CAT(TA_EACH_VARIANT_, RULE_VARIANTS)(M, NAME)
#define TA_EACH_VARIANT_1(M, NAME) M(0, NAME)
#define TA_EACH_VARIANT_2(M, NAME) M(0, NAME) M(1, NAME)
#define TA_EACH_VARIANT_3(M, NAME) M(0, NAME) M(1, NAME) M(2, NAME)
#define TA_EACH_VARIANT_4(M, NAME) M(0, NAME) M(1, NAME) M(2, NAME) M(3, NAME)
/* the copy of row function NAME for variant v, decay d and projection q, and tables of them */
#define TA_FN(NAME, v, d, q) FN(NAME##_##v##_##d##_##q)
#define TA_INST(NAME, v, d, q)                                                                          \
    static void TA_FN(NAME, v, d, q)(const FN(ten_t) * xp, int64_t o, int64_t n, T* aux, T c, T* out) { \
        const FN(ten_t) x = *xp; /* a local copy: the stores of the loop cannot alias it */              \
        FN(NAME)(&x, o, n, aux, c, out, v, d, q);                                                         \
    }
#define TA_INST_V(v, NAME) TA_INST(NAME, v, 0, 0)
#define TA_INST_VD(v, NAME) TA_INST(NAME, v, 0, 0) TA_INST(NAME, v, 1, 0)
#define TA_INST_VDQ(v, NAME) TA_INST_VD(v, NAME) TA_INST(NAME, v, 0, 1) TA_INST(NAME, v, 1, 1)
#define TA_TAB_V(v, NAME) TA_FN(NAME, v, 0, 0),
#define TA_TAB_VD(v, NAME) {TA_FN(NAME, v, 0, 0), TA_FN(NAME, v, 1, 0)},
#define TA_TAB_VDQ(v, NAME) {{TA_FN(NAME, v, 0, 0), TA_FN(NAME, v, 0, 1)}, {TA_FN(NAME, v, 1, 0), TA_FN(NAME, v, 1, 1)}},
/* whether a variant of the rule stores the projected direction (a constant expression, for #if too) */
#define TA_STORES_PROJECTED(v, NAME) || RULE_STORES_PROJECTED(v)
#define TA_STORES_PROJECTED_ANY (0 TA_EACH_VARIANT(TA_STORES_PROJECTED, _))
#if !RULE_STAGES && !RULE_REDERIVES
#error "a rule whose direction cannot be re-derived from its state must stage it (RULE_STAGES 1)"
#endif

#define TA_ABI_STRUCT RULE_ARGS
TA_ABI_QUERY(TA_CAT(TA_CAT(torch_adamp_, RULE), _abi), RULE_FIELDS)
#undef TA_ABI_STRUCT
#endif

/* ---- one tensor: what every row function reads (each takes a local copy) ---- */
typedef struct {
    T* p;
    const T* g;
    T* s[RULE_STATES];
    T gs, sgn, eps; /* the inverse grad scale (1 without GradScaler), -1 under maximize (else 1), eps */
    T f, ss;        /* the step w <- f w + ss u: f the decay factor of the view, ss the rule's step scale */
    FN(rule_t) k;   /* the rule's constants */
} FN(ten_t);

/* a row function: elements [o, o + n) of the tensor; aux, c and out as each says */
typedef void (*FN(row_fn))(const FN(ten_t) * x, int64_t o, int64_t n, T* aux, T c, T* out);
#define TA_ROW_PARAMS \
    const FN(ten_t) * x, int64_t o, int64_t n, T *aux, T c, T *out, const int var, const int dec, const int proj
#define TA_ROW_LOCALS(RESTRICT_P)                                      \
    T* RESTRICT_P p = x->p + o;                                        \
    const T* restrict g = x->g + o;                                    \
    T* s[RULE_STATES];                                                 \
    for (int k_ = 0; k_ < RULE_STATES; k_++) s[k_] = x->s[k_] + o;     \
    (void)p, (void)g, (void)s, (void)aux, (void)c, (void)out, (void)var, (void)dec, (void)proj
/* the gradient the rule sees: unscaled, signed */
#define TA_GRAD(gj) (x->sgn * (gj))
/* w <- f w + ss u */
#define TA_STEP(pj, u) FMA((u), x->ss, dec ? (pj) * x->f : (pj))

/* the only sweep of a tensor never projected, or after a read-only first pass: state, u <- u - c w (proj),
   w <- f w + ss u */
INL void FN(sweep)(TA_ROW_PARAMS) {
    TA_ROW_LOCALS(restrict);
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        T pj = p[j];
        T u = FN(rule_dir)(&x->k, TA_GRAD(g[j] * x->gs), s, j, var, 1);
        if (proj) u = u - c * pj;
        p[j] = TA_STEP(pj, u);
    }
}

/* sweep A of one row (n elements): state, u staged in aux (RULE_STAGES), out[0..3] = the four row sums */
INL void FN(stage)(TA_ROW_PARAMS) {
    TA_ROW_LOCALS(restrict);
    T* restrict U = aux;
    (void)U;
    ROW_SWEEP(j, pj, gj, u, p, g, n, x->sgn, x->gs, out, FN(rule_dir)(&x->k, TA_GRAD(gj), s, j, var, 1),
              if (RULE_STAGES) U[j] = u);
}

/* sweep B from the staged u (aux): u <- u - c w (proj), w <- f w + ss u */
INL void FN(apply)(TA_ROW_PARAMS) {
    TA_ROW_LOCALS(restrict);
    const T* restrict U = aux;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        T pj = p[j];
        T u = U[j];
        if (proj) u = u - c * pj;
        p[j] = TA_STEP(pj, u);
    }
}

/* sweep B with u re-derived from the updated state, w stepped from its values in aux (w itself, or the copy
   of a row written under a wrong guess); the projected u stored back where the rule says */
#if RULE_REDERIVES
INL void FN(redo)(TA_ROW_PARAMS) {
    TA_ROW_LOCALS(); /* aux may be p */
    const T* src = aux;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        T pj = src[j];
        T u = FN(rule_redir)(&x->k, TA_GRAD(g[j] * x->gs), s, j, var);
        if (proj) {
            u = u - c * pj;
            if (RULE_STORES_PROJECTED(var)) s[RULE_PROJECTED_STATE][j] = u;
        }
        p[j] = TA_STEP(pj, u);
    }
}
#endif

/* read-only first pass, layer view: *out = sum_j w_j u_j, storing nothing */
INL void FN(wu)(TA_ROW_PARAMS) {
    TA_ROW_LOCALS(restrict);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; j++) acc += p[j] * FN(rule_dir)(&x->k, TA_GRAD(g[j] * x->gs), s, j, var, 0);
    *out = acc;
}

/* read-only first pass, channel view, one row: state and u (in the thread's buffer aux) and <w,u>, then the
   projected step while the row is in the cache (c: ||w||^2 of the row) */
INL void FN(row)(TA_ROW_PARAMS) {
    TA_ROW_LOCALS(restrict);
    T* restrict buf = aux;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; j++) {
        T u = FN(rule_dir)(&x->k, TA_GRAD(g[j] * x->gs), s, j, var, 1);
        buf[j] = u;
        acc += p[j] * u;
    }
    const T cr = FN(coef)(acc, c, x->eps);
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        T pj = p[j];
        T u = buf[j] - cr * pj;
        p[j] = TA_STEP(pj, u);
    }
}

/* u staged by sweep A is stepped by apply, which stores no projected u */
#define TA_CHECK_VARIANT(v, NAME) \
    _Static_assert(!(RULE_STAGES && RULE_STORES_PROJECTED(v)), "a rule that stages u cannot store the projected u");
TA_EACH_VARIANT(TA_CHECK_VARIANT, _)
TA_EACH_VARIANT(TA_INST_VDQ, sweep)
TA_EACH_VARIANT(TA_INST_V, stage)
static const FN(row_fn) FN(sweep_tab)[RULE_VARIANTS][2][2] = {TA_EACH_VARIANT(TA_TAB_VDQ, sweep)};
static const FN(row_fn) FN(stage_tab)[RULE_VARIANTS] = {TA_EACH_VARIANT(TA_TAB_V, stage)};
#if RULE_REDERIVES
TA_EACH_VARIANT(TA_INST_VDQ, redo)
static const FN(row_fn) FN(redo_tab)[RULE_VARIANTS][2][2] = {TA_EACH_VARIANT(TA_TAB_VDQ, redo)};
#endif
#if RULE_STAGES /* only the rules that stage u compile what reads it */
TA_EACH_VARIANT(TA_INST_V, wu)
TA_EACH_VARIANT(TA_INST_VD, row)
TA_INST_VDQ(0, apply) /* the same for every variant */
static const FN(row_fn) FN(wu_tab)[RULE_VARIANTS] = {TA_EACH_VARIANT(TA_TAB_V, wu)};
static const FN(row_fn) FN(row_tab)[RULE_VARIANTS][2] = {TA_EACH_VARIANT(TA_TAB_VD, row)};
static const FN(row_fn) FN(apply_tab)[2][2] = {{TA_FN(apply, 0, 0, 0), TA_FN(apply, 0, 0, 1)},
                                               {TA_FN(apply, 0, 1, 0), TA_FN(apply, 0, 1, 1)}};
#endif

/* apply in blocks of PF_BLOCK elements, each block first streamed to bak when bak is not NULL (the old
   values of a row written under a guess that can fail), and one cache line of w, g and each state tensor
   prefetched per block at pfo + (e0 + j) / 4 when pfo >= 0 (the next rows of a speculative sweep, read from
   memory while this runs from the cache). Element-wise: the same bits as apply. */
typedef void (*FN(pf_fn))(const FN(ten_t) * x, int64_t o, int64_t n, T* U, T c, T* bak, int64_t e0, int64_t pfo);
INL void FN(apply_pf)(const FN(ten_t) * x, int64_t o, int64_t n, T* U, T c, T* bak, int64_t e0, int64_t pfo,
                      const int dec, const int proj) {
    for (int64_t j = 0; j < n; j += PF_BLOCK) {
        const int64_t len = n - j < PF_BLOCK ? n - j : PF_BLOCK;
        if (pfo >= 0) {
            const int64_t q = pfo + (e0 + j) / 4;
            __builtin_prefetch(x->p + q);
            __builtin_prefetch(x->g + q);
            for (int k = 0; k < RULE_STATES; k++) __builtin_prefetch(x->s[k] + q);
        }
        if (bak != NULL) STREAM_COPY(bak + j, x->p + o + j, len);
        FN(apply)(x, o + j, len, U + j, c, NULL, 0, dec, proj);
    }
}
#if RULE_STAGES
#define TA_INST_PF(d, q)                                                                                      \
    static void FN(apply_pf_##d##_##q)(const FN(ten_t) * xp, int64_t o, int64_t n, T* U, T c, T* bak, int64_t e0, \
                                       int64_t pfo) {                                                         \
        const FN(ten_t) x = *xp;                                                                              \
        FN(apply_pf)(&x, o, n, U, c, bak, e0, pfo, d, q);                                                     \
    }
TA_INST_PF(0, 0)
TA_INST_PF(0, 1)
TA_INST_PF(1, 0)
TA_INST_PF(1, 1)
static const FN(pf_fn) FN(apply_pf_tab)[2][2] = {{FN(apply_pf_0_0), FN(apply_pf_0_1)},
                                                 {FN(apply_pf_1_0), FN(apply_pf_1_1)}};
#endif

#include "pm_log.h"

/* ---- one call: its scratch, the row functions of its variant and decay, its counts ---- */
typedef struct {
    int64_t max_r, max_u, max_stage; /* most rows; elements of u per thread (speculated groups); staged u */
} FN(plan_t);

/* what the call will allocate (its sizes: FN(call_begin) and the scratch query) */
static void FN(plan)(const ta_args* a, FN(plan_t) * pl) {
    const int64_t stage_max = a->stage_bytes / (int64_t)sizeof(T);
    int64_t R, C;
    pl->max_r = 1, pl->max_u = 1, pl->max_stage = 0;
    for (int64_t i = 0; i < a->n; i++) {
        shape_of(a->meta, a->n, i, &R, &C);
        if (R > pl->max_r) pl->max_r = R;
        if (RULE_STAGES && R > 0 && a->mode != MODE_NEVER) {
            if (R * C <= stage_max) {
                if (R * C > pl->max_stage) pl->max_stage = R * C;
            } else if (spec_rows(C) * C > pl->max_u) {
                pl->max_u = spec_rows(C) * C;
            }
        }
    }
}

typedef struct {
    int var, dec, mode, nt;
    double lr, wd, wd_ratio, wd_divisor, delta;
    int64_t stage_max;       /* elements */
    FN(plan_t) pl;
    signed char* guess;      /* n: the guesses this call takes (-1: none) */
    T* bak;                  /* the spare block: old rows of tensors stepped under a guess that can fail */
    T* stats;                /* 4 per row: the row sums */
    T* buf;                  /* RULE_STAGES: u of one group of rows per thread */
    T* staged;               /* RULE_STAGES: u of a staged tensor */
    char* written;           /* per row: written under the guess */
    int64_t* exn;            /* per row: the exceptions logged (RULE_STORES_PROJECTED) */
    int64_t counts[2];       /* speculative sweeps right, wrong */
    FN(row_fn) sweep[2], redo[2], apply[2], stage, wu, row; /* [proj] */
    FN(pf_fn) apply_pf[2];
    FN(pm_fn) pm_row;
} FN(call_t);

/* the guesses of one call (see keep_guesses): tensors too large to stage, under MODE_AUTO, up to
   spec_max_bytes, when the rule can redo a wrong guess */
static size_t FN(guesses)(const ta_args* a, signed char* guess, int64_t limit) {
    const int64_t stage_max = a->stage_bytes / (int64_t)sizeof(T);
    int64_t R, C;
    for (int64_t i = 0; i < a->n; i++) {
        shape_of(a->meta, a->n, i, &R, &C);
        int cand = RULE_REDERIVES && R > 0 && a->mode == MODE_AUTO && R * C > stage_max &&
                   (int64_t)sizeof(T) * R * C <= a->spec_max_bytes;
        guess[i] = cand ? caller_guess(a, i) : -1;
    }
    return keep_guesses(a->meta, a->n, guess, sizeof(T), limit);
}

static void FN(call_end)(FN(call_t) * cl) {
    free(cl->guess);
    free(cl->stats);
    free(cl->buf);
    free(cl->staged);
    free(cl->written);
    free(cl->exn);
}

/* 0, or -1 when an allocation failed (then nothing is allocated) */
static int FN(call_begin)(FN(call_t) * cl, const ta_args* a, FN(rule_t) * k) {
    memset(cl, 0, sizeof *cl);
    cl->wd_divisor = 1.0;
    cl->var = FN(rule_begin)(k, a, &cl->wd_divisor);
    cl->lr = a->lr, cl->wd = a->weight_decay, cl->wd_ratio = a->wd_ratio, cl->delta = a->delta;
    cl->dec = cl->wd > 0, cl->mode = a->mode, cl->nt = a->threads < 1 ? 1 : a->threads;
    cl->stage_max = a->stage_bytes / (int64_t)sizeof(T);
    FN(plan)(a, &cl->pl);
    const int pm = TA_STORES_PROJECTED_ANY;
    cl->guess = (signed char*)malloc(a->n > 0 ? (size_t)a->n : 1);
    size_t bak_bytes = cl->guess != NULL ? FN(guesses)(a, cl->guess, a->spare != NULL ? a->spare_bytes : 0) : 0;
    cl->bak = bak_bytes > 0 ? (T*)a->spare : NULL;
    cl->stats = (T*)malloc(sizeof(T) * 4 * cl->pl.max_r);
    cl->written = (char*)malloc((size_t)cl->pl.max_r);
    cl->exn = pm ? (int64_t*)malloc(sizeof(int64_t) * cl->pl.max_r) : NULL;
    cl->buf = RULE_STAGES ? (T*)malloc(sizeof(T) * cl->pl.max_u * cl->nt) : NULL;
    cl->staged = RULE_STAGES && cl->pl.max_stage > 0 ? (T*)malloc(sizeof(T) * cl->pl.max_stage) : NULL;
    if (!cl->guess || !cl->stats || !cl->written || (pm && !cl->exn) || (RULE_STAGES && !cl->buf) ||
        (RULE_STAGES && cl->pl.max_stage > 0 && !cl->staged)) {
        FN(call_end)(cl);
        return -1;
    }
    cl->stage = FN(stage_tab)[cl->var];
    for (int q = 0; q < 2; q++) {
        cl->sweep[q] = FN(sweep_tab)[cl->var][cl->dec][q];
#if RULE_REDERIVES
        cl->redo[q] = FN(redo_tab)[cl->var][cl->dec][q];
#endif
#if RULE_STAGES
        cl->apply[q] = FN(apply_tab)[cl->dec][q];
        cl->apply_pf[q] = FN(apply_pf_tab)[cl->dec][q];
#endif
    }
#if RULE_STAGES
    cl->wu = FN(wu_tab)[cl->var];
    cl->row = FN(row_tab)[cl->var][cl->dec];
#endif
#if TA_STORES_PROJECTED_ANY
    cl->pm_row = FN(pm_row_tab)[cl->dec];
#endif
    return 0;
}

/* the bytes of C heap FN(call_begin) allocates */
static int64_t FN(scratch_bytes)(const ta_args* a) {
    FN(plan_t) pl;
    FN(plan)(a, &pl);
    const int64_t nt = a->threads < 1 ? 1 : a->threads, item = (int64_t)sizeof(T);
    int64_t bytes = (a->n > 0 ? a->n : 1) + item * 4 * pl.max_r + pl.max_r;
    if (TA_STORES_PROJECTED_ANY) bytes += (int64_t)sizeof(int64_t) * pl.max_r;
    if (RULE_STAGES) bytes += item * (pl.max_u * nt + pl.max_stage);
    return bytes;
}

/* w <- f w + ss u, the decay factor of `view` */
INL void FN(set_decay)(const FN(call_t) * cl, FN(ten_t) * x, int view) {
    x->f = FN(decay)(cl->lr, cl->wd, cl->wd_ratio, cl->wd_divisor, view);
}

/* ---- the schemes of one tensor (R rows of C); each returns the view it took ---- */

/* never projected: one sweep in blocks */
static int FN(plain)(FN(call_t) * cl, FN(ten_t) * x, int64_t N) {
    const int nt = cl->nt;
    const FN(row_fn) fn = cl->sweep[0];
    FN(set_decay)(cl, x, VIEW_NONE);
    PFOR(nt > 1 && N >= PAR_MIN, b, (N + BLOCK - 1) / BLOCK, {
        const int64_t o = b * BLOCK;
        fn(x, o, N - o < BLOCK ? N - o : BLOCK, NULL, 0, NULL);
    });
    return VIEW_NONE;
}

/* sweep B under the decided view, after the row sums (stats, totals tot) of sweep A: from the staged u in
   U (RULE_STAGES), else u re-derived */
static void FN(sweep_b)(FN(call_t) * cl, FN(ten_t) * x, int64_t R, int64_t C, int view, const T* tot, T* U) {
    const int nt = cl->nt;
    const int64_t N = R * C;
    T *stats = cl->stats, *base = RULE_STAGES ? U : x->p;
    const FN(row_fn) fn = RULE_STAGES ? cl->apply[view != VIEW_NONE] : cl->redo[view != VIEW_NONE];
    FN(set_decay)(cl, x, view);
    if (view == VIEW_CHANNEL) {
        FN(channel_coefs)(stats, R, x->eps);
        PFOR(nt > 1 && R > 1 && N >= PAR_MIN, r, R, { fn(x, r * C, C, base + r * C, stats[4 * r + 3], NULL); });
    } else {
        const T coef_l = view == VIEW_LAYER ? FN(layer_coef)(stats, R, tot[1], x->eps) : 0;
        PFOR(nt > 1 && N >= PAR_MIN, b, (N + BLOCK - 1) / BLOCK, {
            const int64_t o = b * BLOCK;
            fn(x, o, N - o < BLOCK ? N - o : BLOCK, base + o, coef_l, NULL);
        });
    }
}

/* sweep A (U: where u is staged, RULE_STAGES), the decision, sweep B */
static int FN(two_sweeps)(FN(call_t) * cl, FN(ten_t) * x, int64_t R, int64_t C, T* U) {
    const int nt = cl->nt;
    const FN(row_fn) stage = cl->stage;
    T* stats = cl->stats;
    T tot[3];
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R,
         { stage(x, r * C, C, RULE_STAGES ? U + r * C : NULL, 0, stats + 4 * r); });
    const int view = FN(decide_from)(stats, R, C, x->eps, cl->delta, cl->mode, tot);
    FN(sweep_b)(cl, x, R, C, view, tot, U);
    return view;
}

/* too large to stage, no guess (RULE_STAGES): the row sums of w and g only, the decision, then one sweep
   (layer view: <w,u> summed first, storing nothing; channel view: each row staged in the thread's buffer
   and stepped from the cache) */
static int FN(read_first)(FN(call_t) * cl, FN(ten_t) * x, int64_t R, int64_t C) {
    const int nt = cl->nt;
    const int64_t N = R * C, max_u = cl->pl.max_u;
    T *stats = cl->stats, *buf = cl->buf, tot[3], coef_l = 0;
    const int view = FN(decide)(x->p, x->g, R, C, x->sgn, x->gs, x->eps, cl->delta, cl->mode, stats, tot, nt);
    if (view == VIEW_LAYER) {
        const FN(row_fn) wu = cl->wu;
        PFOR(nt > 1 && R > 1 && N >= PAR_MIN, r, R, { wu(x, r * C, C, NULL, 0, stats + 4 * r + 3); });
        coef_l = FN(layer_coef)(stats, R, tot[1], x->eps);
    }
    FN(set_decay)(cl, x, view);
    if (view == VIEW_CHANNEL) {
        const FN(row_fn) row = cl->row;
        PFOR(nt > 1 && R > 1 && N >= PAR_MIN, r, R,
             { row(x, r * C, C, buf + max_u * omp_thread(), stats[4 * r + 1], NULL); });
    } else {
        const FN(row_fn) fn = cl->sweep[view == VIEW_LAYER];
        PFOR(nt > 1 && N >= PAR_MIN, b, (N + BLOCK - 1) / BLOCK, {
            const int64_t o = b * BLOCK;
            fn(x, o, N - o < BLOCK ? N - o : BLOCK, NULL, coef_l, NULL);
        });
    }
    return view;
}

/* The speculative sweep of a tensor too large to stage, under the guessed view `spec` (CHANNEL or NONE: the
   view it took at its last step, or CHANNEL when forced, then `check` is 0 and the guess cannot fail), in
   groups of rows: of about SPEC_GROUP elements when the rule stages u (short rows: memory streams longer
   runs between the cached sweeps; u in the thread's buffer), else of one row. Each row of a group takes
   sweep A (state, row sums), then, while the guess holds, sweep B at once from the cache, its old values
   first streamed to the spare block when the guess can be wrong: with RULE_STAGES in blocks, prefetching the
   first quarter of the next group meanwhile (FN(apply_pf)); under a channel guess where the projected
   direction is stored (pm_chan) nothing is copied, pm_row logs what the recovery cannot recompute (exn[r]:
   how many; -1: the row was left as after sweep A, and is stepped once the guess holds). A CHANNEL guess fails
   at the first row that fails the channel test (later rows take sweep A only); a NONE guess is known right
   only at the end. Right: one sweep from memory instead of two. Wrong: the rows are stepped again, from their
   old values, under the view decided from the same row sums (computed by FN(stage), the function of the
   staged scheme: a separate loop might sum in another order, and the decision would depend on the guess), so
   the result does not depend on the guess. */
static int FN(speculate)(FN(call_t) * cl, FN(ten_t) * x, int64_t R, int64_t C, int spec, int check) {
    const int nt = cl->nt, pm_chan = check && spec == VIEW_CHANNEL && RULE_STORES_PROJECTED(cl->var);
    const T chan_thr = (T)(cl->delta / sqrt((double)C));
    const int64_t per = RULE_STAGES ? spec_rows(C) : 1, G = (R + per - 1) / per, max_u = cl->pl.max_u;
    const FN(row_fn) stage = cl->stage, redo = cl->redo[spec == VIEW_CHANNEL];
    const FN(pf_fn) apply_pf = cl->apply_pf[spec == VIEW_CHANNEL];
    const FN(pm_fn) pm_row = cl->pm_row;
    T *p = x->p, *bak = cl->bak, *stats = cl->stats, *buf = cl->buf;
    char* written = cl->written;
    int64_t* exn = cl->exn;
    int stop = 0;
    FN(set_decay)(cl, x, spec);
    PFOR(nt > 1 && G > 1 && R * C >= PAR_MIN, grp, G, {
        const int64_t r0 = grp * per, r1 = r0 + per < R ? r0 + per : R;
        /* the next group's first quarter (at most per * C / 4 elements) prefetched, when it has them */
        const int64_t pfo = RULE_STAGES && r0 + per < R && per <= 4 * (R - r0 - per) ? (r0 + per) * C : -1;
        T* u = RULE_STAGES ? buf + max_u * omp_thread() : NULL;
        for (int64_t r = r0; r < r1; r++) stage(x, r * C, C, RULE_STAGES ? u + (r - r0) * C : NULL, 0, stats + 4 * r);
        for (int64_t r = r0; r < r1; r++) {
            const int64_t o = r * C;
            const T* st = stats + 4 * r;
            int write = !__atomic_load_n(&stop, __ATOMIC_RELAXED);
            if (write && check && spec == VIEW_CHANNEL && !FN(passes)(st, x->eps, chan_thr)) {
                __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
                write = 0;
            }
            const T c = spec == VIEW_CHANNEL ? FN(coef)(st[3], st[1], x->eps) : 0;
            if (write && RULE_STAGES) {
                apply_pf(x, o, C, u + (r - r0) * C, c, check ? bak + o : NULL, (r - r0) * C, pfo);
            } else if (write && pm_chan) {
                exn[r] = pm_row(x, o, C, c, bak + o, r + 1 < R);
                write = exn[r] >= 0;
            } else if (write) {
                if (check) STREAM_COPY(bak + o, p + o, C);
                redo(x, o, C, p + o, c, NULL);
            }
            written[r] = (char)write;
        }
    });
    /* The recovery below re-reads each copied row on the thread that copied it (the same static schedule
       over the same rows), so program order covers the non-temporal stores; the fence orders them for
       everything after this call. */
    STREAM_FENCE();
    T tot[3];
    const int view = FN(decide_from)(stats, R, C, x->eps, cl->delta, cl->mode, tot);
    if (check) cl->counts[view == spec ? 0 : 1]++;
    if (view == spec) { /* every row was written (a CHANNEL guess stops only when the view is not), but: */
        if (pm_chan)    /* the rows left as after sweep A (too many exceptions): sweep B now */
            PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                if (!written[r]) redo(x, r * C, C, p + r * C, FN(coef)(stats[4 * r + 3], stats[4 * r + 1], x->eps), NULL);
            });
        return view;
    }
    if (pm_chan) /* the written rows back to their state after sweep A */
        PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
            if (written[r])
                FN(pm_undo)(x, r * C, C, FN(coef)(stats[4 * r + 3], stats[4 * r + 1], x->eps), cl->dec, bak + r * C, exn[r]);
        });
    FN(set_decay)(cl, x, view);
    const T coef_l = view == VIEW_LAYER ? FN(layer_coef)(stats, R, tot[1], x->eps) : 0;
    const FN(row_fn) again = cl->redo[view != VIEW_NONE];
    PFOR(nt > 1 && G > 1 && R * C >= PAR_MIN, grp, G, {
        const int64_t r0 = grp * per, r1 = r0 + per < R ? r0 + per : R;
        for (int64_t r = r0; r < r1; r++) {
            const int64_t o = r * C;
            const T c = view == VIEW_CHANNEL ? FN(coef)(stats[4 * r + 3], stats[4 * r + 1], x->eps) : coef_l;
            again(x, o, C, written[r] && !pm_chan ? bak + o : p + o, c, NULL);
        }
    });
    return view;
}

/* ---- the entry points ---- */

/* One step of a->n tensors (see torch_adamp.h for the arguments). */
int TA_EXPORT()(ta_args* a) {
    if (amp_skip(a)) return 0;
    FN(call_t) cl;
    FN(ten_t) x;
    if (FN(call_begin)(&cl, a, &x.k) != 0) return -1; /* nothing modified */
    const int64_t n = a->n, *ptrs = a->ptrs, mode = a->mode;
    x.gs = (T)amp_inv_scale(a), x.sgn = a->maximize ? (T)-1 : (T)1, x.eps = (T)a->eps;
    for (int64_t i = 0; i < n; i++) {
        int64_t R, C;
        x.p = (T*)ptrs[i];
        x.g = (const T*)ptrs[n + i];
        for (int k = 0; k < RULE_STATES; k++) x.s[k] = (T*)ptrs[(2 + k) * n + i];
        x.ss = FN(rule_tensor)(&x.k, a, i);
        shape_of(a->meta, n, i, &R, &C);
        const int guess = cl.guess[i], spec = mode == MODE_CHANNEL ? VIEW_CHANNEL : guess;
        int view;
        if (R > 0 && mode != MODE_NEVER && R * C <= cl.stage_max)
            view = FN(two_sweeps)(&cl, &x, R, C, cl.staged);
        else if (R > 0 && (spec == VIEW_CHANNEL || spec == VIEW_NONE))
            view = FN(speculate)(&cl, &x, R, C, spec, mode == MODE_AUTO);
        else if (R > 0 && mode != MODE_NEVER)
            view = RULE_STAGES ? FN(read_first)(&cl, &x, R, C) : FN(two_sweeps)(&cl, &x, R, C, NULL);
        else
            view = FN(plain)(&cl, &x, (R > 0 ? R : 1) * C);
        a->views[i] = view;
    }
    a->spec_right = cl.counts[0];
    a->spec_wrong = cl.counts[1];
    FN(call_end)(&cl);
    return 0;
}

/* the bytes of `spare` a step with these arguments would use (the largest tensor it would speculate on) */
int64_t TA_EXPORT(_spare)(const ta_args* a) {
    signed char* guess = (signed char*)malloc(a->n > 0 ? (size_t)a->n : 1);
    if (guess == NULL) return 0; /* the step will not speculate either when it cannot allocate */
    int64_t bytes = (int64_t)FN(guesses)(a, guess, -1);
    free(guess);
    return bytes;
}

/* the bytes of C heap a step with these arguments allocates (the spare block, the caller's, not counted) */
int64_t TA_EXPORT(_scratch)(const ta_args* a) { return FN(scratch_bytes)(a); }
