"""lm-evaluation-harness with `--model codi`: offline, a local GSM8k task, the same answers as `codi eval`."""

from __future__ import annotations

import json
import os

import pytest
from conftest import shared_file

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[lm_eval]')")

from codi.data.eval_data import load_eval_set  # noqa: E402
from codi.inference.evaluate import evaluate  # noqa: E402
from codi.inference.lm_eval_model import CODILM, cut_at, write_task_yaml  # noqa: E402

LIMIT, MAX_NEW_TOKENS = 5, 12


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_gpt2):
    """A tiny CODI checkpoint and a task folder over the first GSM8k test questions."""
    from codi.config import CODIModelArguments
    from codi.model import CODIModel

    data = shared_file("gsm8k_test.jsonl")
    root = tmp_path_factory.mktemp("lm_eval")
    args = CODIModelArguments(model_name_or_path=tiny_gpt2, lora_r=8, lora_alpha=16, prj_dim=16, num_latent=3)
    CODIModel.from_base(args).save_pretrained(str(root / "model"))
    write_task_yaml(str(root / "tasks"), str(data), max_gen_toks=MAX_NEW_TOKENS)
    return root, data


def codi_eval_texts(root, data, mode: str) -> list[str]:
    from codi.model import CODIModel

    model = CODIModel.from_pretrained(str(root / "model"))
    items = load_eval_set("gsm8k", str(data), LIMIT)
    out = root / f"codi_eval_{mode}"
    evaluate(
        model, items, mode, batch_size=32, name="gsm8k", max_new_tokens=MAX_NEW_TOKENS, output_dir=str(out)
    )
    with open(out / f"gsm8k_{mode}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["generated_text"] for line in handle]


def test_simple_evaluate_equals_codi_eval(saved):
    import lm_eval
    from lm_eval.tasks import TaskManager

    root, data = saved
    results = lm_eval.simple_evaluate(
        model="codi",
        model_args=f"pretrained={root / 'model'},mode=latent",
        tasks=["codi_gsm8k"],
        # without lm-eval's own ~10k task files to index (6 s); the CLI test below does include them
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
        limit=LIMIT,
        batch_size=2,  # other batches than codi eval's: padding must not change the answers
        log_samples=True,
    )
    samples = sorted(results["samples"]["codi_gsm8k"], key=lambda sample: sample["doc_id"])
    texts = codi_eval_texts(root, data, "latent")
    assert len(texts) == LIMIT and any(text.strip() for text in texts)
    assert [sample["resps"][0][0] for sample in samples] == texts
    assert "exact_match,last-number" in results["results"]["codi_gsm8k"]


@pytest.mark.slow  # ~10 s: lm-eval's command line indexes its own ~10k task files first
def test_command_line_in_cot_mode_equals_codi_eval(saved, tmp_path):
    from codi.cli import main

    root, data = saved
    argv = ["lm-eval", "run", "--model", "codi", "--model_args", f"pretrained={root / 'model'},mode=cot"]
    argv += ["--tasks", "codi_gsm8k", "--include_path", str(root / "tasks"), "--limit", str(LIMIT)]
    argv += ["--output_path", str(tmp_path), "--log_samples"]
    assert main(argv) == 0
    (path,) = [
        os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if f.startswith("samples_")
    ]
    with open(path, encoding="utf-8") as handle:
        samples = sorted((json.loads(line) for line in handle), key=lambda sample: sample["doc_id"])
    assert [sample["resps"][0][0] for sample in samples] == codi_eval_texts(root, data, "cot")


def test_loglikelihood_is_refused_and_bad_args_named(saved):
    root, _ = saved
    with pytest.raises(ValueError, match="unknown model_args \\['temprature'\\]"):
        CODILM(pretrained=str(root / "model"), temprature=0.5)
    with pytest.raises(ValueError, match="mode must be latent or cot"):
        CODILM(pretrained=str(root / "model"), mode="greedy")
    with pytest.raises(NotImplementedError, match="generate_until"):
        CODILM(pretrained=str(root / "model")).loglikelihood([])


def test_max_new_tokens_model_arg_sets_the_answer_length(saved):
    """`--model_args pretrained=DIR,max_new_tokens=N` (the name `codi lm-eval --help` advertises) is the
    default answer length; lm-eval's own `max_gen_toks` is accepted too, and both must agree."""
    from lm_eval.api.instance import Instance

    from codi.io.loader import load as load_checkpoint

    root, _ = saved
    lm = CODILM.create_from_arg_string(f"pretrained={root / 'model'},mode=cot,max_new_tokens=3")
    assert lm.max_gen_toks == 3
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    request = Instance("generate_until", {}, (question, {"until": []}), 0)
    expected = load_checkpoint(str(root / "model")).generate([question], mode="cot", max_new_tokens=3)
    assert lm.generate_until([request], disable_tqdm=True) == [expected[0].text]
    assert expected[0].num_generated_tokens <= 3
    assert CODILM(pretrained=str(root / "model"), max_gen_toks=5).max_gen_toks == 5
    with pytest.raises(ValueError, match="max_new_tokens=3 and max_gen_toks=5 disagree"):
        CODILM(pretrained=str(root / "model"), max_new_tokens=3, max_gen_toks=5)


def test_cut_at_stop_strings():
    assert cut_at("a b\n\nc", ["\n\n"]) == "a b"
    assert cut_at("The answer is: 4 Question", ["Question", "Q:"]) == "The answer is: 4 "
    assert cut_at("no stop", []) == "no stop"
