"""A frozen ZeRO-3 model's partitions in one shared-memory file, for ranks on one host (CPU).

Every parameter gets a region of a file in /dev/shm laid out as the buffer its ZeRO-3 gather fills: rank 0's
partition, then rank 1's, and so on. Each rank maps the whole file once, copies its partitions into their places
(its `ds_tensor` is a view of the file from then on) and, once all have, a gather of that parameter makes the
buffer a view of its region: nothing is copied, nothing is mapped anew, and no rank waits for another. The other
ranks' pages of the region come in as they are read; when DeepSpeed lets the buffer go they are unmapped again
(MADV_DONTNEED: their memory stays in the file), so a rank maps the other ranks' partitions only while it uses
them, and its own pages, mapped once, count once in its resident memory (a second mapping of the region counted
them twice: 84 MiB of a 1.5B source's layer on each of 2 ranks). The file is made read-only once the partitions
are in: a write to a gathered parameter would fail loudly, never reach another rank's partition.

Only for a model that nothing updates (the source: inference, activation gradients only). The file is unlinked as
soon as every rank has opened it, so nothing is left behind whatever ends the run; the memory goes with the last
rank that maps it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import torch
import torch.distributed as dist

from semalign_ds import distributed

PAGE = mmap.ALLOCATIONGRANULARITY


def layout(model, world, exclude=(), only=None):
    """[(parameter, offset, bytes)] in ds_id order (the same on every rank), each region page-aligned, and the
    file's size: a ZeRO-3 parameter's gathered buffer is world partitions of ds_tensor.numel() elements each.
    exclude: parameters left out (never gathered); only: these alone."""
    regions, offset = [], 0
    skip = {id(p) for p in exclude}
    keep = None if only is None else {id(p) for p in only}
    params = [p for p in model.parameters() if hasattr(p, "ds_tensor") and id(p) not in skip
              and (keep is None or id(p) in keep)]
    for p in sorted(params, key=lambda p: p.ds_id):
        nbytes = p.ds_tensor.numel() * world * p.ds_tensor.element_size()
        regions.append((p, offset, nbytes))
        offset += -(-nbytes // PAGE) * PAGE
    return regions, offset


class SharedPartitions:
    """The mapped file and, per parameter, where this rank's partition lies in memory -> its region."""

    def __init__(self, fd, whole, regions, world, rank):
        self.fd, self.whole, self.world, self.rank = fd, whole, world, rank
        self._close = weakref.finalize(self, os.close, fd)  # once, by close() or when the last user lets go
        self.by_share = {}
        self.maps = 0  # gathers served from the file (tests and benchmarks read it)
        file = torch.frombuffer(whole, dtype=torch.uint8) if len(whole) else torch.empty(0, dtype=torch.uint8)
        for p, offset, nbytes in regions:
            share = nbytes // world
            mine = file[offset + rank * share:offset + (rank + 1) * share].view(p.ds_tensor.dtype)
            mine.copy_(p.ds_tensor.data.reshape(-1))
            p.ds_tensor.data = mine  # this rank's partition now lives in the file; the private copy is freed
            self.by_share[mine.data_ptr()] = (offset, nbytes)

    def read_only(self):
        """Forbid writes to the file from this rank (a write to a gathered parameter then faults) where the C
        library allows; whether it did."""
        if not len(self.whole):
            return True
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            address = ctypes.addressof(ctypes.c_char.from_buffer(self.whole))
            return libc.mprotect(ctypes.c_void_p(address), ctypes.c_size_t(len(self.whole)), mmap.PROT_READ) == 0
        except (OSError, AttributeError, TypeError):
            return False

    def close(self):
        self.by_share.clear()
        self._close()

    def _region(self, offset, nbytes, start=0, end=None):
        """A uint8 tensor over bytes [start, end) (default: all) of the region [offset, offset + nbytes) of the
        file as this rank maps them: every rank's partitions read in place. When the tensor (and every view of
        it) is gone, the pages of that window outside this rank's partition are unmapped again; a page it shares
        with the partition stays."""
        share = nbytes // self.world
        lo, hi = offset + self.rank * share, offset + (self.rank + 1) * share
        a, b = offset + start, offset + (nbytes if end is None else end)
        # whole pages, never one of this rank's (pages outside the window hold nothing in use from this view:
        # dropping them only makes a later read map them again)
        others = ((a // PAGE * PAGE, min(lo, b) // PAGE * PAGE), (-(-max(hi, a) // PAGE) * PAGE, -(-b // PAGE) * PAGE))
        view = memoryview(self.whole)[a:b]
        weakref.finalize(view, _unmap, self.whole, others)
        return torch.frombuffer(view, dtype=torch.uint8)

    def reader(self, param):
        """A function (lo=0, hi=all) -> rows [lo, hi) of `param` ([ds_shape], its first dimension) read in place
        from the file, every rank's partitions (nothing copied, no collective), or None when param is not in the
        file. The other ranks' pages are unmapped again when the tensor goes; the function keeps the file, not
        the parameter."""
        region = self.by_share.get(param.ds_tensor.data_ptr())
        if region is None:
            return None
        (offset, nbytes), dtype, shape = region, param.ds_tensor.dtype, tuple(param.ds_shape)
        row = param.ds_numel // shape[0] * param.ds_tensor.element_size()

        def rows(lo=0, hi=None):
            hi = shape[0] if hi is None else min(hi, shape[0])
            return self._region(offset, nbytes, lo * row, hi * row).view(dtype).view(hi - lo, *shape[1:])
        return rows

    def gather(self, output_tensor, input_tensor):
        """output_tensor made a view of input_tensor's region when input_tensor is one of this rank's partitions
        in the file and output_tensor has its gathered size (True); else False, and nothing is done."""
        region = self.by_share.get(input_tensor.data_ptr())
        if region is None or not output_tensor.is_contiguous() or output_tensor.dtype != input_tensor.dtype:
            return False
        offset, nbytes = region
        if output_tensor.numel() * output_tensor.element_size() != nbytes:
            return False
        output_tensor.set_(self._region(offset, nbytes).view(output_tensor.dtype).view(output_tensor.shape))
        self.maps += 1
        return True


def _unmap(whole, ranges):
    """Drop this process's mappings of the file's pages in `ranges` (start, end): their memory stays in the
    file, and a later read maps them again."""
    if whole.closed:
        return
    for start, end in ranges:
        if end > start:
            whole.madvise(mmap.MADV_DONTNEED, start, end - start)


def attach(model, exclude=(), only=None, prefix="source-"):
    """Every rank's SharedPartitions for the ZeRO-3 `model`'s parameters but `exclude` (a collective call, after
    its partitions are loaded and before its first forward), or None on every rank when /dev/shm cannot hold
    them with a tenth to spare or a rank cannot map the file: then its gathers copy as before. The caller checks
    that the ranks share a host."""
    w, me = dist.get_world_size(), dist.get_rank()
    regions, size = layout(model, w, exclude, only)
    path = distributed.shm_file(prefix, size, room=1.1)
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
    shared.read_only()
    return shared


def share(model, exclude=()):
    """Put the frozen ZeRO-3 `model`'s partitions in one shared file when every rank is on this host, so that its
    gathers map the other ranks' partitions instead of copying them (a collective call); the SharedPartitions, or
    None where the ranks gather as before."""
    return distributed.use_partitions(attach(model, exclude) if distributed.one_host() else None)


def share_rows(model, params):
    """Put the frozen ZeRO-3 `model`'s vocabulary matrices `params` (embedding, LM head: read as rows, never
    gathered) in a file of their own when every rank is on this host (a collective call): each rank's rows stay a
    view of its partition, and any rank can read every rank's rows in place (SharedPartitions.reader), so that a
    lookup or an NLL over the whole vocabulary needs no collective. Its own file because the rows outlive the rest
    of the source (alignment, the cache's head): they keep this file, not the source's. The SharedPartitions (held
    by whoever reads it; the file goes with the last rank's mappings), or None."""
    if not distributed.one_host():
        return distributed.use_rows(None)
    return distributed.use_rows(attach(model, only=list({id(p): p for p in params}.values()), prefix="rows-"))
