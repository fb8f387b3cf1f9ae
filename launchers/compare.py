"""Compare SemAlign's variants with the baselines at equal training compute, over several seeds, in one table.

    python launchers/compare.py --config launchers/configs/acl.yaml --output-dir runs/compare \
        --seeds 0 1 2 --benchmarks humaneval,nll --allow-code-execution

Variants (each a full run in OUTPUT/<name>/seed<S>, resumable): semalign (the config as it is: the reference),
semalign-uniform (uniform pairing), semalign-cosine and semalign-geometry (the v1 and v2 layer objectives),
semalign-lsq (the least-squares alignment map), semalign-topk (the Fisher objective on the cached top-64 of p*,
whose cheaper stages buy more steps), semalign-lora (rank-16 LoRA), semalign-joint (a joint phase after
the stages, which get half the budget; the joint phase the rest), semalign-kd (the same with joint_layer_weight 0:
the stages as a start, then KL at the output on every layer), semalign-aux (no stages: the whole budget to a
joint phase with the cosine objective at weight 0.1, i.e. output KD with the aligned states as auxiliary targets),
layerwise (cosine to the source state through a learned projection), output-kd (KL at the output only, all layers
at once: the embedded default's recipe) and finetune (the labels' cross-entropy only).

The reference may have no frontier stages (stage_steps 0, a joint phase only, as launchers/configs/default.yaml):
then only the variants that do not re-divide stages run beside it (semalign-uniform, semalign-lsq, output-kd,
finetune); the others are refused by name before any run.

One data set for every seed: compare sets data_seed (the config's, or its seed) on every run, so that each seed
draws the same transfer examples and validation split and the spread over seeds measures training (batch order,
initialisation), not which examples were drawn.

Equal compute: the reference's training FLOPs (budget.predicted_training, from its transfer set) are the budget;
every other variant's stage_steps (and joint_steps) are chosen so that its predicted training FLOPs match it, and the FLOPs each run
counted (budget.json) are in the table. A variant that changes only how the target trains (method output_kd or
finetune, a joint phase, LoRA, the cosine objective) starts from hard links to the reference's source phases of the
same seed (evaluation before training, attribution, cache) and resumes after them; one that changes what the source
side computes (uniform pairing, least squares, geometry, layer-wise) runs them itself. Choices are made on the validation split of the transfer set
(validation_fraction, 0.1 when the config sets none); the evaluations are held out: the config's eval_data (each
run's report.json) and --second-eval (default embedded:idlelib, code the transfer set never shows). OUTPUT/compare.md
and compare.json hold the table (mean and standard deviation over seeds); with --benchmarks, OUTPUT/eval holds the
evaluation of every model on them (report.md/.json/.png).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

from semalign_ds import budget, cache, config as config_mod, distributed, models, pruning, rundir
from semalign_ds.data import TokenizedSet
from semalign_ds.evaluation import evaluate_models
from semalign_ds.pipeline import PRUNED_TARGET, SOURCE_PHASES, initial_target, run

VARIANTS = {
    "semalign": {},
    "semalign-uniform": {"pairing": "uniform"},
    "semalign-cosine": {"layer_objective": "cosine"},
    "semalign-geometry": {"layer_objective": "geometry"},
    "semalign-lsq": {"alignment_map": "least_squares"},
    # the Fisher objective on the cached top-64 of p* per position: cheaper stages, so more steps at equal FLOPs
    "semalign-topk": {"fisher_topk": 64},
    "semalign-lora": {"lora_rank": 16},
    "semalign-joint": {"joint_steps": None},  # None: the config's stage_steps
    "semalign-kd": {"joint_steps": None, "joint_layer_weight": 0.0},  # the stages, then output KD on every layer
    # no stages: output KD on every layer from the start, the aligned states as cosine targets of the layers below
    # it at weight 0.1 falling to 0 (chosen from 1, 0.1 and 0 on seed 0's validation split)
    "semalign-aux": {"stage_steps": 0, "joint_steps": None, "layer_objective": "cosine", "joint_layer_weight": 0.1},
    "layerwise": {"method": "layerwise"},
    "output-kd": {"method": "output_kd"},
    "finetune": {"method": "finetune"},
}
REFERENCE = "semalign"
# the variants that apply to a reference without frontier stages (stage_steps 0: a joint phase only); the others
# re-divide the reference's stages
STAGELESS = ("semalign-uniform", "semalign-lsq", "output-kd", "finetune")
SOURCE_FILES = ("data", "plan.json", "plan.json.sha256", "alignment.safetensors", "alignment.safetensors.sha256",
                "cache", PRUNED_TARGET)  # what the source phases leave in a run directory


def shares_source_phases(reference, cfg):
    """Whether cfg's evaluation before training, attribution, alignment and cache are the reference's: only
    training keys differ, and the cache holds the same entries."""
    return (set(cfg.differs(reference)) <= set(config_mod.Config.TRAINING_KEYS)
            and cache.contents(cfg) == cache.contents(reference))


def start_from_reference(reference, cfg, local_rank=None):
    """Start cfg's run directory with hard links to the reference's finished source phases; the run then resumes
    after them and verifies every file it reuses, as any resumed run does. A directory already started is left as
    it is."""
    distributed.init(local_rank, timeout_minutes=cfg.collective_timeout_minutes)
    if distributed.is_main() and not os.path.exists(cfg.output_dir):
        state = rundir.RunDir(reference.output_dir).read_state()
        if all(p in state["done"] for p in SOURCE_PHASES):
            tmp = cfg.output_dir + ".starting"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name in SOURCE_FILES:
                path = os.path.join(reference.output_dir, name)
                if os.path.isdir(path):
                    shutil.copytree(path, os.path.join(tmp, name), copy_function=os.link)
                elif os.path.isfile(path):
                    os.link(path, os.path.join(tmp, name))
            rundir.write_json(os.path.join(tmp, "config.json"), cfg.to_dict())
            rundir.RunDir(tmp).write_state({"done": {p: state["done"][p] for p in SOURCE_PHASES + ("prune",)
                                                     if p in state["done"]}})
            os.rename(tmp, cfg.output_dir)  # all or nothing: a kill before this leaves no half-started run
            print(f"compare: {cfg.output_dir} starts from the source phases of {reference.output_dir} "
                  f"({', '.join(SOURCE_PHASES)})", flush=True)
    distributed.barrier()


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


def variant_config(base, name, seed, out):
    values = {**base.to_dict(), **VARIANTS[name], "seed": seed, "output_dir": os.path.join(out, name, f"seed{seed}")}
    if values.get("joint_steps") is None:
        values["joint_steps"] = base.joint_steps or base.stage_steps
    if values["method"] in ("output_kd", "finetune") and values["stage_steps"] == 0:
        values.update(stage_steps=1, joint_steps=0)  # steps per target layer: equal_compute_steps sets them
    return config_mod.from_dict(values, origin=f"variant {name}")


def equal_compute_steps(cfg, flops, shape, transfer):
    """{"stage_steps": N} (and "joint_steps" for a variant with a joint phase: half the budget to the stages, the
    rest to the joint phase; all of it to the joint phase for a variant without stages) whose predicted training
    FLOPs come closest to `flops`."""
    lengths, counts = transfer.lengths, transfer.loss_counts
    if cfg.joint_steps == 0:
        return {"stage_steps": budget.steps_for(cfg, flops, shape, lengths, counts)}
    stages = 0 if cfg.stage_steps == 0 else budget.steps_for(cfg.model_copy(update={"joint_steps": 0}), flops / 2,
                                                             shape, lengths, counts)
    one, two = (budget.predicted_training(cfg.model_copy(update={"stage_steps": stages, "joint_steps": j}), shape,
                                          lengths, counts) for j in (1, 2))
    return {"stage_steps": stages, "joint_steps": max(1, round((flops - (one - (two - one))) / (two - one)))}


def target_shape(cfg, vocab):
    """budget.shape of the target, read from configs only (no weights loaded)."""
    source = models.config_of(cfg.source, cfg.source_gguf_file)
    if cfg.target is not None:
        return budget.shape(models.config_of(cfg.target, cfg.target_gguf_file), vocab, source.hidden_size)
    cut = pruning.Shape.of(cfg)
    if cut.needs_calibration:  # cut by width
        return budget.shape(pruning.shape_config(source, pruning.check_shape(source, cut)), vocab, source.hidden_size)
    shape = budget.shape(source, vocab)
    return dict(shape, layers=len(cfg.target_keep_layers))


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _json(path):
    with open(path) as f:
        return json.load(f)


def table(rows, second_name):
    def cell(pair, fmt=".4f"):
        m, sd = pair
        return "-" if m is None else f"{m:{fmt}} ± {sd:{fmt}}"
    lines = [f"| method | stage steps (joint) | training FLOPs | seconds | validation NLL | eval NLL | {second_name} NLL |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        joint = f" ({r['joint_steps']})" if r.get("joint_steps") else ""
        lines.append(f"| {name} | {r.get('stage_steps', '-')}{joint} | {cell(r['training_flops'], '.3e')} | "
                     f"{cell(r['seconds'], '.1f')} | {cell(r['validation'])} | {cell(r['eval'])} | "
                     f"{cell(r['second'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    config_mod.add_arguments(p)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}; "
                                                                  f"{REFERENCE} (the budget) always runs")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of every variant (default: the "
                                                                      "config's seed)")
    p.add_argument("--second-eval", default="embedded:idlelib", help="a second held-out NLL evaluation set")
    p.add_argument("--benchmarks", default="", help="also evaluate every model on these (e.g. humaneval,nll)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems of each evaluation")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--allow-code-execution", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        base = config_mod.from_args(args)
        if base.validation_fraction == 0:
            base = config_mod.from_dict({**base.to_dict(), "validation_fraction": 0.1})
            print("compare: validation_fraction 0.1 (choices are made on a validation split of the transfer set)")
        if base.data_seed is None:  # the spread over seeds measures training, not which examples were drawn
            base = config_mod.from_dict({**base.to_dict(), "data_seed": base.seed})
            print(f"compare: data_seed {base.seed}: every seed trains on the same examples and validation split; "
                  f"seeds change the batch order and initialisation")
        if base.method != "semalign":
            raise config_mod.ConfigError(
                f"the reference (the config as given) must be a SemAlign recipe, but it has method {base.method}: "
                f"use launchers/configs/default.yaml or acl.yaml (output KD is the variant output-kd)")
        out = base.output_dir
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise config_mod.ConfigError(f"unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}")
        staged = [v for v in names if v != REFERENCE and v not in STAGELESS]
        if base.stage_steps == 0 and staged:
            raise config_mod.ConfigError(
                f"variant(s) {', '.join(staged)} re-divide the reference's frontier stages, but it has none "
                f"(stage_steps 0); with this reference use {', '.join(STAGELESS)}, or set stage_steps (e.g. "
                f"--set stage_steps=16 --set joint_steps=0 --set layer_objective=fisher for the ACL recipe)")
        names = [REFERENCE] + [n for n in names if n != REFERENCE]
        seeds = args.seeds or [base.seed]
        data_paths = {"nll": args.second_eval}
        from semalign_ds import data as data_mod
        data_mod.check_data_path(args.second_eval, "--second-eval")

        # the budget: the reference's predicted training FLOPs on its transfer set (seed seeds[0])
        reference_cfg = variant_config(base, REFERENCE, seeds[0], out)
        run(reference_cfg, local_rank=args.local_rank)
        transfer = TokenizedSet.load(os.path.join(reference_cfg.output_dir, "data", "transfer.safetensors"))
        vocab = models.vocab_size(models.load_tokenizer(base.tokenizer or base.source,
                                                        None if base.tokenizer else base.source_gguf_file))
        shape = target_shape(base, vocab)
        flops = budget.predicted_training(reference_cfg, shape, transfer.lengths, transfer.loss_counts)
        print(f"compare: training budget {flops:.4g} FLOPs (predicted for {REFERENCE} at {base.stage_steps} "
              f"stage steps and {base.joint_steps} joint steps)", flush=True)
        steps = {REFERENCE: {"stage_steps": base.stage_steps, "joint_steps": base.joint_steps}}
        for name in names[1:]:
            steps[name] = equal_compute_steps(variant_config(base, name, seeds[0], out), flops, shape, transfer)
            got = budget.predicted_training(variant_config(base, name, seeds[0], out).model_copy(update=steps[name]),
                                            shape, transfer.lengths, transfer.loss_counts)
            print(f"compare: {name}: {steps[name]}, predicted {got:.4g} FLOPs ({100 * got / flops:.0f}% of the "
                  f"budget)", flush=True)

        runs = {}
        for name in names:
            for seed in seeds:
                cfg = variant_config(base, name, seed, out)
                cfg = config_mod.from_dict({**cfg.to_dict(), **steps[name]}, origin=f"variant {name}")
                reference = variant_config(base, REFERENCE, seed, out)
                if name != REFERENCE and shares_source_phases(reference, cfg):
                    start_from_reference(reference, cfg, args.local_rank)
                run(cfg, local_rank=args.local_rank)
                runs[f"{name}-seed{seed}"] = (name, cfg.output_dir)

        distributed.init(args.local_rank)
        before = target_before(reference_cfg, os.path.join(out, "target_before"))
        specs = {"source": base.source, "target before": before,
                 **{key: os.path.join(folder, "target") for key, (_, folder) in runs.items()}}
        common = dict(limit=args.limit, batch_size=args.batch_size, dtype=base.dtype,
                      nll_chat_template=base.chat_template, nll_max_seq_len=base.eval_max_seq_len)
        second = evaluate_models(specs, ["nll"], os.path.join(out, "eval-second"), data_paths=data_paths, **common)
        if args.benchmarks:
            evaluate_models(specs, [b.strip() for b in args.benchmarks.split(",")], os.path.join(out, "eval"),
                            max_new_tokens=args.max_new_tokens, allow_code_execution=args.allow_code_execution,
                            **common)
        second_nll = {key: m["results"]["nll"]["nll"] for key, m in second["models"].items()}

        rows = {}
        first = _json(os.path.join(reference_cfg.output_dir, "report.json"))
        for key, label in (("source", "source"), ("target_before", "target before")):
            rows[label] = {"training_flops": (None, None), "seconds": (None, None), "validation": (None, None),
                           "eval": mean_sd([first.get(key, {}).get("nll")]), "second": mean_sd([second_nll[label]])}
        for name in names:
            keys = [k for k, (n, _) in runs.items() if n == name]
            folders = [runs[k][1] for k in keys]
            reports = [_json(os.path.join(f, "report.json")) for f in folders]
            budgets = [_json(os.path.join(f, "budget.json"))["training"] for f in folders]
            rows[name] = {"stage_steps": steps[name]["stage_steps"], "joint_steps": steps[name].get("joint_steps", 0),
                          "training_flops": mean_sd([b["flops"] for b in budgets]),
                          "seconds": mean_sd([b.get("seconds") for b in budgets]),
                          "validation": mean_sd([r["validation"]["target_after"]["nll"] for r in reports]),
                          "eval": mean_sd([r.get("target_after", {}).get("nll") for r in reports]),
                          "second": mean_sd([second_nll[k] for k in keys])}
        best = min(names, key=lambda n: rows[n]["validation"][0])
        text = (f"Equal training compute ({flops:.3e} FLOPs predicted for {REFERENCE}), seeds {seeds}, "
                f"mean ± standard deviation; NLL in nats/token on held-out sets: validation (a split of the "
                f"transfer set: choices are made on it), eval ({base.eval_data}), {args.second_eval}.\n\n"
                + table(rows, args.second_eval) + f"\n\nBest by validation NLL: {best}\n")
        if distributed.is_main():
            with open(os.path.join(out, "compare.md"), "w") as f:
                f.write(text)
            with open(os.path.join(out, "compare.json"), "w") as f:
                json.dump({"budget_flops": flops, "seeds": seeds, "second_eval": args.second_eval, "rows": rows,
                           "best_by_validation": best}, f, indent=2)
            print(text, flush=True)
        distributed.shutdown()
    except config_mod.ConfigError as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2
    except distributed.Preempted as err:  # SIGUSR1: the run in progress saved a checkpoint; rerunning resumes
        print(f"compare: {err}", file=sys.stderr)
        return distributed.EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
