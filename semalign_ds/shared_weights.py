"""A frozen ZeRO-3 model's partitions in one shared-memory file, for ranks on one host (CPU).

Every parameter gets a region of a file in /dev/shm laid out as the buffer its ZeRO-3 gather fills: rank 0's
partition, then rank 1's, and so on. Each rank copies its partitions into their places (its `ds_tensor` is a view
of the file from then on) and, once all have, a gather of that parameter is a new mapping of its region: nothing
is copied and no rank waits for another. The mapping lives as long as DeepSpeed holds the parameter gathered and
goes with its buffer, so a rank has the other ranks' partitions mapped only while it uses them: its resident memory
is what it is with gathers, its own partitions and the layer in use (the own partition of that layer counted twice,
by both mappings). The mapping is private (copy-on-write): a rank that wrote to a gathered parameter would change
its own copy of the page, never another rank's partition.

Only for a model that nothing updates (the source: inference, activation gradients only). The file is unlinked as
soon as every rank has opened it, so nothing is left behind whatever ends the run; the memory goes with the last
rank that maps it.
"""
from __future__ import annotations

import mmap
import os

import torch
import torch.distributed as dist

from semalign_ds import distributed

PAGE = mmap.ALLOCATIONGRANULARITY


def layout(model, world, exclude=()):
    """[(parameter, offset, bytes)] in ds_id order (the same on every rank), each region page-aligned, and the
    file's size: a ZeRO-3 parameter's gathered buffer is world partitions of ds_tensor.numel() elements each.
    exclude: parameters left out (never gathered)."""
    regions, offset = [], 0
    skip = {id(p) for p in exclude}
    params = [p for p in model.parameters() if hasattr(p, "ds_tensor") and id(p) not in skip]
    for p in sorted(params, key=lambda p: p.ds_id):
        nbytes = p.ds_tensor.numel() * world * p.ds_tensor.element_size()
        regions.append((p, offset, nbytes))
        offset += -(-nbytes // PAGE) * PAGE
    return regions, offset


class SharedPartitions:
    """The mapped file and, per parameter, where this rank's partition lies in memory -> its region."""

    def __init__(self, fd, whole, regions, world, rank):
        self.fd, self.whole, self.world, self.rank = fd, whole, world, rank
        self.by_share = {}
        self.maps = 0  # gathers served by a mapping (tests and benchmarks read it)
        file = torch.frombuffer(whole, dtype=torch.uint8) if len(whole) else torch.empty(0, dtype=torch.uint8)
        for p, offset, nbytes in regions:
            share = nbytes // world
            mine = file[offset + rank * share:offset + (rank + 1) * share].view(p.ds_tensor.dtype)
            mine.copy_(p.ds_tensor.data.reshape(-1))
            p.ds_tensor.data = mine  # this rank's partition now lives in the file; the private copy is freed
            self.by_share[mine.data_ptr()] = (offset, nbytes)

    def close(self):
        self.by_share.clear()
        os.close(self.fd)

    def gather(self, output_tensor, input_tensor):
        """output_tensor made a mapping of input_tensor's region when input_tensor is one of this rank's partitions
        in the file and output_tensor has its gathered size (True); else False, and nothing is done."""
        region = self.by_share.get(input_tensor.data_ptr())
        if region is None or not output_tensor.is_contiguous() or output_tensor.dtype != input_tensor.dtype:
            return False
        offset, nbytes = region
        if output_tensor.numel() * output_tensor.element_size() != nbytes:
            return False
        view = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)
        output_tensor.set_(torch.frombuffer(view, dtype=output_tensor.dtype).view(output_tensor.shape))
        self.maps += 1
        return True


def attach(model, exclude=()):
    """Every rank's SharedPartitions for the ZeRO-3 `model`'s parameters but `exclude` (a collective call, after
    its partitions are loaded and before its first forward), or None on every rank when /dev/shm cannot hold
    them with a tenth to spare or a rank cannot map the file: then its gathers copy as before. The caller checks
    that the ranks share a host."""
    w, me = dist.get_world_size(), dist.get_rank()
    regions, size = layout(model, w, exclude)
    path = distributed.shm_file("source-", size, room=1.1)
    fd = whole = None
    if path is not None:
        try:
            fd = os.open(path, os.O_RDWR)
            whole = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except OSError:
            fd = whole = None
    if not distributed.agreed(whole is not None, path):
        if fd is not None:
            os.close(fd)
        return None
    shared = SharedPartitions(fd, whole, regions, w, me)
    dist.barrier()  # every partition is in the file before any rank maps another's
    return shared


def share(model, exclude=()):
    """Put the frozen ZeRO-3 `model`'s partitions in one shared file when every rank is on this host, so that its
    gathers map the other ranks' partitions instead of copying them (a collective call); the SharedPartitions, or
    None where the ranks gather as before."""
    return distributed.use_partitions(attach(model, exclude) if distributed.one_host() else None)
