"""Runs the benchmarks on models: one function per benchmark, data parallel (each rank evaluates its
distributed.shard of the rows and the per-example results are gathered, so every rank returns the same scores; a
single process is one rank), and evaluate_models, which evaluates several models and writes one report."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time

import torch
from tqdm.auto import tqdm

from semalign_ds import distributed
from semalign_ds.config import Config, ConfigError
import semalign_ds.evaluation.tasks as tasks
import semalign_ds.evaluation.vllm_backend as vllm_backend
from semalign_ds.evaluation.generate import (encode_pair, generate, loglikelihoods, model_device,
                                             prepare_tokenizer)
from semalign_ds.nll import response_nll


def sharded(n, fn):
    """Per-example results of all n examples: this rank computes fn(its shard's indices) (a list in the same
    order), and the ranks' lists are gathered and put back in index order."""
    mine = distributed.shard(n)
    local = fn(mine) if mine else []
    gathered = distributed.all_gather_object(list(zip(mine, local)))
    merged = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
    if [i for i, _ in merged] != list(range(n)):
        raise RuntimeError(f"gathered results cover {len(merged)} of {n} examples")
    return [result for _, result in merged]


def _mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def _main_bar(show):
    return show and distributed.is_main()


# ---------------------------------------------------------------------------------------------------------------
# the benchmarks; rows come from tasks.load_benchmark and carry their prompt as "context"

def evaluate_mmlu(model, tokenizer, rows, batch_size=8, device=None, show=True):
    """The choice letter with the highest log-likelihood after the context, as lm-eval scores `mmlu` (acc)."""
    prepare_tokenizer(tokenizer)

    def run(indices):
        requests = []
        for i in indices:
            pairs = [encode_pair(tokenizer, rows[i]["context"], f" {tasks.LETTERS[k]}")
                     for k in range(len(rows[i]["choices"]))]
            requests.append((pairs[0][0], [cont for _, cont in pairs]))
        scores = loglikelihoods(model, requests, tokenizer.pad_token_id, batch_size, device,
                                show=_main_bar(show), desc="mmlu")
        out = []
        for i, s in zip(indices, scores):
            pred = max(range(len(s)), key=lambda k: s[k])
            out.append({"index": i, "subject": rows[i]["subject"], "answer": rows[i]["answer"], "pred": pred,
                        "correct": pred == rows[i]["answer"], "loglikelihoods": s})
        return out

    per_example = sharded(len(rows), run)
    subjects = {}
    for r in per_example:
        subjects.setdefault(r["subject"], []).append(r["correct"])
    return {"accuracy": _mean(r["correct"] for r in per_example), "n": len(per_example),
            "per_subject": {s: _mean(v) for s, v in sorted(subjects.items())}, "per_example": per_example}


def evaluate_gsm8k(model, tokenizer, rows, batch_size=8, max_new_tokens=None, device=None, show=True,
                   chat_template=False, variant=None):
    """Greedy generation scored by lm-eval's strict-match ("accuracy") and flexible-extract ("accuracy_flexible")."""
    max_new_tokens = max_new_tokens or tasks.TASKS["gsm8k"].max_new_tokens
    stop = tasks.stop_sequences("gsm8k", variant)

    def run(indices):
        prompts = [rows[i]["context"] for i in indices]
        if chat_template:
            if tokenizer.chat_template is None:
                raise ConfigError("gsm8k: chat template requested, but the tokenizer has none")
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
        outs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop, device, show=_main_bar(show),
                        desc="gsm8k", add_special_tokens=not chat_template)
        return [dict(tasks.gsm8k_score(text, rows[i]["target"], variant), index=i, target=rows[i]["target"],
                     generation=text) for i, text in zip(indices, outs)]

    per_example = sharded(len(rows), run)
    return {"accuracy": _mean(r["strict"] for r in per_example),
            "accuracy_flexible": _mean(r["flexible"] for r in per_example), "n": len(per_example),
            "per_example": per_example}


def evaluate_humaneval(model, tokenizer, rows, **kwargs):
    """pass@1 of greedy completions, or pass@k of sampled ones (sampling=Sampling(n, ...), ks=(1, 10, ...))."""
    return _evaluate_code("humaneval", model, tokenizer, rows, **kwargs)


