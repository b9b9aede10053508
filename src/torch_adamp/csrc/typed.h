/* The typed headers instantiated for float32 (suffix _f32), then float64 (_f64): rows.h, then TA_TYPED_A and,
   when defined, TA_TYPED_B (header names). Included once per translation unit, by rule.c and kernels.c. */
#define T float
#define SQRT sqrtf
#define FMA fmaf
#define FABS fabsf
#define FN(name) TA_CAT(name, _f32)
#define STREAM_COPY stream_copy_f32
#include "rows.h"
#include TA_TYPED_A
#ifdef TA_TYPED_B
#include TA_TYPED_B
#endif
#undef T
#undef SQRT
#undef FMA
#undef FABS
#undef FN
#undef STREAM_COPY

#define T double
#define SQRT sqrt
#define FMA fma
#define FABS fabs
#define FN(name) TA_CAT(name, _f64)
#define STREAM_COPY stream_copy_f64
#include "rows.h"
#include TA_TYPED_A
#ifdef TA_TYPED_B
#include TA_TYPED_B
#endif
#undef T
#undef SQRT
#undef FMA
#undef FABS
#undef FN
#undef STREAM_COPY
