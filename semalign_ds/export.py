"""Export of a trained target in Hugging Face format, with the run's plan, config and metrics beside it."""
from __future__ import annotations

import json
import os
import shutil

from semalign_ds.rundir import sha256

CHECKSUMS = "semalign_checksums.json"


def save_hf(model, tokenizer, folder, extras: dict | None = None):
    """Write `model` and `tokenizer` into `folder` (replacing it only once the new copy is complete), with each
    extras[name] (a JSON-able value) as the file `name`."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, value in (extras or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(value, f, indent=2)
    sums = {name: sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, CHECKSUMS), "w") as f:
        json.dump(sums, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def intact(folder):
    """True when an exported folder holds every file it was written with, unchanged."""
    try:
        with open(os.path.join(folder, CHECKSUMS)) as f:
            sums = json.load(f)
        return all(sha256(os.path.join(folder, name)) == digest for name, digest in sums.items())
    except (OSError, ValueError):
        return False
