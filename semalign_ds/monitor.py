"""What a run reports as it goes: TensorBoard scalars, a JSON-lines metrics file, and console lines."""
from __future__ import annotations

import json
import os
import time


class Monitor:
    def __init__(self, folder, enabled=True):
        self.enabled = enabled
        self.writer = None
        self.lines = None
        if enabled:
            os.makedirs(folder, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(folder, "tb"))
            self.lines = open(os.path.join(folder, "metrics.jsonl"), "a")

    def log(self, tag, values: dict, step: int):
        """Scalars under tag/name at `step`, also appended to metrics.jsonl."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{tag}/{name}", value, step)
        self.lines.write(json.dumps({"tag": tag, "step": step, "time": time.time(), **values}) + "\n")
        self.lines.flush()

    def print(self, *args):
        if self.enabled:
            print(*args, flush=True)

    def close(self):
        if self.enabled:
            self.writer.close()
            self.lines.close()
