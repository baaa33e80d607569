"""Decoding (latent and CoT), scoring, evaluation, and the lm-eval adapter."""
