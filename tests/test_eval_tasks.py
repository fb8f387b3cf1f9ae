"""The benchmarks' protocols: exact prompts (with few-shot examples) for fixture rows, few-shot selection, stop
sequences, lm-eval's GSM8K extraction, and the pass@k estimator against brute-force enumeration."""
import itertools
import json
import random

import pytest

from semalign_ds.config import ConfigError
from semalign_ds.evaluation import tasks


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


MMLU_DEV = [
    {"question": "2 * 3 =", "subject": "elementary_mathematics", "choices": ["5", "6", "7", "8"], "answer": 1},
    {"question": "Which organ pumps blood?", "subject": "biology", "choices": ["Lung", "Heart", "Skin", "Eye"],
     "answer": 1},
    {"question": " 10 - 4 = ", "subject": "elementary_mathematics", "choices": ["6", "5", "4", "14"], "answer": "A"},
    {"question": "1 + 1 =", "subject": "elementary_mathematics", "choices": ["1", "3", "2", "0"], "answer": 2},
]
MMLU_TEST = {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"],
             "answer": 1}
GSM8K_TRAIN = [{"question": f"Q{k}: what is {k} + {k}?",
                "answer": f"{k} + {k} = <<{k}+{k}={2 * k}>>{2 * k}\n#### {2 * k}"} for k in range(1, 8)]
MBPP_PROMPT = [  # the prompt split (task ids 1-10), out of order on purpose
    {"task_id": tid, "text": f"Task {tid}.", "code": f"def f{tid}():\r\n  return {tid}",
     "test_list": [f"assert f{tid}() == {tid}", f"assert f{tid}() > 0", f"assert f{tid}() < 99"],
     "test_setup_code": "", "challenge_test_list": []} for tid in (1, 4, 3, 5, 2)]
MBPP_TEST = {"task_id": 11, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x",
             "test_list": ["assert square(3) == 9", "assert square(-2) == 4", "assert square(0) == 0"],
             "test_setup_code": "", "challenge_test_list": []}


def test_mmlu_prompts_zero_and_five_shot(tmp_path):
    test, dev = write_jsonl(tmp_path / "test.jsonl", [MMLU_TEST]), write_jsonl(tmp_path / "dev.jsonl", MMLU_DEV)
    head = "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    question = "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    assert tasks.load_benchmark("mmlu", test, num_fewshot=0)[0]["context"] == head + question
    # the first 3 dev examples of the same subject (biology skipped), each closed by its answer letter
    three = tasks.load_benchmark("mmlu", test, num_fewshot=3, fewshot_path=dev)[0]["context"]
    assert three == (head + "2 * 3 =\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer: B\n\n"
                     "10 - 4 =\nA. 6\nB. 5\nC. 4\nD. 14\nAnswer: A\n\n"
                     "1 + 1 =\nA. 1\nB. 3\nC. 2\nD. 0\nAnswer: C\n\n" + question)
    with pytest.raises(ConfigError, match=r"5-shot needs 5 few-shot examples of subject 'elementary_mathematics'"):
        tasks.load_benchmark("mmlu", test, fewshot_path=dev)  # the default is 5-shot
    with pytest.raises(ConfigError, match=r"'dev' split.*--fewshot-mmlu PATH.*--num-fewshot mmlu=0"):
        tasks.load_benchmark("mmlu", test)


def test_fewshot_split_of_a_datasets_folder(tmp_path):
    import datasets
    folder = str(tmp_path / "mmlu")
    datasets.DatasetDict({"test": datasets.Dataset.from_list([MMLU_TEST]),
                          "dev": datasets.Dataset.from_list([dict(r, answer=1) for r in MMLU_DEV] * 2)}
                         ).save_to_disk(folder)
    context = tasks.load_benchmark("mmlu", folder)[0]["context"]
    assert context.count("Answer: B\n\n") == 5 and context.endswith("D. 22\nAnswer:")
    assert "Which organ" not in context


