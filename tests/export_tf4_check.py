"""Do exports load right under transformers 4.x? Not a CI test: building the 4.x venv takes about 5 minutes on the
2-core machine (see the README). Run it by hand after changing semalign_ds/export.py:

    python3 -m venv /tmp/tf4 && /tmp/tf4/bin/pip install torch==2.13.0 "transformers==4.57.*" safetensors
    python tests/export_tf4_check.py --python /tmp/tf4/bin/python [--export runs/default/target]

Under the running (5.x) interpreter it exports tiny random-init models of every supported family through
export.save_hf (and, for comparison, through plain save_pretrained), then loads each folder with the other
interpreter and compares its logits on the same text with transformers 5's. An --export folder (a real run's
target) is compared too. Prints one line per model; exits 1 when a save_hf export differs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ('def parse(line, sep=","):\n    """Split a CSV line, honouring quotes."""\n    out, cur, quoted = [], "", False\n'
        '    for ch in line:\n        if ch == \'"\':\n            quoted = not quoted\n        elif ch == sep and not '
        'quoted:\n            out.append(cur)\n            cur = ""\n        else:\n            cur += ch\n'
        '    return out + [cur]\n') * 3


def reference_ids(folder):
    """TEXT's token ids by the exported tokenizer.json itself (the `tokenizers` library, no transformers)."""
    import torch
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(TEXT).ids[:256]
    return torch.tensor([ids])


def load_and_run(folder):
    """{"tokens_right": AutoTokenizer gives tokenizer.json's ids, "logits": float64 logits on those ids} under the
    running transformers; a loader that refuses the files gives an "error" entry instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ids, out = reference_ids(folder), {}
    try:
        out["tokens_right"] = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"][:256] == ids[0].tolist()
    except Exception as err:  # a loader that refuses the files is a result to report
        out["tokenizer_error"] = f"{type(err).__name__}: {str(err)[:160]}"
    with open(os.path.join(folder, "config.json")) as f:
        soft_capped = json.load(f).get("attn_logit_softcapping") is not None
    # transformers 4.x picks SDPA for Gemma 2, which drops the attention soft-cap (and ignores an
    # attn_implementation in config.json): such exports must be loaded with attn_implementation="eager" there
    extra = {"attn_implementation": "eager"} if soft_capped else {}
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float64, **extra).eval()
    with torch.no_grad():
        out["logits"] = model(ids).logits[0]
    return out


def export_tiny(out, only=None):
    """{name: folder}: tiny models on the committed tokenizer, rope bases far from the 10000 default."""
    import torch

    sys.path.insert(0, ROOT)
    from semalign_ds import export, models
    from tests.helpers import TINY, random_model
    tokenizer = models.load_tokenizer(TINY)
    folders = {}
    families = {"llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
                "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma2": {}, "gemma3_text": {}, "phi3": {}, "olmo2": {}}
    for arch, extra in families.items():
        if only is not None and arch not in only:
            continue
        model = random_model(arch, layers=2, seed=1, dtype=torch.float32, vocab_size=512,
                             max_position_embeddings=1024, **extra)
        with torch.no_grad():  # peaked attention, so that positions (the rope base) and masks show in the logits
            for name, p in model.named_parameters():
                if any(k in name for k in ("q_proj", "k_proj", "qkv_proj")):
                    p.mul_(8.0)
        for how in ("save_hf", "save_pretrained"):
            folder = os.path.join(out, f"{arch}-{how}")
            if how == "save_hf":
                export.save_hf(model, tokenizer, folder)
            else:
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            folders[f"{arch} ({how})"] = folder
    return folders


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="an interpreter with transformers 4.x")
    parser.add_argument("--export", help="also compare this exported folder")
    parser.add_argument("--families", nargs="*", help="only these model types of the tiny exports")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # inside the 4.x interpreter: print logits of a folder
    args = parser.parse_args()
    import torch
    if args.load:
        torch.save(load_and_run(args.load), os.path.join(args.load, "tf4_result.pt"))
        return 0
    import transformers
    work = tempfile.mkdtemp(prefix="tf4check-")
    folders = export_tiny(work, args.families)
    if args.export:
        folders[f"{args.export} (save_hf)"] = args.export
    other = subprocess.run([args.python, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"transformers {transformers.__version__} (export, reference) vs {other} (load)")
    failed = False
    for name, folder in folders.items():
        mine = load_and_run(folder)
        run = subprocess.run([args.python, __file__, "--python", args.python, "--load", folder],
                             capture_output=True, text=True)
        result = os.path.join(folder, "tf4_result.pt")
        if run.returncode or not os.path.isfile(result):
            ok, line = False, f"model fails to load: {run.stderr.strip().splitlines()[-1][:200]}"
        else:
            theirs = torch.load(result)
            os.remove(result)
            diff = float((theirs["logits"] - mine["logits"]).abs().max())
            scale = float(mine["logits"].abs().max())
            top1 = float((theirs["logits"].argmax(-1) == mine["logits"].argmax(-1)).double().mean())
            tokens = ("tokenizer fails to load: " + theirs["tokenizer_error"] if "tokenizer_error" in theirs
                      else f"tokens {'right' if theirs['tokens_right'] else 'WRONG'}")
            ok = theirs.get("tokens_right", False) and diff <= 1e-6 * scale
            line = (f"{tokens}; max |logit diff| {diff:.2e} (max |logit| {scale:.1f}), top-1 agreement "
                    f"{100 * top1:.1f}%; {transformers.__version__}'s tokenizer "
                    f"{'right' if mine.get('tokens_right') else 'WRONG'}")
        print(f"{'ok  ' if ok else 'BAD '} {name}: {line}", flush=True)
        failed |= (not ok) and "(save_hf)" in name
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
