"""Compare SemAlign with baselines trained on the same transfer set and step budget, in one table.

    python launchers/compare.py --config launchers/configs/default.yaml --output-dir runs/compare \
        --benchmarks humaneval,nll --allow-code-execution

Variants (each a full run in OUTPUT/<name>, resumable): semalign (the config's pairing), semalign-uniform (uniform
pairing: the ablation), layerwise (cosine to the source state through a learned projection, no semantic alignment),
output-kd (KL at the output only, all layers at once, as many steps as all stages together). Then the source, the
target before training and every variant's target are evaluated; OUTPUT/eval holds report.md/.json/.png.
"""
from __future__ import annotations

import argparse
import os
import sys

from semalign_ds import config as config_mod, distributed, models
from semalign_ds.evaluation import evaluate_models
from semalign_ds.pipeline import initial_target, run

VARIANTS = {
    "semalign": {},
    "semalign-uniform": {"pairing": "uniform"},
    "layerwise": {"method": "layerwise"},
    "output-kd": {"method": "output_kd"},
}


def target_before(cfg, folder):
    """The target as training starts, saved so that it can be evaluated like the others."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    if cfg.target is not None and not cfg.target.endswith(".json"):
        return cfg.target
    if distributed.is_main():  # pruned from the source, or random-init as the runs start it
        initial_target(cfg).save_pretrained(folder)
        models.load_tokenizer(cfg.source, cfg.source_gguf_file).save_pretrained(folder)
    distributed.barrier()
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    config_mod.add_arguments(p)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--benchmarks", default="humaneval,nll")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems of each benchmark")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--allow-code-execution", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        base = config_mod.from_args(args)
        out = base.output_dir
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise config_mod.ConfigError(f"unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}")
        targets = {}
        for name in names:
            cfg = config_mod.from_dict({**base.to_dict(), **VARIANTS[name], "output_dir": os.path.join(out, name)})
            run(cfg, local_rank=args.local_rank)
            targets[name] = os.path.join(out, name, "target")
        distributed.init(args.local_rank)
        specs = {"source": base.source, "target before": target_before(base, os.path.join(out, "target_before")),
                 **targets}
        evaluate_models(specs, [b.strip() for b in args.benchmarks.split(",")], os.path.join(out, "eval"),
                        limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        allow_code_execution=args.allow_code_execution, dtype=base.dtype,
                        nll_chat_template=base.chat_template, nll_max_seq_len=base.eval_max_seq_len)
        distributed.shutdown()
    except config_mod.ConfigError as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