def evaluate_mbpp(model, tokenizer, rows, **kwargs):
    """pass@1 of greedy completions of lm-eval's prompt, or pass@k of sampled ones."""
    return _evaluate_code("mbpp", model, tokenizer, rows, **kwargs)


def _evaluate_code(bench, model, tokenizer, rows, batch_size=8, max_new_tokens=None, device=None, show=True,
                   allow_code_execution=False, limits=None, workers=None, sampling=None, ks=(1,)):
    from semalign_ds import sandbox
    sandbox.require_execution(allow_code_execution, bench)  # before any generation
    n = 1 if sampling is None else sampling.n
    ks = sorted(set(ks) | {1})
    if ks[-1] > n:
        raise ConfigError(f"{bench}: pass@{ks[-1]} needs at least {ks[-1]} samples per problem; got {n} "
                          f"(--samples N with N >= k)")
    max_new_tokens = max_new_tokens or tasks.TASKS[bench].max_new_tokens
    stop = tasks.stop_sequences(bench)
    program_of = tasks.humaneval_program if bench == "humaneval" else tasks.mbpp_program

    def run(indices):
        main = _main_bar(show)
        outs = generate(model, tokenizer, [rows[i]["context"] for i in indices], max_new_tokens, batch_size, stop,
                        device, show=main, desc=bench, sampling=sampling, seeds=indices)
        samples = [[c] if sampling is None else c for c in outs]
        programs = [program_of(rows[i], c) for i, cs in zip(indices, samples) for c in cs]
        with tqdm(total=len(programs), desc=f"{bench} tests", disable=not main, leave=False) as bar:
            results = iter(sandbox.run_many(programs, limits, allow=True, workers=workers, progress=bar))
        out = []
        for i, cs in zip(indices, samples):
            res = [next(results) for _ in cs]
            entry = {"index": i, "task_id": rows[i]["task_id"], "passed": sum(r.passed for r in res),
                     "samples": len(cs), "status": [r.status for r in res], "reason": [r.reason for r in res],
                     "completion": cs}
            if sampling is None:  # one greedy completion: plain fields
                entry.update(passed=res[0].passed, status=res[0].status, reason=res[0].reason, completion=cs[0])
            out.append(entry)
        return out

    per_example = sharded(len(rows), run)
    result = {f"pass@{k}": _mean(tasks.pass_at_k(n, int(r["passed"]), k) for r in per_example) for k in ks}
    result.update(n=len(per_example), samples_per_problem=n, per_example=per_example)
    return result


def evaluate_nll(model, tokenizer, rows, batch_size=8, device=None, show=True, max_seq_len=None,
                 chat_template=None):
    """Mean NLL (nats/token) of the reference responses given their prompts, tokenised by data.tokenize as the
    pipeline tokenises (None: the config's defaults, chat_template and eval_max_seq_len)."""
    from semalign_ds import data as data_mod
    from semalign_ds.models import Adapter
    device = model_device(model, device)
    chat_template = chat_template or NLL_DEFAULTS["chat_template"]
    max_seq_len = max_seq_len or NLL_DEFAULTS["eval_max_seq_len"]

    def run(indices):
        tokenized, dropped = data_mod.tokenize([rows[i] for i in indices], tokenizer, max_seq_len, "response",
                                               chat_template, origin="nll")
        total, count = response_nll(Adapter(model), tokenized, data_mod.pad_id(tokenizer), batch_size, device,
                                    desc="nll", show=_main_bar(show))
        return [{"total": total, "tokens": count, "kept": len(tokenized), "dropped": sum(dropped.values())}]

    # NLL is a sum over tokens: each rank sends one summary of its shard
    mine = distributed.shard(len(rows))
    local = run(mine) if mine else []
    parts = [p for part in distributed.all_gather_object(local) for p in part]
    total, tokens = sum(p["total"] for p in parts), sum(p["tokens"] for p in parts)
    return {"nll": total / tokens if tokens else float("nan"), "tokens": tokens,
            "n": sum(p["kept"] for p in parts), "dropped": sum(p["dropped"] for p in parts),
            "chat_template": chat_template, "max_seq_len": max_seq_len}


# the pipeline's settings of its NLL evaluation, and their defaults
NLL_DEFAULTS = {name: Config.model_fields[name].default for name in ("chat_template", "eval_max_seq_len")}


