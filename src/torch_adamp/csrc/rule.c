/* One kernel rule's translation unit: the rule's header over the driver, for float32 (suffix _f32) and
   float64 (_f64). torch_adamp/_native.py compiles it once per header csrc/rules/<rule>.h, naming it with
   -DTA_RULE_HEADER='"rules/<rule>.h"', and links the objects with kernels.c's into one shared object.

   Compiled with -O3 -ffp-contract=off (no fused operations beyond the explicit FMA calls, which mirror
   torch's add_(alpha=)), OpenMP when available. */
#include "common.h"

#ifndef TA_RULE_HEADER
#error "compile with -DTA_RULE_HEADER='\"rules/<rule>.h\"' (torch_adamp/_native.py does)"
#endif

#define TA_TYPED_A TA_RULE_HEADER
#define TA_TYPED_B "driver.h"
#include "typed.h"
