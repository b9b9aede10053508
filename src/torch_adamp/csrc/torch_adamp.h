/* The ABI of the torch_adamp CPU kernels: one argument struct per call, mirrored by ctypes in
   torch_adamp/_native.py (keep the two in the same order). No global state: everything a call reads or
   writes is reachable from its arguments.

   A call steps n tensors of one element type (float32: *_f32, float64: *_f64) with the rule's update, the
   scale-invariance test and the projection, exactly as torch_adamp.engine's multi-tensor path does up to
   float rounding (bitwise whatever the thread count and the guess).

   Speculation: tensors too large to stage are swept once under `guess[i]` (the view tensor i took at its
   last step, kept by the optimizer), their old rows copied to `spare` (SGDP under a channel guess with
   project_momentum: only what cannot be recomputed from the written rows, logged there); a wrong guess costs
   a second sweep, never correctness. torch_adamp_<rule>_spare_<type>() returns the bytes of `spare` the call needs; with less,
   the tensors that do not fit are not speculated. */
#ifndef TORCH_ADAMP_H
#define TORCH_ADAMP_H
#include <stdint.h>

typedef struct {
    double beta1, beta2;
    int32_t nesterov;
} ta_adamp_args;

typedef struct {
    double momentum, dampening;
    int32_t nesterov, project_momentum;
} ta_sgdp_args;

typedef union {
    ta_adamp_args adamp;
    ta_sgdp_args sgdp;
} ta_rule_args;

typedef struct {
    /* inputs */
    int64_t n;            /* number of tensors */
    const int64_t* ptrs;  /* data pointers: n params, n grads, n of each state tensor (AdamP: exp_avg, exp_avg_sq,
                             then n float32 step counters; SGDP: momentum buffer) */
    const int64_t* meta;  /* n numels, then n row counts (0: never projected) */
    const int8_t* guess;  /* per tensor, the view it took at its last step (-1: unknown); NULL: no speculation */
    void* spare;          /* caller-owned scratch for the speculative sweep (64-byte aligned), or NULL */
    int64_t spare_bytes;
    double lr, eps, weight_decay, delta, wd_ratio;
    int32_t maximize, mode, threads, reserved;
    int64_t stage_bytes;    /* tensors up to this size are staged (two sweeps, the second from the cache) */
    int64_t spec_max_bytes; /* the largest tensor speculated on */
    ta_rule_args rule;
    /* outputs */
    int64_t* views;                  /* n: the view each tensor took (0 none, 1 channel, 2 layer) */
    int64_t spec_right, spec_wrong;  /* speculative sweeps of this call whose guess held / failed */
    /* inputs, GradScaler's protocol (torch.amp): NULL when absent */
    const float* grad_scale; /* gradients are read as g * (float)(1 / (double)*grad_scale), as GradScaler.unscale_ */
    const float* found_inf;  /* non-zero: the call is skipped whole (nothing written; views = the guesses) */
} ta_args;

/* torch_adamp.Projected's row sums (csrc/projected.h): one call for n same-type tensors */
typedef struct {
    int64_t n;           /* number of tensors */
    const int64_t* ptrs; /* data pointers: n weights before the step, n grads, n weights after it */
    const int64_t* meta; /* n numels, then n row counts (each >= 1) */
    double scale;        /* the update is scale * w_before - w_after */
    double eps, extra;   /* projected_after: the projection's norm floor, the decay added to k when projected */
    int32_t threads, reserved;
    void* out;           /* (total rows, 4) of the element type: <w,g>, ||w||^2, ||g||^2, <w,u> per row */
    const int64_t* views; /* projected_after: n view codes, taken before the step */
} ta_rows_args;

/* 0, or -1 when a scratch allocation failed (then nothing was modified) */
int torch_adamp_adamp_f32(ta_args* a);
int torch_adamp_adamp_f64(ta_args* a);
int torch_adamp_sgdp_f32(ta_args* a);
int torch_adamp_sgdp_f64(ta_args* a);
int64_t torch_adamp_adamp_spare_f32(const ta_args* a);
int64_t torch_adamp_adamp_spare_f64(const ta_args* a);
int64_t torch_adamp_sgdp_spare_f32(const ta_args* a);
int64_t torch_adamp_sgdp_spare_f64(const ta_args* a);
int torch_adamp_projected_rows_f32(const ta_rows_args* a);
int torch_adamp_projected_rows_f64(const ta_rows_args* a);
int torch_adamp_projected_before_f32(const ta_rows_args* a);
int torch_adamp_projected_before_f64(const ta_rows_args* a);
int torch_adamp_projected_after_f32(const ta_rows_args* a);
int torch_adamp_projected_after_f64(const ta_rows_args* a);
#endif
