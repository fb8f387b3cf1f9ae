"""Run a SemAlign transfer: python launchers/transfer.py --config launchers/configs/tiny.yaml --output-dir DIR
(the same command line as `semalign-ds`: --help, --version, --print-config, --dry-run)."""
import sys

from semalign_ds.cli import main

if __name__ == "__main__":
    sys.exit(main())
