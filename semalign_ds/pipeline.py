"""The SemAlign pipeline end to end: `run(cfg)` reads top to bottom, one call per phase.

    prepare      everything that can be checked before a model runs (config, paths, tokenizers, data, world)
    evaluate     NLL of the source and of the target before training (when eval_data is set)
    attribution  layer scores of the source            -> plan.json (with the pairing)
    alignment    the map M from the semantic bases     -> alignment.safetensors
    cache        aligned source states per position    -> cache/
    training     frontier stages, shallow to deep      -> stages/, frontier/
    export       the target in Hugging Face format     -> target/
    report       NLL after training, the change and the gap closed -> report.json, report.md

Each phase writes its results into the run directory (rundir.py: atomic, checksummed) and is then marked done in
state.json; a rerun into the same directory verifies what it reuses and skips what is finished, so a crash or a
kill loses only the work in flight. Distribution lives in distributed.py (who runs what, lockstep, collectives)
and engines.py (ZeRO engines); the phases are plain loops over this rank's share.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from semalign_ds import alignment, attribution, budget, cache, data as data_mod, distributed, engines, export, lora, \
    models, pairing, pruning, rundir, summary, training, vocab_parallel
from semalign_ds import config as config_mod
from semalign_ds.config import Config, ConfigError
from semalign_ds.monitor import Monitor

# the phases that run the source; a run with all three done never loads it (compare.py starts variants from them)
SOURCE_PHASES = ("eval_before", "plan", "cache")


@dataclass
class Setup:
    """What every phase needs to know about the run, fixed by prepare()."""
    cfg: Config
    rd: rundir.RunDir
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    tokenizer: object  # what the data is tokenised with
    target_tokenizer: object  # exported with the target: its vocabulary matches the target's head
    vocab: int  # token ids shared by source and target
    pad_id: int
    n_source: int
    n_target: int
    data: data_mod.TokenizedSet  # the transfer set, less the validation split
    eval_data: data_mod.TokenizedSet | None
    ds_source: dict | None  # DeepSpeed configs when the source / target run under ZeRO, else None
    ds_target: dict | None
    monitor: Monitor = None
    validation: data_mod.TokenizedSet | None = None  # validation_fraction of the transfer set, held out
    source_width: int = 0  # d_s

    @property
    def main(self):
        return self.rank == 0

    def bar(self, iterable, **kw):
        return tqdm(iterable, disable=not self.main, dynamic_ncols=True, **kw)


def run(cfg: Config, local_rank=None):
    """The whole pipeline; returns the report (or None without evaluation data). A failure on any rank ends every
    rank at once with that rank's error, instead of leaving the others waiting in a collective."""
    config_mod.check_device(cfg)
    distributed.init(local_rank, timeout_minutes=cfg.collective_timeout_minutes)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, distributed.request_stop)  # checkpoint and stop (SLURM's time-limit warning)
    try:
        report = _run(cfg)
    except distributed.Preempted:
        distributed.shutdown()  # every rank stopped after the same step
        raise
    except BaseException as err:
        distributed.abort(err)
        raise
    distributed.shutdown()
    return report