def nll_settings(spec, chat_template=None, max_seq_len=None):
    """(chat template, max sequence length) of a model's NLL, one rule for every entry point: what is given;
    else, for an exported run (its folder holds semalign_config.json), the setting that run was evaluated with;
    else the config's default."""
    saved = {}
    path = os.path.join(spec, "semalign_config.json") if isinstance(spec, str) else None
    if path and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    pick = {k: saved.get(k, default) for k, default in NLL_DEFAULTS.items()}
    return chat_template or pick["chat_template"], max_seq_len or pick["eval_max_seq_len"]


# the benchmarks that generate, which --backend vllm runs through vLLM
GENERATIVE = ("gsm8k", "humaneval", "mbpp")

RUNNERS = {"mmlu": evaluate_mmlu, "gsm8k": evaluate_gsm8k, "humaneval": evaluate_humaneval, "mbpp": evaluate_mbpp,
           "nll": evaluate_nll}


# ---------------------------------------------------------------------------------------------------------------
# several models, one report

def evaluate_models(models, benchmarks, output_dir, data_paths=None, limit=None, batch_size=8, max_new_tokens=None,
                    allow_code_execution=False, dtype="float32", device=None, limits=None, workers=None,
                    gsm8k_chat_template=False, nll_max_seq_len=None, nll_chat_template=None, show=True,
                    num_fewshot=None, fewshot_paths=None, gsm8k_variant=None, sampling=None, pass_ks=(1,),
                    backend="transformers", vllm_python=None, vllm_args=None):
    """Evaluate each model (name -> spec for semalign_ds.models.load_model) on each benchmark; rank 0 writes
    report.md, report.json, report.png and samples/<model>/<benchmark>.jsonl into output_dir and prints the table.
    num_fewshot and fewshot_paths map a benchmark to its count / few-shot data (default: the reference
    harness's); sampling (generate.Sampling) turns the code benchmarks to sampled pass@k for k in pass_ks.
    backend "vllm": gsm8k/humaneval/mbpp generate through vLLM run by the vllm_python interpreter
    (evaluation/vllm_backend.py; vllm_args: more vllm.LLM arguments); mmlu and nll stay transformers'.
    Returns the report (on every rank)."""
    from semalign_ds import models as models_mod
    from semalign_ds import report as report_mod
    from semalign_ds import sandbox
    for b in benchmarks:
        tasks.task(b)
    if not models:
        raise ConfigError("no model to evaluate")
    if backend not in ("transformers", "vllm"):
        raise ConfigError(f"unknown generation backend {backend!r}: transformers or vllm")
    if backend != "vllm" and (vllm_python or vllm_args):
        raise ConfigError("--vllm-python and --vllm-arg go with --backend vllm")
    code = [b for b in benchmarks if b in ("humaneval", "mbpp")]
    if code:
        sandbox.require_execution(allow_code_execution, " and ".join(code))
    for name, spec in models.items():
        models_mod.check_exists(spec, f"model {name!r}")
    vllm_versions = None
    if backend == "vllm":  # before any model loads
        for name, spec in models.items():
            if spec.endswith(".json"):
                raise ConfigError(f"--backend vllm: model {name!r} is a random-init config ({spec}); vLLM loads "
                                  f"saved folders (export one with semalign_ds.export.save_hf)")
        vllm_versions = vllm_backend.check(vllm_python, dtype, distributed.world())
    data_paths, fewshot_paths, num_fewshot = data_paths or {}, fewshot_paths or {}, num_fewshot or {}
    main = distributed.is_main()
    rows = {b: tasks.load_benchmark(b, data_paths.get(b), limit, num_fewshot=num_fewshot.get(b),
                                    fewshot_path=fewshot_paths.get(b),
                                    variant=gsm8k_variant if b == "gsm8k" else None) for b in benchmarks}
    if device is None:
        device = f"cuda:{distributed.launch().local_rank}" if torch.cuda.is_available() else "cpu"
    protocol = {b: _protocol(b, num_fewshot.get(b), gsm8k_variant, sampling, pass_ks) for b in benchmarks}
    settings = dict(benchmarks=list(benchmarks), data={b: data_paths.get(b) or tasks.TASKS[b].hub[0]
                                                       for b in benchmarks},
                    protocol=protocol, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    dtype=dtype, world_size=distributed.world(), device=str(device),
                    gsm8k_chat_template=gsm8k_chat_template, nll_max_seq_len=nll_max_seq_len,
                    backend=backend if vllm_versions is None else dict(vllm_versions, name="vllm",
                                                                        llm_args=dict(vllm_args or {})))
    report = {"settings": settings, "metrics": {b: [tasks.TASKS[b].metric, tasks.TASKS[b].label,
                                                    tasks.TASKS[b].percent] for b in benchmarks},
              "models": {}}
    samples = {}
    for name, spec in models.items():
        t0 = time.time()
        engine = None
        if backend == "vllm":  # started on its first generation, closed after the model's last benchmark
            engine = vllm_backend.VLLMModel(models_mod.resolve(spec)[0], vllm_python, dtype, vllm_args)
        needs_model = engine is None or any(b not in GENERATIVE for b in benchmarks)
        model = _load(models_mod, spec, dtype).to(device) if needs_model else None
        tokenizer = prepare_tokenizer(models_mod.load_tokenizer(spec))
        entry = {"spec": spec, "load_seconds": time.time() - t0, "results": {}}
        with contextlib.ExitStack() as stack:
            if engine is not None:
                stack.enter_context(engine)
            for bench in benchmarks:
                t0 = time.time()
                if main and show:
                    print(f"[{name}] {bench}: {len(rows[bench])} examples ({protocol[bench]})", flush=True)
                kwargs = dict(batch_size=batch_size, device=device, show=show)
                if bench in GENERATIVE:
                    kwargs["max_new_tokens"] = max_new_tokens
                if bench == "gsm8k":
                    kwargs.update(chat_template=gsm8k_chat_template, variant=gsm8k_variant)
                elif bench in ("humaneval", "mbpp"):
                    kwargs.update(allow_code_execution=allow_code_execution, limits=limits, workers=workers,
                                  sampling=sampling, ks=pass_ks)
                elif bench == "nll":
                    template, max_seq_len = nll_settings(spec, nll_chat_template, nll_max_seq_len)
                    kwargs.update(max_seq_len=max_seq_len, chat_template=template)
                runs_on = engine if engine is not None and bench in GENERATIVE else model
                result = RUNNERS[bench](runs_on, tokenizer, rows[bench], **kwargs)
                result["seconds"] = time.time() - t0
                samples[(name, bench)] = result.pop("per_example", None)
                entry["results"][bench] = result
                if main and show:
                    key, label, pct = report["metrics"][bench]
                    print(f"[{name}] {label}: {report_mod.fmt(result[key], pct)} (n={result['n']}, "
                          f"{result['seconds']:.1f} s)", flush=True)
        report["models"][name] = entry
        del model, engine
        gc.collect()
    if main:
        report_mod.write_report(report, samples, output_dir)
        print(report_mod.markdown_table(report))
        print(f"report: {os.path.join(output_dir, 'report.md')} (.json, .png)", flush=True)
    distributed.barrier()
    return report


