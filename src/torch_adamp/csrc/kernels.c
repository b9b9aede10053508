/* The torch_adamp CPU kernels: the headers instantiated for float32 (suffix _f32) and float64 (_f64).

   Built by torch_adamp/_native.py with the system C compiler, -O3 -ffp-contract=off (no fused operations
   beyond the explicit fma() calls, which mirror torch's add_(alpha=)), OpenMP when available. */
#include "common.h"

#define T float
#define SQRT sqrtf
#define FMA fmaf
#define FABS fabsf
#define FN(name) name##_f32
#define STREAM_COPY stream_copy_f32
#include "rows.h"
#include "adamp.h"
#include "sgdp.h"
#include "projected.h"
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
#define FN(name) name##_f64
#define STREAM_COPY stream_copy_f64
#include "rows.h"
#include "adamp.h"
#include "sgdp.h"
#include "projected.h"
#undef T
#undef SQRT
#undef FMA
#undef FABS
#undef FN
#undef STREAM_COPY
