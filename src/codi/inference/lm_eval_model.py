"""A CODI model for lm-evaluation-harness: `codi lm-eval --model codi --model_args pretrained=DIR,...`.

lm-eval (0.4.x) finds models only in its registry, which it fills from its own `lm_eval.models`; it
has no entry-point or `--include_path` hook for models. Importing this module registers `codi` with
`@register_model`, so either

    codi lm-eval --model codi --model_args pretrained=DIR,mode=latent --tasks ... (this package's wrapper
        of lm-eval's own command line: same flags, the model registered first), or
    import codi.inference.lm_eval_model; lm_eval.simple_evaluate(model="codi", model_args="pretrained=DIR", ...)

model_args: pretrained (checkpoint folder or hub id, required; loaded with `codi.load`), mode (latent | cot), base_model (LoRA base if
moved), num_latent (default: the checkpoint's), max_new_tokens (256; lm-eval's own name max_gen_toks is
accepted too; a task's `max_gen_toks` wins for its requests), dtype, device, batch_size (wins over lm-eval's `--batch_size`),
feed_answer_prompt. `generate_until` requests are answered with
`codi.inference.generate.generate` (contexts normalised as `codi eval` does, so the same question gets the same
answer), then cut at the request's `until` strings. Log-likelihood requests are refused: a CODI
model's answer distribution only exists after its latent thoughts, which multiple-choice scoring skips.

`task_config(data_file)` is a generate_until task over a GSM8k-style JSONL (question, answer "... ####
N"), scored like `codi eval` (last number in the text), for `--include_path`.
"""

from __future__ import annotations

import logging
import os
import sys

import yaml

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # an optional extra
    raise ImportError(
        "codi lm-eval needs lm-evaluation-harness: pip install 'codi-latent[lm_eval]'"
    ) from error

from ..data.eval_data import normalize_question

logger = logging.getLogger(__name__)


DEFAULT_MAX_NEW_TOKENS = 256


def _generation_length(max_new_tokens, max_gen_toks) -> int:
    """The default answer length: `max_new_tokens` (the name every `codi` command uses) or lm-eval's own
    `max_gen_toks`; both given must agree."""
    given = {
        name: int(value)
        for name, value in (("max_new_tokens", max_new_tokens), ("max_gen_toks", max_gen_toks))
        if value is not None
    }
    if len(set(given.values())) > 1:
        raise ValueError(
            f"codi: model_args max_new_tokens={given['max_new_tokens']} and max_gen_toks={given['max_gen_toks']} "
            "disagree: they are one setting, give one"
        )
    length = next(iter(given.values()), DEFAULT_MAX_NEW_TOKENS)
    if length < 1:
        raise ValueError(f"codi: model_args max_new_tokens must be >= 1, got {length}")
    return length


