"""The evaluation report: a markdown table, JSON, per-example samples and a bar chart (matplotlib). It reads the
metric names from the report itself (report["metrics"]: benchmark -> [result key, label, shown as percent]), so it
needs nothing from the evaluation package."""
from __future__ import annotations

import json
import os
import re

from semalign_ds import rundir


def fmt(value, pct):
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:.2f}" if pct else f"{value:.3f}"


def markdown_table(report):
    benches, metrics = report["settings"]["benchmarks"], report["metrics"]
    head = ["model"] + [metrics[b][1] + (" (%)" if metrics[b][2] else "") for b in benches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in report["models"].items():
        cells = [name] + [fmt(entry["results"][b][metrics[b][0]], metrics[b][2]) for b in benches]
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(report["models"].values()))["results"]
    counts = ", ".join(f"{b} n={first[b]['n']}" for b in benches)
    protocol = report["settings"].get("protocol", {})
    settings = "".join(f"- {b}: {protocol[b]}\n" for b in benches if b in protocol)
    return "\n".join(lines) + f"\n\n{counts}; world size {report['settings']['world_size']}, " \
                              f"dtype {report['settings']['dtype']}.\n" + (f"\n{settings}" if settings else "")


def write_report(report, samples, output_dir):
    """report.json, report.md, samples/MODEL/BENCHMARK.jsonl and report.png, each written whole or not at all."""
    os.makedirs(output_dir, exist_ok=True)
    rundir.write_json(os.path.join(output_dir, "report.json"), report, default=str)
    rundir.write_text(os.path.join(output_dir, "report.md"),
                      "# Evaluation\n\n" + markdown_table(report) + "\n![scores](report.png)\n")
    for (name, bench), per_example in samples.items():
        if per_example is None:
            continue
        folder = os.path.join(output_dir, "samples", re.sub(r"[^\w.-]", "_", name))
        os.makedirs(folder, exist_ok=True)
        rundir.write_text(os.path.join(folder, f"{bench}.jsonl"),
                          "".join(json.dumps(r, default=str) + "\n" for r in per_example))
    write_bar_chart(report, os.path.join(output_dir, "report.png"))


def write_bar_chart(report, path):
    """One panel per benchmark (each its own scale), one bar per model, the value above each bar."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    benches, metrics, names = report["settings"]["benchmarks"], report["metrics"], list(report["models"])
    fig, axes = plt.subplots(1, len(benches), figsize=(1.2 + 0.9 * len(names) * len(benches), 3.6), squeeze=False)
    colors = [f"C{k % 10}" for k in range(len(names))]
    for ax, bench in zip(axes[0], benches):
        key, label, pct = metrics[bench]
        values = [report["models"][n]["results"][bench][key] for n in names]
        shown = [(100 * v if pct else v) if v == v else 0.0 for v in values]
        bars = ax.bar(range(len(names)), shown, color=colors)
        ax.bar_label(bars, labels=[fmt(v, pct) for v in values], fontsize=8)
        ax.set_title(label + (" (%)" if pct else ""), fontsize=9)
        ax.set_xticks([])
        ax.margins(y=0.15)
    fig.legend(bars, names, loc="lower center", ncol=min(len(names), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    try:
        rundir.write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
