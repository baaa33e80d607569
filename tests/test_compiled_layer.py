"""The compiled decoder layer (`compile_layers`, `codi.compiled_layer`) against the eager paths, which
stay the reference: the same logits, hidden states, caches and gradients (fp32, 1e-5 of the scale)
through three calls continuing one cache, the same CODI losses and gradients, the same greedy tokens.

The tests compile with the `aot_eager` backend: dynamo captures `layer_math` and AOTAutograd derives its
backward exactly as under inductor, but without generating kernels (inductor's code generation takes
minutes on a 2-core CPU; `bench/train_step.py --variants compiled` runs it). Dropout is off throughout:
inductor draws its own masks (aot_eager happens to replay eager's). Checked by hand with
`BACKEND = "inductor"` (~2 min cold): every test passes but Coconut's, whose gradients then differ by
2.4e-5 of their scale instead of <= 1e-5: the float32 RMSNorm inside that float64 test rounds
differently in inductor's fused kernels, and that model's large weights amplify it (as they amplify
fp32 rounding to ~3e-5 on the eager paths, which is why it runs in float64). Each test counts the graphs it compiled, so a silent fall back to eager (a graph break, the
recompile limit) fails it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import batch_for
from test_coconut import coconut_model, records_for
from test_layer_stack import _assert_close, _assert_paths_equal, _lm, _three_calls

from codi.compiled_layer import compiled_layer_math
from codi.layer_stack import LayerStack
from codi.methods.coconut import CoconutArguments
from codi.methods.coconut.data import CoconutCollator, CoconutDataset, MarkerIds

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Every test starts from no compiled graph, so its counts are its own."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_layer_math.cache_clear()
    yield
    torch._dynamo.reset()
    compiled_layer_math.cache_clear()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_a_compiled_llama_with_lora_equals_transformers_through_a_continued_cache():
    """Rotary positions, grouped key/value heads, LoRA on every projection, padding on both sides,
    per-row positions, a cache continued twice (three graphs: no cache, a cache and several tokens, a
    cache and one token), then the same calls again without compiling anything more."""
    lm = _lm("llama", 4)
    stack = LayerStack.build(lm, compile_backend=BACKEND)
    assert stack is not None and stack.kv_heads < stack.heads
    compiled = _three_calls(stack, lm)
    assert _graphs() == 3
    _assert_close(compiled, _three_calls(lm, lm))
    _assert_close(_three_calls(stack, lm), compiled)
    assert _graphs() == 3


@pytest.mark.parametrize("arch, overrides", [("gpt2", {"use_lora": False}), ("llama", {})])
def test_a_codi_training_step_is_the_same_with_compiled_layers(make_model, arch, overrides):
    """Every loss component and every trainable parameter's gradient, with step supervision, LoRA
    (dropout off: a compiled step draws its own masks) or full fine-tuning with GPT-2."""
    model = make_model(arch, lora_dropout=0.0, loss={"latent_step_loss_factor": 1.0}, **overrides).train()
    compiled = model.with_settings(args=replace(model.args, compile_layers=BACKEND))
    assert compiled.stack.compile_backend == BACKEND and model.stack.compile_backend is None
    batch = batch_for(model, step_targets=True)
    _assert_paths_equal(compiled, batch)  # against transformers' forward
    assert _graphs() == 3  # the teacher; the <bot> and latent steps (one position); the decoder tokens


def test_teacher_only_training_is_the_same_with_compiled_layers(make_model):
    """CoT-SFT's forward, which iCoT trains on shortened chains (one graph: the teacher call)."""
    model = make_model("llama", method="cot_sft", lora_dropout=0.0).train()
    compiled = model.with_settings(args=replace(model.args, compile_layers=BACKEND))
    _assert_paths_equal(compiled, batch_for(model, method="cot_sft"))
    assert _graphs() == 1


def test_coconut_training_is_the_same_with_compiled_layers(tiny_dirs):
    """Coconut's passes over its continuous thoughts (float64, as on the eager stack: this test model's
    large weights amplify fp32 rounding through the thoughts; LoRA dropout off)."""
    settings = CoconutArguments(c_thought=2, max_latent_stage=3, pad_latent_to_max=False)
    model = coconut_model(tiny_dirs["llama"], settings, lora_dropout=0.0).train().double()
    dataset = CoconutDataset(
        records_for(model), settings, MarkerIds(model.bot_id, model.eot_id, model.pause_id)
    )
    stages = [0, 2, 1, 4]
    dataset.stage_of = lambda index: stages[index]
    batch = CoconutCollator(model.pad_id)([dataset[i] for i in range(len(stages))])
    _assert_paths_equal(model.with_settings(args=replace(model.args, compile_layers=BACKEND)), batch)
    assert 1 <= _graphs() <= 4


def test_greedy_tokens_are_the_same_with_compiled_layers(make_model):
    model = make_model("llama")
    compiled = model.with_settings(args=replace(model.args, compile_layers=BACKEND))
    questions = ["Tom has 3 apples and buys 4 more. How many?", "2 + 2 = ?", "What is 6 times 7?"]
    for mode in ("latent", "cot"):
        settings = dict(mode=mode, max_new_tokens=8, fast_decoding="off")
        ours, eager = compiled.generate(questions, **settings), model.generate(questions, **settings)
        assert [out.token_ids for out in ours] == [out.token_ids for out in eager], mode
    assert 1 <= _graphs() <= 4  # a prefill; continued by one position; by several


def test_layers_the_compiled_function_does_not_cover_run_eagerly():
    """An activation it has no functional form for: the stack runs its eager layers, compiles nothing."""
    lm = _lm("llama", None)
    for layer in lm.model.layers:
        layer.mlp.act_fn = torch.nn.Tanh()
    stack = LayerStack.build(lm, compile_backend=BACKEND)
    _assert_close(_three_calls(stack, lm), _three_calls(lm, lm))
    assert _graphs() == 0


def test_compiling_is_the_loading_machines_choice_not_the_checkpoints(make_model, tmp_path):
    """Like `dtype`: a checkpoint saved from a compiled model loads eager unless the caller asks."""
    import codi

    model = make_model("llama")
    model.with_settings(args=replace(model.args, compile_layers=BACKEND)).save_pretrained(str(tmp_path))
    assert codi.load(str(tmp_path)).stack.compile_backend is None
    assert codi.load(str(tmp_path), compile_layers=BACKEND).stack.compile_backend == BACKEND


def test_an_unknown_backend_is_a_one_line_error_and_an_uncovered_model_a_warning(caplog):
    from codi import CODIModelArguments
    from codi.layer_stack import build_stack

    with pytest.raises(ValueError, match=r"^compile_layers: no torch.compile backend 'inductr'$"):
        CODIModelArguments(model_name_or_path="gpt2", compile_layers="inductr")
    with caplog.at_level("WARNING", logger="codi.layer_stack"):
        assert build_stack(_lm("llama", None), enabled=False, compile_backend=BACKEND) is None
    assert "layer_stack is off" in caplog.text and "uncompiled" in caplog.text
