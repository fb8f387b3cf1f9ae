"""benchmarks/device_check.py, on CPU: its arguments, the kernel checks against float64 at tiny sizes (Triton's
interpreter), the results folder (bench.csv's header is kernels/bench_results.csv's, gpu.md names device, versions
and date), the guarding of steps (one that raises is recorded and the next runs), the golden comparison of the
pipeline step and the commit into a repository. The whole --cpu run, which starts subprocesses, is marked slow."""
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.parity import GOLDEN, ROOT

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported (conftest does it too)

_spec = importlib.util.spec_from_file_location("device_check", os.path.join(ROOT, "benchmarks", "device_check.py"))
dc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dc)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCH_HEADER = next(csv.reader(open(os.path.join(ROOT, "kernels", "bench_results.csv"))))


# ---------------------------------------------------------------------------------------------------------------
# arguments

def test_arguments():
    a = dc.parse_args(["out"])
    assert a.steps == list(dc.STEPS) and not a.cpu and a.budget_s == 470 and a.commit_into is None
    assert dc.parse_args(["out", "--dry"]).cpu and dc.parse_args(["out", "--cpu"]).budget_s == 1800
    # steps always run in the order of importance, whatever order they are named in
    assert dc.parse_args(["out", "--steps", "throughput", "kernels"]).steps == ["kernels", "throughput"]
    assert dc.parse_args(["out", "--budget-s", "60"]).budget_s == 60
    for bad in ([], ["out", "--steps", "nothing"], ["out", "--commit-only"], ["out", "--budget-s", "0"]):
        with pytest.raises(SystemExit):
            dc.parse_args(bad)


def test_gpu_plan_has_the_issue_sizes():
    p = dc.plan(cpu=False)
    assert (p["bench_n"], p["bench_v"]) == (16384, 128256)
    assert {d for _, _, d in p["bench_cases"]} == {4096, 8192}
    assert p["bench_cases"][:2] == [("fisher", "triton", 4096), ("kl", "triton", 4096)]  # the kernels first
    sizes = p["kernel_sizes"]
    assert all(n % 2 == 1 for n, _, _, _ in sizes)
    assert any(all(x % 16 for x in (d, d_s, v)) for _, d, d_s, v in sizes)         # widths off every block size
    assert any(all(x % 16 == 0 for x in (d, d_s, v)) for _, d, d_s, v in sizes)    # and aligned, as real models
    assert sum(dc.STEP_SHARE.values()) >= 1 and p["budget_s"] <= 480


# ---------------------------------------------------------------------------------------------------------------
# kernel checks against float64

