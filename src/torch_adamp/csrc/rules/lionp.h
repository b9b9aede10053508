/* LionP's kernel rule: Lion's sign update (Chen et al. 2023, lion-pytorch's order), stepped by csrc/driver.h.
   Python side: torch_adamp/optimizers/lionp.py (its kernel_fields declare ta_lionp_args, in this order).

       u  = sign(b1 m + (1 - b1) g)      (from the momentum before its update)
       m <- b2 m + (1 - b2) g
       w <- f w - lr u

   u depends on the old momentum, which the sweep overwrites: it cannot be re-derived from the state
   (RULE_REDERIVES 0), so sweep A stages it (RULE_STAGES 1): staged tensors keep it in a buffer, larger ones
   take the read-only first pass (w and g only: the decision does not need u), then one sweep. */
#ifndef TA_RULE_LIONP_H
#define TA_RULE_LIONP_H
#define RULE lionp
#define LIONP_FIELDS(F) F(double, beta1) F(double, beta2)
TA_STRUCT(ta_lionp_args, LIONP_FIELDS)
#define RULE_ARGS ta_lionp_args
#define RULE_FIELDS LIONP_FIELDS
#define RULE_STATES 1                 /* exp_avg */
#define RULE_VARIANTS 1
#define RULE_STAGES 1                 /* sweep B reads the u staged by sweep A */
#define RULE_REDERIVES 0              /* u needs the momentum before its update */
#define RULE_STORES_PROJECTED(var) 0  /* the projected u is never stored */
#define RULE_PROJECTED_STATE 0
#endif

typedef struct {
    T beta1, one_minus_beta1, beta2, one_minus_beta2;
} FN(rule_t);

static int FN(rule_begin)(FN(rule_t) * k, const ta_args* a, double* wd_divisor) {
    const ta_lionp_args* r = (const ta_lionp_args*)a->rule;
    k->beta1 = (T)r->beta1;
    k->one_minus_beta1 = (T)(1 - r->beta1);
    k->beta2 = (T)r->beta2;
    k->one_minus_beta2 = (T)(1 - r->beta2);
    (void)wd_divisor; /* 1 */
    return 0;
}

static T FN(rule_tensor)(FN(rule_t) * k, const ta_args* a, int64_t i) {
    (void)k, (void)i;
    return (T)(-a->lr);
}

/* u of element j and the momentum (stored back when STORE); g: the gradient, unscaled and signed */
INL T FN(rule_dir)(const FN(rule_t) * k, T g, T* const* s, int64_t j, const int var, const int store) {
    (void)var;
    const T mj = s[0][j];
    const T c = FMA(g, k->one_minus_beta1, mj * k->beta1); /* m.mul(b1).add_(g, alpha=1-b1) */
    if (store) s[0][j] = FMA(g, k->one_minus_beta2, mj * k->beta2); /* m.mul_(b2).add_(g, alpha=1-b2) */
    return c > 0 ? (T)1 : c < 0 ? (T)-1 : c; /* sgn: 0 stays 0, NaN stays NaN */
}