@register_model("codi")
class CODILM(LM):
    """lm-eval's view of a `CODIModel`: generation only (latent or explicit-CoT decoding)."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> CODILM:
        # lm-eval passes its own --batch_size (default 1) beside model_args: a batch_size in model_args
        # would be a duplicate keyword. The model's own arguments are the more specific: they win.
        return super().create_from_arg_obj(arg_dict, without_keys(additional_config, arg_dict))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> CODILM:
        from lm_eval.utils import simple_parse_args_string

        given = simple_parse_args_string(arg_string)
        return super().create_from_arg_string(arg_string, without_keys(additional_config, given))

    def __init__(
        self,
        pretrained: str | None = None,
        mode: str = "latent",
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        device: str | None = None,
        base_model: str | None = None,
        dtype: str | None = None,
        num_latent: int | None = None,
        max_new_tokens: int | None = None,
        feed_answer_prompt: bool = False,
        max_gen_toks: int | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ValueError(
                f"codi: unknown model_args {sorted(unknown)}; see `codi.inference.lm_eval_model`"
            )
        if not pretrained:
            raise ValueError("codi: model_args needs pretrained=DIR (a CODI checkpoint folder)")
        if mode not in ("latent", "cot"):
            raise ValueError(f"codi: model_args mode must be latent or cot, got {mode!r}")
        import torch

        from ..io.loader import load

        self.mode = mode
        # "auto" (lm-eval's batch-size search) has no meaning here: generation is already batched.
        self.batch_size = batch_size_value(batch_size)
        self.num_latent = num_latent
        self.max_gen_toks = _generation_length(max_new_tokens, max_gen_toks)
        self.feed_answer_prompt = bool(feed_answer_prompt)
        self.model = load(str(pretrained), base_model, dtype=dtype)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda by default: fall back as its own HF model does
            if device is not None:
                logger.warning("codi: device %s is not available, using the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device)
        self.model.eval()

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.model.tokenizer.name_or_path.replace("/", "__")

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "codi: loglikelihood is not supported: a CODI model answers after its latent thoughts; "
            "use generate_until tasks (e.g. `codi.inference.lm_eval_model.task_config`)"
        )

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError(
            "codi: loglikelihood_rolling (perplexity) is not supported; use generate_until"
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Answer each (context, gen_kwargs) request; requests with the same settings share batches."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            setting = self._settings(dict(gen_kwargs or {}))
            settings.append(setting)
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in setting.items()))
            groups.setdefault(key, []).append(index)
        answers: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            setting = dict(settings[indices[0]])
            until = setting.pop("until")
            questions = [normalize_question(requests[index].args[0]) for index in indices]
            outputs = self.model.generate(
                questions, mode=self.mode, batch_size=self.batch_size, progress=not disable_tqdm, **setting
            )
            for index, output in zip(indices, outputs):
                answers[index] = cut_at(output.text, until)
                self.cache_hook.add_partial("generate_until", requests[index].args, answers[index])
        return answers  # type: ignore[return-value]

    def _settings(self, gen_kwargs: dict) -> dict:
        """`codi.inference.generate.generate` keyword arguments (plus `until`) from lm-eval's gen_kwargs."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) and temperature > 0  # lm-eval: 0 means greedy
        setting = dict(until=until, max_new_tokens=max_new_tokens, num_latent=self.num_latent)
        if do_sample:
            setting.update(do_sample=True, temperature=temperature, top_p=float(gen_kwargs.pop("top_p", 1.0)))
            setting["top_k"] = int(gen_kwargs.pop("top_k", 0))
        if self.feed_answer_prompt and self.mode == "latent":
            setting["feed_answer_prompt"] = True
        ignored = sorted(set(gen_kwargs) - {"top_p", "top_k"})
        if ignored:
            logger.warning("codi: generation arguments ignored: %s", ignored)
        return setting


def without_keys(config: dict | None, given: dict) -> dict:
    """`config` less the keys the model arguments already set."""
    return {key: value for key, value in (config or {}).items() if key not in given}


def batch_size_value(value: int | str) -> int:
    """A positive integer; lm-eval's `auto` / `auto:N` (a batch-size search) is 16: generation is
    already batched and length-sorted."""
    text = str(value).strip()
    if text == "auto" or text.startswith("auto:"):
        return 16
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"codi: batch_size must be a positive integer (or auto), got {value!r}")
    return int(text)


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string (lm-eval's `until`)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def task_config(data_file: str, name: str = "codi_gsm8k", max_gen_toks: int = 256) -> dict:
    """An lm-eval task over a GSM8k-style JSONL (question, answer "... #### N") for CODI models.

    The prompt is the bare question (what CODI is trained on); the score is exact match between the
    gold number and the LAST number of the answer (commas removed), as `codi eval`'s reference score.
    """
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer.split('####')[-1].strip() | replace(',', '')}}",
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_gen_toks},
        "filter_list": [
            {
                "name": "last-number",
                "filter": [
                    {"function": "regex", "regex_pattern": r"-?\d[\d,]*\.?\d*", "group_select": -1},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                # "1,200." and "18.0" score as 1200 and 18, as `codi eval`'s float comparison does
                "regexes_to_ignore": [",", r"\.0*$"],
            }
        ],
        "metadata": {"version": 1.0},
    }


def write_task_yaml(directory: str, data_file: str, name: str = "codi_gsm8k", **kwargs) -> str:
    """Write `task_config(...)` as `{directory}/{name}.yaml` (a folder for `--include_path`)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(task_config(data_file, name, **kwargs), handle, sort_keys=False)
    return path


def run_lm_eval_cli(argv: list[str]) -> int:
    """lm-eval's command line (same flags) with the `codi` model registered (`codi lm-eval`)."""
    from lm_eval.__main__ import cli_evaluate

    from ..io import hub

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except (ConnectionError, FileNotFoundError) as error:  # a task's hub dataset, offline and not cached
        reason = hub.offline_reason()
        if reason is None:
            raise
        raise hub.OfflineError(
            f"{str(error).splitlines()[0]}: {reason}, and lm-eval's task data is not in the HF cache; "
            "run where the hub is reachable once, or use a task over local files (--include_path)"
        ) from error
    finally:
        sys.argv = saved
    return 0
