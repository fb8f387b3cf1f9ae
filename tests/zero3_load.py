"""Run under torchrun: each source loaded partitioned from its safetensors files (no rank reads the whole model)
must hold only its share on each rank and compute what the model loaded whole computes; and after attribution's
forward and backward, the cache's forwards must leave nothing gathered when the phases start a new trace. Prints
one JSON line per rank and model, then one per rank for the trace, and one for attribution with recomputed layers."""
import contextlib
import gc
import json
import sys
import weakref

import torch

from semalign_ds import distributed, engines, models, vocab_parallel


def say(result):
    """Every rank's `result` as a JSON line each, printed by rank 0 alone: lines of two processes can interleave."""
    results = [None] * distributed.world()
    torch.distributed.all_gather_object(results, result)
    if distributed.rank() == 0:
        for r in results:
            print(json.dumps(r), flush=True)


def main(specs):
    import deepspeed
    torch.set_num_threads(1)
    distributed.init(None, timeout_minutes=5)
    ds = source_ds()
    for spec in specs:
        path = models.resolve(spec)[0]
        model = engines.partitioned_from_safetensors(spec, models.safetensors_files(path), "float32", ds)
        if model is None:
            sys.exit(f"{spec}: not loaded partitioned")
        engine = deepspeed.initialize(model=model, config=ds)[0]  # its other results hold the model too
        whole = models.load_model(spec)
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            got = models.Adapter(model).hidden_states(ids, mask, runner=engine)
            want = models.Adapter(whole).hidden_states(ids, mask)
            head = vocab_parallel.whole(vocab_parallel.rows_of(models.Adapter(model).head.weight))
        diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
        n = sum(p.numel() for p in whole.parameters())
        result = {"spec": spec, "rank": distributed.rank(), "max_abs_diff": diff,
                  "head_equal": bool(torch.equal(head, whole.get_output_embeddings().weight)),
                  "share": engines.parameter_bytes_on_this_rank(model) / (4 * n)}
        # once released and dropped, nothing may keep the source alive (DeepSpeed's global references)
        alive = weakref.ref(model)
        engines.release_source(engine)
        del model, engine, got
        gc.collect()
        say({**result, "freed": alive() is None})
    say({"rank": distributed.rank(), "trace": {str(new): gathered_after_cache(specs[0], new) for new in (False, True)}})
    say({"rank": distributed.rank(), "recompute": recomputed(specs[0])})
    distributed.shutdown()


def source_ds():
    """The shipped ZeRO-3 source config for batches of 2 on this world."""
    return engines.fill(engines.load_ds_config(engines.default_config_path("source_zero3"), "source"), 2,
                        distributed.world(), "float32")


def gathered_after_cache(spec, new_trace):
    """Parameters (numel) still gathered on this rank after two attribution batches (forward and backward, as
    attribution.batch_scores runs them) and three cache forwards, with or without engines.new_trace between."""
    from semalign_ds import attribution
    model, engine, adapter, head = partitioned(spec, stage3_prefetch_bucket_size=5e7)  # as on CUDA: "auto" is 0
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    loss = mask.bool()
    loss[:, -1] = False  # a position's loss predicts the next token
    engines.new_trace(engine)  # as the pipeline calls it before attribution; a no-op before any forward
    for _ in range(2):
        attribution.batch_scores(adapter, ids, mask, loss, head, engine)
    if new_trace:
        engines.new_trace(engine)
    for _ in range(3):  # the first records the trace, the next ones replay it
        with torch.no_grad():
            adapter.hidden_states(ids, mask, runner=engine)
    held = gathered(model)
    engines.release_source(engine)
    return held


def partitioned(spec, **zero):
    """The source loaded partitioned under the shipped ZeRO-3 config, every layer released after use (the tiny
    model's too: persistence threshold 0) and `zero` overriding its zero_optimization keys: (model, engine,
    adapter, this rank's rows of the head), its vocabulary matrices used as the pipeline uses them."""
    import deepspeed
    ds = source_ds()
    ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0, **zero})
    model = engines.partitioned_from_safetensors(spec, models.safetensors_files(models.resolve(spec)[0]), "float32", ds)
    engine = deepspeed.initialize(model=model, config=ds)[0]
    adapter = models.Adapter(model)
    return model, engine, adapter, vocab_parallel.source_rows(adapter, zero3=True)


@contextlib.contextmanager
def gathers():
    """[values] ZeRO-3 gathers inside the block (through deepspeed.comm.allgather_fn)."""
    import deepspeed.comm as dist
    count, original = [0], dist.allgather_fn

    def counting(output, *args, **kwargs):
        count[0] += output.numel()
        return original(output, *args, **kwargs)
    dist.allgather_fn = counting
    try:
        yield count
    finally:
        dist.allgather_fn = original


def gathered(model):
    """Parameters (numel) gathered on this rank now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return sum(p.ds_numel for p in model.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)


def recomputed(spec):
    """Attribution with attribution_recompute on the partitioned source: its scores (each rank its own batch)
    against the same batch without recompute and on the model loaded whole, and the parameters (numel) still
    gathered after each of two batches, and after the cache's forwards that follow (a new trace between)."""
    from semalign_ds import attribution
    model, engine, adapter, head = partitioned(spec)
    whole = models.Adapter(models.load_model(spec))
    runs = []  # neither the embedding nor the head module runs (ZeRO-3 would gather them whole)
    for module in (adapter.embed_tokens, adapter.head):
        module.register_forward_pre_hook(lambda *a: runs.append(1))
    ids = torch.randint(1, 1000, (3, 11), generator=torch.Generator().manual_seed(10 + distributed.rank()))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    loss = mask.bool()
    loss[:, :2] = loss[:, -1] = False
    loss[1, 7:] = False
    held = []
    engines.new_trace(engine)
    plain = attribution.batch_scores(adapter, ids, mask, loss, head, engine)
    moved = []
    for _ in range(2):
        with gathers() as count:
            ours = attribution.batch_scores(adapter, ids, mask, loss, head, engine, recompute=True)
        held.append(gathered(model))
        moved.append(count[0])
    ref = attribution.batch_scores(whole, ids, mask, loss, whole.head.weight)
    engines.new_trace(engine)
    for _ in range(2):
        with torch.no_grad():
            adapter.hidden_states(ids, mask, runner=engine)
    held.append(gathered(model))
    layer = sum(p.ds_numel for p in adapter.layers[0].parameters())
    layers = sum(p.ds_numel for p in adapter.layers.parameters())
    engines.release_source(engine)
    scale = ref.abs().max()  # float32: differences relative to the largest score
    return {"vs_plain": float((ours - plain).abs().max() / scale), "vs_whole": float((ours - ref).abs().max() / scale),
            "smallest": float(ref.min()), "held": held, "layer": layer, "vocab_module_runs": len(runs),
            "gathered_per_batch": [m / layers for m in moved],
            "head_rows": [head.lo, head.hi, head.vocab, head.parallel]}


if __name__ == "__main__":
    main(sys.argv[1:])
