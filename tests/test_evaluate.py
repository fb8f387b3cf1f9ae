"""Benchmark runners on small fixtures in the published layouts, batched scoring and generation against unbatched
references, and the report files. Prompts, extraction and pass@k are in test_eval_tasks.py."""
import json
import os

import pytest
import torch

from helpers import ROOT, TINY
from semalign_ds import sandbox
from semalign_ds.evaluation import generate as gen
from semalign_ds.evaluation import runner
from semalign_ds.evaluation import tasks
from semalign_ds.config import ConfigError

SOURCE = os.path.join(TINY, "source.json")

MMLU = [
    {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"],
     "answer": 1},
    {"question": "Which gas do plants take in?", "subject": "biology", "choices": ["CO2", "O2", "N2", "He"],
     "answer": 0},
    {"question": "The capital of France is", "subject": "geography", "choices": ["Rome", "Oslo", "Bern", "Paris"],
     "answer": 3},
]
GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shirt costs $1,200 and is discounted by $200. What is the price?",
     "answer": "1,200 - 200 = 1,000\n#### 1,000"},
    {"question": "It was 5 degrees and fell by 8. What is the temperature?", "answer": "5 - 8 = -3\n#### -3"},
]
HUMANEVAL = [
    {"task_id": "Fixture/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
    {"task_id": "Fixture/1", "prompt": 'def double(xs):\n    """Each element doubled."""\n',
     "canonical_solution": "    return [2 * x for x in xs]\n",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n",
     "entry_point": "double"},
]
MBPP = [
    {"task_id": 11, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x",
     "test_list": ["assert square(3) == 9", "assert square(-2) == 4"], "test_setup_code": "",
     "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to get pi rounded.", "code": "def pi2():\n    return round(PI, 2)",
     "test_list": ["assert pi2() == 3.14"], "test_setup_code": "PI = 3.14159", "challenge_test_list": []},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny():
    from semalign_ds.models import load_model, load_tokenizer
    model = load_model(SOURCE).double()
    return model, gen.prepare_tokenizer(load_tokenizer(SOURCE))


def load(name, path=None, limit=None, **kwargs):
    """A fixture file is one split: the few-shot benchmarks run zero-shot on it."""
    if tasks.TASKS[name].fewshot_split and "num_fewshot" not in kwargs and "fewshot_path" not in kwargs:
        kwargs["num_fewshot"] = 0
    return tasks.load_benchmark(name, path, limit, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# loading

def test_loaders_read_published_layouts(tmp_path):
    import datasets
    mmlu = load("mmlu", write_jsonl(tmp_path / "mmlu.jsonl", MMLU))
    assert [r["answer"] for r in mmlu] == [1, 0, 3] and mmlu[0]["choices"] == ["3", "4", "5", "22"]
    # letters as answers, a parquet file, a save_to_disk DatasetDict with a test split, and --limit
    lettered = [dict(r, answer="BAD"[i]) for i, r in enumerate(MMLU)]
    datasets.Dataset.from_list(lettered).to_parquet(str(tmp_path / "mmlu.parquet"))
    assert [r["answer"] for r in load("mmlu", str(tmp_path / "mmlu.parquet"))] == [1, 0, 3]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(GSM8K)}).save_to_disk(str(tmp_path / "gsm8k_saved"))
    gsm = load("gsm8k", str(tmp_path / "gsm8k_saved"), limit=2)
    assert [r["target"] for r in gsm] == ["7", "1000"]

    he = load("humaneval", write_jsonl(tmp_path / "he.jsonl", HUMANEVAL))
    assert he[1]["entry_point"] == "double"
    mbpp = load("mbpp", write_jsonl(tmp_path / "mbpp.jsonl", MBPP))
    assert mbpp[1]["test_setup_code"] == "PI = 3.14159"
    sanitized = [{"task_id": 2, "prompt": "Square x.", "code": "import math\ndef sq(x):\n    return x*x",
                  "test_list": ["assert sq(2) == 4"], "test_imports": ["import math"]}]
    row = load("mbpp", write_jsonl(tmp_path / "san.jsonl", sanitized))[0]
    assert row["text"] == "Square x." and row["test_setup_code"] == "import math"
    nll = load("nll", str(tmp_path / "he.jsonl"))
    assert nll[0] == {"prompt": HUMANEVAL[0]["prompt"], "response": HUMANEVAL[0]["canonical_solution"]}


def test_default_humaneval_is_the_packaged_one():
    rows = load("humaneval", limit=3)
    assert len(rows) == 3 and rows[0]["task_id"] == "HumanEval/0"


def test_loader_errors_name_the_missing_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"no field\(s\) \['choices'"):
        load("mmlu", write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": 0}]))
    with pytest.raises(ConfigError, match="no number after '####'"):
        load("gsm8k", write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "7"}]))
    with pytest.raises(ConfigError, match="unknown benchmark"):
        tasks.load_benchmark("arc")
    with pytest.raises(ConfigError, match="data not found"):
        load("gsm8k", "no_such_file")


