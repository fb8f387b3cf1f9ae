"""Evaluation of causal LMs on MMLU, GSM8K, HumanEval, MBPP and reference NLL.

- tasks.py: the benchmarks' loaders, prompts, few-shot selection, stop sequences, answer scoring and pass@k, in the
  reference harnesses' settings (the registry TASKS);
- generate.py: batched greedy and sampled generation, log-likelihoods of continuations;
- runner.py: one function per benchmark (data parallel), evaluate_models (several models, one report).
The report files are written by semalign_ds.report; the NLL itself is semalign_ds.nll's, shared with the pipeline.
"""
from semalign_ds.evaluation.generate import Sampling
from semalign_ds.evaluation.runner import evaluate_models, nll_settings
from semalign_ds.evaluation.tasks import BENCHMARKS, TASKS, load_benchmark

__all__ = ["BENCHMARKS", "TASKS", "Sampling", "evaluate_models", "load_benchmark", "nll_settings"]