def _run(cfg):
    torch.manual_seed(cfg.seed)
    # far-tail softmax probabilities times small differences are denormal floats, several times slower on CPUs
    torch.set_flush_denormal(True)
    rd = rundir.RunDir(cfg.output_dir)
    rd.check_usable()
    state = resume_state(cfg, rd)
    s = prepare(cfg, rd)  # before anything is written or any model runs: bad input fails here
    open_run_dir(s, state)
    if s.main:
        print("config:\n" + str(cfg), flush=True)
    t_start = time.time()
    if pruning.Shape.of(cfg).needs_calibration:
        prune(s, state)
    target = initial_target(cfg).to(s.device)
    tgt = models.Adapter(target)
    if cfg.lora_rank > 0:  # a wrong module name fails here, before the source runs
        lora.check_targets(tgt.layers[0], cfg.lora_targets)
    head_t = tgt.head.weight[:s.vocab]
    check_reused_files(s, state)

    needs_source = not all(p in state["done"] for p in SOURCE_PHASES)
    if needs_source:
        source, src, runner, head_s = load_source(s)
    report = dict(state["done"].get("eval_before") or {})
    if "eval_before" not in state["done"]:  # marked done without eval_data too: a resume need not load the source
        if s.eval_data is not None:
            report = {"source": evaluate(s, src, "source", runner, head_s),
                      "target_before": evaluate(s, tgt, "target before", head=head_t)}
            s.monitor.print(f"NLL source {report['source']['nll']:.3f}, target before "
                            f"{report['target_before']['nll']:.3f} nats/token")
        mark(s, state, "eval_before", report)

    if "plan" not in state["done"]:
        t0 = time.time()
        engines.new_trace(runner)  # the evaluation ran forwards only; attribution runs backwards too
        scores = attribution.phase(s, src, runner, head_s) if cfg.pairing == "attribution" else None
        plan = pairing.make_plan(cfg.pairing, scores, s.n_source, s.n_target, cfg.pairing_lambda)
        if s.main:
            rundir.write_json_checked(rd.path("plan.json"), plan)
        mark(s, state, "plan", {"budget": source_cost(s, "attribution", time.time() - t0)})
    plan = rundir.read_json_checked(rd.path("plan.json"), "the layer pairing")
    s.monitor.print(f"pairing ({plan['strategy']}): target layer k <- source layer {plan['pairs']}")

    if "cache" not in state["done"]:
        t0 = time.time()
        m = alignment.phase(s, head_t, head_s)
        phase_memory(s, "alignment")
        engines.new_trace(runner)  # else the cache replays attribution's trace, backward prefetches included
        cache.phase(s, src, runner, plan, m, tgt, head_t)
    if needs_source:
        engines.release_source(runner)  # DeepSpeed keeps a ZeRO-3 engine's model in a global list otherwise
        summary.map_large_allocations(False)
        del source, src, runner
        if "cache" not in state["done"]:  # the head's rows outlive the rest of the source, to be written whole now
            summary.release_memory()  # DeepSpeed's engine holds the source in reference cycles: collected first
            cache.write_source_head(s, head_s)
            mark(s, state, "cache", {"budget": source_cost(s, "cache", time.time() - t0)})
        del head_s
        phase_memory(s, "source_released")  # on every rank: the frontier stages start without the source

    store = cache.ActivationCache(rd.path("cache"), len(s.data), cfg.cache_shard_examples)
    # what is alive now (the imported modules, the target, the data: about 600,000 objects under DeepSpeed) outlives
    # the stages, the source gone: frozen while they run, no collection walks it again (the full one at every
    # stage's end took 0.4 s of each rank's time, a stage 8 s at 2 ranks); unfrozen after, so that the interpreter's
    # exit still collects it (Triton's bindings report what is left)
    gc.collect()
    gc.freeze()
    try:
        metrics = training.phase(s, state, tgt, head_t, store, lambda phase, info: mark(s, state, phase, info))
    finally:
        gc.unfreeze()
    if s.main:
        rundir.write_json(rd.path("metrics.json"), {"stages": metrics, "plan": plan})
        rundir.write_json(rd.path("budget.json"), budget_of_run(state, metrics))

    if "export" not in state["done"]:
        if s.main:
            with rundir.writing(rd.path("target")):
                export.save_hf(target, s.target_tokenizer, rd.path("target"),
                               {"semalign_plan.json": plan, "semalign_metrics.json": metrics,
                                "semalign_config.json": cfg.to_dict()})
        mark(s, state, "export")
    if s.validation is not None and "eval_validation" not in state["done"]:
        mark(s, state, "eval_validation", evaluate(s, tgt, "validation", head=head_t, dataset=s.validation))
    if s.eval_data is not None:
        if "eval_after" not in state["done"]:
            mark(s, state, "eval_after", evaluate(s, tgt, "target after", head=head_t))
        report["target_after"] = state["done"]["eval_after"]
        report = summary.finish_report(report)
    if s.validation is not None:  # the NLL that choices are made on
        report["validation"] = {"target_after": state["done"]["eval_validation"]}
        s.monitor.print(f"validation NLL (target after, {len(s.validation)} held-out transfer examples): "
                        f"{report['validation']['target_after']['nll']:.4f} nats/token")
    if report:
        if s.main:
            rundir.write_json(rd.path("report.json"), report)
        if s.eval_data is not None:
            text = summary.report_markdown(report, cfg.eval_data)
            if s.main:
                rundir.write_text(rd.path("report.md"), text)
            s.monitor.print(text)
    if s.main:
        print(summary.summarize(rd.root), flush=True)
    s.monitor.print(f"done in {time.time() - t_start:.0f} s; exported target: {rd.path('target')}")
    s.monitor.close()
    return report or None


