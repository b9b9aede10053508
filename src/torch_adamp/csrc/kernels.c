/* What the kernel rules share in the one shared object: the ABI queries of the common argument structs and
   torch_adamp.Projected's sweeps (projected.h), for float32 (suffix _f32) and float64 (_f64). Each kernel
   rule is a translation unit of its own (rule.c over csrc/rules/<rule>.h), linked with this one by
   torch_adamp/_native.py.

   Compiled with -O3 -ffp-contract=off, OpenMP when available. */
#include "common.h"

#define TA_ABI_STRUCT ta_args
TA_ABI_QUERY(torch_adamp_args_abi, TA_ARGS_FIELDS)
#undef TA_ABI_STRUCT
#define TA_ABI_STRUCT ta_rows_args
TA_ABI_QUERY(torch_adamp_rows_args_abi, TA_ROWS_ARGS_FIELDS)
#undef TA_ABI_STRUCT

#define TA_TYPED_A "projected.h"
#include "typed.h"
