"""Loading the authors' reference checkpoints (docs/method.md#reference-checkpoints) and `codi convert`.

Each test builds a checkpoint with EXACTLY the reference layout: a wrapper module whose `codi` child is
the peft-wrapped base LM with V+3 embedding rows (pad, bot, eot appended) and whose `prj` child is the
projection Sequential; its state_dict is what the authors' Trainer saved. The reference forward
(question + bot -> hidden -> prj -> fed back ... -> eot -> answer) is computed directly on that
module and compared with this project's model loaded through the converter.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from codi import cli
from codi.io.convert import convert_reference_checkpoint, load_reference_checkpoint
from codi.io.hf import DEFAULT_LORA_TARGETS
from codi.io.hub import OfflineError
from codi.io.reference_weights import inspect_reference_state
from codi.model import CODIModel
from codi.testing import make_model, make_tokenizer

NUM_LATENT = 3
LORA_R, LORA_ALPHA, PRJ_DIM = 4, 16, 12
QUESTION = "Tom has 12 apples and buys 30 more. How many apples does he have now?"
ANSWER = "The answer is: 42"


class ReferenceCODI(nn.Module):
    """The parameter-holding part of the authors' `CODI` module: `self.codi` and `self.prj`."""

    def __init__(self, codi: nn.Module, prj: nn.Module, vocab: int):
        super().__init__()
        self.codi = codi
        self.prj = prj
        self.pad_id, self.bot_id, self.eot_id = vocab, vocab + 1, vocab + 2


def build_reference(
    base_dir: str, *, use_lora: bool = True, prj_no_ln: bool = False, seed: int = 1
) -> ReferenceCODI:
    """A reference model built the authors' way, with random non-zero LoRA B, added rows and prj."""
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(base_dir)
    vocab = lm.config.vocab_size
    lm.resize_token_embeddings(vocab + 3)  # pad, bot, eot, whatever the tokenizer holds
    hidden = lm.config.hidden_size
    with torch.no_grad():
        lm.get_input_embeddings().weight[vocab:] = torch.randn(3, hidden) * 0.5
        head = lm.get_output_embeddings().weight
        if head is not lm.get_input_embeddings().weight:  # untied: the LM head has its own new rows
            head[vocab:] = torch.randn(3, hidden) * 0.5
    if use_lora:
        model_type = lm.config.model_type
        config = LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.1,
            target_modules=DEFAULT_LORA_TARGETS[model_type],
            fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D (peft would switch it on and warn)
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            lm = get_peft_model(lm, config)
        with torch.no_grad():
            for name, parameter in lm.named_parameters():
                if "lora_B" in name:  # B = 0 at init would make the adapters invisible
                    parameter.normal_(0.0, 0.3)
    else:
        with torch.no_grad():  # full fine-tuning: every weight moved away from the base
            for parameter in lm.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(hidden, PRJ_DIM), nn.GELU(), nn.Linear(PRJ_DIM, hidden))
    if not prj_no_ln:
        prj.add_module("ln", nn.LayerNorm(hidden))
        with torch.no_grad():
            prj.ln.weight.normal_(1.0, 0.2)
            prj.ln.bias.normal_(0.0, 0.2)
    return ReferenceCODI(lm, prj, vocab).eval()


def save_reference(reference: nn.Module, directory: str, fmt: str, dtype=None) -> str:
    """Write the state dict the authors' Trainer writes (`pytorch_model.bin`) or its safetensors twin."""
    os.makedirs(directory, exist_ok=True)
    state = reference.state_dict()
    if dtype is not None:
        state = {key: value.to(dtype) for key, value in state.items()}
    if fmt == "bin":
        path = os.path.join(directory, "pytorch_model.bin")
        torch.save(state, path)
    else:  # safetensors refuses shared (tied) tensors: store each one separately
        path = os.path.join(directory, "model.safetensors")
        save_file({key: value.clone().contiguous() for key, value in state.items()}, path)
    return path


