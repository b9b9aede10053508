/* SGDP's kernel rule: SGD's momentum direction (Heo et al., ICLR 2021, Algorithm 1), stepped by csrc/driver.h.
   Python side: torch_adamp/optimizers/sgdp.py (its kernel_fields declare ta_sgdp_args, in this order).

       b <- momentum b + (1 - dampening) g
       d  = g + momentum b   (nesterov)   or   b
       w <- f w - lr d                     (f: decay divided by 1 - momentum)

   d costs no square root or division, so sweep B re-derives it from the stored buffer instead of staging it
   (why that beats a read-only first pass here, as measured: docs/performance.md). Without nesterov, with
   project_momentum, the projected d is the new buffer (variant 2). */
#ifndef TA_RULE_SGDP_H
#define TA_RULE_SGDP_H
#define RULE sgdp
#define SGDP_FIELDS(F) F(double, momentum) F(double, dampening) F(int32_t, nesterov) F(int32_t, project_momentum)
TA_STRUCT(ta_sgdp_args, SGDP_FIELDS)
#define RULE_ARGS ta_sgdp_args
#define RULE_FIELDS SGDP_FIELDS
#define RULE_STATES 1                          /* the momentum buffer */
#define RULE_VARIANTS 3                        /* 0: plain, 1: nesterov, 2: project_momentum (not nesterov) */
#define RULE_STAGES 0                          /* sweep B re-derives d (rule_redir) */
#define RULE_REDERIVES 1
#define RULE_STORES_PROJECTED(var) ((var) == 2) /* the projected d is stored in the buffer ... */
#define RULE_PROJECTED_STATE 0                  /* ... which is d itself after sweep A */
#endif

typedef struct {
    T momentum, one_minus_dampening;
} FN(rule_t);

static int FN(rule_begin)(FN(rule_t) * k, const ta_args* a, double* wd_divisor) {
    const ta_sgdp_args* r = (const ta_sgdp_args*)a->rule;
    k->momentum = (T)r->momentum;
    k->one_minus_dampening = (T)(1 - r->dampening);
    *wd_divisor = 1 - r->momentum;
    return r->nesterov ? 1 : r->project_momentum ? 2 : 0;
}

static T FN(rule_tensor)(FN(rule_t) * k, const ta_args* a, int64_t i) {
    (void)k, (void)i;
    return (T)(-a->lr);
}

/* the buffer of element j (stored back when STORE) and d; g: the gradient, unscaled and signed */
INL T FN(rule_dir)(const FN(rule_t) * k, T g, T* const* s, int64_t j, const int var, const int store) {
    T bj = FMA(g, k->one_minus_dampening, s[0][j] * k->momentum); /* buf.mul_(momentum).add_(g, alpha=1-dampening) */
    if (store) s[0][j] = bj;
    return var == 1 ? g + k->momentum * bj : bj; /* grad + momentum * buf */
}

/* d from the stored buffer */
INL T FN(rule_redir)(const FN(rule_t) * k, T g, T* const* s, int64_t j, const int var) {
    return var == 1 ? g + k->momentum * s[0][j] : s[0][j];
}