def test_gsm8k_prompts(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", [GSM8K_TRAIN[6]])
    train = write_jsonl(tmp_path / "train.jsonl", GSM8K_TRAIN)
    five = tasks.load_benchmark("gsm8k", test, fewshot_path=train)[0]
    shots = "".join(f"Question: Q{k}: what is {k} + {k}?\nAnswer: {k} + {k} = <<{k}+{k}={2 * k}>>{2 * k}\n"
                    f"#### {2 * k}\n\n" for k in range(1, 6))
    assert five["context"] == shots + "Question: Q7: what is 7 + 7?\nAnswer:"
    assert five["target"] == "14"
    cot = tasks.load_benchmark("gsm8k", test, variant="cot-zeroshot")[0]["context"]
    assert cot == "Q: Q7: what is 7 + 7?\nA: Let's think step by step."
    assert tasks.stop_sequences("gsm8k") == ("Question:", "</s>", "<|im_end|>")
    assert tasks.stop_sequences("gsm8k", "cot-zeroshot") == ("Q:", "</s>", "<|im_end|>")
    with pytest.raises(ConfigError, match="unknown variant 'cot'"):
        tasks.load_benchmark("gsm8k", test, variant="cot")


def test_mbpp_prompts_take_tasks_2_3_4(tmp_path):
    test, prompt = write_jsonl(tmp_path / "t.jsonl", [MBPP_TEST]), write_jsonl(tmp_path / "p.jsonl", MBPP_PROMPT)

    def block(tid):
        return (f"You are an expert Python programmer, and here is your task: Task {tid}. Your code should pass "
                f"these tests:\n\nassert f{tid}() == {tid}\nassert f{tid}() > 0\nassert f{tid}() < 99\n[BEGIN]\n"
                f"def f{tid}():\r\n  return {tid}\n[DONE]\n\n")
    question = ("You are an expert Python programmer, and here is your task: Write a function to square a number. "
                "Your code should pass these tests:\n\nassert square(3) == 9\nassert square(-2) == 4\n"
                "assert square(0) == 0\n[BEGIN]\n")
    assert tasks.load_benchmark("mbpp", test, fewshot_path=prompt)[0]["context"] == \
        block(2) + block(3) + block(4) + question
    assert tasks.load_benchmark("mbpp", test, num_fewshot=4, fewshot_path=prompt)[0]["context"] == \
        block(2) + block(3) + block(4) + block(1) + question
    assert tasks.load_benchmark("mbpp", test, num_fewshot=0)[0]["context"] == question
    assert tasks.stop_sequences("mbpp") == ("[DONE]",)


def test_humaneval_prompt_and_stops(tmp_path):
    row = {"task_id": "X/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    assert tasks.load_benchmark("humaneval", write_jsonl(tmp_path / "h.jsonl", [row]))[0]["context"] == "def f():\n"
    assert tasks.HUMANEVAL_STOP == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    text = "    return 1\n\nprint(f())"
    assert tasks.truncate_at(text, tasks.HUMANEVAL_STOP) == "    return 1\n"
    assert tasks.truncate_at("    x = 1\n    if x:\n        return x\nif True:", tasks.HUMANEVAL_STOP) == \
        "    x = 1\n    if x:\n        return x"  # indented lines do not stop it
    with pytest.raises(ConfigError, match="humaneval: num_fewshot 2 is not possible"):
        tasks.load_benchmark("humaneval", write_jsonl(tmp_path / "h.jsonl", [row]), num_fewshot=2)


@pytest.mark.parametrize("generation, strict, flexible", [
    ("7 + 7 = 14\n#### 14", "14", "14"),
    ("It costs $1,000.", "[invalid]", "$1,000."),
    ("#### 1,000 is the total, checked 3 times", "1,000", "3"),  # flexible takes the last number
    ("so -3 degrees\n#### -3\n\nQuestion", "-3", "-3"),
    ("no number", "[invalid]", "[invalid]"),
    ("5 then 18.00.", "[invalid]", "18.00."),
])
def test_gsm8k_extraction_as_lm_eval(generation, strict, flexible):
    got = tasks.gsm8k_score(generation, "never")
    assert (got["pred_strict"], got["pred_flexible"]) == (strict, flexible)


def test_gsm8k_exact_match_drops_commas_dollars_and_a_final_dot():
    target = tasks.gsm8k_target("1,200 - 200 = 1,000\n#### 1,000")
    assert target == "1000"
    assert tasks.gsm8k_score("It costs $1,000.", target) == {
        "strict": False, "flexible": True, "pred_strict": "[invalid]", "pred_flexible": "$1,000."}
    assert tasks.gsm8k_score("#### 1000.0", target)["strict"] is False  # string match, as lm-eval
    cot = tasks.gsm8k_score("The answer is 1,000.", target, "cot-zeroshot")
    assert cot["strict"] and cot["flexible"]


def test_pass_at_k_equals_enumeration():
    rng = random.Random(7)
    for n in (1, 2, 5, 7, 9):
        for _ in range(4):
            outcome = [rng.random() < 0.4 for _ in range(n)]
            c = sum(outcome)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcome, k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert tasks.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    # large n: C(197, 100) / C(200, 100) = (100 * 99 * 98) / (200 * 199 * 198)
    assert tasks.pass_at_k(200, 3, 100) == pytest.approx(1 - (100 * 99 * 98) / (200 * 199 * 198), abs=1e-12)
    with pytest.raises(ConfigError, match="0 < k <= n"):
        tasks.pass_at_k(3, 1, 4)
