"""Model cards: the README.md of a saved checkpoint, a `huggingface_hub.ModelCard`.

    card = build_model_card(model_card_info(model, datasets=["zen-E/GSM8k-Aug"]))
    write_model_card(output_dir, card)                # what `save_pretrained` does
    add_eval_results(output_dir, summary["results"])  # what `codi eval` does: results as `EvalResult`s

The metadata is `ModelCardData`: `base_model` (only when it is a Hub id, not a local path),
`library_name` (`peft` for a LoRA checkpoint, whose folder is a valid PEFT adapter, else
`transformers`), `tags`, `datasets`, `pipeline_tag` and, when evaluation results are known, one
`EvalResult` per dataset and decoding mode (the `model-index`). The body says how to load and evaluate
the checkpoint with this package: the folder is not a plain `transformers`/`peft` model (the projection
and the special tokens live in `codi_extra.safetensors` and `codi_config.json`).

A card this package writes ends with a marker line holding its info; a README.md without it is the
user's: it is never replaced (nor updated by peft), and the card goes to MODEL_CARD.md beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .hub import is_hub_id

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
OWN_CARD_NAME = "MODEL_CARD.md"  # where the card goes when README.md is the user's own
# The card's info, kept as JSON in an HTML comment (invisible on the Hub) so that results can be added;
# it also marks the card as ours.
_INFO_MARK = "<!-- codi-card-info: "
METHOD_NAMES = {
    "codi": "CODI (continuous chain-of-thought via self-distillation)",
    "cot_sft": "CoT-SFT baseline (fine-tuned on question + chain of thought + answer)",
    "no_cot_sft": "No-CoT-SFT baseline (fine-tuned on question + answer)",
}


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
    eval_results: `codi.inference.evaluate.evaluate` result dicts (`dataset`, `mode`, `n`, `accuracy`, ...).
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


def card_data(info: dict) -> ModelCardData:
    """The card's metadata (the Hub's model card schema); evaluation results as `EvalResult`s."""
    method = info.get("method", "codi")
    tags = ["codi", "latent-reasoning", method.replace("_", "-")]
    if info.get("use_lora"):
        tags.append("lora")
    results = [eval_result(result) for result in info.get("eval_results", [])]
    return ModelCardData(
        base_model=info["base_model"] if is_hub_id(info.get("base_model")) else None,
        library_name="peft" if info.get("use_lora") else "transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        datasets=[name for name in info.get("datasets", []) if is_hub_id(name)] or None,
        model_name=(info.get("name") or "codi-model") if results else None,
        eval_results=results or None,
    )


def front_matter(info: dict) -> dict:
    """The card's YAML metadata as a dict."""
    return card_data(info).to_dict()


def eval_result(result: dict) -> EvalResult:
    """One `codi eval` result as an `EvalResult`: the benchmark (its Hub id when known), accuracy in %;
    the decoding mode is in the metric's name (both modes of one set share the set's model-index entry)."""
    from ..data.eval_data import EVAL_SETS

    spec = EVAL_SETS.get(result["dataset"])
    mode = result.get("mode", "latent")
    return EvalResult(
        task_type="text-generation",
        task_name="Math word problems",
        dataset_type=spec.hub_id if spec else result["dataset"],
        dataset_name=result["dataset"],
        dataset_config=spec.hub_config if spec else None,
        dataset_split="+".join(spec.hub_splits) if spec else None,
        metric_type="accuracy",
        metric_value=round(float(result["accuracy"]), 2),
        metric_name=f"accuracy ({mode} decoding" + (f", n={result['n']})" if "n" in result else ")"),
    )


def build_model_card(info: dict) -> ModelCard:
    """The `ModelCard` of `info` (see `model_card_info`): metadata, a short body and the info marker."""
    return ModelCard(f"---\n{card_data(info).to_yaml()}\n---\n\n{_body(info)}")


def render_model_card(info: dict) -> str:
    """README.md text: YAML front matter and a short body."""
    return str(build_model_card(info))