# --- before any model runs -------------------------------------------------------------------------------------
def resume_state(cfg, rd):
    """The finished phases of an earlier run of the same config in output_dir (none for a new directory); a run
    directory of another config is refused."""
    saved = rd.path("config.json")
    if not os.path.isfile(saved):
        return {"done": {}}
    values = rundir.read_json(saved, "the run's config")
    try:
        old = config_mod.from_dict({**values, "output_dir": cfg.output_dir}, origin=saved)
    except ConfigError as err:
        raise ConfigError(f"{saved} holds a config this version cannot read ({err}); use another --output-dir, "
                          f"or delete that folder to start over") from err
    diff = cfg.differs(old)
    if diff:
        raise ConfigError(f"{rd.root} holds a run with a different config ({', '.join(diff)} differ); "
                          f"use another --output-dir, or delete it to start over")
    state = rd.read_state()
    if distributed.rank() == 0:
        print(f"resuming the run in {rd.root}; done so far: {', '.join(state['done']) or 'nothing'}")
    return state


def check_paths(cfg):
    """The models and data sets the config names exist (hub ids are left to their loaders)."""
    models.check_exists(cfg.source, "source", cfg.source_gguf_file)
    if cfg.target is not None:
        models.check_exists(cfg.target, "target", cfg.target_gguf_file)
    data_mod.check_data_path(cfg.data, "data")
    if cfg.eval_data:
        data_mod.check_data_path(cfg.eval_data, "eval_data")


def check_run(cfg, world, source_config, target_config=None):
    """The checks that need the world size or the models' configs (no weights): the run and the dry run apply
    these same ones, before anything expensive (after check_paths)."""
    per_step = world * cfg.grad_accum_steps
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by world {world} x grad_accum_steps "
                          f"{cfg.grad_accum_steps}: each rank runs batch_size / (world x grad_accum_steps) sequences "
                          f"per micro-batch; use a multiple of {per_step} (e.g. --set batch_size="
                          f"{per_step * max(1, cfg.batch_size // per_step)})")
    models.check_config(source_config, "source")
    if target_config is not None:
        models.check_config(target_config, "target")
    n_source = source_config.num_hidden_layers
    shape = pruning.Shape.of(cfg)
    if shape.needs_calibration:  # a target cut by width or block importance: the shape the source can give
        return n_source, pruning.check_shape(source_config, shape).num_layers
    if cfg.target_keep_layers is not None and cfg.target_keep_layers[-1] >= n_source:
        raise ConfigError(f"target_keep_layers {cfg.target_keep_layers} names layer "
                          f"{cfg.target_keep_layers[-1]}, but the source has layers 0..{n_source - 1}")
    n_target = (len(cfg.target_keep_layers) if cfg.target_keep_layers is not None
                else target_config.num_hidden_layers)
    if n_target > n_source:
        raise ConfigError(f"the target has more layers ({n_target}) than the source ({n_source}); SemAlign "
                          f"transfers from a larger source to a smaller target: swap them or prune the target")
    vocab = min(source_config.vocab_size, (target_config or source_config).vocab_size)
    if cfg.fisher_topk > vocab:
        raise ConfigError(f"fisher_topk {cfg.fisher_topk} > vocabulary {vocab}: use at most {vocab} (or 0 for the "
                          f"exact loss)")
    return n_source, n_target


