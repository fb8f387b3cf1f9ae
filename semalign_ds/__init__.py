"""semalign-ds: SemAlign knowledge transfer from a large source LLM into a smaller target of the same vocabulary."""
import os


def _huge_pages_default():
    """Let torch put CPU tensors of 2 MiB or more on transparent huge pages (THP_MEM_ALLOC_ENABLE, read by torch
    once, at its first CPU allocation: so here, before anything allocates), unless the user has set it or the
    kernel has them off. A freshly mapped tensor is then faulted in 2 MiB at a time instead of 4 KiB: at 2 ranks a
    ZeRO-3 source maps every large allocation on its own (summary.map_large_allocations), and the page faults were
    most of its system time. THP_MEM_ALLOC_ENABLE=0 turns it off."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:  # not Linux, or a kernel without transparent huge pages
        return
    if "[never]" not in mode:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


_huge_pages_default()
