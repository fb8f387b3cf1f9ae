"""Run under torchrun (2 ranks): a ZeRO-3 source whose partitions are shared through /dev/shm
(shared_weights.share) must compute what the same source computes with its gathers copied, bit for bit:
forwards, and attribution's backward with and without recomputed layers. Its gathers must be mappings (none
through SharedGather), the other ranks' partitions mapped only while in use, and a write to a gathered parameter
must not reach another rank. Prints one JSON line per rank (from rank 0)."""
import gc
import re
import sys

import torch

from semalign_ds import attribution, distributed, engines, shared_weights
from tests.zero3_load import gathered, partitioned, say


def mappings():
    """How many times this process maps the shared file now."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if re.search(r"/semalign-ds-source-\S+ \(deleted\)$", line.strip()))


def run(spec, share):
    """(hidden states, scores without and with recompute) of this rank's batch, maps, slot gathers, mappings
    held after the batch, numel left gathered, and the SharedPartitions (or None)."""
    model, engine, adapter, head = partitioned(spec)
    vocab = (adapter.embed_tokens.weight, adapter.head.weight)  # as engines.sharded_source leaves them out
    shared = shared_weights.share(model, exclude=vocab) if share else None
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
    finally:
        slots.gather = original
    out = {"states": states, "plain": plain, "recompute": again, "maps": shared.maps if shared else 0,
           "slot_gathers": slotted, "mapped_after": mappings(), "gathered_after": gathered(model),
           "gathered_tensors": gathered_tensors(model),
           "vocab_in_file": any(v.ds_tensor.data_ptr() in shared.by_share for v in vocab) if shared else None}
    cow = private_write(model, shared) if shared else None
    engines.release_source(engine)
    return out, cow


def gathered_tensors(model):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return sum(1 for p in model.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)


def private_write(model, shared):
    """Rank 1 fills its mapping of a gathered parameter with 7s; then every rank maps it again: what it sees."""
    import torch.distributed as dist
    p = next(p for p in model.parameters() if p.ds_numel > 1000 and p.ds_tensor.data_ptr() in shared.by_share)
    buf = torch.empty(p.ds_tensor.numel() * shared.world, dtype=p.ds_tensor.dtype)
    assert shared.gather(buf, p.ds_tensor)
    before = buf.clone()
    if distributed.rank() == 1:
        buf.fill_(7.0)
    dist.barrier()
    again = torch.empty_like(before)
    assert shared.gather(again, p.ds_tensor)
    return {"unchanged": bool(torch.equal(again, before)), "has_sevens": bool((again == 7.0).any()),
            "own_equal": bool(torch.equal(again.view(shared.world, -1)[distributed.rank()], p.ds_tensor.data))}


def main(spec):
    torch.set_num_threads(1)
    distributed.init(None, timeout_minutes=5)
    copied, _ = run(spec, share=False)
    mapped, cow = run(spec, share=True)
    gc.collect()
    released = mappings()  # the source dropped: nothing of the file stays mapped
    same = {k: all(torch.equal(a, b) for a, b in zip(copied[k], mapped[k])) if k == "states"
            else bool(torch.equal(copied[k], mapped[k])) for k in ("states", "plain", "recompute")}
    # no room in /dev/shm: every rank gathers as before
    room, distributed._shm_free = distributed._shm_free, lambda: 0
    model, engine, *_ = partitioned(spec)
    fallback = shared_weights.share(model)
    distributed._shm_free = room
    engines.release_source(engine)
    result = {"rank": distributed.rank(), "same": same, "smallest": float(mapped["plain"].min()),
              **{k: mapped[k] for k in ("maps", "slot_gathers", "mapped_after", "gathered_after",
                                         "gathered_tensors", "vocab_in_file")}, "mapped_released": released,
              "copied_slot_gathers": copied["slot_gathers"], "copied_maps": copied["maps"],
              "cow": cow, "fallback": fallback is None}
    say(result)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
