"""Baselines trained beside CODI for the paper's comparison (Table 1): `icot` (stepwise internalisation)
and `coconut` (continuous thoughts with a stage curriculum). `codi.compare` trains and evaluates them."""
