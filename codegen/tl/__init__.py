"""The Triton-language (``tl``) kernel family: generated per pattern, run on every GPU Triton
supports and under ``TRITON_INTERPRET=1``.

``module`` assembles one pattern's module from the printed predicate (``printer``,
``predicate``), the shared visit helpers (``visit``) and the kernel templates, each next to its
launcher: ``forward``, ``backward_delta``, ``backward_dq``, ``backward_dkdv``; ``merge`` holds
the row kernels of strided unions and ``dma/`` the kernels of dynamic patterns.
"""
