"""Dynamic patterns: DMA (trainable dynamic-mask attention) and training-free ``topk``.

- ``functional``: the public functions (``dma_attention``, ``dma_delta``, ``attach_dma``);
- ``reference``: the dense float64 oracle of DMA;
- ``op``: the fused custom op (forward, backward reusing the selection);
- ``masked``, ``chunked``: DMA under a model's dense mask, fused where it allows, else a
  memory-bounded PyTorch path;
- ``topk``: block top-k selection run by the same gather kernels;
- ``dispatch``: which of these runs a dynamic pattern;
- ``attach``, ``values``: DMA's parameters on any model, and how the backend finds them;
- ``detect``, ``sites``: the backend's rewrite of Doge's dynamic-mask construction and of
  generic sites under a dynamic pattern;
- ``flex``: the same selection as a FlexAttention ``BlockMask``.

Its kernels (selection, forward, backward) sit with the other Triton kernels in
``sparse_compile.codegen.tl.dma``. The package is not named ``dma``: ``sparse_compile.dma`` is
the pattern builder.
"""
