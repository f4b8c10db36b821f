"""Kernels of dynamic patterns (DMA, topk): the selection (``select``), the gather forward
(``forward``) and the backward (``backward``, with its key-tile pass ``backward_kv``)."""
