"""The evaluation report: a markdown table, JSON, per-example samples and a PNG bar chart (drawn into an array and
encoded here, so no plotting library is needed)."""
from __future__ import annotations

import json
import os
import re
import struct
import zlib

from semalign_ds.evaluate import METRICS


def fmt(value, pct):
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:.2f}" if pct else f"{value:.3f}"


def markdown_table(report):
    benches = report["settings"]["benchmarks"]
    head = ["model"] + [METRICS[b][1] + (" (%)" if METRICS[b][2] else "") for b in benches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in report["models"].items():
        cells = [name] + [fmt(entry["results"][b][METRICS[b][0]], METRICS[b][2]) for b in benches]
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(report["models"].values()))["results"]
    counts = ", ".join(f"{b} n={first[b]['n']}" for b in benches)
    return "\n".join(lines) + f"\n\n{counts}; world size {report['settings']['world_size']}, " \
                              f"dtype {report['settings']['dtype']}.\n"


def write_report(report, samples, output_dir):
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("# Evaluation\n\n" + markdown_table(report) + "\n![scores](report.png)\n")
    for (name, bench), per_example in samples.items():
        if per_example is None:
            continue
        folder = os.path.join(output_dir, "samples", re.sub(r"[^\w.-]", "_", name))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{bench}.jsonl"), "w") as f:
            for r in per_example:
                f.write(json.dumps(r, default=str) + "\n")
    write_bar_chart(report, os.path.join(output_dir, "report.png"))


# ---------------------------------------------------------------------------------------------------------------
# the bar chart: drawn into a uint8 array and encoded as PNG here (no plotting library needed)

# 3x5 glyphs, rows top to bottom
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    " ": "000000000000000", ".": "000000000000010", "-": "000000111000000", "_": "000000000000111",
    "%": "101001010100101", ":": "000010000010000", "/": "001001010100100", "(": "010100100100010",
    ")": "010001001001010", "+": "000010111010000", "=": "000111000111000", ",": "000000000010100",
    "@": "010101111100011", "#": "101111101111101", "?": "111001010000010", "<": "001010100010001",
    ">": "100010001010100",
}
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127)]


def _text(img, x, y, text, scale=2, color=(0, 0, 0)):
    """Draw text with its top-left corner at (x, y); returns the width drawn."""
    import numpy as np
    h, w = img.shape[:2]
    for n, ch in enumerate(text.upper()):
        bits = np.array([int(b) for b in _GLYPHS.get(ch, _GLYPHS["?"])], dtype=bool).reshape(5, 3)
        block = np.kron(bits, np.ones((scale, scale), dtype=bool))
        x0 = x + n * 4 * scale
        ys, xs = np.nonzero(block)
        ys, xs = ys + y, xs + x0
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        img[ys[ok], xs[ok]] = color
    return len(text) * 4 * scale


def _text_width(text, scale=2):
    return len(text) * 4 * scale - scale


def encode_png(rgb) -> bytes:
    """PNG bytes of an RGB uint8 array [H, W, 3] (filter 0 on every row, zlib-compressed)."""
    import numpy as np
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + \
        chunk(b"IEND", b"")


def render_bar_chart(report):
    """An RGB array: one panel per benchmark (its own scale), one bar per model, values above the bars."""
    import numpy as np
    benches = report["settings"]["benchmarks"]
    names = list(report["models"])
    bar, gap, plot_h, margin = 32, 16, 200, 24
    panel_w = max(len(names) * (bar + gap) + gap, max(_text_width(_panel_title(b)) for b in benches) + gap)
    legend_h = 16 * len(names) + 8
    width = margin * 2 + len(benches) * (panel_w + margin)
    height = margin + legend_h + 24 + plot_h + 40
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    for k, name in enumerate(names):  # legend
        y = margin + 16 * k
        img[y:y + 10, margin:margin + 10] = _PALETTE[k % len(_PALETTE)]
        _text(img, margin + 16, y, name[:40])
    top = margin + legend_h + 24
    for p, bench in enumerate(benches):
        key, _, pct = METRICS[bench]
        values = [report["models"][n]["results"][bench][key] for n in names]
        finite = [v for v in values if v == v]
        scale = max(finite + [1e-9]) * 1.15 if finite else 1.0
        x0 = margin + p * (panel_w + margin)
        img[top + plot_h, x0:x0 + panel_w] = (0, 0, 0)  # baseline
        for k, v in enumerate(values):
            bx = x0 + gap + k * (bar + gap)
            if v == v:
                bh = int(round(plot_h * max(v, 0) / scale))
                img[top + plot_h - bh:top + plot_h, bx:bx + bar] = _PALETTE[k % len(_PALETTE)]
            else:
                bh = 0
            label = fmt(v, pct)
            _text(img, bx + (bar - _text_width(label)) // 2, top + plot_h - bh - 14, label)
        title = _panel_title(bench)
        _text(img, x0 + (panel_w - _text_width(title)) // 2, top + plot_h + 12, title)
    return img


def _panel_title(bench):
    _, label, pct = METRICS[bench]
    return label + (" %" if pct else "")


def write_bar_chart(report, path):
    with open(path, "wb") as f:
        f.write(encode_png(render_bar_chart(report)))
