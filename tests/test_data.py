import itertools
import json

import pytest
import torch
from transformers import AutoTokenizer

from semalign_ds import data
from semalign_ds.config import ConfigError
from tests.helpers import TINY


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


def _scored(ts, i, tok):
    """Tokens scored in sequence i (position t scores token t+1) and its tokens."""
    a, b = int(ts.offsets[i]), int(ts.offsets[i + 1])
    ids, loss = ts.ids[a:b].tolist(), ts.loss[a:b].tolist()
    return tok.convert_ids_to_tokens([ids[t + 1] for t in range(len(ids)) if loss[t]]), \
        tok.convert_ids_to_tokens(ids)


def test_prompt_and_response_tokenised_together_loss_by_offsets(tok):
    rows = [{"prompt": "def f(x):\n", "response": "    return x + 1\n"},
            {"prompt": "import os\n", "response": "print(os.sep)\n"}]
    ts, dropped = data.tokenize(rows, tok, max_seq_len=64, chat_template="off")
    assert not dropped and len(ts) == 2
    scored, tokens = _scored(ts, 0, tok)
    # one string: "\n    " is one token that straddles the boundary, and counts as response (no extra token there)
    assert tokens == ["def", "Ġf", "(", "x", "):", "ĊĠĠĠ", "Ġreturn", "Ġ", "x", "Ġ+", "Ġ1", "Ċ"]
    assert scored == tokens[5:]
    assert len(tokens) < len(tok(rows[0]["prompt"])["input_ids"]) + len(tok(rows[0]["response"])["input_ids"])
    scored, tokens = _scored(ts, 1, tok)
    assert tokens == ["i", "mp", "ort", "Ġo", "s", "Ċ", "p", "r", "int", "(", "o", "s", ".", "se", "p", ")", "Ċ"]
    assert scored == tokens[6:]
    assert ts.loss.tolist() == [False] * 4 + [True] * 7 + [False] + [False] * 5 + [True] * 11 + [False]
    all_ts, _ = data.tokenize(rows, tok, max_seq_len=64, loss_on="all", chat_template="off")
    assert int(all_ts.loss.sum()) == int(all_ts.offsets[-1]) - 2
    cut, _ = data.tokenize(rows[:1], tok, max_seq_len=8, chat_template="off")
    assert _scored(cut, 0, tok)[0] == ["ĊĠĠĠ", "Ġreturn", "Ġ"]


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tok():
    chat = AutoTokenizer.from_pretrained(TINY)
    chat.chat_template = CHATML
    return chat


def _runs(ts, i, tok):
    """The scored text of sequence i, one string per run of consecutive scored tokens."""
    a, b = int(ts.offsets[i]), int(ts.offsets[i + 1])
    ids, loss = ts.ids[a:b].tolist(), ts.loss[a:b].tolist()
    runs, previous = [], False
    for t in range(b - a - 1):
        if loss[t]:
            piece = tok.decode([ids[t + 1]])
            runs[-1:] = [runs[-1] + piece] if previous else runs[-1:] + [piece]
        previous = loss[t]
    return runs


