"""Triton source generation and launching for pattern-sparse attention."""
