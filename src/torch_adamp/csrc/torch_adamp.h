/* The ABI of the torch_adamp CPU kernels: one argument struct per call, mirrored by ctypes in
   torch_adamp/_native.py. No global state: everything a call reads or writes is reachable from its arguments.

   Every struct is declared from one field list (an X-macro: F(type, name) per field, in order), which also
   gives its ABI query: torch_adamp_args_abi(), torch_adamp_rows_args_abi() and, per kernel rule,
   torch_adamp_<rule>_abi() return the name, offset and size of every field, then {NULL, sizeof, alignof}
   (tests/test_native_abi.py checks them against the ctypes mirror).

   A kernel rule (csrc/rules/<rule>.h, one translation unit each: csrc/rule.c) steps n tensors of one element
   type (float32: _f32, float64: _f64) with the rule's update, the scale-invariance test and the projection,
   exactly as torch_adamp.engine's multi-tensor path does up to float rounding (bitwise whatever the thread
   count and the guess). It exports, for each type:
       int     torch_adamp_<rule>_<type>(ta_args* a)                the step: 0, or -1 when a scratch
                                                                     allocation failed (nothing modified)
       int64_t torch_adamp_<rule>_spare_<type>(const ta_args* a)    the bytes of `spare` the call needs
       int64_t torch_adamp_<rule>_scratch_<type>(const ta_args* a)  the bytes of C heap it allocates
   and const ta_abi_field* torch_adamp_<rule>_abi(void) for its argument struct (ta_<rule>_args, defined by
   its header, pointed to by ta_args.rule).

   Speculation: tensors too large to stage are swept once under `guess[i]` (the view tensor i took at its
   last step, kept by the optimizer), their old rows copied to `spare` (under a channel guess where the
   projected direction is stored in the state, as SGDP's project_momentum: only what cannot be recomputed
   from the written rows, logged there); a wrong guess costs a second sweep, never correctness. With less
   spare than the query says, the tensors that do not fit are not speculated. */
#ifndef TORCH_ADAMP_H
#define TORCH_ADAMP_H
#include <stdint.h>

/* a struct from its field list */
#define TA_DECLARE_FIELD(type, name) type name;
#define TA_STRUCT(NAME, FIELDS) typedef struct { FIELDS(TA_DECLARE_FIELD) } NAME;

/* one row of an ABI query */
typedef struct {
    const char* name; /* NULL in the last row, which holds sizeof and alignof the struct */
    int64_t offset, size;
} ta_abi_field;

#define TA_ARGS_FIELDS(F)                                                                                      \
    /* inputs */                                                                                               \
    F(int64_t, n)           /* number of tensors */                                                            \
    F(const int64_t*, ptrs) /* data pointers: n params, n grads, n of each state tensor of the rule, then its \
                               per-tensor extras (AdamP: n float32 step counters) */                          \
    F(const int64_t*, meta) /* n numels, then n row counts (0: never projected) */                             \
    F(const int8_t*, guess) /* per tensor, the view it took at its last step (-1: unknown); NULL: none */      \
    F(void*, spare)         /* caller-owned scratch for the speculative sweep (64-byte aligned), or NULL */    \
    F(int64_t, spare_bytes)                                                                                    \
    F(double, lr)                                                                                              \
    F(double, eps)                                                                                             \
    F(double, weight_decay)                                                                                    \
    F(double, delta)                                                                                           \
    F(double, wd_ratio)                                                                                        \
    F(int32_t, maximize)                                                                                       \
    F(int32_t, mode)                                                                                           \
    F(int32_t, threads)                                                                                        \
    F(int32_t, reserved)                                                                                       \
    F(int64_t, stage_bytes)    /* tensors up to this size are staged (two sweeps, the second from the cache) */ \
    F(int64_t, spec_max_bytes) /* the largest tensor speculated on */                                          \
    F(const void*, rule)       /* the rule's arguments: its ta_<rule>_args */                                  \
    /* outputs */                                                                                              \
    F(int64_t*, views)     /* n: the view each tensor took (0 none, 1 channel, 2 layer) */                     \
    F(int64_t, spec_right) /* speculative sweeps of this call whose guess held */                              \
    F(int64_t, spec_wrong) /* ... and failed */                                                                \
    /* inputs, GradScaler's protocol (torch.amp): NULL when absent */                                          \
    F(const float*, grad_scale) /* gradients are read as g * (float)(1 / (double)*grad_scale) */               \
    F(const float*, found_inf)  /* non-zero: the call is skipped whole (nothing written; views = guesses) */
TA_STRUCT(ta_args, TA_ARGS_FIELDS)

/* torch_adamp.Projected's row sums (csrc/projected.h): one call for n same-type tensors */
#define TA_ROWS_ARGS_FIELDS(F)                                                                                 \
    F(int64_t, n)           /* number of tensors */                                                            \
    F(const int64_t*, ptrs) /* data pointers: n weights before the step, n grads, n weights after it */        \
    F(const int64_t*, meta) /* n numels, then n row counts (each >= 1) */                                      \
    F(double, scale)        /* the update is scale * w_before - w_after */                                     \
    F(double, eps)          /* projected_after: the projection's norm floor */                                 \
    F(double, extra)        /* projected_after: the decay added to k when projected */                         \
    F(int32_t, threads)                                                                                        \
    F(int32_t, reserved)                                                                                       \
    F(void*, out)               /* (total rows, 4) of the element type: <w,g>, ||w||^2, ||g||^2, <w,u> per row */ \
    F(const int64_t*, views)    /* projected_after: n view codes, taken before the step */
TA_STRUCT(ta_rows_args, TA_ROWS_ARGS_FIELDS)

const ta_abi_field* torch_adamp_args_abi(void);
const ta_abi_field* torch_adamp_rows_args_abi(void);
int torch_adamp_projected_rows_f32(const ta_rows_args* a);
int torch_adamp_projected_rows_f64(const ta_rows_args* a);
int torch_adamp_projected_before_f32(const ta_rows_args* a);
int torch_adamp_projected_before_f64(const ta_rows_args* a);
int torch_adamp_projected_after_f32(const ta_rows_args* a);
int torch_adamp_projected_after_f64(const ta_rows_args* a);
#endif
