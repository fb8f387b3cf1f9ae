"""benchmarks/peers.py: the job's rows (the pipeline's own rows less those that do not fit max_seq_len whole, the
same token ids and loss positions for every trainer), the batches TRL's collator gets, the CSV, the refusals; and,
where the `peers` extra (TRL) is installed, the whole benchmark on the tiny config for a few steps (slow)."""
import csv
import glob
import importlib.util
import math
import os

import pytest
import torch

from semalign_ds import config as config_mod, data as data_mod
from tests.parity import ROOT, TINY_YAML

_spec = importlib.util.spec_from_file_location("peers", os.path.join(ROOT, "benchmarks", "peers.py"))
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)


@pytest.fixture(scope="module")
def tokenizer():
    from semalign_ds import models
    return models.load_tokenizer(os.path.join(ROOT, "launchers", "configs", "tiny", "source.json"))


def tiny_config(**overrides):
    return config_mod.load(TINY_YAML, overrides)


def rows_of_lengths(tokenizer, spec):
    """Rows whose prompt and response are `n` repetitions of a one-token word, for (n_prompt, n_response) in
    spec (the tiny tokenizer has no chat template: a row's tokens are its prompt's and its response's)."""
    word = next(w for w in ("a", "x", "e", " ") if len(tokenizer(w)["input_ids"]) == 1)
    return [{"prompt": word * p, "response": word * r} for p, r in spec]


def test_job_rows_are_the_pipelines_rows_that_fit_whole(tokenizer):
    cfg = tiny_config(max_seq_len=40, max_examples=5)
    # lengths in tokens (prompt, response): whole rows of <= 40 tokens are kept, (30, 20) and (5, 36) are longer;
    # (40, 3) and (45, 5) have their prompt fill max_seq_len and (3, 0) has no response: the pipeline skips them,
    # so they do not count towards max_examples; (1, 1) is the sixth usable row, past max_examples
    spec = [(10, 5), (30, 20), (40, 3), (3, 0), (20, 20), (5, 36), (45, 5), (2, 2), (1, 1)]
    rows = rows_of_lengths(tokenizer, spec)
    lengths = [len(tokenizer(r["prompt"] + r["response"])["input_ids"]) for r in rows]
    assert lengths == [p + r for p, r in spec]  # one token per repetition: the rows are as the spec says
    kept, tokens, counts = peers.job_rows(cfg, tokenizer, rows)
    assert counts == {"used": 5, "kept": 3, "longer": 2}
    assert kept == [rows[0], rows[4], rows[7]]
    # the pipeline's own set of these rows, cut at max_seq_len: ours is its rows that were not cut, unchanged
    theirs, _ = data_mod.tokenize(rows, tokenizer, cfg.max_seq_len, cfg.loss_on, cfg.chat_template,
                                  cfg.max_examples)
    assert len(theirs) == 5
    same = theirs.subset([0, 2, 4])
    for key in ("ids", "loss", "offsets"):
        assert torch.equal(getattr(tokens, key), getattr(same, key)), key
    assert int(tokens.lengths.max()) <= cfg.max_seq_len


def test_no_row_fits(tokenizer):
    cfg = tiny_config(max_seq_len=8, max_examples=2)
    with pytest.raises(SystemExit, match="fits max_seq_len=8 whole"):
        peers.job_rows(cfg, tokenizer, rows_of_lengths(tokenizer, [(4, 6), (5, 9)]))


def test_the_collator_gives_the_pipelines_batches_and_loss_positions(tokenizer):
    cfg = tiny_config(max_seq_len=60, max_examples=6)
    rows = rows_of_lengths(tokenizer, [(10, 5), (3, 20), (7, 7), (30, 2)])
    _, tokens, _ = peers.job_rows(cfg, tokenizer, rows)
    collate = peers.JobCollator(tokens, data_mod.pad_id(tokenizer))
    batch = collate([{"index": 2}, {"index": 0}, {"index": 1}])
    ids, attn, loss = tokens.batch([2, 0, 1], data_mod.pad_id(tokenizer))
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], attn)
    # GKDTrainer scores position t where labels[t + 1] != -100: exactly the pipeline's loss positions
    scored = batch["labels"][:, 1:] != -100
    assert torch.equal(scored, loss[:, :-1])
    assert int(scored.sum()) == int(tokens.loss_counts[[2, 0, 1]].sum())
    assert torch.equal(batch["labels"][:, 1:][scored], ids[:, 1:][loss[:, :-1]])
    assert bool((batch["labels"][:, 0] == -100).all())


