"""semalign-ds: run a SemAlign transfer (the same entry point as launchers/transfer.py)."""
from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap

import yaml

from semalign_ds import config as config_mod
from semalign_ds.embedded import DEFAULT_RUN


def version():
    """The installed package's version; from setup.py beside the package when it runs from a checkout."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed("semalign-ds")
    except PackageNotFoundError:
        setup = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
        with open(setup) as f:
            return re.search(r"""version\s*=\s*["']([^"']+)["']""", f.read()).group(1)


def keys_help():
    """Every config key with what it accepts, its default in a run without --config, and its description."""
    defaults = config_mod.Config(**DEFAULT_RUN)
    lines = textwrap.wrap("Config keys (set them in the file or with --set KEY=VALUE). Defaults are those of a run "
                          "without --config: the embedded default run, which sets the keys marked *; a --config "
                          "file starts from the defaults of the others.", 110)
    for name, info in config_mod.Config.model_fields.items():
        if name in config_mod.Config.SECTIONS:
            lines.append(f"\n{config_mod.Config.SECTIONS[name]}:")
        mark = "*" if name in DEFAULT_RUN else ""
        lines.append(f"  {name}{mark} = {getattr(defaults, name)!r}  ({config_mod.allowed(name)})")
        lines.extend(textwrap.wrap(info.description, 110, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(
        prog="semalign-ds",
        description=textwrap.fill(
                    "Transfer task knowledge from a large source LM into a smaller target LM of the same "
                    "vocabulary (SemAlign): attribution -> pairing -> alignment -> activation cache -> frontier "
                    "training -> export -> evaluation. Without --config, runs the embedded default "
                    "(SmolLM2-135M-Instruct into a width-384, 12-layer cut of itself, standard-library code, HumanEval "
                    "NLL). "
                    "Rerunning into an existing --output-dir resumes it.", 110),
        epilog=keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    config_mod.add_arguments(p)
    p.add_argument("--version", action="version", version=f"semalign-ds {version()}")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults included) as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything that can be checked, build the models on the meta device (no weights) "
                        "and print the plan and a resource estimate per phase and rank; runs nothing")
    p.add_argument("--world", type=int, default=None,
                   help="--dry-run: number of ranks to plan for (default: what the launcher says, else 1)")
    p.add_argument("--accelerator-tflops", type=float, default=400.0,
                   help="--dry-run: sustained TFLOP/s per rank for the time estimate (default 400: an H100 in "
                        "bf16 at about 40%% of its 990 dense peak)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from semalign_ds import distributed
    try:
        cfg = config_mod.from_args(args, base=DEFAULT_RUN)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None), end="")
            return 0
        if args.dry_run:
            from semalign_ds import dryrun
            print(dryrun.report(cfg, args.world, args.accelerator_tflops))
            return 0
        config_mod.check_device(cfg)
        from semalign_ds.pipeline import run
        run(cfg, local_rank=args.local_rank)
    except config_mod.ConfigError as err:
        print(f"semalign-ds: error: {err}", file=sys.stderr)
        return 2
    except distributed.Preempted as stop:  # checkpointed on SIGUSR1: the same command resumes
        print(f"semalign-ds: {stop}", file=sys.stderr)
        return distributed.EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
