import os

import pytest
import torch

# Triton reads this when a kernel module is imported: without a GPU, run the kernels through its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """uninterrupted(world): the folder of the tiny parity run (tests/parity.py) on `world` ranks, run once per
    session. A killed, damaged or faulted run must end, after reruns, with this run's target bit for bit."""
    from tests.parity import launch
    runs = {}

    def get(world):
        if world not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted{world}") / "run"
            proc = launch(out, world)
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[world] = out
        return runs[world]
    return get


def pytest_runtest_setup(item):
    """Tests marked `sandbox` need bubblewrap: skipped where it is missing or unusable, with the reason and the
    install line; under CI (CI=true) they fail instead, so that CI always proves the sandbox."""
    if item.get_closest_marker("sandbox") is None:
        return
    from semalign_ds import sandbox
    problem = sandbox.isolation_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI is set, so the sandbox tests must run, not skip: {problem}", pytrace=False)
    pytest.skip(problem)