def _protocol(bench, num_fewshot, gsm8k_variant, sampling, pass_ks):
    """The setting a benchmark ran in, in words, for the report."""
    t = tasks.TASKS[bench]
    if bench == "gsm8k" and gsm8k_variant == "cot-zeroshot":
        return "zero-shot CoT (lm-eval gsm8k_cot_zeroshot), strict-match"
    shots = t.num_fewshot if num_fewshot is None else num_fewshot
    text = {"mmlu": f"{shots}-shot (lm-eval mmlu prompt)", "gsm8k": f"{shots}-shot (lm-eval gsm8k), strict-match",
            "mbpp": f"{shots}-shot (lm-eval mbpp prompt)", "humaneval": "zero-shot, reference stop sequences",
            "nll": "reference responses, pipeline tokenisation"}[bench]
    if bench in ("humaneval", "mbpp"):
        text += ", greedy pass@1" if sampling is None else (
            f", pass@{','.join(map(str, sorted(set(pass_ks) | {1})))} from {sampling.n} samples "
            f"(T={sampling.temperature}, top_p={sampling.top_p})")
    return text


def _load(models_mod, spec, dtype):
    if dtype == "float64":  # float64 is for exact comparisons in tests; load_model knows the common dtypes
        return models_mod.load_model(spec, dtype="float32").double()
    return models_mod.load_model(spec, dtype=dtype)
