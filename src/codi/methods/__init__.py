"""Baselines of the paper's comparison beside CODI (Coconut; see docs/method.md)."""