def test_batches_and_counts_are_the_pipelines(tokenizer):
    order = peers.batch_stream(20, 8, 5, 3)
    assert order == data_mod.batch_order(20, 8, 5, 3, 0)  # output KD's stage 0, as training.fit draws it
    cfg = tiny_config(max_seq_len=60, max_examples=6)
    _, tokens, _ = peers.job_rows(cfg, tokenizer, rows_of_lengths(tokenizer, [(10, 5), (3, 20), (7, 7)]))
    order = peers.batch_stream(len(tokens), 2, 3, 0)
    positions, loss = peers.batch_counts(tokens, order)
    assert positions == sum(int(tokens.lengths[i]) for b in order for i in b)
    assert loss == sum(int(tokens.loss[int(tokens.offsets[i]):int(tokens.offsets[i + 1])].sum())
                       for b in order for i in b)


def fake_results(nll, train_s=10.0, source_s=None):
    return {"train_s": train_s, "source_s": source_s, "losses": [2.0, 1.0], "rss_peak_mib": 1000.0,
            "process_wall_s": train_s + 5, "tokens": 4000, "loss_tokens": 1500, "steps": 6, "rows": 20,
            "nll": nll, "nll_tokens": 900, "nll_start": 9.0, "load_1m": 0.5, "load_1m_end": 0.7,
            "trainable_params": 1234, "optim": "adamw_torch_fused", "schedule": "constant"}


def test_csv_rows_are_appended_under_one_header(tmp_path):
    args = peers.parser().parse_args(["--config", TINY_YAML, "--set", "max_examples=8"])
    args.config, args.steps, args.batch_size, args.lr = os.path.abspath(TINY_YAML), 6, 8, 3e-3
    per_seed = {0: {"semalign-ds": fake_results(5.0, 2.0, 1.0), "trl": fake_results(5.1, 8.0)},
                1: {"semalign-ds": fake_results(5.2, 2.0, 1.0), "trl": fake_results(5.3, 8.0)}}
    path = tmp_path / "peers.csv"
    assert peers.append_rows(str(path), per_seed, args, 2, 2) == 4
    assert peers.append_rows(str(path), {2: per_seed[0]}, args, 2, 2) == 2
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == peers.COLUMNS
    first = rows[0]
    assert first["trainer"] == "semalign-ds" and first["seed"] == "0"
    assert first["config"] == "launchers/configs/tiny.yaml"
    assert first["settings"] == "steps=6 max_examples=8" and first["device"] and first["torch"] == torch.__version__
    assert float(first["total_s"]) == 3.0 and float(first["source_s"]) == 1.0 and float(first["nll"]) == 5.0
    assert float(first["tokens_per_s_total"]) == pytest.approx(4000 / 3, abs=0.1)
    trl = rows[1]
    assert trl["source_s"] == "-" and float(trl["total_s"]) == 8.0 and "lmbda=0" in trl["notes"]
    assert "adamw_torch_fused" in trl["notes"] and "{" not in trl["notes"]
    # a file written with other columns is rewritten with these, its rows kept
    old = tmp_path / "old.csv"
    old.write_text("date,trainer,nll\n2026-01-01,trl,4.0\n")
    peers.append_rows(str(old), {0: per_seed[0]}, args, 2, 2)
    with open(old, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == peers.COLUMNS and rows[0]["nll"] == "4.0" and len(rows) == 3


def test_table_means_spread_and_ratios():
    per_seed = {0: {"semalign-ds": fake_results(5.0, 2.0, 1.0), "trl": fake_results(5.1, 9.0)},
                1: {"semalign-ds": fake_results(5.2, 4.0, 1.0), "trl": fake_results(5.3, 9.0)}}
    summary = peers.summarize(per_seed, ["semalign-ds", "trl"])
    assert summary["semalign-ds"]["total_s"] == 4.0 and summary["trl"]["total_s"] == 9.0
    assert summary["trl"]["nll"] == pytest.approx(5.2) and summary["trl"]["nll_sd"] == pytest.approx(0.1414, abs=1e-4)
    text = peers.table(summary)
    assert "| TRL GKDTrainer (lmbda=0) | 6 | - | 9.0 | 9.0 | 2.25 |" in text
    assert "5.200 ± 0.141" in text and "Student before training: HumanEval NLL 9.000" in text


def test_missing_trl_stops_before_any_model_loads(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))

    def never(*a, **k):
        raise AssertionError("a model or data set was loaded before the missing extra was reported")

    monkeypatch.setattr(peers, "prepare", never)
    monkeypatch.setattr(peers, "target_layers", never)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[peers\]"'):
        peers.main(["--config", TINY_YAML, "--trainers", "semalign-ds,trl"])
    peers.require_trl(["semalign-ds", "torch"])  # the others run without TRL


