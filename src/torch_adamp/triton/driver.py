"""The generic Triton driver: one projected step of any rule over a device/dtype bucket, in three launches.

A step is the rule's direction, the scale-invariance decision on the per-row sums, then the projection,
decay and step (``w <- f w + s (u - c w)``, ``s < 0``), as everywhere in the engine. The decision of a
tensor needs every row's sums before any row of it may be written, so the step is three kernels, each
one launch for every tensor of the bucket (a table of pointers, shapes and tiles):

1. **stage** (one program per tile: a few whole rows, a chunk of a long row, or a block of a tensor that
   is never projected): the rule's direction (the state updated and stored), the four row sums of the
   test and the projection (``<w,g>, ||w||^2, ||g||^2, <w,u>``, float32, one row sum per row of the
   tile), and the whole update of a tensor that is never projected. A projectable tensor is also
   stepped here when its view is known (``scale_invariant="channel"``) or **guessed**: the view it took
   at its last step (``none``, or ``channel`` when its rows fit a tile), the CPU kernel's speculation.
   A guessed row first copies its old weights to a spare block (and, for a rule whose stored state is
   the projected direction, SGDP's buffer, the unprojected state).
2. **decide** (one program per tensor): the step counter, the per-tensor totals, the decision (the
   thresholds and tests of :class:`torch_adamp.projection.RowDecision`), the view, the layer view's
   coefficient, the channel view's per-row coefficients when needed, and whether the tensor must be
   stepped again (no guess, or a wrong one).
3. **apply** (the tiles of projectable tensors; a program whose tensor was guessed right returns at
   once): the direction re-derived from the stored state (the very bits of stage), projected, decayed
   and stepped, from the old weights (the spare block after a wrong guess).

A right guess moves what torch's fused AdamW moves plus the copy of ``w`` (32 bytes per float32
parameter for AdamP, 28 for AdamW); no guess or a wrong one 40 (state stored by stage, re-read by apply).
Speculation never changes a result: stage and apply compute every element with the same expressions.

Every value the kernels read is on the device (``lr`` as a tensor or in the float64 hyper-parameter
tensor, step counters, GradScaler's ``grad_scale``/``found_inf``): no host read, CUDA-graph capturable.
Per-program scalars are computed in float64 and rounded once, as the multi-tensor path rounds its Python
floats. Floating-point contraction is off in every kernel (``enable_fp_fusion=False``); a multiply-add is
fused only where torch's ``add_(alpha=)`` fuses it on the CPU (``tl.fma``), so the element arithmetic is
the native CPU kernel's, the same bits in the interpreter and on a GPU; division and square roots are
IEEE-rounded (``div_rn``, ``sqrt_rn``). Row sums are tree reductions in float32 (their order differs from
torch's: the results are within float32 rounding of the multi-tensor path, not bitwise).

A rule's Triton module (``torch_adamp.triton.<rule name>``) supplies ``NSTATE`` (1 or 2 state tensors,
float32), ``hyper(o)`` (its float64 hyper-parameters), ``flags(o)`` (its compile-time switches),
``dir_state(o)`` (the state slot that stores the projected direction, or -1) and three ``@triton.jit``
element functions: ``scalars(hyp, lr, t, RFLAGS) -> (s, K)`` (the step multiplier ``s`` and a tuple of
float32 constants), ``direction(g, s0, s1, K, RFLAGS) -> (u, s0, s1)`` and ``restore(g, s0, s1, K,
RFLAGS) -> u`` (the direction from the stored state).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

#: the modes of ``scale_invariant``
MODES: dict[Any, int] = {False: 0, "auto": 1, "channel": 2, "layer": 3}
#: where a rule's step counters are: none, on the device (read and advanced by the kernels), or on the host
#: (advanced there and uploaded as this step's counts)
STEPS_NONE, STEPS_DEVICE, STEPS_HOST = 0, 1, 2
#: float64 hyper-parameters every rule has, before the rule's own: lr (a float lr), eps, weight decay,
#: wd_ratio, the decay divisor
HYP_COMMON = 5
#: columns of the per-tensor table: numel, rows, row length, first row-sum slot, slots per row, spare offset,
#: spare offset of the direction's state, projectable
META = 8
#: rows of the pointer table: params, grads, state 0, state 1, step counters
PTRS = 5
META_: tl.constexpr = tl.constexpr(META)
HYP_COMMON_: tl.constexpr = tl.constexpr(HYP_COMMON)


@dataclass(frozen=True)
class Config:
    """The tiles of a launch: ``rt x cb`` elements. A tile holds ``rt // k`` whole rows of a projectable tensor
    whose rows take ``k = ceil(row length / cb) <= rt`` tile rows each; a longer row is one program, in chunks
    of ``rt * cb``; a tensor never projected is cut into blocks of ``flat`` elements. ``rblk``: rows per
    iteration of decide."""

    rt: int = 16
    cb: int = 128
    flat: int = 2048
    rblk: int = 1024
    num_warps: int = 8

    @property
    def tile(self) -> int:
        return self.rt * self.cb


#: a GPU's tiles: 2048 elements (8 per thread of 8 warps: AdamP's stage fits 128 registers, two programs per SM),
#: rows of up to 2048 elements held whole
GPU = Config()
#: small tiles, so that small tensors exercise every kind of tile (rows in several tile rows, long rows)
SMALL = Config(rt=4, cb=8, flat=32, rblk=4, num_warps=1)
#: the interpreter's default: large tiles (its cost is per program and per operation, not per element)
INTERPRETER = Config(rt=64, cb=1024, flat=65536, rblk=4096, num_warps=1)


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
    return not isinstance(stage_kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------------------------------
# shared element helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _coef(pu, pp, eps):
    """The projection coefficient ``<w,u> / (||w|| + eps)^2`` (``RowDecision``'s)."""
    nrm = tl.sqrt_rn(pp) + eps
    return tl.div_rn(pu, nrm * nrm)


@triton.jit
def _passes(pg, pp, gg, eps, thr):
    """``|cos(w, g)| < thr`` of rows (or totals); NaN and an overflowed squared norm fail."""
    den = tl.maximum(tl.sqrt_rn(gg), eps, propagate_nan=tl.PropagateNan.ALL) * tl.maximum(
        tl.sqrt_rn(pp), eps, propagate_nan=tl.PropagateNan.ALL
    )
    cos = tl.div_rn(tl.abs(pg), den)
    return (cos < thr) & (tl.abs(pp) < float("inf")) & (tl.abs(gg) < float("inf"))


@triton.jit
def _guess(MODE: tl.constexpr, SPEC: tl.constexpr, old, spare):
    """The view a projectable tensor is stepped under in stage: -1 (none: apply steps it), 0 (``none``) or
    1 (``channel``). ``old``: its view at the last step (-1 before the first); ``spare``: it has room in the
    spare block (for its old weights)."""
    if MODE == 2:
        g = tl.where(spare, 1, 1)
    elif (MODE == 1) and SPEC:
        g = tl.where(spare & (old == 0), 0, tl.where(spare & (old == 1), 1, -1))
    else:
        g = tl.where(spare, -1, -1)
    return g


@triton.jit
def _grad(g_ptr, offs, mask, inv, HAS_GS: tl.constexpr, MAXIMIZE: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GS:
        g = g * inv
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _tensor(meta_ptr, ptr_ptr, n, i, like_p):
    """Tensor ``i``: its table row and typed pointers (params and grads of the bucket's dtype, state float32)."""
    m = meta_ptr + META_ * i
    numel = tl.load(m)
    rows = tl.load(m + 1)
    cols = tl.load(m + 2)
    row0 = tl.load(m + 3)
    k = tl.load(m + 4)
    sp = tl.load(m + 5)
    sp2 = tl.load(m + 6)
    proj = tl.load(m + 7)
    p_ptr = tl.load(ptr_ptr + i).to(like_p.dtype, bitcast=True)
    g_ptr = tl.load(ptr_ptr + n + i).to(like_p.dtype, bitcast=True)
    s0_ptr = tl.load(ptr_ptr + 2 * n + i).to(tl.pointer_type(tl.float32), bitcast=True)
    s1_ptr = tl.load(ptr_ptr + 3 * n + i).to(tl.pointer_type(tl.float32), bitcast=True)
    return numel, rows, cols, row0, k, sp, sp2, proj, p_ptr, g_ptr, s0_ptr, s1_ptr


@triton.jit
def _count(ptr_ptr, count_ptr, n, i, ADVANCE: tl.constexpr, STEPS: tl.constexpr):
    """The step count ``t`` of tensor ``i`` this step, as float64 (``ADVANCE``: the device counter is not yet
    advanced: stage; decide advances it before apply)."""
    if STEPS == 1:
        sp = tl.load(ptr_ptr + 4 * n + i).to(tl.pointer_type(tl.float32), bitcast=True)
        c = tl.load(sp)
        if ADVANCE:
            c = c + 1.0
        t = c.to(tl.float64)
    elif STEPS == 2:
        t = tl.load(count_ptr + i).to(tl.float64)
    else:
        t = tl.zeros((), tl.float64)
    return t


@triton.jit
def _scalars(hyp_ptr, lr_ptr, gs_ptr, t, SCALARS: tl.constexpr, RFLAGS: tl.constexpr, HAS_GS: tl.constexpr):
    """Per-program scalars in float64, rounded once: the rule's, the decay factors, eps, GradScaler's 1/scale."""
    lr = tl.load(lr_ptr).to(tl.float64)
    wd = tl.load(hyp_ptr + 2)
    lr_wd = lr * wd
    div = tl.load(hyp_ptr + 4)
    f_none = (1.0 - lr_wd / div).to(tl.float32)
    f_proj = (1.0 - lr_wd * tl.load(hyp_ptr + 3) / div).to(tl.float32)
    eps = tl.load(hyp_ptr + 1).to(tl.float32)
    ss, K = SCALARS(hyp_ptr + HYP_COMMON_, lr, t, RFLAGS)
    if HAS_GS:  # as GradScaler.unscale_: (1 / double(scale)) rounded to float
        inv = (1.0 / tl.load(gs_ptr).to(tl.float64)).to(tl.float32)
    else:
        inv = tl.full((), 1.0, tl.float32)
    return ss, K, f_none, f_proj, eps, inv


@triton.jit
def _skipped(fi_ptr, HAS_FI: tl.constexpr):
    """GradScaler's ``found_inf != 0`` (NaN included): the step changes nothing."""
    if HAS_FI:
        s = tl.load(fi_ptr).to(tl.float32) != 0.0
    else:
        s = tl.full((), 0, tl.int1)
    return s


@triton.jit
def _store_states(s0_ptr, s1_ptr, offs, mask, n0, n1, NSTATE: tl.constexpr):
    tl.store(s0_ptr + offs, n0, mask=mask)
    if NSTATE > 1:
        tl.store(s1_ptr + offs, n1, mask=mask)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to the parameters' dtype, to nearest even (as torch's ``copy_``). bfloat16 by
    integer arithmetic, the same bits in the interpreter (whose conversion truncates) and on a GPU; NaN
    becomes torch's 0x7FC0."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        up = tl.where(x != x, 0x7FC0, up)
        out = up.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def _step(w, u, f, ss, DECAY: tl.constexpr):
    """``w f + s u``: ``p.mul_(f)`` then ``p.add_(u, alpha=s)`` (one FMA, as torch's CPU ``add_``)."""
    if DECAY:
        w = w * f
    return tl.fma(u, ss, w)


# ----------------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _tile(b, cols, k, RT: tl.constexpr, CB: tl.constexpr):
    """A tile of ``b`` whole rows of ``cols`` elements as ``[RT, CB]``: tile row ``j`` holds chunk ``j % k`` of
    row ``j // k`` (``k = ceil(cols / CB)``). Offsets are relative to the tile's first row (int32: a tile spans
    fewer than ``RT * CB`` elements; the first row's offset is added as int64)."""
    j = tl.arange(0, RT)
    lr = j // k
    q = j % k
    rvalid = lr < b
    col = q[:, None] * CB + tl.arange(0, CB)[None, :]
    mask = rvalid[:, None] & (col < cols)
    offs = (lr * cols)[:, None] + col
    return lr, q, rvalid, mask, offs


@triton.jit
def _row_total(x, lr):
    """Per tile row, the sum of its whole row: the chunks' sums added over the tile rows of the same row."""
    part = tl.sum(x, axis=1)
    same = lr[:, None] == lr[None, :]
    return tl.sum(tl.where(same, part[None, :], 0.0), axis=1)


@triton.jit
def _load_states(s0_ptr, s1_ptr, offs, mask, NSTATE: tl.constexpr):
    s0 = tl.load(s0_ptr + offs, mask=mask, other=0.0)
    s1 = s0
    if NSTATE > 1:
        s1 = tl.load(s1_ptr + offs, mask=mask, other=0.0)
    return s0, s1


@triton.jit
def _keep(spare_ptr, spare2_ptr, offs, mask, w_raw, n0, n1, guess, DIR_STATE: tl.constexpr):
    """What a wrong guess needs, kept before a guessed row is written: its old weights and, under a ``channel``
    guess, the unprojected direction state (where the state stores the projected direction)."""
    tl.store(spare_ptr + offs, w_raw, mask=mask)
    channel = tl.where(guess == 1, mask, False)  # (not mask & scalar: the interpreter makes that int32)
    if DIR_STATE == 0:
        tl.store(spare2_ptr + offs, n0, mask=channel)
    if DIR_STATE == 1:
        tl.store(spare2_ptr + offs, n1, mask=channel)


# ----------------------------------------------------------------------------------------------------
# stage
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _stage_flat(p_ptr, g_ptr, s0_ptr, s1_ptr, numel, a, ss, K, f_none, inv,
                DIRECTION: tl.constexpr, NSTATE: tl.constexpr, RFLAGS: tl.constexpr, HAS_GS: tl.constexpr,
                MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, FLAT: tl.constexpr):  # fmt: skip
    """A block of a tensor that is never projected: the whole step."""
    offs = tl.arange(0, FLAT)
    mask = offs < numel - a
    p_ptr += a
    g_ptr += a
    s0_ptr += a
    s1_ptr += a
    w_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = _grad(g_ptr, offs, mask, inv, HAS_GS, MAXIMIZE)
    s0, s1 = _load_states(s0_ptr, s1_ptr, offs, mask, NSTATE)
    u, n0, n1 = DIRECTION(g, s0, s1, K, RFLAGS)
    _store_states(s0_ptr, s1_ptr, offs, mask, n0, n1, NSTATE)
    tl.store(p_ptr + offs, _rounded(_step(w_raw.to(tl.float32), u, f_none, ss, DECAY), w_raw.dtype), mask=mask)


@triton.jit
def _stage_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, rows_ptr, spare_ptr, spare2_ptr, a, b, cols, k, guess, ss, K,
                f_none, f_proj, eps, inv,
                DIRECTION: tl.constexpr, NSTATE: tl.constexpr, DIR_STATE: tl.constexpr, RFLAGS: tl.constexpr,
                MODE: tl.constexpr, HAS_GS: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
                RT: tl.constexpr, CB: tl.constexpr):  # fmt: skip
    """Rows ``a .. a+b-1`` of a projectable tensor, held whole (pointers are at the tensor's row ``a``)."""
    lr, q, rvalid, mask, offs = _tile(b, cols.to(tl.int32), k.to(tl.int32), RT, CB)
    w_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
    w = w_raw.to(tl.float32)
    g = _grad(g_ptr, offs, mask, inv, HAS_GS, MAXIMIZE)
    s0, s1 = _load_states(s0_ptr, s1_ptr, offs, mask, NSTATE)
    u, n0, n1 = DIRECTION(g, s0, s1, K, RFLAGS)
    pg = _row_total(w * g, lr)
    pp = _row_total(w * w, lr)
    gg = _row_total(g * g, lr)
    pu = _row_total(w * u, lr)
    first = rvalid & (q == 0)
    slot = rows_ptr + 4 * (a + lr)
    tl.store(slot, pg, mask=first)
    tl.store(slot + 1, pp, mask=first)
    tl.store(slot + 2, gg, mask=first)
    tl.store(slot + 3, pu, mask=first)
    if guess >= 0:  # stepped now, under the known or guessed view
        if MODE == 1:
            _keep(spare_ptr, spare2_ptr, offs, mask, w_raw, n0, n1, guess, DIR_STATE)
        channel = guess == 1
        c = tl.where(channel, _coef(pu, pp, eps), 0.0)
        u = tl.where(channel, u - c[:, None] * w, u)
        f = tl.where(channel, f_proj, f_none)
        tl.store(p_ptr + offs, _rounded(_step(w, u, f, ss, DECAY), w_raw.dtype), mask=mask)
        if DIR_STATE == 0:
            n0 = u
        if DIR_STATE == 1:
            n1 = u
    _store_states(s0_ptr, s1_ptr, offs, mask, n0, n1, NSTATE)


