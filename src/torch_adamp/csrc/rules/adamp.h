/* AdamP's kernel rule: Adam's direction (Heo et al., ICLR 2021, Algorithm 2), stepped by csrc/driver.h.
   Python side: torch_adamp/optimizers/adamp.py (its kernel_fields declare ta_adamp_args, in this order).

       m <- b1 m + (1 - b1) g        v <- b2 v + (1 - b2) g^2
       u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (nesterov: (b1 m + (1 - b1) g) / ...)
       w <- f w - lr / (1 - b1^t) u

   u costs a square root and a division: it is computed once per element and staged for sweep B. */
#ifndef TA_RULE_ADAMP_H
#define TA_RULE_ADAMP_H
#define RULE adamp
#define ADAMP_FIELDS(F) F(double, beta1) F(double, beta2) F(int32_t, nesterov)
TA_STRUCT(ta_adamp_args, ADAMP_FIELDS)
#define RULE_ARGS ta_adamp_args
#define RULE_FIELDS ADAMP_FIELDS
#define RULE_STATES 2                 /* exp_avg, exp_avg_sq; then one float32 step counter per tensor */
#define RULE_VARIANTS 2               /* 0: plain, 1: nesterov */
#define RULE_STAGES 1                 /* sweep B reads the u staged by sweep A */
#define RULE_REDERIVES 1              /* u can be re-derived from the updated moments (rule_redir) */
#define RULE_STORES_PROJECTED(var) 0  /* the projected u is never stored */
#define RULE_PROJECTED_STATE 0
#endif

typedef struct {
    T beta1, beta2, one_minus_beta1, one_minus_beta2, eps; /* of the call */
    T sqrt_bc2;                                           /* of the tensor: sqrt(1 - beta2^t) */
} FN(rule_t);

static int FN(rule_begin)(FN(rule_t) * k, const ta_args* a, double* wd_divisor) {
    const ta_adamp_args* r = (const ta_adamp_args*)a->rule;
    k->beta1 = (T)r->beta1;
    k->beta2 = (T)r->beta2;
    k->one_minus_beta1 = (T)(1 - r->beta1);
    k->one_minus_beta2 = (T)(1 - r->beta2);
    k->eps = (T)a->eps;
    (void)wd_divisor; /* 1 */
    return r->nesterov != 0;
}

/* the step counter (state_steps[i] += 1) and the bias corrections; returns the step scale -lr / bc1 */
static T FN(rule_tensor)(FN(rule_t) * k, const ta_args* a, int64_t i) {
    const ta_adamp_args* r = (const ta_adamp_args*)a->rule;
    float* step_p = (float*)a->ptrs[(2 + RULE_STATES) * a->n + i];
    float step_f = *step_p + 1.0f;
    *step_p = step_f;
    double step = (double)step_f;
    double bc1 = 1 - pow(r->beta1, step);
    k->sqrt_bc2 = (T)sqrt(1 - pow(r->beta2, step));
    return (T)(-(a->lr / bc1));
}

/* the moments of element j (stored back when STORE) and u; g: the gradient, unscaled and signed */
INL T FN(rule_dir)(const FN(rule_t) * k, T g, T* const* s, int64_t j, const int var, const int store) {
    T mj = FMA(g, k->one_minus_beta1, s[0][j] * k->beta1);     /* m.mul_(b1).add_(g, alpha=1-b1) */
    T vj = s[1][j] * k->beta2 + k->one_minus_beta2 * g * g;   /* v.mul_(b2).addcmul_(g, g, value=1-b2) */
    if (store) {
        s[0][j] = mj;
        s[1][j] = vj;
    }
    T d = SQRT(vj) / k->sqrt_bc2 + k->eps; /* (sqrt(v) / sqrt(bc2)).add_(eps) */
    return var ? (k->beta1 * mj + k->one_minus_beta1 * g) / d : mj / d;
}

/* u from the stored moments (rule_dir's arithmetic: the same bits) */
INL T FN(rule_redir)(const FN(rule_t) * k, T g, T* const* s, int64_t j, const int var) {
    T d = SQRT(s[1][j]) / k->sqrt_bc2 + k->eps;
    return var ? (k->beta1 * s[0][j] + k->one_minus_beta1 * g) / d : s[0][j] / d;
}
