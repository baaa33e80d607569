"""Accuracy effect of `feed_answer_prompt` on a trained CODI checkpoint (e.g. the demo's).

Generates greedy latent answers to a test file twice, with the answer prompt decoded token by token
(the default) and fed in one forward after `<eot>` (`feed_answer_prompt=True`), interleaved, and
prints one JSON object: accuracy of both, how many outputs are identical, and the wall time.

    python bench/answer_prompt.py runs/demo-*/codi runs/demo-*/data/test.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from codi.inference.scoring import extract_answer, is_correct, parse_gold


def correct(text: str, gold: str) -> bool:
    """The scoring rule of `codi eval` (`codi.inference.scoring`): the reference's extraction, tolerant compare."""
    return is_correct(extract_answer(text), parse_gold(gold))


def main(argv: list[str] | None = None) -> int:
    from codi.data.dataset import answer_value, read_records
    from codi.model import CODIModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("test_file")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = CODIModel.from_pretrained(args.checkpoint)
    records = read_records(args.test_file)
    questions = [record.question for record in records]
    gold = [answer_value(record.answer) for record in records]
    outputs: dict[bool, list] = {}
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for round_index in range(args.repeats):
        for feed in (False, True) if round_index % 2 == 0 else (True, False):
            start = time.perf_counter()
            outputs[feed] = model.generate(
                questions,
                mode="latent",
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                feed_answer_prompt=feed,
            )
            seconds[feed].append(time.perf_counter() - start)
    plain, fed = outputs[False], outputs[True]
    result = {
        "bench": "answer_prompt",
        "checkpoint": args.checkpoint,
        "questions": len(questions),
        "accuracy_plain": sum(correct(o.text, g) for o, g in zip(plain, gold)) / len(gold),
        "accuracy_feed_answer_prompt": sum(correct(o.text, g) for o, g in zip(fed, gold)) / len(gold),
        "identical_token_ids": sum(a.token_ids == b.token_ids for a, b in zip(plain, fed)),
        "plain_outputs_starting_with_prompt": sum(o.text.startswith(model.args.answer_prompt) for o in plain),
        "seconds_plain_median": round(sorted(seconds[False])[len(seconds[False]) // 2], 3),
        "seconds_feed_median": round(sorted(seconds[True])[len(seconds[True]) // 2], 3),
        "batch_size": args.batch_size,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
