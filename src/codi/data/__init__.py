"""Data: record readers, the training dataset and collator, benchmark sets, synthetic data."""