def test_refusals(monkeypatch):
    monkeypatch.setattr(peers, "prepare", lambda *a, **k: pytest.fail("prepared a refused job"))
    with pytest.raises(SystemExit, match="use a multiple of 3, e.g. 3"):
        peers.main(["--config", TINY_YAML, "--trainers", "torch,semalign-ds", "--steps", "4"])
    with pytest.raises(SystemExit, match="unknown trainer"):
        peers.main(["--config", TINY_YAML, "--trainers", "deepspeed-chat"])
    with pytest.raises(SystemExit, match="plain output KD"):
        peers.main(["--config", TINY_YAML, "--trainers", "torch", "--set", "ce_weight=0.5"])


def load_weights(folder):
    from safetensors.torch import load_file
    out = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.slow
def test_three_trainers_on_the_tiny_config(tmp_path):
    pytest.importorskip("trl", reason='the peers benchmark compares with TRL, an optional extra: pip install -e '
                                      '".[peers]"')
    out = tmp_path / "peers.csv"
    work = tmp_path / "work"
    assert peers.main(["--config", TINY_YAML, "--steps", "3", "--workdir", str(work), "--output", str(out),
                       "--set", "max_examples=24"]) == 0
    with open(out, newline="") as f:
        rows = {r["trainer"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["semalign-ds", "trl", "torch"]
    # the same job: rows, token positions, loss positions, steps, trainable parameters
    for key in ("rows", "tokens", "loss_tokens", "steps", "trainable_params"):
        assert len({r[key] for r in rows.values()}) == 1, key
    assert rows["trl"]["steps"] == "3" and int(rows["trl"]["trainable_params"]) > 0
    # the same loss on the same first batch from the same start (the KL of the pipeline, of GKDTrainer, of kl_div)
    first = [float(r["first_loss"]) for r in rows.values()]
    assert max(first) - min(first) <= 1e-5 * max(first)
    last = [float(r["last_loss"]) for r in rows.values()]
    assert max(last) - min(last) <= 1e-3 * max(last)
    for name, r in rows.items():
        assert math.isfinite(float(r["nll"])) and float(r["train_s"]) > 0 and float(r["peak_rss_mib"]) > 100, name
        assert float(r["nll"]) != float(r["nll_start"]), name
    assert float(rows["semalign-ds"]["source_s"]) > 0 and rows["trl"]["source_s"] == "-"
    # every student moved from the one start, and all three moved alike
    seed = work / "seed0"
    start = load_weights(seed / "student-init")
    exports = {name: load_weights(seed / name / "export") for name in rows}
    layer = next(k for k in start if ".layers.0." in k and k.endswith("weight") and start[k].dim() == 2)
    for name, weights in exports.items():
        assert float((weights[layer] - start[layer]).abs().max()) > 1e-4, name
        assert torch.equal(weights["model.embed_tokens.weight"], start["model.embed_tokens.weight"]), name
    for name in ("trl", "torch"):
        assert torch.allclose(exports[name][layer], exports["semalign-ds"][layer], atol=1e-4), name