@pytest.mark.parametrize("loss", ["fisher", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_case_passes_at_a_tiny_odd_size(loss, dtype):
    rec = dc.kernel_case(loss, dtype, 9, 20, 24, 53, 2.0, DEVICE)
    assert rec["passed"], rec
    assert 0 < rec["err_loss"] < rec["tol_loss"] and 0 < rec["err_grad_x"] < rec["tol_grad"]
    assert 0 < rec["err_grad_w"] < rec["tol_grad"]
    from tests.test_kernels import TOL
    assert (rec["tol_loss"], rec["tol_grad"]) == TOL[dtype]  # the CPU tests' tolerances, not a copy


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_kernel_case_fails_on_a_wrong_kernel(monkeypatch, what):
    from semalign_ds.kernels import fisher_quadratic
    real = fisher_quadratic.fused_fisher_quadratic

    class Scale(torch.autograd.Function):  # the loss right, its gradient 0.1% off (or the other way round)
        @staticmethod
        def forward(ctx, t):
            return t * (1.001 if what == "loss" else 1.0)

        @staticmethod
        def backward(ctx, g):
            return g * (1.0 if what == "loss" else 1.001)

    monkeypatch.setattr(fisher_quadratic, "fused_fisher_quadratic", lambda *a, **k: Scale.apply(real(*a, **k)))
    rec = dc.kernel_case("fisher", torch.float32, 9, 20, 24, 53, 2.0, DEVICE)
    assert not rec["passed"]
    err = rec["err_loss"] if what == "loss" else rec["err_grad_x"]
    assert err == pytest.approx(1e-3, rel=0.05)


# ---------------------------------------------------------------------------------------------------------------
# the results folder

def test_bench_csv_has_the_header_of_bench_results(tmp_path):
    res = dc.Results(tmp_path / "out", "NVIDIA H200", mode="cuda")
    row = dict.fromkeys(BENCH_HEADER, "")
    row.update(device="NVIDIA H200", loss="kl", backend="triton", median_ms="12.5")
    res.bench_row(row)
    res.bench_row({**row, "backend": "naive"})
    with open(tmp_path / "out" / "bench.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == BENCH_HEADER == dc.bench_fields()
    assert [r[BENCH_HEADER.index("backend")] for r in rows[1:]] == ["triton", "naive"]
    assert rows[1][BENCH_HEADER.index("device")] == "NVIDIA H200"


def test_records_are_on_disk_as_soon_as_written(tmp_path):
    res = dc.Results(tmp_path, "dev")
    res.jsonl("kernels.jsonl", {"loss": "kl", "passed": True})
    assert json.loads((tmp_path / "kernels.jsonl").read_text()) == {"loss": "kl", "passed": True}
    res.jsonl("kernels.jsonl", {"loss": "fisher", "passed": False})
    assert [r["loss"] for r in res.read_jsonl("kernels.jsonl")] == ["kl", "fisher"]


def fake_context(tmp_path, budget=60.0, mode="cuda"):
    args = dc.parse_args([str(tmp_path / "out"), "--budget-s", str(budget), "--workdir", str(tmp_path / "work")])
    res = dc.Results(tmp_path / "out", "NVIDIA H200" if mode == "cuda" else "cpu x86_64", mode=mode)
    ctx = dc.Context(args, res, dc.plan(cpu=mode != "cuda"), mode)
    ctx.versions = {"torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8", "driver": "570.1",
                    "transformers": "5.17.0", "deepspeed": "0.19.8", "liger-kernel": "0.8.5", "python": "3.12.3"}
    return ctx


def test_gpu_md_names_device_versions_and_date(tmp_path):
    ctx = fake_context(tmp_path)
    ctx.results.jsonl("kernels.jsonl", {"loss": "kl", "dtype": "bfloat16", "n": 37, "d": 72, "d_s": 56, "v": 1000,
                                        "err_loss": 1.5e-3, "err_grad_x": 2e-3, "err_grad_w": 3e-3, "tol_loss": 1e-2,
                                        "tol_grad": 2e-2, "passed": True})
    dc.run_steps(ctx, [("kernels", lambda c: {"status": "passed"})])
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "- device: NVIDIA H200" in md and f"- date: {ctx.results.started}" in md
    for text in ("torch 2.11.0", "triton 3.6.0", "cuda 12.8", "driver 570.1", "transformers 5.17.0",
                 "deepspeed 0.19.8"):
        assert text in md, text
    assert "| kl | bfloat16 | 37 | 72 | 56 | 1000 | 1.50e-03 |" in md


# ---------------------------------------------------------------------------------------------------------------
# order and guarding

def test_a_step_that_raises_is_recorded_and_the_next_runs(tmp_path):
    ctx = fake_context(tmp_path)
    ran = []

    def broken(c):
        ran.append("kernels")
        raise RuntimeError("kernel launch failed")

    def fine(c):
        ran.append("pipeline")
        return {"status": "passed"}

    outcome = dc.run_steps(ctx, [("kernels", broken), ("pipeline", fine)])
    assert ran == ["kernels", "pipeline"]
    assert outcome["kernels"]["status"] == "error" and "kernel launch failed" in outcome["kernels"]["error"]
    assert "Traceback" in outcome["kernels"]["traceback"] and outcome["pipeline"]["status"] == "passed"
    events = ctx.results.read_jsonl("events.jsonl")
    assert [(e["step"], e["status"]) for e in events] == [("kernels", "started"), ("kernels", "error"),
                                                          ("pipeline", "started"), ("pipeline", "passed")]
    assert "RuntimeError: kernel launch failed" in events[1]["traceback"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"]["kernels"]["status"] == "error" and "traceback" not in summary["steps"]["kernels"]
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "kernel launch failed" in md and "test_device_check.py" in md
    assert ROOT not in md  # the traceback's paths, relative to the checkout
    assert dc.exit_code(outcome, ["kernels", "pipeline"]) == 1


def test_exit_code():
    ok = {"status": "passed"}
    assert dc.exit_code({"kernels": ok, "pipeline": ok, "bench": {"status": "measured"}}, dc.STEPS[:3]) == 0
    assert dc.exit_code({"kernels": ok, "pipeline": {"status": "failed"}}, ["kernels", "pipeline"]) == 1
    assert dc.exit_code({"kernels": ok}, ["kernels", "pipeline"]) == 1  # a check that did not run did not pass
    assert dc.exit_code({"kernels": ok, "pipeline": ok, "bench": {"status": "error"}}, dc.STEPS[:3]) == 2
    assert dc.exit_code({"bench": {"status": "measured"}}, ["bench"]) == 0


def test_steps_past_the_budget_are_skipped_and_recorded(tmp_path):
    ctx = fake_context(tmp_path, budget=1.0)
    outcome = dc.run_steps(ctx, [("kernels", lambda c: {"status": "passed"})])
    assert outcome["kernels"] == {"status": "skipped", "reason": "out of time"}
    assert dc.exit_code(outcome, ["kernels"]) == 1


def test_a_step_gets_its_share_of_the_budget_and_the_last_one_all_that_is_left(tmp_path):
    ctx = fake_context(tmp_path, budget=100.0)
    seen = {}
    dc.run_steps(ctx, [("kernels", lambda c: seen.setdefault("kernels", c.left())),
                       ("throughput", lambda c: seen.setdefault("throughput", c.left()))])
    assert dc.STEP_SHARE["kernels"] * 100 - 2 < seen["kernels"] <= dc.STEP_SHARE["kernels"] * 100
    assert seen["throughput"] > dc.STEP_SHARE["throughput"] * 100 + 2  # e.g. --steps pipeline throughput
    assert seen["throughput"] <= ctx.deadline - ctx.start


# ---------------------------------------------------------------------------------------------------------------
# pieces of the measurement steps

def test_pipeline_comparison_against_the_goldens():
    golden = json.load(open(GOLDEN))["world1"]["losses"]
    assert dc.compare_to_golden(golden, golden, "float32")["passed"]
    off = {tag: [x * (1 + 2e-3) for x in v] for tag, v in golden.items()}
    res = dc.compare_to_golden(off, golden, "float32")
    assert not res["passed"] and all(s["max_rel_dev"] == pytest.approx(2e-3) for s in res["stages"].values())
    assert dc.compare_to_golden(off, golden, "bfloat16")["passed"]  # bf16: first losses within 5%
    first_off = {tag: [v[0] * 1.08] + v[1:] for tag, v in golden.items()}
    assert not dc.compare_to_golden(first_off, golden, "bfloat16")["passed"]
    nan = {tag: v[:-1] + [math.nan] for tag, v in golden.items()}
    assert not dc.compare_to_golden(nan, golden, "bfloat16")["passed"]
    missing = dict(list(golden.items())[1:])
    assert not dc.compare_to_golden(missing, golden, "float32")["passed"]


def test_peak_ratios_against_naive():
    rows = [{"loss": "kl", "backend": "naive", "d": "4096", "peak_mib": "40000"},
            {"loss": "kl", "backend": "triton", "d": "4096", "peak_mib": "400"},
            {"loss": "kl", "backend": "liger-jsd", "d": "4096", "peak_mib": "4000"},
            {"loss": "fisher", "backend": "triton", "d": "4096", "peak_mib": "300"},  # no naive row: left out
            {"loss": "kl", "backend": "chunked", "d": "4096", "peak_mib": ""}]       # failed row: left out
    assert dc.peak_ratios(rows) == {"kl triton d=4096": 0.01, "kl liger-jsd d=4096": 0.1}


def test_phase_flops():
    assert dc.phase_flops("cache", 10, 3)[0] == 20
    assert dc.phase_flops("attribution", 10, 3)[0] == 40
    assert dc.phase_flops("stage_4", 10, 3)[0] == dc.phase_flops("output_kd", 10, 3)[0] == 18
    assert dc.phase_flops("run", 10, 3)[0] is None


def test_padded_tokenizer_keeps_the_tiny_tokenization(tmp_path):
    from transformers import PreTrainedTokenizerFast
    tok = dc.write_tokenizer(tmp_path / "tok", 1001)
    tiny = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ROOT, "launchers", "configs", "tiny",
                                                               "tokenizer.json"))
    text = "def add(a, b):\n    return a + b  # sum"
    assert len(tok) == 1001 and tok(text)["input_ids"] == tiny(text)["input_ids"]
    assert tok.convert_tokens_to_ids("<|reserved_1000|>") == 1000 and tok.eos_token_id == tok.pad_token_id == 0


# ---------------------------------------------------------------------------------------------------------------
# committing

def fake_results(folder, mode):
    res = dc.Results(folder, "NVIDIA H200" if mode == "cuda" else "cpu x86_64 (2 cores)", mode=mode)
    row = dict.fromkeys(BENCH_HEADER, "")
    row.update(date="2026-12-01T10:00:00", device=res.device_name, loss="fisher", backend="triton", n=16384)
    res.bench_row(row)
    res.bench_row({**row, "device": "cpu x86_64 (2 cores)"})
    res.write_json("summary.json", {"mode": mode})
    (folder / "gpu.md").write_text("# GPU device check\n- device: NVIDIA H200\n")
    return row


def test_commit_appends_the_cuda_rows_and_writes_gpu_md(tmp_path):
    repo = tmp_path / "repo"
    (repo / "kernels").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "kernels", "bench_results.csv"), repo / "kernels" / "bench_results.csv")
    before = list(csv.DictReader(open(repo / "kernels" / "bench_results.csv")))
    fake_results(tmp_path / "out", "cuda")
    assert dc.main(["--commit-only", str(tmp_path / "out"), "--commit-into", str(repo)]) == 0
    after = list(csv.DictReader(open(repo / "kernels" / "bench_results.csv")))
    assert after[:len(before)] == before and len(after) == len(before) + 1
    assert after[-1]["device"] == "NVIDIA H200" and after[-1]["n"] == "16384"
    assert (repo / "benchmarks" / "gpu.md").read_text().startswith("# GPU device check")