@triton.jit
def _stage_long(p_ptr, g_ptr, s0_ptr, s1_ptr, rows_ptr, spare_ptr, spare2_ptr, cols, guess, ss, K, f_none, f_proj,
                eps, inv,
                DIRECTION: tl.constexpr, RESTORE: tl.constexpr, NSTATE: tl.constexpr, DIR_STATE: tl.constexpr,
                RFLAGS: tl.constexpr, MODE: tl.constexpr, HAS_GS: tl.constexpr, MAXIMIZE: tl.constexpr,
                DECAY: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """One row longer than a tile (pointers at its start), in chunks: directions, state and sums; then, when
    guessed, a second sweep (from the cache) that re-derives the direction from the stored state and steps."""
    pg = tl.zeros((), tl.float32)
    pp = tl.zeros((), tl.float32)
    gg = tl.zeros((), tl.float32)
    pu = tl.zeros((), tl.float32)
    for c0 in range(0, cols, CHUNK):
        offs = tl.arange(0, CHUNK)
        mask = offs < cols - c0
        w_raw = tl.load(p_ptr + c0 + offs, mask=mask, other=0.0)
        w = w_raw.to(tl.float32)
        g = _grad(g_ptr + c0, offs, mask, inv, HAS_GS, MAXIMIZE)
        s0, s1 = _load_states(s0_ptr + c0, s1_ptr + c0, offs, mask, NSTATE)
        u, n0, n1 = DIRECTION(g, s0, s1, K, RFLAGS)
        _store_states(s0_ptr + c0, s1_ptr + c0, offs, mask, n0, n1, NSTATE)
        if (MODE == 1) & (guess >= 0):
            _keep(spare_ptr + c0, spare2_ptr + c0, offs, mask, w_raw, n0, n1, guess, DIR_STATE)
        pg += tl.sum(w * g)
        pp += tl.sum(w * w)
        gg += tl.sum(g * g)
        pu += tl.sum(w * u)
    tl.store(rows_ptr, pg)
    tl.store(rows_ptr + 1, pp)
    tl.store(rows_ptr + 2, gg)
    tl.store(rows_ptr + 3, pu)
    if guess >= 0:
        channel = guess == 1
        c = tl.where(channel, _coef(pu, pp, eps), 0.0)
        f = tl.where(channel, f_proj, f_none)
        for c0 in range(0, cols, CHUNK):
            offs = tl.arange(0, CHUNK)
            mask = offs < cols - c0
            w_raw = tl.load(p_ptr + c0 + offs, mask=mask, other=0.0)
            w = w_raw.to(tl.float32)
            g = _grad(g_ptr + c0, offs, mask, inv, HAS_GS, MAXIMIZE)
            s0, s1 = _load_states(s0_ptr + c0, s1_ptr + c0, offs, mask, NSTATE)
            u = RESTORE(g, s0, s1, K, RFLAGS)
            u = tl.where(channel, u - c * w, u)
            tl.store(p_ptr + c0 + offs, _rounded(_step(w, u, f, ss, DECAY), w_raw.dtype), mask=mask)
            if DIR_STATE == 0:
                tl.store(s0_ptr + c0 + offs, u, mask=mask)
            if DIR_STATE == 1:
                tl.store(s1_ptr + c0 + offs, u, mask=mask)


@triton.jit
def stage_kernel(work_ptr, meta_ptr, ptr_ptr, n, like_p, hyp_ptr, lr_ptr, count_ptr, gs_ptr, fi_ptr, rows_ptr,
                 views_ptr, spare_ptr, spare2_ptr,
                 SCALARS: tl.constexpr, DIRECTION: tl.constexpr, RESTORE: tl.constexpr, NSTATE: tl.constexpr,
                 DIR_STATE: tl.constexpr, RFLAGS: tl.constexpr, MODE: tl.constexpr, SPEC: tl.constexpr,
                 STEPS: tl.constexpr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, MAXIMIZE: tl.constexpr,
                 DECAY: tl.constexpr, RT: tl.constexpr, CB: tl.constexpr, FLAT: tl.constexpr):  # fmt: skip
    """Launch 1 (one program per tile): directions and state, row sums, and the step where the view is known
    or guessed (see the module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(work_ptr + 4 * pid)
    a = tl.load(work_ptr + 4 * pid + 1)
    b = tl.load(work_ptr + 4 * pid + 2)
    kind = tl.load(work_ptr + 4 * pid + 3)
    if _skipped(fi_ptr, HAS_FI) == 0:
        numel, _rows, cols, row0, k, sp, sp2, _proj, p_ptr, g_ptr, s0_ptr, s1_ptr = _tensor(
            meta_ptr, ptr_ptr, n, i, like_p
        )
        t = _count(ptr_ptr, count_ptr, n, i, True, STEPS)
        ss, K, f_none, f_proj, eps, inv = _scalars(hyp_ptr, lr_ptr, gs_ptr, t, SCALARS, RFLAGS, HAS_GS)
        if kind == 2:
            _stage_flat(p_ptr, g_ptr, s0_ptr, s1_ptr, numel, a, ss, K, f_none, inv,
                        DIRECTION, NSTATE, RFLAGS, HAS_GS, MAXIMIZE, DECAY, FLAT)  # fmt: skip
        else:
            guess = _guess(MODE, SPEC, tl.load(views_ptr + i).to(tl.int32), sp >= 0)
            base = a * cols  # the tile's first element (int64)
            if kind == 0:
                _stage_tile(p_ptr + base, g_ptr + base, s0_ptr + base, s1_ptr + base, rows_ptr + 4 * row0,
                            spare_ptr + sp + base, spare2_ptr + sp2 + base, a, b, cols, k, guess, ss, K, f_none,
                            f_proj, eps, inv, DIRECTION, NSTATE, DIR_STATE, RFLAGS, MODE, HAS_GS, MAXIMIZE, DECAY,
                            RT, CB)  # fmt: skip
            else:
                _stage_long(p_ptr + base, g_ptr + base, s0_ptr + base, s1_ptr + base, rows_ptr + 4 * (row0 + a),
                            spare_ptr + sp + base, spare2_ptr + sp2 + base, cols, guess, ss, K, f_none, f_proj, eps,
                            inv, DIRECTION, RESTORE, NSTATE, DIR_STATE, RFLAGS, MODE, HAS_GS, MAXIMIZE, DECAY,
                            RT * CB)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# decide
# ----------------------------------------------------------------------------------------------------


@triton.jit
def decide_kernel(meta_ptr, ptr_ptr, n, thr_ptr, hyp_ptr, fi_ptr, rows_ptr, rowcoef_ptr, views_ptr, flags_ptr,
                  tcoef_ptr, MODE: tl.constexpr, SPEC: tl.constexpr, STEPS: tl.constexpr, HAS_FI: tl.constexpr,
                  RBLK: tl.constexpr):  # fmt: skip
    """Launch 2 (one program per tensor): the step counter, the decision, the view and the coefficients.

    ``flags``: bit 0, apply must step the tensor; bit 1, from the spare block's old weights; bit 2, with the
    direction's state from the second spare block (it was stored projected under a ``channel`` guess)."""
    i = tl.program_id(0).to(tl.int64)
    if _skipped(fi_ptr, HAS_FI) == 0:
        if STEPS == 1:
            sp = tl.load(ptr_ptr + 4 * n + i).to(tl.pointer_type(tl.float32), bitcast=True)
            tl.store(sp, tl.load(sp) + 1.0)
        m_ptr = meta_ptr + META_ * i
        if tl.load(m_ptr + 7) != 0:
            rows = tl.load(m_ptr + 1)
            row0 = tl.load(m_ptr + 3)
            eps = tl.load(hyp_ptr + 1).to(tl.float32)
            thr_c = tl.load(thr_ptr + 2 * i)
            thr_l = tl.load(thr_ptr + 2 * i + 1)
            fails = tl.zeros((), tl.int32)
            tpg = tl.zeros((), tl.float32)
            tpp = tl.zeros((), tl.float32)
            tgg = tl.zeros((), tl.float32)
            tpu = tl.zeros((), tl.float32)
            for r0 in range(0, rows, RBLK):
                r = r0 + tl.arange(0, RBLK)
                m = r < rows
                slot = rows_ptr + 4 * (row0 + r)
                pg = tl.load(slot, mask=m, other=0.0)
                pp = tl.load(slot + 1, mask=m, other=0.0)
                gg = tl.load(slot + 2, mask=m, other=0.0)
                pu = tl.load(slot + 3, mask=m, other=0.0)
                ok = _passes(pg, pp, gg, eps, thr_c)
                fails += tl.sum(tl.where(m & (ok == 0), 1, 0))
                tpg += tl.sum(pg)
                tpp += tl.sum(pp)
                tgg += tl.sum(gg)
                tpu += tl.sum(pu)
            if MODE == 1:
                channel = fails == 0
                layer = _passes(tpg, tpp, tgg, eps, thr_l)
            elif MODE == 2:
                channel = fails >= 0
                layer = fails < 0
            else:
                channel = fails < 0
                layer = fails >= 0
            view = tl.where(channel, 1, tl.where(layer, 2, 0))
            guess = _guess(MODE, SPEC, tl.load(views_ptr + i).to(tl.int32), tl.load(m_ptr + 5) >= 0)
            redo = (guess < 0) | (guess != view)
            copied = (guess >= 0) & (MODE == 1)
            tl.store(views_ptr + i, view.to(tl.int8))
            bits = redo.to(tl.int32) + 2 * copied.to(tl.int32) + 4 * (copied & (guess == 1)).to(tl.int32)
            tl.store(flags_ptr + i, bits)
            tl.store(tcoef_ptr + i, tl.where(layer & (channel == 0), _coef(tpu, tpp, eps), 0.0))
            if redo & channel:
                for r0 in range(0, rows, RBLK):
                    r = r0 + tl.arange(0, RBLK)
                    m = r < rows
                    slot = rows_ptr + 4 * (row0 + r)
                    coef = _coef(tl.load(slot + 3, mask=m, other=0.0), tl.load(slot + 1, mask=m, other=0.0), eps)
                    tl.store(rowcoef_ptr + row0 + r, coef, mask=m)


# ----------------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _apply_elems(p_ptr, src_ptr, g_ptr, s0_ptr, s1_ptr, d_ptr, offs, mask, c, projected, ss, K, f_none, f_proj, inv,
                 RESTORE: tl.constexpr, NSTATE: tl.constexpr, DIR_STATE: tl.constexpr, RFLAGS: tl.constexpr,
                 HAS_GS: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr):  # fmt: skip
    """Elements stepped from the stored state: ``src`` holds the old weights, ``d_ptr`` the direction's state;
    ``c`` the coefficient (broadcast to the elements)."""
    w = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = _grad(g_ptr, offs, mask, inv, HAS_GS, MAXIMIZE)
    if DIR_STATE == 0:
        s0 = tl.load(d_ptr + offs, mask=mask, other=0.0)
    else:
        s0 = tl.load(s0_ptr + offs, mask=mask, other=0.0)
    s1 = s0
    if NSTATE > 1:
        if DIR_STATE == 1:
            s1 = tl.load(d_ptr + offs, mask=mask, other=0.0)
        else:
            s1 = tl.load(s1_ptr + offs, mask=mask, other=0.0)
    u = RESTORE(g, s0, s1, K, RFLAGS)
    u = tl.where(projected, u - c * w, u)
    f = tl.where(projected, f_proj, f_none)
    tl.store(p_ptr + offs, _rounded(_step(w, u, f, ss, DECAY), p_ptr.dtype.element_ty), mask=mask)
    if DIR_STATE == 0:
        tl.store(s0_ptr + offs, u, mask=mask)
    if DIR_STATE == 1:
        tl.store(s1_ptr + offs, u, mask=mask)


