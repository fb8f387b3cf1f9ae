"""Loss parity against committed goldens (tests/parity.py): per-step losses of every stage and the exported
target's checksum, on 1 rank and on 2 ranks (gloo over loopback)."""
import json

import pytest
import torch

from tests.parity import GOLDEN, launch, summary

pytestmark = pytest.mark.slow  # pipeline runs on 1 and 2 ranks


@pytest.mark.parametrize("world", [1, 2])
def test_losses_and_target_match_the_goldens(world, tmp_path):
    golden = json.load(open(GOLDEN))
    if torch.__version__.split("+")[0] != golden["torch"]:
        pytest.fail(f"goldens were made with torch {golden['torch']}, this is {torch.__version__}: regenerate "
                    f"them (python -m tests.parity --write) after checking the difference")
    proc = launch(tmp_path / "run", world)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got, want = summary(tmp_path / "run"), golden[f"world{world}"]
    assert sorted(got["losses"]) == sorted(want["losses"])
    for tag, losses in want["losses"].items():
        assert got["losses"][tag] == pytest.approx(losses, rel=1e-6, abs=0), tag
    assert got["target_checksum"] == want["target_checksum"]