@torch.no_grad()
def reference_forward(reference: ReferenceCODI, question_ids: list[int], answer_ids: list[int]):
    """The authors' inference loop on one unpadded example: latents fed and decoder logits."""
    codi = reference.codi
    out = codi(
        input_ids=torch.tensor([question_ids + [reference.bot_id]]), use_cache=True, output_hidden_states=True
    )
    latent = reference.prj(out.hidden_states[-1][:, -1:])
    latents = []
    for _ in range(NUM_LATENT):
        latents.append(latent[:, 0])
        out = codi(inputs_embeds=latent, cache=out.cache, use_cache=True, output_hidden_states=True)
        latent = reference.prj(out.hidden_states[-1][:, -1:])  # the last one is never fed
    decoder = torch.tensor([[reference.eot_id] + answer_ids])
    embeds = codi.get_input_embeddings()(decoder)
    logits = codi(inputs_embeds=embeds, cache=out.cache, use_cache=True).logits
    return torch.cat(latents), logits[0]


@torch.no_grad()
def our_forward(model: CODIModel, question_ids: list[int], answer_ids: list[int], defer_last: bool = False):
    ids = torch.tensor([question_ids + [model.bot_id]])
    prefix = model.encode_latents(ids, torch.ones_like(ids), NUM_LATENT, defer_last=defer_last)
    decoder = torch.tensor([[model.eot_id] + answer_ids])
    out = model.decode_step(prefix, decoder, torch.ones_like(decoder), hidden_states=False)
    offset = 1 if defer_last else 0
    return torch.cat(prefix.latents), out.logits[0, offset:]