# ---------------------------------------------------------------------------------------------------------------
# answers and programs

@pytest.mark.sandbox
def test_truncation_and_programs_run():
    completion = "    return a + b\n\ndef unrelated():\n    pass\n"
    assert tasks.truncate_at(completion, tasks.HUMANEVAL_STOP) == "    return a + b\n"
    assert tasks.truncate_at("    return 1\n# note\n", tasks.HUMANEVAL_STOP) == "    return 1"
    assert tasks.truncate_at("x = 1\nif __name__ == '__main__':", tasks.HUMANEVAL_STOP) == "x = 1"
    assert tasks.truncate_at("def f():\n    return 2\n[DONE]\n", tasks.MBPP_STOP) == "def f():\n    return 2\n"
    limits = sandbox.Limits(timeout=10)
    programs = [tasks.humaneval_program(HUMANEVAL[0], HUMANEVAL[0]["canonical_solution"]),
                tasks.humaneval_program(HUMANEVAL[0], "    return a - b\n"),
                tasks.mbpp_program(tasks.normalize_mbpp(MBPP[1], 0, "x"), MBPP[1]["code"]),
                tasks.mbpp_program(tasks.normalize_mbpp(MBPP[0], 0, "x"), "def square(x):\n    return x + x")]
    passed = [r.passed for r in sandbox.run_many(programs, limits, allow=True, workers=2)]
    assert passed == [True, False, True, False]


# ---------------------------------------------------------------------------------------------------------------
# model calls against unbatched references (float64: batched and unbatched agree to rounding)

