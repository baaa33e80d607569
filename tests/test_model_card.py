"""Model cards: README.md with the Hub's YAML metadata, written beside a saved checkpoint."""

from __future__ import annotations

import pytest

from codi.io.model_card import (
    add_eval_results,
    model_card_info,
    read_card_info,
    read_front_matter,
    render_model_card,
    write_model_card,
)
from codi.model import CODIModel

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
    # one model-index entry per dataset (huggingface_hub's EvalResult grouping), one metric per mode
    values = [
        (r["dataset"]["name"], metric["name"], metric["value"])
        for r in meta["model-index"][0]["results"]
        for metric in r["metrics"]
    ]
    assert values == [
        ("gsm8k", "accuracy (cot decoding, n=1319)", 50.0),
        ("gsm8k", "accuracy (latent decoding, n=1319)", 45.0),
        ("svamp", "accuracy (latent decoding)", 40.0),
    ]
    assert meta["datasets"] == ["zen-E/GSM8k-Aug"]
    assert read_card_info(str(tmp_path / "README.md"))["answer_prompt"] == "Answer -->"


def test_a_users_readme_is_never_replaced(make_model, tmp_path, caplog):
    """A README.md in the output folder that codi did not write survives saving byte for byte (peft's
    own card update included); the card goes to MODEL_CARD.md beside it, and is said so."""
    from codi.io.model_card import OWN_CARD_NAME, card_file

    mine = "# My experiment\n\nNotes that must survive.\n"
    (tmp_path / "README.md").write_text(mine)
    model = make_model()
    with caplog.at_level("WARNING", logger="codi.io.model_card"):
        model.save_pretrained(str(tmp_path))
    assert (tmp_path / "README.md").read_text() == mine
    assert "not a card written by codi: kept" in caplog.text and OWN_CARD_NAME in caplog.text
    assert card_file(str(tmp_path)) == str(tmp_path / OWN_CARD_NAME)
    assert read_card_info(str(tmp_path / OWN_CARD_NAME))["method"] == "codi"
    model.save_pretrained(str(tmp_path))  # again: still the user's file
    add_eval_results(str(tmp_path), [GSM8K_RESULT])
    assert (tmp_path / "README.md").read_text() == mine
    assert read_front_matter(str(tmp_path / OWN_CARD_NAME))["model-index"]
    CODIModel.from_pretrained(str(tmp_path))
    # a card codi wrote is ours to replace
    other = tmp_path / "other"
    model.save_pretrained(str(other))
    model.save_pretrained(str(other))
    assert not (other / OWN_CARD_NAME).exists() and "codi-card-info" in (other / "README.md").read_text()


def test_codi_eval_writes_its_results_into_the_card_as_eval_results(make_model, tmp_path):
    import json

    from huggingface_hub import ModelCard

    from codi import cli

    checkpoint = tmp_path / "ckpt"
    make_model(method="cot_sft").save_pretrained(str(checkpoint))
    assert ModelCard.load(checkpoint / "README.md").data.eval_results is None
    data = tmp_path / "gsm8k_test.jsonl"
    rows = [{"question": "Tom has 12 apples and buys 30 more.", "answer": "#### 42"}] * 3
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["eval", "--model", str(checkpoint), "--datasets", "gsm8k", "--data_file", str(data)]
    argv += ["--max_new_tokens", "4", "--output_dir", str(tmp_path / "out"), "--no_progress"]
    assert cli.main(argv + ["--compare_cot"]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    results = ModelCard.load(checkpoint / "README.md").data.eval_results
    assert [(r.dataset_name, r.metric_name, r.metric_value) for r in results] == [
        ("gsm8k", f"accuracy ({r['mode']} decoding, n=3)", round(r["accuracy"], 2))
        for r in summary["results"]
    ]
    assert all(r.metric_type == "accuracy" and r.dataset_split == "test" for r in results)
    CODIModel.from_pretrained(str(checkpoint))
