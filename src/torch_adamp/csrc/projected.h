/* torch_adamp.Projected's row sums, for one element type T (instantiated by kernels.c): one sweep over the
   weights before the inner step (w_b), the gradients and the weights after it (w_a). Per row, with
   u = scale w_b - w_a the inner update without its decoupled decay (scale = 1 - lr wd, or 1; computed as
   the two torch operations do, fl(fl(scale w_b) - w_a), so u is the same bits as theirs): the four row sums
   of the scale-invariance test and the projection, out[4r..4r+3] = <w_b,g>, ||w_b||^2, ||g||^2, <w_b,u>,
   rows of all tensors in order. What torch_adamp.projection.projection_coefficients computes from
   (w_b, g, u), without materialising u. Nothing is written but `out`. */
int FN(torch_adamp_projected_rows)(const ta_rows_args* a) {
    const int64_t n = a->n;
    const int nt = a->threads > 0 ? a->threads : 1;
    const T scale = (T)a->scale;
    T* out = (T*)a->out;
    int64_t off = 0;
    for (int64_t i = 0; i < n; i++) {
        const T* wb = (const T*)(intptr_t)a->ptrs[i];
        const T* g = (const T*)(intptr_t)a->ptrs[n + i];
        const T* wa = (const T*)(intptr_t)a->ptrs[2 * n + i];
        const int64_t R = a->meta[n + i], C = R > 0 ? a->meta[i] / R : 0;
        T* o = out + 4 * off;
        PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
            const T* pr = wb + r * C;
            const T* gr = g + r * C;
            const T* ar = wa + r * C;
            ROW_SWEEP(j, pj, gj, u, pr, gr, C, (T)1, (T)1, o + 4 * r, scale * pj - ar[j], (void)0);
        });
        off += R;
    }
    return 0;
}

/* The two-sweep form (plain CPU tensors): the decision needs only w_b and g, so it is taken before the inner
   step, and the channel view's <w_b,u> is summed and applied row by row while the row is in the cache.

   Before the step: w_b <- w (non-temporal stores where the CPU has them: w_b is read back only after the
   inner step has streamed the whole model through the cache) and out[4r..4r+3] = <w,g>, ||w||^2, ||g||^2, 0.
   ptrs: n weights, n grads, n buffers w_b. */
int FN(torch_adamp_projected_before)(const ta_rows_args* a) {
    const int64_t n = a->n;
    const int nt = a->threads > 0 ? a->threads : 1;
    T* out = (T*)a->out;
    int64_t off = 0;
    for (int64_t i = 0; i < n; i++) {
        const T* w = (const T*)(intptr_t)a->ptrs[i];
        const T* g = (const T*)(intptr_t)a->ptrs[n + i];
        T* wb = (T*)(intptr_t)a->ptrs[2 * n + i];
        const int64_t R = a->meta[n + i], C = R > 0 ? a->meta[i] / R : 0;
        T* o = out + 4 * off;
        PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
            FN(row_stats)(w + r * C, g + r * C, C, (T)1, (T)1, o + 4 * r);
            o[4 * r + 3] = 0;
            STREAM_COPY(wb + r * C, w + r * C, C);
        });
        off += R;
    }
    STREAM_FENCE();
    return 0;
}

/* <w_b, u> of one row, u = scale w_b - w_a */
INL T FN(row_pu)(const T* restrict b, const T* restrict w, int64_t C, T scale) {
    T pu = 0;
#pragma omp simd reduction(+ : pu)
    for (int64_t j = 0; j < C; j++) pu += b[j] * (scale * b[j] - w[j]);
    return pu;
}

/* w <- w + b k on one row */
INL void FN(row_axpy)(const T* restrict b, T* restrict w, int64_t C, T k) {
#pragma omp simd
    for (int64_t j = 0; j < C; j++) w[j] = w[j] + b[j] * k;
}

/* After it: w_a <- w_a + k w_b, with u = scale w_b - w_a and, by the view views[i] taken before the step,
   channel: k_r = <w_b,u>_r / (||w_b||_r + eps)^2 + extra per row (summed and applied in one visit of the row);
   layer: k = sum_r <w_b,u>_r / (||w_b|| + eps)^2 + extra (two visits); none: nothing is read or written.
   out: the row sums of the `before` call (||w_b||^2 read; <w_b,u> written into slot 3 of projected rows).
   ptrs: n buffers w_b, n (unused) grads, n weights w_a. As torch's `w_a.addcmul_(w_b, k)`: w_a + w_b k. */
int FN(torch_adamp_projected_after)(const ta_rows_args* a) {
    const int64_t n = a->n;
    const int nt = a->threads > 0 ? a->threads : 1;
    const T scale = (T)a->scale, eps = (T)a->eps, extra = (T)a->extra;
    T* out = (T*)a->out;
    int64_t off = 0;
    for (int64_t i = 0; i < n; i++) {
        const T* wb = (const T*)(intptr_t)a->ptrs[i];
        T* wa = (T*)(intptr_t)a->ptrs[2 * n + i];
        const int64_t R = a->meta[n + i], C = R > 0 ? a->meta[i] / R : 0;
        const int64_t view = a->views[i];
        T* o = out + 4 * off;
        off += R;
        if (view == VIEW_CHANNEL) {
            PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, {
                T pu = FN(row_pu)(wb + r * C, wa + r * C, C, scale);
                o[4 * r + 3] = pu;
                FN(row_axpy)(wb + r * C, wa + r * C, C, FN(coef)(pu, o[4 * r + 1], eps) + extra);
            });
        } else if (view == VIEW_LAYER) {
            PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R,
                 { o[4 * r + 3] = FN(row_pu)(wb + r * C, wa + r * C, C, scale); });
            T ww = 0;
            for (int64_t r = 0; r < R; r++) ww += o[4 * r + 1]; /* in row order, whatever the thread count */
            const T k = FN(layer_coef)(o, R, ww, eps) + extra;
            PFOR(nt > 1 && R > 1 && R * C >= PAR_MIN, r, R, { FN(row_axpy)(wb + r * C, wa + r * C, C, k); });
        }
    }
    return 0;
}