def test_loglikelihoods_match_unpadded_forward(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    requests = [(torch.randint(1, 500, (n,), generator=g).tolist(),
                 [torch.randint(1, 500, (m,), generator=g).tolist() for m in ms])
                for n, ms in ((7, (1, 3)), (2, (2,)), (11, (1, 1, 1)), (4, (4, 1)))]
    got = gen.loglikelihoods(model, requests, pad_id=0, batch_size=3)
    for (ctx, conts), scores in zip(requests, got):
        for cont, score in zip(conts, scores):
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            want = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
            assert score == pytest.approx(want, abs=1e-9)
    # the single-token shortcut and the general path agree
    single = [(ctx, [[5], [9], [400]]) for ctx, _ in requests]
    fast = gen.loglikelihoods(model, single, 0, batch_size=2)
    slow = gen.loglikelihoods(model, single, 0, batch_size=2, fast_single_token=False)
    assert sum(fast, []) == pytest.approx(sum(slow, []), abs=1e-9)


def test_batched_generation_matches_one_by_one(tiny):
    model, tok = tiny
    prompts = ["def f(x):\n    return", "Question: 1 + 1?\nAnswer:", "a", "import os\nimport sys\n\nclass A:"]
    batched = gen.generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [gen.generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert any(batched)


def test_mmlu_and_gsm8k_on_a_tiny_model(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    rows = load("mmlu", write_jsonl(tmp_path / "mmlu.jsonl", MMLU))
    res = runner.evaluate_mmlu(model, tok, rows, batch_size=2, show=False)
    assert res["n"] == 3 and 0 <= res["accuracy"] <= 1 and len(res["per_subject"]) == 3
    assert all(len(r["loglikelihoods"]) == 4 and r["pred"] in range(4) for r in res["per_example"])
    gsm = load("gsm8k", write_jsonl(tmp_path / "gsm.jsonl", GSM8K))
    res = runner.evaluate_gsm8k(model, tok, gsm, batch_size=2, max_new_tokens=4, show=False)
    assert res["n"] == 3 and 0 <= res["accuracy"] <= 1
    # scoring, with generations we control
    answers = iter(["3 + 4 = 7.\n#### 7", "It costs 1,200 - 200 = $1,000.", "It is 3 degrees.\n#### 3"])
    monkeypatch.setattr(runner, "generate", lambda model, tok, prompts, *a, **k: [next(answers) for _ in prompts])
    res = runner.evaluate_gsm8k(model, tok, gsm, batch_size=8, show=False)
    # strict-match needs '#### N'; flexible-extract takes the last number
    assert [r["strict"] for r in res["per_example"]] == [True, False, False]
    assert [r["flexible"] for r in res["per_example"]] == [True, True, False]
    assert (res["accuracy"], res["accuracy_flexible"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))


@pytest.mark.sandbox
def test_code_benchmarks(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.delenv(sandbox.ENV_FLAG, raising=False)
    he = load("humaneval", write_jsonl(tmp_path / "he.jsonl", HUMANEVAL))
    mbpp = load("mbpp", write_jsonl(tmp_path / "mbpp.jsonl", MBPP))
    with pytest.raises(sandbox.ExecutionNotAllowed, match="--allow-code-execution"):
        runner.evaluate_humaneval(model, tok, he, show=False)
    # the tiny model's own completions run (and fail)
    res = runner.evaluate_humaneval(model, tok, he, max_new_tokens=4, show=False, allow_code_execution=True)
    assert res["n"] == 2 and res["pass@1"] == 0.0 and all(r["status"] == "failed" for r in res["per_example"])
    # reference solutions as completions pass; a wrong one fails
    monkeypatch.setattr(runner, "generate", lambda model, tok, prompts, *a, **k: [
        r["canonical_solution"] for r in he][:len(prompts)])
    assert runner.evaluate_humaneval(model, tok, he, show=False, allow_code_execution=True)["pass@1"] == 1.0
    codes = iter([MBPP[0]["code"], "def pi2():\n    return 3"])
    monkeypatch.setattr(runner, "generate", lambda model, tok, prompts, *a, **k: [next(codes) for _ in prompts])
    res = runner.evaluate_mbpp(model, tok, mbpp, show=False, allow_code_execution=True)
    assert [r["passed"] for r in res["per_example"]] == [True, False] and res["pass@1"] == 0.5


def test_nll_matches_the_pipeline_computation(tiny):
    from semalign_ds import data as data_mod
    from semalign_ds.models import Adapter
    model, tok = tiny
    rows = load("nll", limit=5)  # embedded:humaneval
    res = runner.evaluate_nll(model, tok, rows, batch_size=2, show=False)
    assert res["chat_template"] == "auto"  # the config's default, as the pipeline
    tokenized, _ = data_mod.tokenize(rows, tok, 1024, "response", "auto")
    total, count = runner.response_nll(Adapter(model), tokenized, 0, 5, "cpu", show=False)
    assert res["tokens"] == count and res["n"] == 5
    assert res["nll"] == pytest.approx(total / count, rel=1e-6)  # response_nll takes logits to float32


# ---------------------------------------------------------------------------------------------------------------
# report

def read_png(path):
    from PIL import Image
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.mark.sandbox
def test_evaluate_models_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(sandbox.ENV_FLAG, raising=False)
    data = {"mmlu": write_jsonl(tmp_path / "mmlu.jsonl", MMLU), "gsm8k": write_jsonl(tmp_path / "g.jsonl", GSM8K),
            "mbpp": write_jsonl(tmp_path / "mbpp.jsonl", MBPP)}
    models = {"source": SOURCE, "target": os.path.join(TINY, "target.json")}
    with pytest.raises(sandbox.ExecutionNotAllowed):  # refused before any model loads
        runner.evaluate_models(models, ["mbpp"], str(tmp_path / "no"), data_paths=data)
    assert not (tmp_path / "no").exists()
    out = tmp_path / "report"
    zero = {"mmlu": 0, "gsm8k": 0, "mbpp": 0}
    report = runner.evaluate_models(models, ["mmlu", "gsm8k", "mbpp", "nll"], str(out), data_paths=data, limit=2,
                                    max_new_tokens=3, allow_code_execution=True, show=False, num_fewshot=zero)
    for name in ("report.md", "report.json", "report.png", "samples/source/mmlu.jsonl",
                 "samples/target/mbpp.jsonl"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"]["target"]["results"]["nll"]["n"] == 2 == report["models"]["source"]["results"]["mmlu"]["n"]
    table = (out / "report.md").read_text()
    assert "| model | MMLU acc (%) | GSM8K acc (%) | MBPP pass@1 (%) | NLL nats/token |" in table
    assert "| target |" in table and table.split("\n\n")[1] in capsys.readouterr().out  # printed at the end
    assert "- mmlu: 0-shot (lm-eval mmlu prompt)" in table
    width, height = read_png(out / "report.png")
    assert width > 300 and height > 200


# ---------------------------------------------------------------------------------------------------------------
# sampled pass@k, the NLL's chat-template setting, the launcher's options

def test_sampled_generation_is_seeded_per_prompt(tiny):
    model, tok = tiny
    prompts = ["def f(x):\n    return", "Question: 1 + 1?\nAnswer:"]
    sampling = gen.Sampling(3, temperature=1.0, top_p=0.9, seed=11)
    both = gen.generate(model, tok, prompts, 5, sampling=sampling, seeds=[4, 9])
    alone = gen.generate(model, tok, prompts[1:], 5, sampling=sampling, seeds=[9])
    assert both[1] == alone[0]  # a prompt's samples do not depend on the others in the call (or on the rank)
    assert [len(s) for s in both] == [3, 3] and len(set(both[0])) > 1
    assert gen.generate(model, tok, prompts[:1], 5, sampling=sampling, seeds=[5])[0] != both[0]
    with pytest.raises(ConfigError, match="temperature > 0"):
        gen.Sampling(2, temperature=0.0)


@pytest.mark.sandbox
def test_sampled_pass_at_k_of_the_code_benchmarks(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    he = load("humaneval", write_jsonl(tmp_path / "he.jsonl", HUMANEVAL))
    right, wrong = HUMANEVAL[0]["canonical_solution"], "    return None\n"
    outcomes = {HUMANEVAL[0]["prompt"]: [right, wrong, right], HUMANEVAL[1]["prompt"]: [wrong, wrong, wrong]}
    seen = {}

    def fake(model, tok, prompts, *args, sampling=None, seeds=None, **kwargs):
        seen["sampling"], seen["seeds"] = sampling, seeds
        return [outcomes[p] for p in prompts]
    monkeypatch.setattr(runner, "generate", fake)
    sampling = gen.Sampling(3, temperature=0.8, top_p=0.95)
    res = runner.evaluate_humaneval(model, tok, he, show=False, allow_code_execution=True, sampling=sampling,
                                    ks=(2, 3))
    # problem 0: 2 of 3 pass (pass@1 2/3, pass@2 = pass@3 = 1); problem 1: none
    assert res["pass@1"] == pytest.approx(1 / 3) and res["pass@2"] == res["pass@3"] == pytest.approx(0.5)
    assert [r["passed"] for r in res["per_example"]] == [2, 0] and res["samples_per_problem"] == 3
    assert seen["sampling"] is sampling and list(seen["seeds"]) == [0, 1]  # global indices seed the samples
    with pytest.raises(ConfigError, match="pass@4 needs at least 4 samples"):
        runner.evaluate_humaneval(model, tok, he, show=False, allow_code_execution=True, sampling=sampling,
                                  ks=(4,))


def test_nll_settings_are_the_runs_own(tmp_path):
    run = tmp_path / "run" / "target"
    run.mkdir(parents=True)
    (run / "semalign_config.json").write_text(json.dumps({"chat_template": "off", "eval_max_seq_len": 333}))
    assert runner.nll_settings(str(run)) == ("off", 333)  # as the pipeline evaluated that run
    assert runner.nll_settings(str(run), "on", 77) == ("on", 77)  # --nll-chat-template, --nll-max-seq-len win
    assert runner.nll_settings(SOURCE) == ("auto", 1024)  # the config's defaults


def test_launcher_options():
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate_launcher", os.path.join(ROOT, "launchers", "evaluate.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.num_fewshot("2") == {"mmlu": 2, "gsm8k": 2, "mbpp": 2}
    assert launcher.num_fewshot("mmlu=0, gsm8k=8") == {"mmlu": 0, "gsm8k": 8}
    with pytest.raises(ConfigError, match=r"\['humaneval'\] take no few-shot examples"):
        launcher.num_fewshot("humaneval=1")
    with pytest.raises(ConfigError, match="give a count"):
        launcher.num_fewshot("many")
    args = launcher.parser().parse_args(["--model", "m", "--output-dir", "o", "--samples", "5", "--pass-k", "1,2,10"])
    sampling, ks = launcher.sampling(args)
    assert (sampling.n, sampling.temperature, sampling.top_p, ks) == (5, 0.8, 0.95, [1, 2])
    assert launcher.sampling(launcher.parser().parse_args(["--model", "m", "--output-dir", "o"])) == (None, (1,))


@pytest.mark.sandbox
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(tiny, monkeypatch):
    """All 164 packaged problems: each canonical solution, cut at the reference stop sequences as a generation
    would be, passes in the sandbox; the first line alone (a wrong completion) fails."""
    model, tok = tiny
    rows = tasks.load_benchmark("humaneval")
    assert len(rows) == 164
    solutions = {r["context"]: r["canonical_solution"] for r in rows}
    monkeypatch.setattr(runner, "generate", lambda model, tok, prompts, max_new, batch, stop, *a, **k: [
        tasks.truncate_at(solutions[p], stop) for p in prompts])
    limits = sandbox.Limits(timeout=20)
    res = runner.evaluate_humaneval(model, tok, rows, show=False, allow_code_execution=True, limits=limits)
    assert res["pass@1"] == 1.0, [r["task_id"] for r in res["per_example"] if not r["passed"]]
    solutions = {r["context"]: "    pass\n" for r in rows}  # the fake generate reads the new table
    res = runner.evaluate_humaneval(model, tok, rows[:20], show=False, allow_code_execution=True, limits=limits)
    assert res["pass@1"] == 0.0
