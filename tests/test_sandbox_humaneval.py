"""HumanEval's 164 canonical solutions pass in the sandbox, through the program builder the evaluation uses, and
a wrong completion fails."""
import time

from semalign_ds import evaluate, sandbox


def test_canonical_solutions_pass_and_wrong_ones_fail():
    rows = evaluate.load_benchmark("humaneval")
    assert len(rows) == 164
    # a wrong completion per problem for a spread of them: the body returns None
    wrong = rows[::20]
    programs = [evaluate.humaneval_program(r, r["canonical_solution"]) for r in rows]
    programs += [evaluate.humaneval_program(r, "    return None\n") for r in wrong]
    start = time.monotonic()
    results = sandbox.run_many(programs, sandbox.Limits(timeout=20), allow=True, workers=4)
    seconds = time.monotonic() - start
    failed = [(r["task_id"], res.reason) for r, res in zip(rows, results) if not res.passed]
    assert failed == []
    assert not any(res.passed for res in results[len(rows):])
    print(f"\n{len(programs)} HumanEval programs in the sandbox: {seconds:.1f} s")
