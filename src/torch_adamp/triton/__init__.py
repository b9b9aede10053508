"""The Triton kernels of the fused path (an optional dependency: nothing here is imported with ``torch_adamp``).

:mod:`.driver` is the generic driver, written once for every rule: three kernels per device/dtype bucket
(stage, decide, apply), their tables and launches. Each rule with a Triton kernel is one module of element
functions named after it (:mod:`.adamp`, :mod:`.sgdp`): its per-tensor scalars, its direction (the state
update) and the direction re-derived from the stored state. The back end that uses them is
:mod:`torch_adamp.engine.triton`.
"""
