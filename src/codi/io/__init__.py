"""Checkpoints (save, the one loader, checks), Hugging Face loading, the hub, model cards, the authors' weights."""
