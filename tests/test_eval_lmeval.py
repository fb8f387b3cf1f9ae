"""MMLU per-choice log-likelihoods equal lm-evaluation-harness's on a fixture: a tiny random-init Llama
(tests/fixtures/eval/tiny_llama, float32) and five questions of two subjects, 5-shot (the default) and 0-shot.
The reference figures were recorded by lm_eval itself (tests/fixtures/eval/make_lmeval_fixture.py record; the
version and command are in lmeval_mmlu.json); lm_eval is not needed here."""
import json
import os

import pytest

from helpers import ROOT
from semalign_ds.evaluation import runner, tasks

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "eval")
TOLERANCE = 1e-4  # absolute, in nats: both sides run the model in float32 (ours takes log_softmax in float64)


@pytest.fixture(scope="module")
def tiny_llama():
    from semalign_ds.models import load_model, load_tokenizer
    path = os.path.join(FIXTURE, "tiny_llama")
    return load_model(path, dtype="float32"), runner.prepare_tokenizer(load_tokenizer(path))


@pytest.mark.parametrize("shots", [5, 0])
def test_mmlu_loglikelihoods_equal_lm_eval(tiny_llama, shots):
    with open(os.path.join(FIXTURE, "lmeval_mmlu.json")) as f:
        recorded = json.load(f)["runs"][str(shots)]["per_question"]
    rows = tasks.load_benchmark("mmlu", os.path.join(FIXTURE, "mmlu_test.jsonl"), num_fewshot=shots,
                                fewshot_path=os.path.join(FIXTURE, "mmlu_dev.jsonl"))
    model, tokenizer = tiny_llama
    result = runner.evaluate_mmlu(model, tokenizer, rows, batch_size=3, show=False)
    seen = {}
    for row, r in zip(rows, result["per_example"]):
        index = sum(1 for s in rows[:r["index"]] if s["subject"] == row["subject"])  # lm-eval's doc_id
        want = recorded[f"{row['subject']}/{index}"]
        assert row["context"] == want["context"]  # the same prompt, few-shot examples included
        assert r["loglikelihoods"] == pytest.approx(want["loglikelihoods"], abs=TOLERANCE)
        seen[f"{row['subject']}/{index}"] = True
    assert len(seen) == len(recorded) == 5
    # the figures differ between choices by far more than the tolerance: the comparison can fail
    spread = [max(w["loglikelihoods"]) - min(w["loglikelihoods"]) for w in recorded.values()]
    assert min(spread) > 100 * TOLERANCE
