"""Attention patterns: the DSL, their semantics and exact block layouts."""
