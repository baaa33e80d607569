"""Model cards: the README.md of a saved checkpoint, with the Hub's YAML metadata.

    info = model_card_info(model, datasets=["zen-E/GSM8k-Aug"], eval_results=[result_of_codi_eval])
    write_model_card(output_dir, info)

The front matter follows the Hub's model card metadata: `base_model` (only when it is a Hub id, not a
local path), `library_name` (`peft` for a LoRA checkpoint, whose folder is a valid PEFT adapter, else
`transformers`), `tags`, `datasets`, `pipeline_tag` and, when evaluation results are known,
`model-index`. The body says how to load and evaluate the checkpoint with this package: the
folder is not a plain `transformers`/`peft` model (the projection and the special tokens live in
`codi_extra.safetensors` and `codi_config.json`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import yaml

CARD_NAME = "README.md"
# The card's info, kept as JSON in an HTML comment (invisible on the Hub) so that results can be added.
_INFO_MARK = "<!-- codi-card-info: "
METHOD_NAMES = {
    "codi": "CODI (continuous chain-of-thought via self-distillation)",
    "cot_sft": "CoT-SFT baseline (fine-tuned on question + chain of thought + answer)",
    "no_cot_sft": "No-CoT-SFT baseline (fine-tuned on question + answer)",
}
# A Hub repository id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repository id and is not an existing local path."""
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def model_card_info(
    model,
    *,
    method: str | None = None,
    datasets: Sequence[str] = (),
    eval_results: Sequence[dict] = (),
    name: str | None = None,
) -> dict:
    """What a card needs, read from a `CODIModel`.

    method: default the model's training objective (`model.objective.method`).
    datasets: training data names (Hub ids go to the metadata, any other name to the body only);
        default `model.training_data` when set.
    eval_results: `codi.evaluate.evaluate` result dicts (`dataset`, `mode`, `n`, `accuracy`, ...).
    """
    args = model.args
    objective = getattr(model, "objective", None)
    settings = getattr(objective, "loss", None)
    method = method or getattr(objective, "method", None) or "codi"
    info = {
        "name": name,
        "base_model": args.model_name_or_path,
        "method": method,
        "use_lora": bool(args.use_lora),
        "lora_r": args.lora_r if args.use_lora else None,
        "num_latent": args.num_latent,
        "use_prj": args.use_prj,
        "answer_prompt": args.answer_prompt,
        "model_type": getattr(model.hf_model.config, "model_type", None),
        "datasets": list(datasets or getattr(model, "training_data", None) or ()),
        "eval_results": [_result_summary(result) for result in eval_results],
    }
    if settings is not None and method == "codi":
        info["distill_loss_type"] = settings.distill_loss_type
        info["distill_loss_factor"] = settings.distill_loss_factor
        info["ref_loss_factor"] = settings.ref_loss_factor
        info["latent_step_loss_factor"] = settings.latent_step_loss_factor
    return info


def _result_summary(result: dict) -> dict:
    """The fields of a `codi eval` result that a card shows."""
    keys = ("dataset", "mode", "n", "accuracy", "strict_accuracy", "num_runs")
    missing = [key for key in ("dataset", "accuracy") if key not in result]
    if missing:
        raise ValueError(f"evaluation result lacks {missing}: {sorted(result)}")
    return {key: result[key] for key in keys if key in result}


def front_matter(info: dict) -> dict:
    """The card's YAML metadata (a dict in the Hub's model card schema)."""
    method = info.get("method", "codi")
    tags = ["codi", "latent-reasoning", method.replace("_", "-")]
    if info.get("use_lora"):
        tags.append("lora")
    meta: dict = {}
    if is_hub_id(info.get("base_model")):
        meta["base_model"] = info["base_model"]
    meta["library_name"] = "peft" if info.get("use_lora") else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(tags))
    hub_datasets = [name for name in info.get("datasets", []) if is_hub_id(name)]
    if hub_datasets:
        meta["datasets"] = hub_datasets
    results = [_model_index_result(result) for result in info.get("eval_results", [])]
    if results:
        meta["model-index"] = [{"name": info.get("name") or "codi-model", "results": results}]
    return meta


