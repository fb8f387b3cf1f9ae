import json

import pytest
from transformers import AutoTokenizer

from semalign_ds import data
from semalign_ds.config import ConfigError
from tests.helpers import TINY


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


def test_loss_positions_score_exactly_the_response_tokens(tok):
    rows = [{"prompt": "def f(x):\n", "response": "    return x + 1\n"},
            {"prompt": "import os\n", "response": "print(os.sep)\n"}]
    ts, dropped = data.tokenize(rows, tok, max_seq_len=64, chat_template="off")
    assert not dropped and len(ts) == 2
    for i, row in enumerate(rows):
        a, b = int(ts.offsets[i]), int(ts.offsets[i + 1])
        ids, loss = ts.ids[a:b].tolist(), ts.loss[a:b].tolist()
        n_prompt = len(tok(row["prompt"])["input_ids"])
        scored = [ids[t + 1] for t in range(len(ids)) if loss[t]]  # position t scores token t+1
        assert scored == tok(row["response"])["input_ids"] == ids[n_prompt:]
    all_ts, _ = data.tokenize(rows, tok, max_seq_len=64, loss_on="all", chat_template="off")
    assert int(all_ts.loss.sum()) == int(all_ts.offsets[-1]) - 2


def test_batch_is_right_padded(tok):
    rows = [{"prompt": "a = 1\n", "response": "b = 2\nc = 3\n"}, {"prompt": "x\n", "response": "y\n"}]
    ts, _ = data.tokenize(rows, tok, max_seq_len=64, chat_template="off")
    ids, attn, loss = ts.batch([1, 0], pad_id=0)
    n0, n1 = int(ts.lengths[0]), int(ts.lengths[1])
    assert ids.shape == (2, max(n0, n1))
    assert attn[0].sum() == n1 and attn[1].sum() == n0
    assert not loss[0, n1:].any()


def test_no_usable_rows_says_how_many_and_why(tok):
    rows = [{"prompt": "p", "response": ""}, {"prompt": "x" * 400, "response": "y"}, {"prompt": 3, "response": "z"}]
    with pytest.raises(ConfigError, match=r"no usable rows \(3 dropped: 2 empty or non-text.*1 prompt fills"):
        data.tokenize(rows, tok, max_seq_len=8, chat_template="off")


def test_read_rows_jsonl_and_field_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) for i in range(3)))
    rows = data.read_rows(str(path), "q", "a")
    assert rows[2] == {"prompt": "q2", "response": "a2"}
    with pytest.raises(ConfigError, match=r"no field\(s\) \['prompt', 'response'\]; its fields are \['a', 'q'\]"):
        data.read_rows(str(path))
    with pytest.raises(ConfigError, match="data not found"):
        data.read_rows("nonexistent_file_here")


def test_the_idlelib_evaluation_is_never_in_the_transfer_set():
    """embedded:idlelib, the second held-out evaluation: IDLE's documented functions, none of whose bodies the
    transfer set embedded:stdlib holds, in the same order whatever the seed."""
    from semalign_ds import embedded
    held_out = embedded.rows("idlelib", seed=3)
    transfer = embedded.rows("stdlib")
    assert len(held_out) > 400 and held_out == embedded.rows("idlelib", seed=0)
    assert not {r["response"] for r in held_out} & {r["response"] for r in transfer}
    assert not {r["prompt"] for r in held_out} & {r["prompt"] for r in transfer}
    assert all(r["prompt"].lstrip().startswith(("def ", "async def ")) and r["response"].strip() for r in held_out)