def _body(info: dict) -> str:
    method = info.get("method", "codi")
    title = info.get("name") or f"{METHOD_NAMES.get(method, method).split(' (')[0]} model"
    lines = [f"# {title}", ""]
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
    lines += ["", "## Use", "", "```python", "import codi", ""]
    lines += [
        'model = codi.load("PATH_OR_HUB_ID")  # the class the checkpoint needs, e.g. CODIModel.from_pretrained'
    ]
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


@contextlib.contextmanager
def keep_foreign_readme(output_dir: str) -> Iterator[str]:
    """Around a save into `output_dir`: yields the file name the card goes to (README.md, or
    MODEL_CARD.md when the folder holds a README.md this package did not write), and puts that README
    back byte for byte afterwards (peft's saving adds its own metadata to any README.md it finds)."""
    readme = os.path.join(output_dir, CARD_NAME)
    if not os.path.isfile(readme) or is_codi_card(readme):
        yield CARD_NAME
        return
    with open(readme, "rb") as handle:
        original = handle.read()
    logger.warning(
        "%s: not a card written by codi: kept as it is; the model card is written to %s",
        readme, os.path.join(output_dir, OWN_CARD_NAME),
    )  # fmt: skip
    try:
        yield OWN_CARD_NAME
    finally:
        with open(readme, "wb") as handle:
            handle.write(original)


def is_codi_card(path: str) -> bool:
    """Whether the file at `path` is a card this package wrote (it carries the info marker)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return _INFO_MARK in handle.read()


def card_file(output_dir: str) -> str:
    """The path of this package's card in a checkpoint folder (README.md, or MODEL_CARD.md beside a
    README.md of the user's own)."""
    readme = os.path.join(output_dir, CARD_NAME)
    if os.path.isfile(readme) and not is_codi_card(readme):
        return os.path.join(output_dir, OWN_CARD_NAME)
    return readme


def write_model_card(output_dir: str, card: ModelCard | dict, name: str | None = None) -> str:
    """Write the card (a `ModelCard`, or the info of `model_card_info`) as `{output_dir}/{name}`;
    default `card_file(output_dir)` (never over a README.md that is not ours). Returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name) if name else card_file(output_dir)
    card = build_model_card(card) if isinstance(card, dict) else card
    card.save(path)
    return path


def add_eval_results(output_dir: str, results: Sequence[dict]) -> str:
    """Add `codi eval` results to the card in `output_dir` as `EvalResult`s (one per dataset and mode:
    a new result replaces an older one) and rewrite it; returns its path."""
    path = card_file(output_dir)
    info = read_card_info(path)
    new = [_result_summary(result) for result in results]
    replaced = {(result["dataset"], result.get("mode")) for result in new}
    kept = [old for old in info.get("eval_results", []) if (old["dataset"], old.get("mode")) not in replaced]
    info["eval_results"] = kept + new
    return write_model_card(output_dir, info, os.path.basename(path))


def record_eval_results(checkpoint: str, results: Sequence[dict]) -> str | None:
    """`codi eval`'s step after evaluating: its accuracies into the card of the checkpoint folder (not
    a hub id's cached copy, nor a folder without a card of ours); returns the card's path, or None
    (with the reason logged): a card that cannot be written does not fail the evaluation."""
    scored = [result for result in results if "accuracy" in result]
    path = card_file(checkpoint) if os.path.isdir(checkpoint) else None
    if not scored or path is None or not os.path.isfile(path) or not is_codi_card(path):
        logger.info("%s: no model card of codi's to add the results to", checkpoint)
        return None
    try:
        written = add_eval_results(checkpoint, scored)
    except (OSError, ValueError) as error:
        logger.warning("%s: evaluation results not added to the model card (%s)", path, error)
        return None
    logger.info("results added to the model card %s", written)
    return written


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
    if text.find("\n---", 4) < 0:
        raise ValueError(f"{path}: YAML front matter is not closed by a '---' line")
    return ModelCard(text).data.to_dict()