def prepare(cfg, rd):
    rank, world = distributed.rank(), distributed.world()
    check_paths(cfg)
    ds_source = ds_target = None
    source_config = models.config_of(cfg.source, cfg.source_gguf_file)
    target_config = models.config_of(cfg.target, cfg.target_gguf_file) if cfg.target is not None else None
    n_source, n_target = check_run(cfg, world, source_config, target_config)
    counts = budget.model_counts(source_config, models.DTYPES[cfg.dtype])
    if engines.source_zero3(cfg, world, counts["params"], counts["layer_params"]):
        ds_source = engines.load_ds_config(cfg.ds_source_config or engines.default_config_path("source_zero3"),
                                           "source")
    if world > 1 or cfg.ds_target_config is not None:
        ds_target = engines.load_ds_config(cfg.ds_target_config or engines.default_config_path("target_zero2"),
                                           "target")
    tok_s = models.load_tokenizer(cfg.source, cfg.source_gguf_file)
    tokenizer = models.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else tok_s  # what the data is tokenised with
    vocab, tok_t = models.vocab_size(tok_s), tok_s
    if cfg.target is not None:
        tok_t = models.load_tokenizer(cfg.target, cfg.target_gguf_file)
        vocab = models.check_same_vocabulary(tok_s, tok_t, cfg.source, cfg.target, source_config.vocab_size,
                                             target_config.vocab_size)
    if cfg.tokenizer:
        vocab = min(vocab, models.check_same_vocabulary(tokenizer, tok_s, cfg.tokenizer, cfg.source,
                                                        models.vocab_size(tokenizer), source_config.vocab_size))
    pad_id = data_mod.pad_id(tokenizer)
    if pad_id >= vocab:
        raise ConfigError(f"the pad token id {pad_id} lies beyond the {vocab} token ids source and target share: "
                          f"set a pad token below {vocab} in the tokenizer (or use the smaller vocabulary's)")
    transfer, validation = transfer_sets(cfg, rd, tokenizer)
    if len(transfer) < world:
        raise ConfigError(f"{len(transfer)} usable transfer examples for {world} ranks: every rank needs "
                          f"at least one; use more data or fewer ranks")
    eval_data = (tokenized(cfg, rd, tokenizer, "eval", cfg.eval_data, cfg.eval_max_examples, cfg.eval_max_seq_len)
                 if cfg.eval_data else None)
    models.out_of_vocabulary(transfer.ids, vocab, f"transfer set {cfg.data}")
    if eval_data is not None:
        models.out_of_vocabulary(eval_data.ids, vocab, f"evaluation set {cfg.eval_data}")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Setup(cfg, rd, device, models.DTYPES[cfg.dtype], rank, world, tokenizer, tok_t, vocab, pad_id, n_source,
                 n_target, transfer, eval_data, ds_source, ds_target, validation=validation,
                 source_width=source_config.hidden_size)


def transfer_sets(cfg, rd, tokenizer):
    """(training part, validation part or None) of the transfer set: with validation_fraction > 0, a seeded share
    of its sequences is held out, to make choices on (never the evaluation set); both are kept in data/."""
    if cfg.validation_fraction == 0:
        return tokenized(cfg, rd, tokenizer, "transfer", cfg.data, cfg.max_examples, cfg.max_seq_len), None
    paths = [rd.path("data", f"{name}.safetensors") for name in ("transfer", "validation")]
    if all(rundir.intact(p) for p in paths):
        return tuple(data_mod.TokenizedSet.from_tensors(rundir.load_tensors(p)) for p in paths)
    full = tokenized(cfg, rd, tokenizer, "transfer (all)", cfg.data, cfg.max_examples, cfg.max_seq_len)
    if len(full) < 2:
        raise ConfigError(f"validation_fraction {cfg.validation_fraction} needs at least 2 transfer examples, "
                          f"{len(full)} usable: use more data or validation_fraction=0")
    return full.split(cfg.validation_fraction, cfg.rows_seed)