def test_commit_refuses_a_cpu_mode_run(tmp_path):
    repo = tmp_path / "repo"
    (repo / "kernels").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "kernels", "bench_results.csv"), repo / "kernels" / "bench_results.csv")
    fake_results(tmp_path / "out", "cpu")
    with pytest.raises(SystemExit):
        dc.commit_into(tmp_path / "out", repo)
    assert not (repo / "benchmarks").exists()


# ---------------------------------------------------------------------------------------------------------------
# the whole CPU mode

@pytest.mark.slow
def test_cpu_mode_end_to_end(tmp_path):
    """Every step at tiny sizes in a subprocess (a few minutes on 2 cores): exit 0, every file written."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"), str(out), "--cpu"],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu"
    assert {k: v["status"] for k, v in summary["steps"].items()} == {
        "kernels": "passed", "bench": "measured", "pipeline": "passed", "throughput": "measured"}
    assert all(r["passed"] for r in dc.Results(out).read_jsonl("kernels.jsonl"))
    bench = list(csv.DictReader(open(out / "bench.csv")))
    assert {r["backend"] for r in bench} >= {"triton", "naive", "chunked"} and all(r["median_ms"] for r in bench)
    pipe = dc.Results(out).read_jsonl("pipeline.jsonl")
    assert [(p["variant"], p["dtype"]) for p in pipe] == [("", "float32"), ("", "bfloat16"), ("chunked", "float32"),
                                                          ("no-deepspeed", "float32")]
    assert all(p["passed"] for p in pipe) and pipe[3]["deepspeed"] == "none"
    # the diagnostic variants: on CPU the chunked loss is what "auto" runs, and DeepSpeed changes no bit
    for variant in pipe[2:]:
        assert all(s["max_rel_dev"] == 0 for s in variant["vs_float32_run"].values())
        assert variant["pairs"] == pipe[0]["pairs"] and variant["alignment_norm"] == pipe[0]["alignment_norm"] > 0
    phases = {(r["run"], r["phase"]) for r in csv.DictReader(open(out / "throughput.csv"))}
    assert {("semalign", "cache"), ("semalign", "stage_1"), ("output_kd", "output_kd")} <= phases
    md = (out / "gpu.md").read_text()
    assert "CPU mode" in md and "## 4." in md