def test_messages_score_assistant_turns_only(chat_tok, tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bye."},
            {"role": "assistant", "content": "Bye."}, {"role": "user", "content": "Sum 1 and 1?"},
            {"role": "assistant", "content": "It is 2."}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": chat[:3]}) + "\n")
    rows = data.read_rows(str(path))
    assert rows.layout == "messages" and "layout messages" in rows.describe()
    ts, dropped = data.tokenize(rows, chat_tok, max_seq_len=256)
    assert not dropped
    # the user's "Bye." comes first and is context: only the assistant turns and the EOS ending each are scored
    assert _runs(ts, 0, chat_tok) == ["Bye.<|endoftext|>", "It is 2.<|endoftext|>"]
    assert _runs(ts, 1, chat_tok) == ["Bye.<|endoftext|>"]
    # a reply whose text is also in the turn's header ("<|im_start|>assistant") is found after the header
    short, _ = data.tokenize([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ss"}],
                               "loss_from": 0}], chat_tok, max_seq_len=256)
    assert _runs(short, 0, chat_tok) == ["ss<|endoftext|>"]
    text = chat_tok.apply_chat_template(chat, tokenize=False)
    assert ts.ids[:int(ts.offsets[1])].tolist() == chat_tok(text, add_special_tokens=False)["input_ids"]
    trimming = AutoTokenizer.from_pretrained(TINY)
    trimming.chat_template = CHATML.replace("m.content }}", "m.content | trim }}")
    padded = [dict(m, content=f"  {m['content']}\n") for m in chat]
    trimmed, _ = data.tokenize([{"messages": padded, "loss_from": 0}], trimming, max_seq_len=256)
    assert _runs(trimmed, 0, trimming) == ["Bye.<|endoftext|>", "It is 2.<|endoftext|>"]
    with pytest.raises(ConfigError, match="chat template.*tokenizer has no chat template.*prompt/response"):
        data.tokenize(rows, AutoTokenizer.from_pretrained(TINY), max_seq_len=256)
    with pytest.raises(ConfigError, match="chat_template is off: set chat_template to auto or on"):
        data.tokenize(rows, chat_tok, max_seq_len=256, chat_template="off")


def test_prompt_completion_rows_plain_and_conversational(chat_tok, tok, tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "x = ", "completion": "41 + 1\n"}) + "\n")
    rows = data.read_rows(str(path))
    assert rows.layout == "prompt_completion" and list(rows) == [{"prompt": "x = ", "response": "41 + 1\n"}]
    ts, _ = data.tokenize(rows, tok, max_seq_len=64, chat_template="off")
    assert "".join(_runs(ts, 0, tok)) == "41 + 1\n"
    convo = {"prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Name?"}],
             "completion": [{"role": "assistant", "content": "Tiny."}]}
    path.write_text(json.dumps(convo) + "\n" + json.dumps(dict(convo, completion="Small.")) + "\n")
    rows = data.read_rows(str(path), data_format="prompt_completion")
    assert rows[0] == {"messages": convo["prompt"] + convo["completion"], "loss_from": 3}
    ts, _ = data.tokenize(rows, chat_tok, max_seq_len=256)
    # the prompt's own assistant turn is context; the completion is scored
    assert _runs(ts, 0, chat_tok) == ["Tiny.<|endoftext|>"] and _runs(ts, 1, chat_tok) == ["Small.<|endoftext|>"]
    # a string prompt through the template: the response and the EOS appended to it are scored, nothing else
    plain, _ = data.tokenize([{"prompt": "Name?", "response": "Tiny."}], chat_tok, max_seq_len=256)
    assert _runs(plain, 0, chat_tok) == ["Tiny.<|endoftext|>"]


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