def tokenized(cfg, rd, tokenizer, name, spec, max_examples, max_seq_len):
    """The tokenised set, from the run directory when it is there and intact, else made (again)."""
    path = rd.path("data", f"{name}.safetensors")
    try:
        if os.path.isfile(path):  # load_tensors checks it against its checksum
            return data_mod.TokenizedSet.from_tensors(rundir.load_tensors(path))
    except (rundir.DamagedFile, data_mod.StaleTokenization) as err:
        if distributed.rank() == 0:
            print(f"{err}: tokenising the {name} set again", flush=True)
    rows = data_mod.read_rows(spec, cfg.prompt_field, cfg.response_field, cfg.data_split, cfg.rows_seed,
                              cfg.data_format, cfg.messages_field, cfg.completion_field, cfg.max_row_chars)
    result, dropped = data_mod.tokenize(rows, tokenizer, max_seq_len, cfg.loss_on, cfg.chat_template,
                                        max_examples, origin=spec, max_row_chars=cfg.max_row_chars)
    if distributed.rank() == 0:
        print(f"{name} set {spec}: {len(result)} sequences, {int(result.offsets[-1])} tokens, "
              f"{int(result.loss.sum())} loss positions" +
              (f" ({sum(dropped.values())} rows dropped: {dict(dropped)})" if dropped else ""))
    return result


def open_run_dir(s, state):
    """Lock the run directory (rank 0), write the config and the tokenised sets, start the monitor."""
    rd = s.rd
    if s.main:
        rd.make("data", "stages", "frontier")
        rd.lock()
        rundir.write_json(rd.path("config.json"), s.cfg.to_dict())
        rd.write_state(state)
        for name, tokens in (("transfer", s.data), ("eval", s.eval_data), ("validation", s.validation)):
            path = rd.path("data", f"{name}.safetensors")
            if tokens is not None and not rundir.intact(path):
                rundir.save_tensors(path, tokens.tensors())
    distributed.barrier()
    s.monitor = Monitor(rd.root, enabled=s.main, report_to=s.cfg.report_to, hparams=s.cfg.to_dict(),
                        run_name=os.path.basename(os.path.abspath(rd.root)))


def check_reused_files(s, state):
    """Verify every file a finished phase left before it is reused; a damaged one is recomputed (its phase and
    those built on it are marked undone, and the log says so). Rank 0 checks, for every rank alike."""
    rd, done, damaged = s.rd, state["done"], []

    def check(path, phases):
        try:
            ok = rundir.verified(path)
        except rundir.DamagedFile as err:
            ok = False
            damaged.append(str(err))
        if not ok:
            for phase in phases:
                done.pop(phase, None)
        return ok

    if s.main:
        if "plan" in done:
            check(rd.path("plan.json"), ["plan", "cache"])
        if "cache" in done:
            for problem in cache.ActivationCache(rd.path("cache"), len(s.data), s.cfg.cache_shard_examples).damaged():
                damaged.append(problem)
                done.pop("cache", None)
        for k in sorted(int(p[6:]) for p in done if p.startswith("stage_") and p[6:].isdigit()):
            # this stage and every later one (trained on its output) are trained again, and what stands on them
            later = [p for p in done if p.startswith("stage_") and p[6:].isdigit() and int(p[6:]) >= k]
            if not check(rd.path("stages", f"layer-{k}.safetensors"),
                         later + ["joint", "export", "eval_after", "eval_validation"]):
                break
        for name in ("stage_output_kd", "stage_finetune"):
            if name in done:
                check(rd.path("stages", "layers.safetensors"), [name, "export", "eval_after", "eval_validation"])
        if "joint" in done:
            check(rd.path("stages", "joint.safetensors"), ["joint", "export", "eval_after", "eval_validation"])
        if "export" in done and not export.intact(rd.path("target")):
            damaged.append(f"{rd.path('target')} is incomplete or damaged")
            done.pop("export", None)
    state["done"] = distributed.broadcast_object(done)
    if damaged:
        for problem in damaged:
            print(f"recomputing: {problem}", flush=True)
        rd.write_state(state)


def mark(s, state, phase, info=None):
    """Record a finished phase (rank 0 writes; every rank keeps the same state)."""
    state["done"][phase] = info if info is not None else True
    phase_memory(s, phase)
    if s.main:
        s.rd.write_state(state)
    distributed.barrier()


def phase_memory(s, name):
    """Log memory/NAME, rank 0's memory as a phase ends (rss_phase_peak_mib: the phase's own peak), after handing
    back what the phase freed; the next phase's peak starts from here."""
    summary.release_memory()
    s.monitor.log(f"memory/{name}", summary.memory_scalars(s.device, phase_peak=True), 0)
    summary.reset_phase_peak()


