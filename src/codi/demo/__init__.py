"""The offline toy demo (`codi demo`, `codi data synth`, `codi export-smollm2`): not part of the method.

- `synth`: synthetic GSM8k-Aug-style word problems with equation CoTs (pure Python);
- `offline_models`: models the project makes itself (a digit-level tokenizer, random tiny GPT-2 /
  Llama models, shared with `codi.testing`) and the de-quantised offline SmolLM2;
- `pipeline`: data -> base model -> No-CoT-SFT and CODI -> evaluation -> table, JSON and chart.

Nothing is imported here, so `codi.demo.synth` stays importable without torch.
"""