@pytest.mark.parametrize("content, match", [
    (b'{"prompt": "caf\xe9", "response": "x"}\n', r"is not UTF-8 text \(byte 15 of the file\): save it as UTF-8"),
    (b"\x00\x01\x02\x03binary", "holds NUL bytes, so it is binary"),
    (b"", "is an empty file"),
    (b"  \n", "is an empty file"),
    (b"[1, 2]", r"is not a list of records: item 0 is a int, not an object"),
    (b"3", "holds a JSON int, not a list of records"),
    (b'[{"prompt": "a", "response": "b"},', r"is not valid JSON \(line 1"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c"\n', r"line 2: not JSON"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n',
     r"row 1: no field 'response' \(its fields: \['prompt'\]\)"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "c"}\n',
     r"row 1, field 'prompt': a int, where the prompt_response layout needs str"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}\n',
     r"row 0, field 'messages': a chat message must be \{'role': str, 'content': str\}"),
])
def test_bad_data_files_get_an_error_naming_the_file_and_the_fix(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as err:
        data.read_rows(str(path))
    assert str(path) in str(err.value)


def test_json_list_file_and_explicit_layout_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p", "response": "r"}, {"prompt": "q", "response": None}]))
    rows = data.read_rows(str(path), data_format="prompt_response")
    assert list(rows) == [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": None}]
    with pytest.raises(ConfigError, match=r"has no field\(s\) \['messages'\]"):
        data.read_rows(str(path), data_format="messages")
    with pytest.raises(ConfigError, match="data_format: 'chat' is not a layout"):
        data.read_rows(str(path), data_format="chat")


@pytest.mark.slow
def test_a_huge_row_is_cut_before_tokenisation(tmp_path):
    """A 33 MB response is cut to max_row_chars before the tokenizer sees it: time and memory stay small."""
    import subprocess
    import sys
    path = tmp_path / "huge.jsonl"
    response = "x = [1, 2, 3]\n" * (33_000_000 // 14)
    path.write_text(json.dumps({"prompt": "def f():\n", "response": response}) + "\n"
                    + json.dumps({"prompt": "a", "response": "b\n"}) + "\n")
    del response
    script = f"""
import sys, time
from transformers import AutoTokenizer
from semalign_ds import data, summary
def hwm():  # KiB; VmHWM, as ru_maxrss would carry the forking test process's peak across exec
    return summary.peak_rss_bytes() // 1024
tok = AutoTokenizer.from_pretrained({TINY!r})
before = hwm()
t0 = time.perf_counter()
rows = data.read_rows({str(path)!r})
ts, _ = data.tokenize(rows, tok, max_seq_len=128, chat_template="off")
peak = hwm()
print(rows.cut, len(ts), int(ts.lengths[0]), time.perf_counter() - t0, before / 1024, peak / 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    cut, kept, length, seconds, before_mb, peak_mb = out.split()[-6:]
    print(f"33 MB row: {float(seconds):.2f} s, peak RSS {float(peak_mb):.0f} MB ({float(before_mb):.0f} MB before)")
    assert (int(cut), int(kept), int(length)) == (1, 2, 128)
    assert float(seconds) < 30 and float(peak_mb) < 2500  # tokenised whole, the row took 7.2 GB
    rows = data.bound_rows(data.Rows([{"messages": [{"role": "user", "content": "ab" * 9}]}], "messages"), 5)
    assert rows[0]["messages"][0]["content"] == "ababa" and rows.cut == 1


def test_csv_and_parquet_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty.csv' is an empty file"):
        data.read_records(str(empty))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(bytes(range(256)) * 7)
    with pytest.raises(ConfigError, match=r"broken.parquet' \(split 'train'\): \w+: .*Check that it is a valid"):
        data.read_records(str(broken), name="mmlu")
    good = tmp_path / "good.csv"
    good.write_text("prompt,response\nab,cd\n")
    assert data.read_rows(str(good)) == [{"prompt": "ab", "response": "cd"}]


def test_tokenize_itself_cuts_rows_it_is_given(tok, monkeypatch):
    seen, real = [], type(tok).__call__

    def spy(self, text, *args, **kwargs):
        seen.extend(len(t) for t in (text if isinstance(text, list) else [text]))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", spy)
    rows = [{"prompt": "p" * 1500, "response": "x = 1\n" * 777}]  # as the NLL evaluation passes them
    response_tokens = len(tok(rows[0]["response"][:1001])["input_ids"])
    seen.clear()
    ts, _ = data.tokenize(rows, tok, max_seq_len=2000, chat_template="off", max_row_chars=1001)
    assert seen == [2002] and int(ts.loss.sum()) == response_tokens
    assert rows[0]["prompt"] == "p" * 1500  # the caller's rows are left as they were


@pytest.mark.slow  # builds both embedded data sets (a minute)
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


@pytest.mark.parametrize("n,batch_size,groups", [(64, 32, 8), (37, 12, 4), (13, 6, 2), (11, 5, 1), (3, 8, 2)])
def test_batch_order_gives_every_rank_an_equal_share_of_each_batch(n, batch_size, groups):
    """Ranks own the sequences r, r + w, ... (distributed.shard): at every world dividing the balance groups, each
    rank owns batch_size / world of every batch, with one order whatever the world size; a longer stage extends the
    same stream (resume); every sequence comes round; stages and seeds draw different orders."""
    from semalign_ds import distributed
    assert data.balance_groups(n, batch_size) == groups
    steps = 3 * n // batch_size + 2
    order = data.batch_order(n, batch_size, steps, seed=5, stage=2)
    assert [len(b) for b in order] == [batch_size] * steps
    for world in (w for w in (1, 2, 4, 8) if groups % w == 0):
        for r in range(world):
            mine = set(distributed.shard(n, r, world))
            assert all(sum(i in mine for i in b) == batch_size // world for b in order), (world, r)
    assert data.batch_order(n, batch_size, steps + 4, 5, 2)[:steps] == order
    assert set(i for b in order for i in b) == set(range(n))
    assert order != data.batch_order(n, batch_size, steps, 5, 3) != data.batch_order(n, batch_size, steps, 6, 2)


@pytest.mark.parametrize("n,batch_size", [(64, 32), (37, 12), (53, 8), (13, 6)])
def test_owned_deals_whole_classes_with_the_least_busy_busiest_rank(n, batch_size):
    """data.owned: the ranks' sequences partition the set, each rank gets batch_size / world of every batch, and
    the busiest rank's work is the least any deal of whole residue classes (G / world per rank) allows: checked
    against every assignment of classes to ranks. Where the world does not divide G, strided."""
    import itertools
    g = data.balance_groups(n, batch_size)
    work = (torch.rand(n, generator=torch.Generator().manual_seed(n)) * 100 + 1).tolist()
    order = data.batch_order(n, batch_size, 4, seed=1, stage=3)
    load = [sum(work[c::g]) for c in range(g)]
    for world in (w for w in (1, 2, 4, 8) if g % w == 0):
        shares = [data.owned(work, batch_size, r, world) for r in range(world)]
        assert sorted(i for m in shares for i in m) == list(range(n))
        assert all(m == sorted(m) for m in shares)
        for m in shares:
            classes = {i % g for i in m}
            assert len(classes) == g // world and m == [i for i in range(n) if i % g in classes]
            assert all(sum(i in set(m) for i in b) == batch_size // world for b in order)
        best = min(max(sum(load[c] for c in range(g) if a[c] == r) for r in range(world))
                   for a in set(itertools.permutations([r for r in range(world) for _ in range(g // world)])))
        got = max(sum(work[i] for i in m) for m in shares)
        assert abs(got - best) < 1e-9 * best
        strided = max(sum(work[r::world]) for r in range(world))
        assert got <= strided + 1e-9 * strided
    if g < 4:
        assert data.owned(work, batch_size, 1, 4) == list(range(1, n, 4))
    assert data.owned(work, batch_size, 0, 3) == list(range(0, n, 3))


@pytest.mark.parametrize("n,batch_size", [(7, 3), (8, 3), (37, 4), (53, 5), (13, 6), (3, 4), (301, 2)])
def test_length_batches_pad_the_least(n, batch_size):
    """data.length_batches: every rank as many steps, each example once, batches of at most batch_size, longest
    first; the padded tokens (per step, the largest batch's size x its longest example) no more than strided shares
    batched per rank, as before, and on 1 rank and 2 the least of any split of 7 or 8 examples into batches of
    those sizes (every order tried)."""
    import itertools
    lengths = torch.randint(3, 129, (n,), generator=torch.Generator().manual_seed(n)).tolist()

    def cost(steps):  # steps: [step] -> the ranks' batches at that step
        return sum(max((len(b) * max(lengths[i] for i in b) for b in step if b), default=0) for step in steps)

    for world in (1, 2, 4):
        deal = data.length_batches(lengths, batch_size, world)
        assert len(deal) == world and len({len(m) for m in deal}) == 1
        steps = list(zip(*deal))
        batches = [b for step in steps for b in step if b]
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(len(b) <= batch_size for b in batches)
        for k in range(len(steps) - 1):  # longest first
            assert min(lengths[i] for b in steps[k] if b for i in b) >= max(lengths[i] for b in steps[k + 1] if b
                                                                           for i in b)
        mine = [list(range(r, n, world)) for r in range(world)]
        strided = [[m[k:k + batch_size] for m in mine] for k in range(0, len(mine[0]), batch_size)]
        assert cost(steps) <= cost(strided)
        # the short step's place: the least of every place, each plan built whole (the longest first, dealt in turn,
        # the short step's longest examples in its smaller batches)
        order = sorted(range(n), key=lambda i: (-lengths[i], i))
        per = world * batch_size
        full, rest = divmod(n, per)
        places = []
        for k in range(full + 1 if rest else 1):
            sizes = [per] * full + ([] if not rest else [rest])
            sizes = sizes[:k] + sizes[full:] + sizes[k:full] if rest else sizes
            plan, a = [], 0
            for size in sizes:
                q, extra = divmod(size, world)
                step = order[a:a + size]
                plan.append([step[(world - extra) * q:][r::extra] if r < extra else
                             step[:(world - extra) * q][r - extra::world - extra] for r in range(world)])
                a += size
            places.append(cost(plan))
        assert cost(steps) == min(places)
        if n <= 8 and world <= 2:
            shape = [[len(b) if b else 0 for b in step] for step in steps]
            best = None
            for p in itertools.permutations(range(n)):
                it = iter(p)
                trial = [[[next(it) for _ in range(k)] for k in step] for step in shape]
                best = cost(trial) if best is None else min(best, cost(trial))
            assert cost(steps) == best


def test_lockstep_fills_gaps_and_pads_to_the_busiest_rank():
    """distributed.lockstep on one process: a None (no batch at that step) becomes a repeat of `filler`, or of the
    first batch, marked not real; without collective it is dropped; the other batches stay in order."""
    from semalign_ds import distributed
    assert distributed.lockstep([None, [3, 4], [5]], filler=[9]) == [([9], False), ([3, 4], True), ([5], True)]
    assert distributed.lockstep([None, [3, 4], [5]]) == [([3, 4], False), ([3, 4], True), ([5], True)]
    assert distributed.lockstep([None], filler=[9]) == [([9], False)]
    assert distributed.lockstep([None, [3, 4]], collective=False, filler=[9]) == [([3, 4], True)]
    assert distributed.lockstep([[1], [2]]) == [([1], True), ([2], True)]


def test_batch_order_is_an_epoch_of_each_residue_class_when_the_groups_divide_the_set():
    order = data.batch_order(64, 16, 8, seed=0, stage=1)  # 2 epochs of 4 batches
    for epoch in (order[:4], order[4:]):
        assert sorted(i for b in epoch for i in b) == list(range(64))


def _set_partitions(items):
    """Every partition of `items` into blocks (lists)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


@pytest.mark.parametrize("overhead", [0, 9])
def test_cheapest_batches_is_the_least_of_every_split(overhead):
    """data.cheapest_batches: each example once, batches of at most batch_size (and, with a cap, of at most cap
    padded tokens unless single), longest first, and its cost (padded tokens, size x longest, plus `overhead` per
    batch) the least over every partition of 7 examples into such batches, not only runs of the sorted order;
    fresh random lengths with ties."""
    g = torch.Generator().manual_seed(70 + overhead)
    for trial in range(6):
        lengths = torch.randint(2, 40, (7,), generator=g).tolist()
        lengths[trial % 7] = lengths[(trial + 3) % 7]  # a tie
        subset = [i for i in range(7) if i != trial % 3] if trial % 2 else list(range(7))  # indices not 0..n-1
        def price(bs):
            return sum(len(b) * max(lengths[i] for i in b) + overhead for b in bs)

        def fits(b, cap):
            return len(b) <= 3 and (len(b) == 1 or cap is None or len(b) * max(lengths[i] for i in b) <= cap)
        for cap in (None, 2 * max(lengths)):  # at most batches of 2 of the longest
            cost, batches = data.cheapest_batches(subset, lengths, 3, overhead, cap)
            assert sorted(i for b in batches for i in b) == sorted(subset) and all(fits(b, cap) for b in batches)
            assert cost == price(batches)
            assert all(min(lengths[i] for i in a) >= max(lengths[i] for i in b) for a, b in zip(batches, batches[1:]))
            best = min(price(p) for p in _set_partitions(subset) if all(fits(b, cap) for b in p))
            assert cost == best, (lengths, subset, batches, cap)


def test_rank_batches_balance_independent_ranks():
    """data.rank_batches: every example once, each rank's batches the cheapest of its examples with none larger (in
    padded tokens) than 1 rank's largest, the busiest rank's cost never above the lockstep plan's (length_batches: the sum of every step's largest batch) nor above 1 rank's
    cost / world rounded up by one example's batch; the same result each call; on 1 rank, cheapest_batches. The scale
    benchmark's 16 lengths at batches of 4, 1 and 2 ranks: the figures its comment gives."""
    bench = [92, 128, 33, 79, 107, 62, 25, 48, 126, 44, 91, 85, 31, 106, 87, 128]
    g = torch.Generator().manual_seed(80)
    cases = [(bench, 4, 1), (bench, 4, 2), (bench, 4, 4)]
    cases += [(torch.randint(3, 129, (n,), generator=g).tolist(), b, w)
              for n, b, w in ((1, 4, 2), (5, 2, 4), (23, 3, 2), (40, 4, 2), (37, 5, 3), (64, 8, 4))]
    for lengths, bsz, world in cases:
        def price(bs, over=data.BATCH_TOKENS):
            return sum(len(b) * max(lengths[i] for i in b) + over for b in bs)
        deal = data.rank_batches(lengths, bsz, world)
        assert deal == data.rank_batches(lengths, bsz, world) and len(deal) == world
        assert sorted(i for m in deal for b in m for i in b) == list(range(len(lengths)))
        one = data.cheapest_batches(range(len(lengths)), lengths, bsz)
        cap = max(price([b], 0) for b in one[1])  # no batch larger than one rank's largest
        for mine in deal:
            assert all(len(b) == 1 or price([b], 0) <= cap for b in mine)
            assert [sorted(b) for b in mine] == [sorted(b) for b in data.cheapest_batches(
                [i for b in mine for i in b], lengths, bsz, cap=None if world == 1 else cap)[1]]
        busiest = max(price(m) for m in deal)
        steps = list(zip(*data.length_batches(lengths, bsz, world)))
        lockstep = sum(max(price([b]) for b in step if b) for step in steps)
        assert busiest <= lockstep, (lengths, bsz, world)
        assert busiest <= one[0] / world + bsz * max(lengths) + data.BATCH_TOKENS, (lengths, bsz, world)
        if world == 1:
            assert deal == [data.cheapest_batches(range(len(lengths)), lengths, bsz)[1]]
    padded = [[sum(len(b) * max(bench[i] for i in b) for b in m) for m in data.rank_batches(bench, 4, w)]
              for w in (1, 2)]
    assert padded[0] == [1319] and max(padded[1]) == 667, padded


@pytest.mark.parametrize("seed", range(6))
def test_deal_balances_items_over_ranks(seed):
    """data.deal: every item to exactly one rank, the same on every call; the busiest rank no busier than the
    largest-first deal or strided shares, and no single move or swap between it and another rank lowers the larger
    of their two loads; within 4/3 of the best split found by trying every assignment (small cases)."""
    gen = torch.Generator().manual_seed(seed)
    n, world = int(torch.randint(3, 10, (1,), generator=gen)), int(torch.randint(2, 4, (1,), generator=gen))
    costs = torch.randint(1, 1000, (n,), generator=gen).tolist()
    sets = data.deal(costs, world)
    assert sets == data.deal(costs, world) and len(sets) == world
    assert sorted(i for s in sets for i in s) == list(range(n))
    load = [sum(costs[i] for i in s) for s in sets]
    busy = max(load)
    assert busy <= max(sum(costs[r::world]) for r in range(world))
    b = load.index(busy)
    for r in range(world):
        if r == b:
            continue
        for i in sets[b]:
            for j in [None] + sets[r]:
                d = costs[i] - (0 if j is None else costs[j])
                assert not (d > 0 and max(busy - d, load[r] + d) < busy)
    best = min(max(sum(c for c, w in zip(costs, a) if w == r) for r in range(world))
               for a in itertools.product(range(world), repeat=n))
    assert busy <= best * 4 / 3 + 1e-9
