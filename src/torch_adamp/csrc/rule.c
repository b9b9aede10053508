/* One kernel rule's translation unit: the rule's header over the driver, for float32 (suffix _f32) and
   float64 (_f64). torch_adamp/_native.py compiles it once per header csrc/rules/<rule>.h, naming it with
   -DTA_RULE_HEADER='"rules/<rule>.h"', and links the objects with kernels.c's into one shared object.

   Compiled with -O3 -ffp-contract=off (no fused operations beyond the explicit FMA calls, which mirror
   torch's add_(alpha=)), OpenMP when available. */
#include "common.h"

#ifndef TA_RULE_HEADER
#error "compile with -DTA_RULE_HEADER='\"rules/<rule>.h\"' (torch_adamp/_native.py does)"
#endif

#define T float
#define SQRT sqrtf
#define FMA fmaf
#define FABS fabsf
#define FN(name) TA_CAT(name, _f32)
#define STREAM_COPY stream_copy_f32
#include "rows.h"
#include TA_RULE_HEADER
#include "driver.h"
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
#include TA_RULE_HEADER
#include "driver.h"
#undef T
#undef SQRT
#undef FMA
#undef FABS
#undef FN
#undef STREAM_COPY
