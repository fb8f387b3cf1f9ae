"""Export of a trained target in Hugging Face format, with the run's plan, config and metrics beside it."""
from __future__ import annotations

import json
import os
import shutil


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
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
