"""--dry-run: numbers equal to hand-computed ones on a tiny pair, refusals before any work, and the Llama-2-13B
-> 7B plan printed without holding weights."""
import csv
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

from semalign_ds import config as config_mod, data as data_mod, dryrun, models
from semalign_ds.config import ConfigError
from tests.helpers import ROOT

TINY = os.path.join(ROOT, "launchers", "configs", "tiny")
LLAMA_YAML = os.path.join(ROOT, "launchers", "configs", "llama2-13b-to-7b.yaml")


def shapes_only(tmp_path):
    """The tiny pair's config.json files with no tokenizer beside them: token counts fall back to the bound."""
    for name in ("source", "target"):
        shutil.copy(os.path.join(TINY, f"{name}.json"), tmp_path / f"{name}.json")
    return {"source": str(tmp_path / "source.json"), "target": str(tmp_path / "target.json")}


def act(batch, seq, d, heads, b):  # Korthikanti et al.: bytes of one layer's saved activations at 2 bytes/value
    return batch * seq * d * (34 + 5 * heads * seq / d) * b / 2


def test_numbers_match_a_hand_computation(tmp_path):
    values = {**shapes_only(tmp_path), "data": "embedded:stdlib", "eval_data": None, "max_examples": 9,
              "max_seq_len": 17, "batch_size": 6, "grad_accum_steps": 3, "stage_steps": 5, "attribution_examples": 4,
              "eval_batch_size": 3, "attribution_batch_size": 5, "dtype": "bfloat16", "fisher_weight": 0.25}
    cfg = config_mod.from_dict(values)
    p = dryrun.plan(cfg, world=2)
    spec = {n: json.load(open(os.path.join(TINY, f"{n}.json"))) for n in ("source", "target")}
    V, b, W, N, T = 512, 2, 2, 9 * 17, 17

    def layer_matmul(c):
        d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        return 2 * d * d + 2 * d * kv * (d // h) + 3 * d * c["intermediate_size"]

    s, t = spec["source"], spec["target"]
    Ls, ds, Lt, dt = s["num_hidden_layers"], s["hidden_size"], t["num_hidden_layers"], t["hidden_size"]
    lm_s, lm_t = layer_matmul(s), layer_matmul(t)
    lp_s, lp_t = lm_s + 2 * ds, lm_t + 2 * dt  # two RMSNorm weights per layer
    assert p.source.params == 2 * V * ds + Ls * lp_s + ds  # untied head
    assert p.target.params == V * dt + Lt * lp_t + dt  # tied head
    assert (p.tokens.examples, p.tokens.tokens, p.tokens.loss_positions) == (9, N, N)
    assert "upper bound" in p.tokens.how
    assert p.pairs == "attribution: decided at run time"
    assert p.cache_bytes == N * (Lt * dt + ds) * 4 + V * ds * 4  # the cache and the frontiers are float32
    assert p.frontier_bytes == N * dt * 4
    phases = {ph.name: ph for ph in p.phases}
    assert list(phases) == ["attribution", "alignment", "activation cache", "stage k < 3 (each)", "stage 3 (output)",
                            "all 3 stages"]
    src_held = p.source.params * b / W  # the ZeRO-3 partition
    attr = phases["attribution"]
    assert attr.param_bytes == src_held and attr.train_bytes == 0
    # frozen weights: a backward costs once its forward; the head forward and back at every loss position
    attr_n = N * 4 / 9
    assert attr.flops == pytest.approx((2 * lm_s + 2 * T * ds) * 2 * Ls * attr_n + 2 * V * ds * 2 * attr_n, rel=1e-12)
    # every layer's saved activations, the logits (float32, after their bfloat16 product: one rank's positions on
    # 1/W of the vocabulary, in one chunk here), the float32 gradient they form, another rank's positions (bfloat16)
    # and its part of their gradient, whatever W; the gradient of the one state the backward is at (each layer's
    # score is taken from it, none is kept)
    nll = 5 * T * V // W * (4 + 2) + 5 * T * ds * 4 + 5 * T * ds * (2 + 4)
    assert attr.activation_bytes == pytest.approx(Ls * act(5, T, ds, 4, b) + nll + 5 * T * ds * b, rel=1e-12)
    # more ranks: fewer vocabulary columns each, and no more positions held
    at8 = dryrun.phase_of(dryrun.plan(config_mod.from_dict({**values, "batch_size": 24}), world=8).phases,
                          "attribution").activation_bytes
    assert at8 == pytest.approx(attr.activation_bytes - 5 * T * (V // W - V // 8) * (4 + 2), rel=1e-12)
    # recomputed: every layer's input and one layer's activations at a time, for one more forward of every layer
    rc = dryrun.phase_of(dryrun.plan(config_mod.from_dict({**values, "attribution_recompute": True}), 2).phases,
                         "attribution")
    assert rc.activation_bytes == pytest.approx(Ls * 5 * T * ds * b + act(5, T, ds, 4, b) + nll + 5 * T * ds * b,
                                                rel=1e-12)
    assert rc.flops == pytest.approx((2 * lm_s + 2 * T * ds) * 3 * Ls * attr_n + 2 * V * ds * 2 * attr_n, rel=1e-12)
    # besides the source: the runtime, the target (loaded first), the data; no copy of the source head (this
    # rank's rows of it are a view of its partition: 512 x 64 splits evenly over 2 ranks)
    MiB = 2**20
    # (of the target, read mapped and not evaluated before training here, only its head)
    held = {"runtime": 490 * MiB, "DeepSpeed": 380 * MiB, "target head": V * dt * b, "tokenised data": N * 9}
    # ZeRO-3 in a forward: one layer, the prefetch bucket ("auto": 0 on CPU, 5e7 > the model on CUDA); neither
    # vocabulary matrix
    in_flight = (lp_s + (p.source.params if torch.cuda.is_available() else 0)) * b
    assert attr.held == {**held, "ZeRO-3 gathered in a forward": in_flight}
    assert attr.peak_bytes == src_held + attr.activation_bytes + sum(held.values()) + in_flight
    cache = phases["activation cache"]
    assert cache.flops == pytest.approx((2 * lm_s + 2 * T * ds) * Ls * N, rel=1e-12)
    shard = N * (Lt * dt + ds) * 4  # the one cache shard (9 examples, 64 per shard), in fp32
    # batches of 3 (eval_batch_size): one state whole as a layer makes it, and the loss positions' rows (here every
    # position) of the paired states, h^(0) (for the geometry objective) and h^(Ls)
    kept = min(Lt, Ls) + 2
    assert cache.activation_bytes == pytest.approx(act(3, T, ds, 4, b) / 2 + 3 * T * ds * b * (1 + kept) + shard,
                                                   rel=1e-12)
    # a new trace for the cache (engines.new_trace): a forward's gathered parameters, as in attribution
    assert cache.held == {**held, "ZeRO-3 gathered in a forward": in_flight}
    step = 6 * T  # tokens (= loss positions) per optimizer step
    layer_fwd = 2 * lm_t + 2 * T * dt  # causal attention: T/2 keys on average
    fisher, kl, frontier = 8 * step * V * dt, 2 * step * V * (ds + 3 * dt), layer_fwd * N
    stage, final = 5 * (3 * layer_fwd * step + fisher), 5 * (3 * layer_fwd * step + kl + fisher)
    assert phases["stage k < 3 (each)"].flops == pytest.approx(stage + frontier, rel=1e-12)
    assert phases["stage 3 (output)"].flops == pytest.approx(final + frontier, rel=1e-12)
    assert phases["all 3 stages"].flops == pytest.approx(2 * (stage + frontier) + final + frontier, rel=1e-12)
    # the cached rows a stage reads: aligned.k for a Fisher stage; the last also source_final (KL) and aligned.3
    # (fisher_weight > 0)
    for name, row_width in (("stage k < 3 (each)", dt), ("stage 3 (output)", dt + ds)):
        ph = phases[name]
        assert ph.param_bytes == p.target.params * b
        # ZeRO-2: the layer's gradients whole in the reduce bucket (5e7 values), this rank's half of the fp32
        # master copy, its two fp32 moments and its gradients
        assert ph.train_bytes == lp_t * b + lp_t * (3 * 4 + b) / W
        assert ph.activation_bytes == pytest.approx(act(1, T, dt, 4, b) + 3 * T * V * 4, rel=1e-12)  # micro 1
        # the source is released; the source head for the KL, this rank's cached rows and frontiers
        assert ph.held == {"runtime": 490 * MiB, "DeepSpeed": 380 * MiB, "tokenised data": N * 9,
                           "source head": V * ds * b, "cached rows, this rank's": N / W * row_width * 4,
                           "frontier, this rank's (the old and the next)": 2 * N / W * dt * 4}

    # LoRA and top-k change what they should
    lora = dryrun.plan(config_mod.from_dict({**cfg.to_dict(), "lora_rank": 3, "fisher_topk": 7}), world=2)
    hd, kv = dt // 4, 2
    i = t["intermediate_size"]  # default targets: v_proj, o_proj, up_proj, down_proj; r x (in + out) each
    assert lora.target.lora_params == 3 * ((dt + kv * hd) + (dt + dt) + (dt + i) + (i + dt))
    assert lora.cache_bytes == N * (Lt * dt + ds + (Lt - 1) * (2 * 7 + 1)) * 4 + V * ds * 4  # int32 id, z*, tail
    assert [ph.in_total for ph in p.phases] == [True, True, True, False, False, True]
    from semalign_ds.alignment import alignment_cost
    align = phases["alignment"]  # each rank its half of the vocabulary; both heads held whole
    assert align.flops == 2 * alignment_cost(V // 2, dt, ds, 8)["flops"]
    assert align.activation_bytes == alignment_cost(V // 2, dt, ds, 8)["peak_bytes"]
    assert align.param_bytes == src_held and align.held == held  # both heads are among the held terms
    text = dryrun.report(cfg, world=2, tflops=123.0)
    per_rank = phases["all 3 stages"].flops / W
    assert f"{per_rank / 1e12:.4g}" in text and "123 TFLOP/s" in text
    total = (attr.flops + align.flops + cache.flops + phases["all 3 stages"].flops) / W
    assert re.search(rf"run \(phases above, once each\) +peak .* {total / 1e12:.4g} +{total / 123e12 * 1e3:.3g} ms",
                     text), text

    # a joint phase alone (stage_steps 0): no stage and no frontier; the Fisher layer objectives of the Lt - 1
    # layers below the output are its only head cost beyond the KL, the cosine objective has none
    joint = {**cfg.to_dict(), "stage_steps": 0, "joint_steps": 7, "fisher_weight": 0.0}
    plans = {o: dryrun.plan(config_mod.from_dict({**joint, "layer_objective": o}), world=2)
             for o in ("fisher", "cosine")}
    assert [ph.name for ph in plans["fisher"].phases] == ["attribution", "alignment", "activation cache",
                                                          "joint (7 steps)"]
    flops = {o: pl.phases[-1].flops for o, pl in plans.items()}
    assert flops["cosine"] == pytest.approx(7 * (3 * Lt * layer_fwd * step + kl), rel=1e-12)
    assert flops["fisher"] - flops["cosine"] == pytest.approx(7 * fisher * (Lt - 1), rel=1e-12)
    # no stage, so no frontier; the rows of aligned.1, aligned.2 (the layer objectives) and source_final (the KL)
    assert plans["fisher"].phases[-1].held["cached rows, this rank's"] == N / W * (2 * dt + ds) * 4
    assert not any(k.startswith("frontier") for k in plans["fisher"].phases[-1].held)
    assert "one frontier" in text
    assert "one frontier" not in dryrun.report(config_mod.from_dict({**joint, "layer_objective": "cosine"}), world=2)


def test_one_process_holds_no_deepspeed_terms(tmp_path):
    """One process: the source whole, no DeepSpeed, nothing gathered; AdamW's moments exist from the first step
    on, made after its backward (a one-step stage peaks with the gradients alone); with uniform pairs on two ranks
    the cache holds only what a forward gathers."""
    values = {**shapes_only(tmp_path), "data": "embedded:stdlib", "eval_data": None, "max_examples": 9,
              "max_seq_len": 17, "batch_size": 2, "stage_steps": 5}
    p = dryrun.plan(config_mod.from_dict(values), world=1)
    b, MiB, V, N = 4, 2**20, 512, 9 * 17
    lp_t = p.target.layer_params
    phases = {ph.name: ph for ph in p.phases}
    held = {"runtime": 490 * MiB, "target head": V * p.target.width * b, "tokenised data": N * 9}
    for name in ("attribution", "alignment", "activation cache"):
        assert phases[name].param_bytes == p.source.params * b and phases[name].held == held, name
    assert phases["all 3 stages"].train_bytes == 3 * lp_t * b  # gradients and two moments
    assert "DeepSpeed" not in phases["all 3 stages"].held
    assert not any(k.startswith("target file pages") for k in phases["all 3 stages"].held)  # trained in place
    evaluated = dryrun.plan(config_mod.from_dict({**values, "eval_data": "embedded:humaneval"}), world=1)
    assert evaluated.phases[0].held["target"] == p.target.params * b  # its forward reads every page
    one_step = dryrun.plan(config_mod.from_dict({**values, "stage_steps": 1}), world=1)
    assert one_step.phases[-1].train_bytes == lp_t * b
    uniform = dryrun.plan(config_mod.from_dict({**values, "pairing": "uniform"}), world=2)
    cache = next(ph for ph in uniform.phases if ph.name == "activation cache")
    bucket = uniform.source.params if torch.cuda.is_available() else 0  # "auto": 5e7 > the model, or 0 on CPU
    assert cache.held["ZeRO-3 gathered in a forward"] == (uniform.source.layer_params + bucket) * b
    assert not any("kept" in k for k in cache.held)
    # the source whole on each of 2 ranks (source_sharding replicated, or auto for a source this small): its phases
    # hold what one process holds; the stages run ZeRO-2 and so DeepSpeed
    for sharding in ("replicated", "auto"):
        two = dryrun.plan(config_mod.from_dict({**values, "source_sharding": sharding}), world=2)
        ph = {x.name: x for x in two.phases}
        for name in ("attribution", "alignment", "activation cache"):
            assert ph[name].param_bytes == p.source.params * b and ph[name].held == held, (sharding, name)
        assert ph["all 3 stages"].held["DeepSpeed"] == 380 * MiB
    assert dryrun.phase_of(p.phases, "plan").name == "attribution"
    assert dryrun.phase_of(p.phases, "cache").name == "activation cache"
    assert [dryrun.phase_of(p.phases, f"stage_{k}").name for k in (1, 2, 3)] == \
        ["stage k < 3 (each)", "stage k < 3 (each)", "stage 3 (output)"]
    assert dryrun.phase_of(p.phases, "stages").name == "all 3 stages"
    assert dryrun.phase_of(p.phases, "export") is None


SCALE_CSV = os.path.join(ROOT, "benchmarks", "scale.csv")


def _scale_benchmark():
    """launchers/scale_benchmark.py as a module (launchers/ is not a package)."""
    spec = importlib.util.spec_from_file_location("scale_benchmark",
                                                  os.path.join(ROOT, "launchers", "scale_benchmark.py"))
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    return scale


# rows measured before ZeRO's stages released the target's file pages they had read (engines.own_copies): their
# stages held those pages too, one trained layer's worth a stage at world > 1, which the dry run no longer counts
PAGES_RELEASED = "2026-12-06T05:40"


def _within(predicted, measured, tolerance=0.25):
    return abs(predicted - measured) <= tolerance * measured


def test_the_dry_run_predicts_the_measured_scale_rows():
    """Every row of benchmarks/scale.csv that the dry run estimates, from the row's settings (the scale benchmark's
    reduced config, its source and target, its world size), within 25% of rank0_phase_peak_mib_run: rank 0's peak
    as the run measured it over exactly that phase (the sampled columns' windows also hold the alignment before the
    cache and the source until its release in stage 1's; rank 0 is the largest rank in every sampled row). The
    frontier stages are compared as one phase, their peak against the dry run's for all stages: the target is
    read mapped, so a stage's resident memory grows with the layers touched so far and only the last reaches the
    estimate."""
    from semalign_ds import synthetic
    scale = _scale_benchmark()
    with open(SCALE_CSV) as f:
        rows = [r for r in csv.DictReader(f) if r["dryrun_peak_mib_per_rank"] not in ("", "-")]
    assert len(rows) >= 8
    written = {r["source"]: os.path.isdir(synthetic.folder(r["source"].split(":", 1)[1]))
               for r in rows if r["source"].startswith("synthetic:")}
    plans, measured, pages = {}, {}, {}
    for r in rows:  # the stages as one phase: their peak
        key = (r["source"], r["target"], r["settings"], int(r["world"]))
        if key not in plans:
            target = ({"target_keep_layers": json.loads(r["target"].removeprefix("source layers "))}
                      if r["target"].startswith("source layers ") else {"target": r["target"]})
            settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in r["settings"].split())}
            cfg = config_mod.from_dict({**scale.REDUCED, "source": r["source"], **target, **settings})
            plans[key] = dryrun.plan(cfg, int(r["world"]))
        phase = "stages" if r["phase"].startswith("stage") else r["phase"]  # stage_K, and "stages" (their sum)
        measured[key + (phase,)] = max(measured.get(key + (phase,), 0), float(r["rank0_phase_peak_mib_run"]))
        pages[key + (phase,)] = r["date"] < PAGES_RELEASED and phase == "stages" and int(r["world"]) > 1
    misses = []
    for (*key, phase), got in measured.items():
        phases = plans[tuple(key)].phases
        predicted = dryrun.phase_of(phases, phase).peak_bytes / 2**20
        if pages[(*key, phase)]:
            tgt = plans[tuple(key)].target
            predicted += tgt.layers * tgt.layer_params * 4 / 2**20  # float32 rows only
        if not _within(predicted, got):
            misses.append(f"{key[0]} {key[2]} world {key[3]} {phase}: {predicted:.0f} MiB predicted, "
                          f"{got:.0f} measured")
    assert len(measured) >= 6 and not misses, misses
    for source, was in written.items():  # a dry run reads a synthetic model's shape and tokenizer, never writes it
        assert os.path.isdir(synthetic.folder(source.split(":", 1)[1])) == was


def test_token_counts_come_from_the_data_when_cheap(tmp_path):
    rng = random.Random(7)
    words = ["def", "return", "x", "(", ")", "if", "else", "for", "in", "range", ":", "+", "1"]
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": " ".join(rng.choices(words, k=rng.randint(3, 30))),
             "response": " ".join(rng.choices(words, k=rng.randint(1, 40)))} for _ in range(13)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_mod.from_dict({"source": os.path.join(TINY, "source.json"), "target": os.path.join(TINY,
                                "target.json"), "data": str(path), "eval_data": None, "max_seq_len": 23,
                                "max_examples": 11, "batch_size": 4, "pairing": "uniform"})
    p = dryrun.plan(cfg, world=1)
    tok = models.load_tokenizer(cfg.source)
    reference, _ = data_mod.tokenize(data_mod.read_rows(str(path)), tok, 23, "response", "auto", 11)
    assert (p.tokens.examples, p.tokens.tokens, p.tokens.loss_positions) == \
        (len(reference), int(reference.offsets[-1]), int(reference.loss.sum()))
    assert p.tokens.how == "counted by tokenising the data"
    assert p.pairs == "uniform: 1->2, 2->4, 3->6"
    assert [ph.name for ph in p.phases][0] == "alignment"  # no attribution phase with uniform pairs


@pytest.mark.parametrize("overrides, world, match", [
    ({"batch_size": 6}, 4, r"batch_size 6 is not divisible by world 4 x grad_accum_steps 1"),
    ({"lora_rank": 2, "lora_targets": ["up_proj", "c_fc"]}, 1, r"lora_targets \['c_fc'\] name no linear module in a llama layer; its linear modules: \['down_proj', "),
    ({"fisher_topk": 513}, 1, r"fisher_topk 513 > vocabulary 512: use at most 512"),
    ({"target": None, "target_keep_layers": [0, 6]}, 1, r"names layer 6, but the source has layers 0\.\.5"),
    ({"max_examples": None}, 1, r"set max_examples"),
    ({}, 0, r"--world 0: the number of ranks must be >= 1"),
])
def test_refusals(tmp_path, overrides, world, match):
    values = {**shapes_only(tmp_path), "data": "embedded:stdlib", "eval_data": None, "max_examples": 9,
              "batch_size": 4, **overrides}
    with pytest.raises(ConfigError, match=match):
        dryrun.plan(config_mod.from_dict(values), world=world)


@pytest.mark.slow
def test_llama2_13b_to_7b_plan_holds_no_weights():
    """The paper's scale on this machine: a plan in well under a minute, peak RSS far below one model's weights
    (13B parameters in bf16 would be 24 GiB)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child forked from a large test process (a
    # pytest-xdist worker late in the suite) would report its parent's peak
    code = ("import sys; from semalign_ds import summary; from semalign_ds.cli import main; "
            f"rc = main(['--config', {LLAMA_YAML!r}, '--dry-run', '--world', '8']); "
            "print('MAXRSS_KB', summary.peak_rss_bytes() // 1024); sys.exit(rc)")
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.time() - t0
    assert done.returncode == 0, done.stderr
    out = done.stdout
    rss = int(out.split("MAXRSS_KB")[1]) * 1024
    print(f"llama2-13b->7b dry run: {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MiB")
    assert rss < 2 * 2**30
    assert "40 layers, width 5120, vocab 32000, 13.016 B params" in out
    assert "32 layers, width 4096, 6.738 B params" in out
    assert "8 rank(s)" in out and "attribution: decided at run time" in out and "all 32 stages" in out
    # cache: 20000 x 2048 positions x (32 x 4096 + 5120) values + the source head, all float32
    assert f"activation cache {(20000 * 2048 * (32 * 4096 + 5120) * 4 + 32000 * 5120 * 4) / 2**40:.2f} TiB" in out


def test_gpt2_conv1d_shapes():
    """GPT-2's linear maps are Conv1D ([in, out] weights): counted like nn.Linear, and a LoRA target name that
    matches two modules (attn.c_proj, mlp.c_proj) adapts both."""
    from transformers import GPT2Config
    d, v, layers = 40, 97, 3
    cfg = config_mod.from_dict({"target_keep_layers": [0], "lora_rank": 5, "lora_targets": ["c_fc", "c_proj"]})
    sh = dryrun.shapes(GPT2Config(n_embd=d, n_layer=layers, n_head=4, vocab_size=v, bos_token_id=0,
                                  eos_token_id=0), cfg, "target")
    assert sh.layer_matmul == 3 * d * d + d * d + 4 * d * d + 4 * d * d
    assert sh.body_matmul == layers * sh.layer_matmul and sh.head_matmul == v * d
    assert sh.lora_params == 5 * ((d + 4 * d) + (d + d) + (4 * d + d))


def test_the_scale_plot_draws_every_row_of_the_results(tmp_path):
    """scale.png is drawn from scale.csv: every source's attribution, cache and stages-together rows, rank 0's peak
    and tokens/s; of rows measured again (the same source, settings, phase and world size) the newest."""
    scale = _scale_benchmark()
    series = scale.plot_csv(str(tmp_path / "scale.png"), SCALE_CSV)
    assert (tmp_path / "scale.png").stat().st_size > 10_000
    with open(SCALE_CSV) as f:
        newest = {(r["source"], r["settings"], r["phase"], r["world"]): r for r in csv.DictReader(f)
                  if r["phase"] in ("plan", "cache", "stages")}
    rows = list(newest.values())
    assert sum(len(points) for points in series.values()) == len(rows)
    for r in rows:
        source = " ".join(filter(None, (r["source"], r["settings"])))
        point = dict((w, (mib, tps)) for w, mib, tps in series[(source, r["phase"])])[int(r["world"])]
        assert point == (float(r["rank0_phase_peak_mib_run"]), float(r["tokens_per_s_total"]))


def test_the_plan_names_attribution_recompute_when_activations_dominate(tmp_path):
    """A note when attribution's activations are most of its peak, with what recomputing would hold instead; none
    when they are not, or when it is already on."""
    base = {**shapes_only(tmp_path), "data": "embedded:stdlib", "eval_data": None, "max_examples": 64,
            "max_seq_len": 512, "attribution_examples": 64}
    notes, attrs = {}, {}
    for batch, recompute in ((1, False), (64, False), (64, True)):
        cfg = config_mod.from_dict({**base, "attribution_batch_size": batch, "attribution_recompute": recompute})
        p = dryrun.plan(cfg, world=1)
        notes[batch, recompute] = [n for n in p.notes if "attribution_recompute" in n]
        attrs[batch, recompute] = dryrun.phase_of(p.phases, "attribution")
    attr, lean = attrs[64, False], attrs[64, True]
    small = attrs[1, False]
    assert attr.activation_bytes > attr.peak_bytes / 2 and small.activation_bytes < small.peak_bytes / 2
    assert lean.activation_bytes < attr.activation_bytes / 4
    assert notes[1, False] == [] and notes[64, True] == []
    assert notes[64, False] == [f"attribution's activations are {dryrun._bytes(attr.activation_bytes)} of its "
                                f"{dryrun._bytes(attr.peak_bytes)} per rank; attribution_recompute: true would hold "
                                f"{dryrun._bytes(lean.activation_bytes)} (peak {dryrun._bytes(lean.peak_bytes)}) "
                                "for one more forward"]


def test_the_scale_benchmark_adds_the_stages_together(tmp_path, monkeypatch):
    """The "stages" phase: the frontier stages' seconds and loss tokens summed, each rank's peak over them; none
    where a stage has no time; and before each world size every earlier run's file leaves the page cache."""
    scale = _scale_benchmark()
    rng = random.Random(11)
    phases = {"attribution": {"seconds": 3.0, "tokens": 50}}
    sampled, rank0 = {"plan": [900.0, 800.0]}, {"plan": 905.0}
    for k in range(1, 6):
        phases[f"stage_{k}"] = {"seconds": rng.uniform(0.5, 2.0), "tokens": rng.randint(30, 300)}
        sampled[f"stage_{k}"] = [rng.uniform(1000, 2000), rng.uniform(1000, 2000)]
        rank0[f"stage_{k}"] = rng.uniform(1000, 2000)
    phases["stage_output_kd"] = {"seconds": 9.0, "tokens": 7}  # not a frontier stage
    scale.stages_together(phases, sampled, rank0)
    stages = [f"stage_{k}" for k in range(1, 6)]
    seconds, tokens = sum(phases[s]["seconds"] for s in stages), sum(phases[s]["tokens"] for s in stages)
    assert phases["stages"] == {"seconds": seconds, "tokens": tokens, "tokens_per_s_total": tokens / seconds}
    assert sampled["stages"] == [max(sampled[s][0] for s in stages), max(sampled[s][1] for s in stages)]
    assert rank0["stages"] == max(rank0[s] for s in stages)
    phases = {"stage_1": {"seconds": 1.0, "tokens": 9}, "stage_2": {"seconds": None, "tokens": 9}}
    scale.stages_together(phases, {}, {})
    assert "stages" not in phases

    (tmp_path / "world1" / "cache").mkdir(parents=True)
    files = {str(tmp_path / "world1" / "cache" / "shard_00000.safetensors"), str(tmp_path / "world1.log"),
             str(tmp_path / "config.yaml")}
    for f in files:
        open(f, "w").write("x")
    advised = []
    monkeypatch.setattr(models, "drop_from_page_cache", lambda fs: advised.extend(fs))
    scale.drop_earlier_runs(str(tmp_path))
    assert sorted(advised) == sorted(files)
