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
            ROW_SWEEP(pr, gr, C, (T)1, o + 4 * r, scale * pj - ar[j], (void)0);
        });
        off += R;
    }
    return 0;
}
