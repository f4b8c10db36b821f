"""The barriers every Gluon kernel here sets up before it forks producer and consumers.

Each kernel copies one tile (or pair) once, then streams two operands through a ring of
``STAGES`` shared-memory buffers. ``pipeline_barriers`` allocates and initialises, in the
parent region (before ``gl.warp_specialize``), one barrier for the tile copied once and a
*ready* and an *empty* barrier per buffer for each streamed operand: the producer waits on
*empty* and the copy's bytes complete *ready*; the consumers wait on *ready* and arrive on
*empty* (one arrival per consumer partition: triton lowers ``mbarrier.arrive`` to a single
thread after a partition-wide barrier), so an *empty* barrier expects ``CONSUMERS`` arrivals.
"""

from __future__ import annotations

from sparse_compile.codegen.gluon.support import gl, gluon_jit, mbarrier


@gluon_jit
def _ring(STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)
    return ready, empty


@gluon_jit
def pipeline_barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """``(once, a_ready, a_empty, b_ready, b_empty)``: the *ready* barriers and ``once`` expect
    one arrival (the producer's), the *empty* ones one per consumer partition."""
    once = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(once, count=1)
    a_ready, a_empty = _ring(STAGES, CONSUMERS)
    b_ready, b_empty = _ring(STAGES, CONSUMERS)
    return once, a_ready, a_empty, b_ready, b_empty
