"""semalign-ds: run a SemAlign transfer (the same entry point as launchers/transfer.py)."""
from __future__ import annotations

import argparse
import sys

from semalign_ds import config as config_mod


def parser():
    p = argparse.ArgumentParser(
        prog="semalign-ds",
        description="Transfer task knowledge from a large source LM into a smaller target LM of the same "
                    "vocabulary (SemAlign): attribution -> pairing -> alignment -> activation cache -> frontier "
                    "training -> export -> evaluation. Without --config, runs the embedded default "
                    "(SmolLM2-135M-Instruct into a 10-layer copy of itself, standard-library code, HumanEval NLL). "
                    "Rerunning into an existing --output-dir resumes it.",
        epilog="Config keys (set them in the file or with --set KEY=VALUE):\n" + str(config_mod.Config()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    config_mod.add_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from semalign_ds import training
    try:
        from semalign_ds.embedded import DEFAULT_RUN
        cfg = config_mod.from_args(args, base=DEFAULT_RUN)
        from semalign_ds.pipeline import run
        run(cfg, local_rank=args.local_rank)
    except config_mod.ConfigError as err:
        print(f"semalign-ds: error: {err}", file=sys.stderr)
        return 2
    except training.Preempted as stop:  # checkpointed on SIGUSR1: the same command resumes
        print(f"semalign-ds: {stop}", file=sys.stderr)
        return training.EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