def source_cost(s, phase, seconds):
    """Budget of the source's phases: attribution (every layer forward, again with attribution_recompute, and
    backward, weights frozen, over the attribution examples; none with uniform pairing) and the cache (every layer
    forward over the transfer set)."""
    cfg, lengths = s.cfg, s.data.lengths
    model = budget.shape(models.config_of(cfg.source, cfg.source_gguf_file), s.vocab)
    if phase == "attribution":
        if cfg.pairing != "attribution":
            return budget.cost(model, 0, 0, 0, 0, seconds=seconds)
        n = len(s.data) if cfg.attribution_examples is None else min(cfg.attribution_examples, len(s.data))
        positions, loss = int(lengths[:n].sum()), int(s.data.loss_counts[:n].sum())
        forwards = 2 if cfg.attribution_recompute else 1  # each layer recomputed in the backward
        return budget.cost(model, positions, loss, positions / n, forwards * s.n_source, s.n_source, 1, 1,
                           weight_grads=False, seconds=seconds)
    positions = int(lengths.sum())
    return budget.cost(model, positions, 0, positions / len(s.data), s.n_source, seconds=seconds)


def budget_of_run(state, metrics):
    """budget.json: each phase's counts, FLOPs and seconds; "training" sums the target's training phases (what
    comparisons hold equal), "total" adds the source's attribution and cache."""
    done = state["done"]
    phases = {name: done[key]["budget"] for name, key in (("attribution", "plan"), ("cache", "cache"))
              if isinstance(done.get(key), dict) and "budget" in done[key]}
    phases.update({(f"stage_{k}" if k.isdigit() else k): m["budget"] for k, m in metrics.items() if "budget" in m})
    training = budget.add(*[c for name, c in phases.items() if name not in ("attribution", "cache")])
    return {"phases": phases, "training": training, "total": budget.add(*phases.values())}


# --- models --------------------------------------------------------------------------------------------------
PRUNED_TARGET = "pruned-target"  # the run directory's folder of a target cut by width or block importance


