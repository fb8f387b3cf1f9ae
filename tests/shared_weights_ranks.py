"""Run under torchrun (2 ranks): a ZeRO-3 source whose partitions are shared through /dev/shm
(shared_weights.share), and its vocabulary rows through a file of their own (share_rows), must compute what the
same source computes with its gathers copied: forwards bit for bit, attribution's scores with and without
recomputed layers within float32 rounding, and a batch run by one rank alone (no collective left). Its gathers must be mappings (none
through SharedGather), the other ranks' partitions mapped only while in use, and a write to a gathered parameter
must not reach another rank. Prints one JSON line per rank (from rank 0)."""
import gc
import re
import sys

import torch

from semalign_ds import attribution, distributed, engines, shared_weights, vocab_parallel
from tests.zero3_load import gathered, partitioned, say


def mappings():
    """How many times this process maps the shared file now."""
    return file_maps()[0]


def file_maps():
    """(how many times this process maps the shared file, their permissions, bytes of it resident in them)."""
    count, perms, rss, inside = 0, set(), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = bool(re.search(r"/semalign-ds-source-\S+ \(deleted\)$", line.strip()))
                if inside:
                    count += 1
                    perms.add(line.split()[1])
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return count, sorted(perms), rss


def run(spec, share):
    """(hidden states, scores without and with recompute) of this rank's batch, maps, slot gathers, mappings
    held after the batch, numel left gathered, and the SharedPartitions (or None)."""
    model, engine, adapter, head = partitioned(spec)
    vocab = (adapter.embed_tokens.weight, adapter.head.weight)  # as engines.sharded_source shares them
    shared = shared_weights.share(model, exclude=vocab) if share else None
    if share:  # the vocabulary rows in a file of their own, read in place: the rows made again from it
        shared_weights.share_rows(model, vocab)
        head = vocab_parallel.source_rows(adapter, zero3=True)
    slotted = []  # the dtypes gathered through the slots
    slots = distributed._shared["gather"]
    original = slots.gather

    def counting(output, *args, **kwargs):
        slotted.append(str(output.dtype))
        return original(output, *args, **kwargs)
    slots.gather = counting
    ids = torch.randint(1, 1000, (3, 13), generator=torch.Generator().manual_seed(20 + distributed.rank()))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    loss = mask.bool()
    loss[:, :2] = loss[:, -1] = False
    loss[2, 8:] = False
    try:
        engines.new_trace(engine)
        with torch.no_grad():
            states = adapter.hidden_states(ids, mask, runner=engine)
        plain = attribution.batch_scores(adapter, ids, mask, loss, head, engine)
        again = attribution.batch_scores(adapter, ids, mask, loss, head, engine, recompute=True)
        # a batch of its own (other ids), on rank 1 alone where the ranks need not keep step: it would hang on
        # any collective left; with copied gathers every rank runs it
        other = torch.randint(1, 1000, (2, 7), generator=torch.Generator().manual_seed(40))
        other_loss = torch.ones_like(other).bool()
        other_loss[:, -1] = False  # the last position has no next token
        alone = not attribution.independent(engine, head) or distributed.rank() == 1
        with engines.ranks_apart():
            extra = (attribution.batch_scores(adapter, other, torch.ones_like(other), other_loss, head, engine,
                                              recompute=True) if alone else None)
    finally:
        slots.gather = original
    out = {"states": states, "plain": plain, "recompute": again, "extra": extra,
           "independent": attribution.independent(engine, head), "maps": shared.maps if shared else 0,
           "slot_gathers": slotted, "mapped_after": mappings(), "resident_after": resident(model, shared),
           "gathered_after": gathered(model),
           "gathered_tensors": gathered_tensors(model),
           "vocab_in_file": any(v.ds_tensor.data_ptr() in shared.by_share for v in vocab) if shared else None}
    cow = in_use() if shared else None
    engines.release_source(engine)
    return out, cow


def gathered_tensors(model):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return sum(1 for p in model.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)


def resident(model, shared):
    """Bytes of the file resident in this rank's mapping beyond its own partitions, against the most that whole
    pages at partition edges and the tensors still gathered can explain (None without the file)."""
    if shared is None:
        return None
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    own = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters()
              if p.ds_tensor.data_ptr() in shared.by_share)
    edges = 2 * shared_weights.PAGE * len(shared.by_share)
    held = sum(p.ds_tensor.numel() * shared.world * p.ds_tensor.element_size() for p in model.parameters()
               if p.ds_status != ZeroParamStatus.NOT_AVAILABLE and p.ds_tensor.data_ptr() in shared.by_share)
    return {"beyond_own": file_maps()[2] - own, "allowed": edges + held}


def in_use():
    """A ZeRO-3 partitioned matrix of 301 x 701 float32 (825 KiB: whole pages of other ranks' partitions) in a file
    of its own (shared_weights.attach), gathered and read: what it holds, how much of the file became resident;
    after it is dropped, how much stayed; the mapping's permissions (read-only: a write would fault)."""
    import deepspeed
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        lin = torch.nn.Linear(701, 301, bias=False)
    want = torch.randn(301, 701, generator=torch.Generator().manual_seed(9))
    with deepspeed.zero.GatheredParameters([lin.weight], modifier_rank=0):
        lin.weight.data.copy_(want)
    shared = shared_weights.attach(lin, prefix="source-test-")
    p = lin.weight
    before = file_maps()[2]
    buf = torch.empty(p.ds_tensor.numel() * shared.world, dtype=p.ds_tensor.dtype)
    assert shared.gather(buf, p.ds_tensor)
    equal = bool(torch.equal(buf[:p.ds_numel].view(301, 701), want))
    grew = file_maps()[2] - before
    others = (shared.world - 1) * p.ds_tensor.numel() * p.ds_tensor.element_size()
    del buf
    left = file_maps()[2] - before
    found = {"equal": equal, "grew": grew, "others": others, "left": left, "page": shared_weights.PAGE,
             "perms": file_maps()[1]}
    del p, lin, shared
    return found


def main(spec):
    torch.set_num_threads(1)
    distributed.init(None, timeout_minutes=5)
    copied, _ = run(spec, share=False)
    mapped, cow = run(spec, share=True)
    gc.collect()
    released = mappings()  # the source dropped: nothing of the file stays mapped
    same = {"states": all(torch.equal(a, b) for a, b in zip(copied["states"], mapped["states"]))}
    # the scores: the NLL over the whole vocabulary on one rank against the ranks' rows summed: float32 rounding
    same.update({k: float(((copied[k] - mapped[k]).abs().max() / copied[k].abs().max()))
                 for k in ("plain", "recompute", "extra") if mapped[k] is not None})
    # no room in /dev/shm: every rank gathers as before
    room, distributed._shm_free = distributed._shm_free, lambda: 0
    model, engine, *_ = partitioned(spec)
    fallback = shared_weights.share(model)
    distributed._shm_free = room
    engines.release_source(engine)
    result = {"rank": distributed.rank(), "same": same, "smallest": float(mapped["plain"].min()),
              "independent": [copied["independent"], mapped["independent"]],
              **{k: mapped[k] for k in ("maps", "slot_gathers", "mapped_after", "resident_after", "gathered_after",
                                         "gathered_tensors", "vocab_in_file")}, "mapped_released": released,
              "copied_slot_gathers": copied["slot_gathers"], "copied_maps": copied["maps"],
              "cow": cow, "fallback": fallback is None}
    say(result)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
