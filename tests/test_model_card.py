"""Model cards: README.md with the Hub's YAML metadata, written beside a saved checkpoint."""

from __future__ import annotations

import pytest

from codi.model import CODIModel
from codi.model_card import (
    add_eval_results,
    model_card_info,
    read_card_info,
    read_front_matter,
    render_model_card,
    write_model_card,
)

GSM8K_RESULT = {"dataset": "gsm8k", "mode": "latent", "n": 1319, "accuracy": 43.7, "strict_accuracy": 43.1}


def test_card_of_a_saved_lora_checkpoint(make_model, tmp_path):
    model = make_model()
    model.training_method = "codi"
    model.save_pretrained(str(tmp_path))  # peft writes its own template README.md: ours replaces it
    loaded = CODIModel.from_pretrained(str(tmp_path))
    info = model_card_info(
        loaded, datasets=["zen-E/GSM8k-Aug", "/local/train.txt"], eval_results=[GSM8K_RESULT]
    )
    path = write_model_card(str(tmp_path), info)
    meta = read_front_matter(path)
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"codi", "latent-reasoning", "lora"} <= set(meta["tags"])
    assert meta["datasets"] == ["zen-E/GSM8k-Aug"]  # a local path is no Hub dataset
    assert "base_model" not in meta  # the tiny base model is a local folder, not a Hub id
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert result["dataset"]["type"] == "gsm8k" and result["dataset"]["split"] == "test"
    assert result["metrics"][0] == {
        "type": "accuracy",
        "value": 43.7,
        "name": "accuracy (latent decoding, n=1319)",
    }
    body = open(path, encoding="utf-8").read()
    assert "CODIModel.from_pretrained" in body and "codi eval" in body
    assert "| gsm8k | latent | 1319 | 43.70 | 43.10 |" in body
    assert info["num_latent"] == 3 and info["use_lora"] and info["method"] == "codi"
    CODIModel.from_pretrained(str(tmp_path))  # the card does not disturb loading


def test_hub_base_model_and_baseline_method(make_model):
    model = make_model(use_lora=False, method="cot_sft")
    info = model_card_info(model)
    info["base_model"] = "openai-community/gpt2"
    text = render_model_card(info)
    import yaml

    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "openai-community/gpt2"
    assert meta["library_name"] == "transformers"
    assert "cot-sft" in meta["tags"] and "model-index" not in meta
    assert "distill_loss_factor" not in info  # CODI's loss weights are not shown for a baseline


def test_result_without_accuracy_is_rejected(make_model):
    with pytest.raises(ValueError, match="accuracy"):
        model_card_info(make_model(), eval_results=[{"dataset": "gsm8k"}])


def test_file_without_front_matter_is_a_clear_error(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# no metadata\n")
    with pytest.raises(ValueError, match="no YAML front matter"):
        read_front_matter(str(path))


def test_eval_results_are_added_to_an_existing_card(make_model, tmp_path):
    model = make_model()
    model.training_data = ["zen-E/GSM8k-Aug"]
    model.args.answer_prompt = "Answer -->"  # a value that could end the HTML comment holding the info
    write_model_card(str(tmp_path), model_card_info(model))
    assert "model-index" not in read_front_matter(str(tmp_path / "README.md"))
    add_eval_results(str(tmp_path), [GSM8K_RESULT, {**GSM8K_RESULT, "mode": "cot", "accuracy": 50.0}])
    add_eval_results(
        str(tmp_path), [{**GSM8K_RESULT, "accuracy": 45.0}, {"dataset": "svamp", "accuracy": 40.0}]
    )
    meta = read_front_matter(str(tmp_path / "README.md"))
    values = [
        (r["dataset"]["name"], r["metrics"][0]["name"], r["metrics"][0]["value"])
        for r in meta["model-index"][0]["results"]
    ]
    assert values == [
        ("gsm8k", "accuracy (cot decoding, n=1319)", 50.0),
        ("gsm8k", "accuracy (latent decoding, n=1319)", 45.0),
        ("svamp", "accuracy (latent decoding)", 40.0),
    ]
    assert meta["datasets"] == ["zen-E/GSM8k-Aug"]
    assert read_card_info(str(tmp_path / "README.md"))["answer_prompt"] == "Answer -->"
