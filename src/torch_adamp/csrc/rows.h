/* The row machinery of every sweep, for one element type T (instantiated per translation unit): the row
   sums of the scale-invariance test, the decision, the projection coefficient and the decay factor.
   Mirrors torch_adamp.projection.projection_coefficients: c = <w,u> / (||w|| + eps)^2, u - c w. */

/* The first sweep of a row: for J over [0, C), with PJ = p[J] and GJ = g[J] * GS (GS: the inverse grad scale),
   U = DIRECTION (an expression of J, PJ and GJ that may update state of element J), then STAGE (a statement
   that may keep U), and the four row sums of the test and the projection, out[0..3] = <w,g>, ||w||^2,
   ||g||^2, <w,u> (out[0] times SGN). J, PJ, GJ and U are the names the caller's DIRECTION and STAGE use. A
   macro, so that each caller's loop is one loop (vectorised with one summation order, which the decision
   must not depend on). */
#define ROW_SWEEP(J, PJ, GJ, U, p, g, C, SGN, GS, out, DIRECTION, STAGE) \
    do {                                                                 \
        T pg_ = 0, pp_ = 0, gg_ = 0, pu_ = 0;                            \
        _Pragma("omp simd reduction(+ : pg_, pp_, gg_, pu_)")            \
        for (int64_t J = 0; J < (C); J++) {                              \
            T PJ = (p)[J], GJ = (g)[J] * (GS);                           \
            T U = (DIRECTION);                                           \
            STAGE;                                                       \
            pg_ += PJ * GJ;                                              \
            pp_ += PJ * PJ;                                              \
            gg_ += GJ * GJ;                                              \
            pu_ += PJ * U;                                               \
        }                                                                \
        (out)[0] = (SGN) * pg_;                                          \
        (out)[1] = pp_;                                                  \
        (out)[2] = gg_;                                                  \
        (out)[3] = pu_;                                                  \
    } while (0)

/* per-row statistics of the scale-invariance test: <p,g>, ||p||^2, ||g||^2 */
INL void FN(row_stats)(const T* restrict p, const T* restrict g, int64_t C, T sgn, T gs, T* restrict out) {
    T pg = 0, pp = 0, gg = 0;
#pragma omp simd reduction(+ : pg, pp, gg)
    for (int64_t j = 0; j < C; j++) {
        T pj = p[j], gj = g[j] * gs;
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
/* whether one row (or the whole tensor: the totals) passes: |cos(w, g)| < thr; NaN and overflow fail */
INL int FN(passes)(const T* st, T eps, T thr) {
    T cos = FABS(st[0]) / (FMAX(SQRT(st[2]), eps) * FMAX(SQRT(st[1]), eps));
    /* a squared norm that overflowed fails too: its cosine would read 0, and the projection would spread
       one huge element over the whole row (the per-tensor path's cosine does not overflow) */
    return cos < thr && isfinite(st[1]) && isfinite(st[2]);
}
TA_UNUSED static int FN(decide_from)(const T* stats, int64_t R, int64_t C, T eps, double delta, int mode, T* tot) {
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
TA_UNUSED static int FN(decide)(const T* p, const T* g, int64_t R, int64_t C, T sgn, T gs, T eps, double delta, int mode,
                      T* stats, T* tot, int nt) {
    PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, { FN(row_stats)(p + r * C, g + r * C, C, sgn, gs, stats + 4 * r); });
    return FN(decide_from)(stats, R, C, eps, delta, mode, tot);
}

/* c = <w,u> / (||w|| + eps)^2: the projected update is u - c w */
INL T FN(coef)(T wu, T ww, T eps) {
    T nrm = SQRT(ww) + eps;
    return wu / (nrm * nrm);
}

/* the layer view's coefficient from the row sums: c = sum_r <w_r,u_r> / (||w|| + eps)^2, rows in order */
INL T FN(layer_coef)(const T* stats, int64_t R, T ww, T eps) {
    T wu = 0;
    for (int64_t r = 0; r < R; r++) wu += stats[4 * r + 3];
    return FN(coef)(wu, ww, eps);
}

/* decoupled weight decay: w <- w (1 - lr wd r / divisor), r = wd_ratio when projected */
INL T FN(decay)(double lr, double wd, double wd_ratio, double divisor, int view) {
    return (T)(1 - lr * wd * (view != VIEW_NONE ? wd_ratio : 1.0) / divisor);
}

/* the channel view's coefficient of every row, in place of <w,u> (stats[4r+3]); vectorised across rows */
TA_UNUSED static void FN(channel_coefs)(T* stats, int64_t R, T eps) {
#pragma omp simd
    for (int64_t r = 0; r < R; r++) stats[4 * r + 3] = FN(coef)(stats[4 * r + 3], stats[4 * r + 1], eps);
}