def tokens(base_dir: str) -> tuple[list[int], list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return tokenizer(QUESTION)["input_ids"], tokenizer(ANSWER)["input_ids"]


def assert_same_outputs(model: CODIModel, reference: ReferenceCODI, base_dir: str, columns=None) -> None:
    """Latents and decoder logits equal; `columns` maps our logit columns to the reference's."""
    question, answer = tokens(base_dir)
    ref_latents, ref_logits = reference_forward(reference, question, answer)
    for defer_last in (False, True):
        latents, logits = our_forward(model, question, answer, defer_last=defer_last)
        torch.testing.assert_close(latents, ref_latents, atol=1e-5, rtol=1e-5)
        if columns is not None:
            ours_cols, ref_cols = columns
            logits, expected = logits[:, ours_cols], ref_logits[:, ref_cols]
        else:
            expected = ref_logits
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------------


# llama + safetensors is covered by test_codi_convert_then_from_pretrained.
@pytest.mark.parametrize(("arch", "fmt"), [("gpt2", "bin"), ("gpt2", "safetensors"), ("llama", "bin")])
def test_lora_checkpoint_matches_the_reference_forward(arch, fmt, tiny_dirs, tmp_path):
    base = tiny_dirs[arch]
    reference = build_reference(base)
    path = save_reference(reference, str(tmp_path / "ref"), fmt)
    # The layout is the authors': peft-wrapped names, V+3 rows, prj.1 / prj.ln.
    keys = set(reference.state_dict())
    assert any(k.startswith("codi.base_model.model.") and k.endswith(".lora_A.default.weight") for k in keys)
    assert {"prj.1.weight", "prj.3.bias", "prj.ln.weight"} <= keys

    model = load_reference_checkpoint(path, base, lora_alpha=LORA_ALPHA, num_latent=NUM_LATENT)
    report = model.conversion_report
    assert (model.pad_id, model.bot_id, model.eot_id) == (
        reference.pad_id,
        reference.bot_id,
        reference.eot_id,
    )
    assert report.inferred["use_lora"] and report.inferred["lora_r"] == LORA_R
    assert report.inferred["prj_dim"] == PRJ_DIM and not report.inferred["prj_no_ln"]
    assert model.args.lora_target_modules == sorted(DEFAULT_LORA_TARGETS[arch])
    assert report.unused_keys == [] and report.missing_keys == [] and report.base_mismatch == []
    assert_same_outputs(model, reference, base)


def test_bfloat16_checkpoint_from_a_folder(tiny_gpt2, tmp_path):
    """The released weights are bf16: loaded into float32 they give the bf16 reference's outputs."""
    reference = build_reference(tiny_gpt2, prj_no_ln=True)
    save_reference(reference, str(tmp_path / "ref"), "bin", dtype=torch.bfloat16)
    # The reference as it computes after loading those rounded weights.
    rounded = {key: value.to(torch.bfloat16) for key, value in reference.state_dict().items()}
    reference.load_state_dict(rounded)
    model = load_reference_checkpoint(str(tmp_path / "ref"), tiny_gpt2, lora_alpha=LORA_ALPHA)
    assert model.args.prj_no_ln and "ln" not in dict(model.prj.named_children())
    assert model.conversion_report.base_mismatch == []  # base weights equal up to bf16 rounding
    assert_same_outputs(model, reference, tiny_gpt2)


def test_full_finetuning_checkpoint(tiny_gpt2, tmp_path):
    reference = build_reference(tiny_gpt2, use_lora=False)
    path = save_reference(reference, str(tmp_path / "ref"), "bin")
    assert not any(key.startswith("codi.base_model") for key in reference.state_dict())
    model = load_reference_checkpoint(path, tiny_gpt2)
    assert not model.is_lora and model.conversion_report.unused_keys == []
    assert_same_outputs(model, reference, tiny_gpt2)


@pytest.mark.parametrize("case", ["tokenizer_has_pad", "vocab_larger_than_tokenizer"])
def test_special_rows_are_mapped_when_our_ids_differ(case, tmp_path):
    """Our ids are not V, V+1, V+2 here: the reference rows must land on our <pad>/<bot>/<eot> rows."""
    tokenizer = make_tokenizer("gpt2")
    extra = 5 if case == "vocab_larger_than_tokenizer" else 0
    base = str(tmp_path / "base")
    make_model("gpt2", len(tokenizer) + extra).save_pretrained(base)
    if case == "tokenizer_has_pad":
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(base)

    reference = build_reference(base)
    vocab = reference.pad_id
    path = save_reference(reference, str(tmp_path / "ref"), "bin")
    model = load_reference_checkpoint(path, base, lora_alpha=LORA_ALPHA)
    report = model.conversion_report
    if case == "tokenizer_has_pad":
        assert model.pad_id == tokenizer.eos_token_id and (model.bot_id, model.eot_id) == (vocab, vocab + 1)
        assert report.unused_rows == [vocab]
    else:
        assert model.bot_id < vocab and report.token_rows["pad"] == [vocab, model.pad_id]
        assert model.base_vocab_rows == model.pad_id  # so the added rows are saved with the adapter
    assert report.token_rows["bot"] == [vocab + 1, model.bot_id]

    # Compare logits column by column: our bot/eot columns against the reference's V+1/V+2.
    kept = [i for i in range(vocab) if i not in (model.bot_id, model.eot_id, model.pad_id)]
    columns = (kept + [model.bot_id, model.eot_id], kept + [vocab + 1, vocab + 2])
    question, answer = tokens(base)
    ref_latents, ref_logits = reference_forward(reference, question, answer)
    for loaded in (model, _roundtrip(model, tmp_path / "ours")):
        latents, logits = our_forward(loaded, question, answer)
        torch.testing.assert_close(latents, ref_latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[:, columns[0]], ref_logits[:, columns[1]], atol=1e-4, rtol=1e-5)


def test_untied_lm_head_rows_are_mapped_and_saved(tmp_path):
    """An untied LM head (Llama-3-8B style) gets its own V+3 rows mapped and saved with the adapter."""
    tokenizer = make_tokenizer("llama3")
    base = str(tmp_path / "base")
    make_model("llama", len(tokenizer), tie_word_embeddings=False).save_pretrained(base)
    tokenizer.save_pretrained(base)
    reference = build_reference(base)
    path = save_reference(reference, str(tmp_path / "ref"), "safetensors")
    model = load_reference_checkpoint(path, base, lora_alpha=LORA_ALPHA)
    assert model.hf_model.get_output_embeddings().weight is not model.hf_model.get_input_embeddings().weight
    assert model.conversion_report.missing_keys == [] and model.conversion_report.unused_keys == []
    assert_same_outputs(model, reference, base)
    assert_same_outputs(_roundtrip(model, tmp_path / "ours"), reference, base)


def _roundtrip(model: CODIModel, directory) -> CODIModel:
    model.save_pretrained(str(directory))
    return CODIModel.from_pretrained(str(directory))


# --------------------------------------------------------------------------------------------------
# Refusals


def test_missing_projection_is_refused(tiny_gpt2, tmp_path):
    reference = build_reference(tiny_gpt2)
    state = {key: value for key, value in reference.state_dict().items() if not key.startswith("prj.")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no projection \(no 'prj.1.weight'"):
        load_reference_checkpoint(str(tmp_path), tiny_gpt2)
    # Half a projection is refused too, naming what is missing.
    state["prj.1.weight"] = reference.state_dict()["prj.1.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"projection is incomplete: missing \['prj.1.bias'"):
        load_reference_checkpoint(str(tmp_path), tiny_gpt2)


def test_wrong_vocab_size_is_refused(tiny_gpt2, tmp_path):
    reference = build_reference(tiny_gpt2)
    vocab = reference.pad_id
    state = dict(reference.state_dict())
    for key in ("codi.base_model.model.transformer.wte.weight", "codi.base_model.model.lm_head.weight"):
        state[key] = torch.cat([state[key], torch.zeros(1, state[key].shape[1])])  # V+4 rows
    torch.save(state, tmp_path / "pytorch_model.bin")
    expected = (
        rf"codi.base_model.model.transformer.wte.weight: checkpoint shape \({vocab + 4}, 32\) does not fit "
        rf"this model's \({vocab + 3}, 32\): expected {vocab + 3} rows"
    )
    with pytest.raises(ValueError, match=expected):
        load_reference_checkpoint(str(tmp_path), tiny_gpt2)


def test_other_shape_mismatches_name_the_key(tiny_gpt2, tiny_llama, tmp_path):
    reference = build_reference(tiny_gpt2)
    path = save_reference(reference, str(tmp_path / "ref"), "bin")
    with pytest.raises(
        ValueError, match=r"prj.1.weight: checkpoint shape \(12, 32\) != this model's \(8, 32\)"
    ):
        load_reference_checkpoint(path, tiny_gpt2, prj_dim=8)
    with pytest.raises(ValueError, match="use_lora=False but the checkpoint is LoRA"):
        load_reference_checkpoint(path, tiny_gpt2, use_lora=False)
    state = dict(reference.state_dict())
    del state["codi.base_model.model.transformer.h.1.mlp.c_fc.lora_B.default.weight"]
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="1 LoRA tensor.* not in the checkpoint .*h.1.mlp.c_fc.lora_B"):
        load_reference_checkpoint(str(tmp_path / "partial.bin"), tiny_gpt2)
    with pytest.raises(ValueError, match="no key starts with 'codi.'"):
        torch.save({"prj.1.weight": torch.zeros(2, 2)}, tmp_path / "other.bin")
        load_reference_checkpoint(str(tmp_path / "other.bin"), tiny_gpt2)


def test_unused_keys_are_reported_and_strict_refuses(tiny_gpt2, tmp_path):
    reference = build_reference(tiny_gpt2)
    state = dict(reference.state_dict())
    state["codi.base_model.model.transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # old GPT-2 buffer
    state["codi.extra_head.weight"] = torch.zeros(2)
    state["decoder.weight"] = torch.zeros(2)
    del state["codi.base_model.model.transformer.ln_f.bias"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    report = load_reference_checkpoint(str(tmp_path), tiny_gpt2).conversion_report
    assert report.unused_keys == ["codi.extra_head.weight", "decoder.weight"]
    assert report.ignored_buffers == ["codi.base_model.model.transformer.h.0.attn.bias"]
    assert report.missing_keys == ["base_model.model.transformer.ln_f.bias"]
    with pytest.raises(ValueError, match="strict loading failed"):
        load_reference_checkpoint(str(tmp_path), tiny_gpt2, strict=True)


def test_inspect_reads_settings_from_the_weights(tiny_llama):
    info = inspect_reference_state(build_reference(tiny_llama).state_dict())
    assert info == {
        "use_lora": True,
        "lora_r": LORA_R,
        "lora_target_modules": sorted(DEFAULT_LORA_TARGETS["llama"]),
        "use_prj": True,
        "prj_dim": PRJ_DIM,
        "prj_no_ln": False,
    }


def test_hub_id_without_network_gives_a_clear_error(monkeypatch, tiny_gpt2):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read when called, not the env
    with pytest.raises(OfflineError, match="cannot load the reference checkpoint 'zen-E/CODI-gpt2': offline"):
        load_reference_checkpoint("zen-E/CODI-gpt2", tiny_gpt2)


def test_missing_local_path_is_not_sent_to_the_hub(tiny_gpt2, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder, and not a hub id"):
        load_reference_checkpoint(str(tmp_path / "absent"), tiny_gpt2)
    with pytest.raises(FileNotFoundError, match="no reference checkpoint found"):
        load_reference_checkpoint(str(tmp_path), tiny_gpt2)


def test_hub_id_resolves_from_the_local_hub_cache(monkeypatch, tiny_gpt2, tmp_path):
    """Offline, a hub id resolves through huggingface_hub's cache (safetensors absent, .bin cached)."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--zen-E--CODI-gpt2" / "snapshots" / ("0" * 40)
    reference = build_reference(tiny_gpt2)
    save_reference(reference, str(snapshot), "bin")
    (tmp_path / "hub" / "models--zen-E--CODI-gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--zen-E--CODI-gpt2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_reference_checkpoint("zen-E/CODI-gpt2", tiny_gpt2, lora_alpha=LORA_ALPHA)
    assert model.conversion_report.source == [str(snapshot / "pytorch_model.bin")]


def test_hub_reference_is_fetched_by_download_repo_one_format_at_a_time(monkeypatch, tmp_path):
    """A hub id goes through `codi.io.hub.download_repo` (the package's one hub download), asking for
    the safetensors files first and for the `.bin` files only when the repository has no safetensors."""
    from codi.io import hub, reference_weights

    calls = []

    def download_repo(source, what, *, revision=None, allow_patterns=None):
        calls.append((source, what, revision, allow_patterns[0]))
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        if allow_patterns[0] in holds:
            (folder / allow_patterns[0]).write_bytes(b"")
        return str(folder)

    monkeypatch.setattr(hub, "download_repo", download_repo)
    holds = {"pytorch_model.bin"}
    files = reference_weights.resolve_checkpoint_files("zen-E/CODI-gpt2", revision="v1")
    assert files == [str(tmp_path / "1" / "pytorch_model.bin")]
    assert calls == [
        ("zen-E/CODI-gpt2", "reference checkpoint", "v1", "model.safetensors"),
        ("zen-E/CODI-gpt2", "reference checkpoint", "v1", "pytorch_model.bin"),
    ]
    calls.clear()
    holds = {"model.safetensors", "pytorch_model.bin"}
    assert reference_weights.resolve_checkpoint_files("zen-E/CODI-gpt2") == [
        str(tmp_path / "2" / "model.safetensors")
    ]
    assert len(calls) == 1
    holds = set()
    with pytest.raises(FileNotFoundError, match="zen-E/CODI-gpt2: the hub repository holds no reference"):
        reference_weights.resolve_checkpoint_files("zen-E/CODI-gpt2")


def test_ddp_and_coconut_prefixes_are_normalised(tiny_gpt2, tmp_path):
    reference = build_reference(tiny_gpt2)
    state = {
        "module." + key.replace("codi.", "coconut.", 1): value
        for key, value in reference.state_dict().items()
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_reference_checkpoint(str(tmp_path), tiny_gpt2, lora_alpha=LORA_ALPHA)
    assert sum("prefix" in note for note in model.conversion_report.notes) == 2
    assert model.conversion_report.unused_keys == []
    assert_same_outputs(model, reference, tiny_gpt2)


# --------------------------------------------------------------------------------------------------
# codi convert


def test_codi_convert_then_from_pretrained(tiny_llama, tmp_path):
    reference = build_reference(tiny_llama)
    save_reference(reference, str(tmp_path / "ref"), "safetensors")
    out = str(tmp_path / "converted")
    argv = ["convert", "--reference_checkpoint", str(tmp_path / "ref"), "--base_model", tiny_llama]
    assert cli.main([*argv, "--output_dir", out, "--lora_alpha", str(LORA_ALPHA)]) == 0
    assert os.path.isfile(os.path.join(out, "conversion_report.json"))
    assert_same_outputs(CODIModel.from_pretrained(out), reference, tiny_llama)


def test_convert_refuses_a_different_base_unless_merged(tiny_gpt2, tmp_path):
    """A LoRA checkpoint is rebuilt from --base_model: frozen weights that differ must not be lost."""
    reference = build_reference(tiny_gpt2)
    with torch.no_grad():  # as if trained from another base (Llama-3.2-1B vs -Instruct)
        reference.codi.base_model.model.transformer.h[0].mlp.c_fc.base_layer.weight.add_(0.5)
    path = save_reference(reference, str(tmp_path / "ref"), "bin")
    with pytest.raises(ValueError, match="frozen weight.* differ from the base model"):
        convert_reference_checkpoint(path, str(tmp_path / "out"), tiny_gpt2, lora_alpha=LORA_ALPHA)
    report = convert_reference_checkpoint(
        path, str(tmp_path / "merged"), tiny_gpt2, merge=True, lora_alpha=LORA_ALPHA
    )
    assert report.base_mismatch == ["base_model.model.transformer.h.0.mlp.c_fc.base_layer.weight"]
    # Full weights: the frozen weights travel with the checkpoint instead of coming from the base.
    assert os.path.isfile(tmp_path / "merged" / "model.safetensors")
    merged = CODIModel.from_pretrained(str(tmp_path / "merged"))
    assert not merged.is_lora
    assert_same_outputs(merged, reference, tiny_gpt2)


@pytest.mark.skipif(
    importlib.util.find_spec("codi.inference.evaluate") is None,
    reason="codi.inference.evaluate not written yet",
)
def test_codi_eval_runs_on_a_converted_checkpoint(tiny_gpt2, tmp_path):
    reference = build_reference(tiny_gpt2)
    save_reference(reference, str(tmp_path / "ref"), "bin")
    out = str(tmp_path / "converted")
    argv = ["convert", "--reference_checkpoint", str(tmp_path / "ref"), "--base_model", tiny_gpt2]
    assert cli.main([*argv, "--output_dir", out]) == 0
    data = tmp_path / "test.txt"
    data.write_text("".join(f"{QUESTION}||<<12+30=42>> #### 42\n" for _ in range(6)))
    argv = ["eval", "--model", out, "--datasets", "gsm8k-aug", "--data_file", str(data), "--limit", "5"]
    argv += [
        "--max_new_tokens",
        "8",
        "--device",
        "cpu",
        "--no_progress",
        "--output_dir",
        str(tmp_path / "eval"),
    ]
    assert cli.main(argv) == 0
    assert os.listdir(tmp_path / "eval")  # results written