def prune(s, state):
    """A target cut from the source by width (and depth by block importance), docs/method.md section 7: rank 0
    scores the source's units on the first prune_calibration_examples of the transfer set and writes the target
    into the run directory, whole or not at all. A resumed run verifies it against the checksums recorded when it
    was written; a damaged one is cut again, and when the new one differs, every phase built on it runs again."""
    folder, done = s.rd.path(PRUNED_TARGET), state["done"].get("prune")
    files = rundir.folder_checksums(folder) if s.main and os.path.isdir(folder) else None
    if distributed.broadcast_object(done is not None and files == done["files"]):
        return
    if s.main:
        if done is not None:
            print(f"{folder} is missing or fails its checksums: pruning the target again", flush=True)
        t0, tmp = time.time(), folder + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with rundir.writing(tmp):
            batches = pruning.calibration_batches(s.data, s.pad_id, s.cfg.prune_calibration_examples)
            kept, _ = pruning.prune_target(s.cfg.source, batches, pruning.Shape.of(s.cfg), tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        files = rundir.folder_checksums(folder)
        print(f"pruned target: width {len(kept.channels)}, source layers {kept.layers} "
              f"({time.time() - t0:.0f} s)", flush=True)
    files = distributed.broadcast_object(files)
    if done is not None and done["files"] != files:  # a different target: nothing built on the old one stands
        for phase in [p for p in state["done"] if p != "prune"]:
            state["done"].pop(phase)
    mark(s, state, "prune", {"files": files, "shape": dataclasses.asdict(pruning.Shape.of(s.cfg))})


def initial_target(cfg, run_dir=None):
    """The target as training starts: loaded (a random-init one seeded with seed + 1, so that it differs from a
    random-init source), the kept layers of the source, read alone (no process holds the whole source), or the
    target the prune phase cut by width into the run directory (`run_dir`, default output_dir)."""
    if pruning.Shape.of(cfg).needs_calibration:
        folder = os.path.join(run_dir or cfg.output_dir, PRUNED_TARGET)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigError(f"no pruned target in {folder}: the run's prune phase writes it; run the transfer "
                              f"first")
        return models.load_model(folder, None, cfg.dtype, cfg.seed + 1)
    if cfg.target_keep_layers is None:
        return models.load_model(cfg.target, cfg.target_gguf_file, cfg.dtype, cfg.seed + 1)
    return models.load_pruned(cfg.source, cfg.target_keep_layers, cfg.source_gguf_file, cfg.dtype, cfg.seed)


def load_source(s):
    """(model, adapter, ZeRO-3 engine or None, this rank's vocab_parallel.Rows of the LM head)."""
    cfg = s.cfg
    if s.ds_source is not None:
        ds = engines.fill(s.ds_source, cfg.eval_batch_size, s.world, cfg.dtype)
        n_params = models.parameter_count(cfg.source, cfg.source_gguf_file)
        engines.check_source_fits(ds, n_params, s.dtype.itemsize)
        phase_memory(s, "before_source")
        if s.device.type == "cpu":
            summary.map_large_allocations(True)
        source, runner = engines.sharded_source(cfg.source, cfg.source_gguf_file, cfg.dtype, cfg.seed, ds,
                                                shared=cfg.source_shared_memory)
        held = engines.parameter_bytes_on_this_rank(source)
        share = held / (n_params * s.dtype.itemsize)
        s.monitor.log("memory", {"source_param_bytes_rank0": held, "source_param_fraction_rank0": share}, 0)
        how = ""
        if distributed.shares_partitions():
            how = "; the ranks map each other's partitions from /dev/shm instead of gathering them"
        elif cfg.source_shared_memory and s.device.type == "cpu" and distributed.one_host():
            how = (f"; /dev/shm has no room for the source (up to {n_params * s.dtype.itemsize * 1.1 / 2**30:.1f} GiB), "
                   f"so its gathers copy (source_shared_memory)")
        s.monitor.print(f"source under ZeRO-3 on {s.world} ranks: {held / 2**20:.1f} MiB of parameters on rank 0 "
                        f"({100 * share:.0f}% of the model){how}")
    else:
        source = models.load_model(cfg.source, cfg.source_gguf_file, cfg.dtype, cfg.seed).to(s.device)
        runner = None
        if s.world > 1:
            s.monitor.print(f"source whole on each of {s.world} ranks (source_sharding {cfg.source_sharding}): "
                            f"data parallel, no ZeRO-3")
    src = models.Adapter(source)
    # the head (and, under ZeRO-3, the embedding) as this rank's vocabulary rows: never gathered whole
    head = vocab_parallel.source_rows(src, s.vocab, s.device, zero3=runner is not None)
    phase_memory(s, "source_loaded")
    return source, src, runner, head


@torch.no_grad()
def evaluate(s, adapter, name, runner=None, head=None, dataset=None):
    """NLL of the evaluation responses (or of `dataset`'s), data-parallel over ranks."""
    from semalign_ds.nll import batch_nll
    dataset = s.eval_data if dataset is None else dataset
    mine = distributed.shard(len(dataset))
    mine.sort(key=lambda i: -int(dataset.lengths[i]))  # longest first: little padding per batch
    sums = torch.zeros(2, dtype=torch.float64)
    for idx, real in s.bar(lockstep(s, mine, s.cfg.eval_batch_size, runner), desc=f"eval {name}", leave=False):
        ids, attn, loss = (t.to(s.device) for t in dataset.batch(idx, s.pad_id))
        total, count = batch_nll(adapter, ids, attn, loss, head, runner)
        if real:
            sums += torch.tensor([total, count], dtype=torch.float64)
    total, count = distributed.all_reduce_sum(sums).tolist()
    return {"nll": total / count, "tokens": int(count)}


def lockstep(s, indices, batch_size, runner):
    """This rank's batches of `indices`, padded so that every rank runs as many forwards of a ZeRO-3 model."""
    batches = [[indices[j] for j in b] for b in data_mod.index_batches(len(indices), batch_size)]
    return distributed.lockstep(batches, collective=runner is not None and s.world > 1)


if __name__ == "__main__":
    sys.exit("run a transfer with `semalign-ds` or `python launchers/transfer.py`")
