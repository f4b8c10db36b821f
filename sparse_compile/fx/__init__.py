"""The FX pass: from the graph Dynamo hands over to sparse-attention calls.

Stages, in the order the backend (``sparse_compile.backend``) runs them:

- ``graph_ops``: the torch operations the pass recognises, in all their spellings;
- ``inplace``: in-place score updates made out-of-place, so the chains below can be read;
- ``detect`` (with ``softmax``, ``operands``, ``score_chain``, ``einsum``, ``mha``, ``flex``):
  every softmax(Q Kᵀ)V found and proven, normalised to an ``AttentionSite`` (``site``);
  FlexAttention calls are proven by ``flex_site`` (``flex_mask``, ``flex_score``);
- ``choose``: the backend's options and the pattern each site gets;
- ``fold``: the model's own mask read (``index_values``, ``model_mask``, ``index_patterns``,
  ``mask_documents``, ``cache_positions``) and taken over by the op, or kept as a bias;
- ``rewrite``: the site's nodes replaced by one call of the sparse attention op (``placed``:
  its positions, key mask and documents; ``flex_rewrite`` for FlexAttention calls).
"""