@triton.jit
def _apply_tile(p_ptr, src_ptr, g_ptr, s0_ptr, s1_ptr, d_ptr, rowcoef_ptr, b, cols, k, view, coef_l, ss, K, f_none,
                f_proj, inv,
                RESTORE: tl.constexpr, NSTATE: tl.constexpr, DIR_STATE: tl.constexpr, RFLAGS: tl.constexpr,
                HAS_GS: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, RT: tl.constexpr,
                CB: tl.constexpr):  # fmt: skip
    """Rows of a tile stepped from the stored state (pointers at the tile's first row)."""
    lr, _q, rvalid, mask, offs = _tile(b, cols.to(tl.int32), k.to(tl.int32), RT, CB)
    c = tl.load(rowcoef_ptr + lr, mask=rvalid, other=0.0)  # written by decide where the view is channel
    c = tl.where(view == 1, c, coef_l)
    _apply_elems(p_ptr, src_ptr, g_ptr, s0_ptr, s1_ptr, d_ptr, offs, mask, c[:, None], view > 0, ss, K, f_none,
                 f_proj, inv, RESTORE, NSTATE, DIR_STATE, RFLAGS, HAS_GS, MAXIMIZE, DECAY)  # fmt: skip


@triton.jit
def _apply_long(p_ptr, src_ptr, g_ptr, s0_ptr, s1_ptr, d_ptr, rowcoef_ptr, cols, view, coef_l, ss, K, f_none, f_proj,
                inv,
                RESTORE: tl.constexpr, NSTATE: tl.constexpr, DIR_STATE: tl.constexpr, RFLAGS: tl.constexpr,
                HAS_GS: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """A long row stepped from the stored state, in chunks (pointers at its start)."""
    c = tl.where(view == 1, tl.load(rowcoef_ptr), coef_l)
    for c0 in range(0, cols, CHUNK):
        offs = tl.arange(0, CHUNK)
        mask = offs < cols - c0
        _apply_elems(p_ptr + c0, src_ptr + c0, g_ptr + c0, s0_ptr + c0, s1_ptr + c0, d_ptr + c0, offs, mask, c,
                     view > 0, ss, K, f_none, f_proj, inv, RESTORE, NSTATE, DIR_STATE, RFLAGS, HAS_GS, MAXIMIZE,
                     DECAY)  # fmt: skip


@triton.jit
def apply_kernel(work_ptr, meta_ptr, ptr_ptr, n, like_p, hyp_ptr, lr_ptr, count_ptr, gs_ptr, fi_ptr, rowcoef_ptr,
                 views_ptr, flags_ptr, tcoef_ptr, spare_ptr, spare2_ptr,
                 SCALARS: tl.constexpr, RESTORE: tl.constexpr, NSTATE: tl.constexpr, DIR_STATE: tl.constexpr,
                 RFLAGS: tl.constexpr, STEPS: tl.constexpr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr,
                 MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, RT: tl.constexpr, CB: tl.constexpr):  # fmt: skip
    """Launch 3 (the tiles of projectable tensors): the step of tensors not stepped by stage, or guessed wrong."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(work_ptr + 4 * pid)
    fl = tl.load(flags_ptr + i)
    if ((fl & 1) != 0) & (_skipped(fi_ptr, HAS_FI) == 0):
        a = tl.load(work_ptr + 4 * pid + 1)
        b = tl.load(work_ptr + 4 * pid + 2)
        kind = tl.load(work_ptr + 4 * pid + 3)
        _numel, _rows, cols, row0, k, sp, sp2, _proj, p_ptr, g_ptr, s0_ptr, s1_ptr = _tensor(
            meta_ptr, ptr_ptr, n, i, like_p
        )
        t = _count(ptr_ptr, count_ptr, n, i, False, STEPS)
        ss, K, f_none, f_proj, _eps, inv = _scalars(hyp_ptr, lr_ptr, gs_ptr, t, SCALARS, RFLAGS, HAS_GS)
        view = tl.load(views_ptr + i).to(tl.int32)
        coef_l = tl.load(tcoef_ptr + i)
        base = a * cols
        src_ptr = p_ptr + base
        if (fl & 2) != 0:
            src_ptr = spare_ptr + sp + base
        if DIR_STATE == 1:
            d_ptr = s1_ptr + base
        else:
            d_ptr = s0_ptr + base
        if (fl & 4) != 0:
            d_ptr = spare2_ptr + sp2 + base
        if kind == 0:
            _apply_tile(p_ptr + base, src_ptr, g_ptr + base, s0_ptr + base, s1_ptr + base, d_ptr,
                        rowcoef_ptr + row0 + a, b, cols, k, view, coef_l, ss, K, f_none, f_proj, inv, RESTORE, NSTATE,
                        DIR_STATE, RFLAGS, HAS_GS, MAXIMIZE, DECAY, RT, CB)  # fmt: skip
        else:
            _apply_long(p_ptr + base, src_ptr, g_ptr + base, s0_ptr + base, s1_ptr + base, d_ptr,
                        rowcoef_ptr + row0 + a, cols, view, coef_l, ss, K, f_none, f_proj, inv, RESTORE, NSTATE,
                        DIR_STATE, RFLAGS, HAS_GS, MAXIMIZE, DECAY, RT * CB)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# host side: tables and launches
# ----------------------------------------------------------------------------------------------------


class Layout:
    """The tables of one list of tensors, built once: per tensor its row view, per program its tile.

    ``shapes`` of the tensors, ``projectable`` those the projection may apply to (``scale_invariant`` not
    ``False``, at least 2 dimensions, none of size 0), ``spare``: which of them get room in the spare block
    (the old weights of a guessed tensor), ``spare2``: in the second block (the unprojected direction state of
    a ``channel`` guess). Tiles of projectable tensors come first (the grid of apply)."""

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        projectable: Sequence[bool],
        config: Config,
        spare: Sequence[bool] = (),
        spare2: Sequence[bool] = (),
    ) -> None:
        self.config = config
        n = len(shapes)
        self.n = n
        meta: list[list[int]] = []
        proj_work: list[list[int]] = []
        flat_work: list[list[int]] = []
        row0 = 0
        sp_off = sp2_off = 0
        for i, (shape, proj) in enumerate(zip(shapes, projectable, strict=True)):
            numel = math.prod(shape)
            if proj:
                rows = shape[0]
                cols = numel // rows
                k = -(-cols // config.cb)
                sp = sp2 = -1
                if spare and spare[i]:
                    sp, sp_off = sp_off, sp_off + numel
                if spare2 and spare2[i]:
                    sp2, sp2_off = sp2_off, sp2_off + numel
                if k <= config.rt:  # whole rows in a tile
                    per = config.rt // k
                    meta.append([numel, rows, cols, row0, k, sp, sp2, 1])
                    proj_work += [[i, a, min(per, rows - a), 0] for a in range(0, rows, per)]
                else:  # a long row per program
                    meta.append([numel, rows, cols, row0, 0, sp, sp2, 1])
                    proj_work += [[i, r, 1, 1] for r in range(rows)]
                row0 += rows
            else:
                meta.append([numel, 1, numel, 0, 0, -1, -1, 0])
                flat_work += [[i, a, 0, 2] for a in range(0, numel, config.flat)]
        self.meta = meta
        self.work = proj_work + flat_work
        self.proj_items = len(proj_work)
        self.rows = row0
        self.spare_numel = sp_off
        self.spare2_numel = sp2_off
        self.any_projectable = any(projectable)


def thresholds(shapes: Sequence[Sequence[int]], delta: float) -> list[list[float]]:
    """Per tensor the channel and layer thresholds, ``delta / sqrt(row length)`` and ``delta / sqrt(numel)``,
    computed in float64 as :class:`~torch_adamp.projection.RowDecision` computes them (rounded to float32)."""
    out = []
    for s in shapes:
        if len(s) > 1 and all(d > 0 for d in s):
            out.append([delta / math.sqrt(math.prod(s[1:])), delta / math.sqrt(math.prod(s))])
        else:
            out.append([0.0, 0.0])
    return out


@dataclass
class Launch:
    """What one step passes to the three kernels beyond the tables (pointers are tensors)."""

    lr: Tensor
    counts: Tensor
    grad_scale: Tensor | None
    found_inf: Tensor | None
    steps: int
    mode: int
    spec: bool
    maximize: bool
    decay: bool
    rflags: int
    dir_state: int


def upload(dst: Tensor, src: Tensor) -> None:
    """Host values to the device, asynchronously: every copy the back end makes (a pageable source is staged by
    the CUDA driver before the call returns, so it may be freed or changed at once; nothing waits)."""
    dst.copy_(src, non_blocking=True)


class Buffers:
    """The device tensors of a :class:`Layout` (tables, row sums, views, coefficients, spare blocks)."""

    def __init__(self, layout: Layout, device: torch.device, param_dtype: torch.dtype, hyp_len: int) -> None:
        n = layout.n
        i64 = torch.int64
        # host tables uploaded asynchronously (a synchronous copy would stall, and fail under sync debug mode)
        self.work = torch.empty(max(len(layout.work), 1), 4, dtype=i64, device=device)
        upload(self.work.narrow(0, 0, len(layout.work)), torch.tensor(layout.work, dtype=i64).reshape(-1, 4))
        self.meta = torch.empty(max(n, 1), META, dtype=i64, device=device)
        upload(self.meta.narrow(0, 0, n), torch.tensor(layout.meta, dtype=i64).reshape(-1, META))
        self.ptrs = torch.zeros(PTRS, max(n, 1), dtype=i64, device=device)
        self.thr = torch.zeros(max(n, 1), 2, dtype=torch.float32, device=device)
        self.hyp = torch.zeros(hyp_len, dtype=torch.float64, device=device)
        self.rows = torch.empty(max(layout.rows, 1), 4, dtype=torch.float32, device=device)
        self.rowcoef = torch.empty(max(layout.rows, 1), dtype=torch.float32, device=device)
        # the view of each tensor at its last step: the guesses of the next (-1: none yet; 0 where never projected)
        views = [-1 if m[7] else 0 for m in layout.meta]
        self.views = torch.zeros(max(n, 1), dtype=torch.int8, device=device)
        upload(self.views.narrow(0, 0, n), torch.tensor(views, dtype=torch.int8))
        self.flags = torch.zeros(max(n, 1), dtype=torch.int32, device=device)
        self.tcoef = torch.zeros(max(n, 1), dtype=torch.float32, device=device)
        self.counts = torch.zeros(max(n, 1), dtype=torch.float32, device=device)
        self.spare = torch.empty(max(layout.spare_numel, 1), dtype=param_dtype, device=device)
        self.spare2 = torch.empty(max(layout.spare2_numel, 1), dtype=torch.float32, device=device)


def compile_options(config: Config) -> dict[str, Any]:
    """Launch options of every kernel: no implicit contraction (see the module docstring)."""
    return {"num_warps": config.num_warps, "enable_fp_fusion": False}


#: the three kernels, in launch order
KERNELS = ("stage", "decide", "apply")


def constexprs(kernel: str, rule: Any, x: Launch, config: Config) -> dict[str, Any]:
    """The compile-time arguments of ``kernel`` for a step ``x`` of ``rule`` (its Triton module): what
    :func:`launch` passes, and what ``benchmarks/triton_compile.py`` compiles ahead of time."""
    if kernel == "decide":
        return dict(MODE=x.mode, SPEC=x.spec, STEPS=x.steps, HAS_FI=x.found_inf is not None, RBLK=config.rblk)
    out = dict(
        SCALARS=rule.scalars,
        RESTORE=rule.restore,
        NSTATE=rule.NSTATE,
        DIR_STATE=x.dir_state,
        RFLAGS=x.rflags,
        STEPS=x.steps,
        HAS_GS=x.grad_scale is not None,
        HAS_FI=x.found_inf is not None,
        MAXIMIZE=x.maximize,
        DECAY=x.decay,
        RT=config.rt,
        CB=config.cb,
    )
    if kernel == "stage":
        out.update(DIRECTION=rule.direction, MODE=x.mode, SPEC=x.spec, FLAT=config.flat)
    return out


def launch(layout: Layout, buf: Buffers, like_p: Tensor, rule: Any, x: Launch) -> None:
    """The three kernels of one step (``rule``: the rule's Triton module)."""
    cfg = layout.config
    n = layout.n
    opts = compile_options(cfg)
    gs = x.grad_scale if x.grad_scale is not None else buf.hyp
    fi = x.found_inf if x.found_inf is not None else buf.hyp
    if layout.work:
        stage_kernel[(len(layout.work),)](
            buf.work, buf.meta, buf.ptrs, n, like_p, buf.hyp, x.lr, buf.counts, gs, fi, buf.rows, buf.views,
            buf.spare, buf.spare2, **constexprs("stage", rule, x, cfg), **opts,
        )  # fmt: skip
    if layout.any_projectable or x.steps == STEPS_DEVICE:
        decide_kernel[(n,)](
            buf.meta, buf.ptrs, n, buf.thr, buf.hyp, fi, buf.rows, buf.rowcoef, buf.views, buf.flags, buf.tcoef,
            **constexprs("decide", rule, x, cfg), **opts,
        )  # fmt: skip
    if layout.proj_items:
        apply_kernel[(layout.proj_items,)](
            buf.work, buf.meta, buf.ptrs, n, like_p, buf.hyp, x.lr, buf.counts, gs, fi, buf.rowcoef, buf.views,
            buf.flags, buf.tcoef, buf.spare, buf.spare2, **constexprs("apply", rule, x, cfg), **opts,
        )  # fmt: skip