def _model_index_result(result: dict) -> dict:
    """One `model-index` entry: the benchmark (its Hub id when known) and the accuracy in %."""
    from .eval_data import EVAL_SETS

    spec = EVAL_SETS.get(result["dataset"])
    dataset = {"name": result["dataset"], "type": spec.hub_id if spec else result["dataset"]}
    if spec is not None:
        if spec.hub_config:
            dataset["config"] = spec.hub_config
        dataset["split"] = "+".join(spec.hub_splits)
    mode = result.get("mode", "latent")
    metric = {
        "type": "accuracy",
        "value": round(float(result["accuracy"]), 2),
        "name": f"accuracy ({mode} decoding" + (f", n={result['n']})" if "n" in result else ")"),
    }
    return {
        "task": {"type": "text-generation", "name": "Math word problems"},
        "dataset": dataset,
        "metrics": [metric],
    }


def render_model_card(info: dict) -> str:
    """README.md text: YAML front matter and a short body."""
    meta = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True)
    method = info.get("method", "codi")
    title = info.get("name") or f"{METHOD_NAMES.get(method, method).split(' (')[0]} model"
    lines = [f"---\n{meta}---", "", f"# {title}", ""]
    lines.append(f"Trained with **{METHOD_NAMES.get(method, method)}** using the `codi` package.")
    lines += ["", "| setting | value |", "| --- | --- |"]
    for key in ("base_model", "model_type", "use_lora", "lora_r", "num_latent",
                "use_prj", "distill_loss_type", "distill_loss_factor", "ref_loss_factor",
                "latent_step_loss_factor", "answer_prompt"):  # fmt: skip
        if info.get(key) is not None:
            lines.append(f"| {key} | `{info[key]}` |")
    if info.get("datasets"):
        lines.append(f"| training data | {', '.join(f'`{name}`' for name in info['datasets'])} |")
    if info.get("eval_results"):
        lines += [
            "",
            "## Evaluation",
            "",
            "| dataset | mode | n | accuracy % | strict % |",
            "| --- | --- | --- | --- | --- |",
        ]
        for result in info["eval_results"]:
            strict = result.get("strict_accuracy")
            lines.append(
                f"| {result['dataset']} | {result.get('mode', '')} | {result.get('n', '')} "
                f"| {result['accuracy']:.2f} | {'' if strict is None else f'{strict:.2f}'} |"
            )
    lines += ["", "## Use", "", "```python", "from codi.model import CODIModel", ""]
    lines += ['model = CODIModel.from_pretrained("PATH_OR_DOWNLOADED_FOLDER")']
    lines += [
        'print(model.generate(["Tom has 3 apples and buys 4 more. How many apples does he have?"])[0].text)'
    ]
    lines += [
        "```",
        "",
        "Evaluate (latent decoding; `--compare_cot` adds the explicit chain of thought):",
        "",
    ]
    lines += ["```bash", "codi eval --model PATH --datasets gsm8k,svamp,gsm-hard,multiarith", "```", ""]
    if info.get("use_lora"):
        lines += [
            "The folder holds a LoRA adapter for the base model plus `codi_extra.safetensors` (latent",
            "projection, added token rows) and `codi_config.json`: load it with `codi`, not `peft` alone.",
            "",
        ]
    # ">" escaped so that no value can close the comment early
    encoded = json.dumps(info, sort_keys=True).replace(">", "\\u003e")
    lines.append(f"{_INFO_MARK}{encoded} -->")
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: str, info: dict) -> str:
    """Write `{output_dir}/README.md` from `info` (see `model_card_info`); returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, CARD_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_model_card(info))
    return path


def add_eval_results(output_dir: str, results: Sequence[dict]) -> str:
    """Add `codi eval` results to the card in `output_dir` (one entry per dataset and mode: a new
    result replaces an older one) and rewrite it; returns its path."""
    path = os.path.join(output_dir, CARD_NAME)
    info = read_card_info(path)
    new = [_result_summary(result) for result in results]
    replaced = {(result["dataset"], result.get("mode")) for result in new}
    kept = [old for old in info.get("eval_results", []) if (old["dataset"], old.get("mode")) not in replaced]
    info["eval_results"] = kept + new
    return write_model_card(output_dir, info)


def read_card_info(path: str) -> dict:
    """The info a card was written from (see `write_model_card`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model card: {path}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    start = text.rfind(_INFO_MARK)
    if start < 0:
        raise ValueError(f"{path}: not a card written by codi (no '{_INFO_MARK.strip()}' line)")
    return json.loads(text[start + len(_INFO_MARK) : text.index(" -->", start)])


def read_front_matter(path: str) -> dict:
    """The YAML metadata of a card (the text between the first two `---` lines)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: no YAML front matter (the file does not start with '---')")
    end = text.find("\n---", 4)
    if end < 0:
        raise ValueError(f"{path}: YAML front matter is not closed by a '---' line")
    return yaml.safe_load(text[4:end]) or {}
