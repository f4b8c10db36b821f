"""sparse_compile: pattern-sparse attention for existing PyTorch models."""
