"""The offline toy demo (`codi demo`): not part of the method, a set of presets of the comparison
harness (`codi.compare`).

- `presets`: the demo's sizes and settings, `--set KEY=VALUE` overrides;
- `pipeline`: a preset -> the harness's settings; data -> `codi.compare` -> the demo's claims.

The synthetic data (`codi.data.synth`) and the models the project makes itself (`codi.offline_models`) live
outside: the harness and the tests use them too.
"""
