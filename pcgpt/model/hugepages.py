"""CPU memory on transparent huge pages, for the tensors a decode step streams end to end.

A batch-1 GPT-2 step reads ~495 MB of weights; on 4 KiB pages that is ~120,000 pages a step, each
a TLB entry to find (the TLB holds a few thousand). On 2 MiB pages it is ~240. Linux backs an
anonymous mapping with huge pages where it is advised to (MADV_HUGEPAGE) before it is touched;
the usual system setting ("madvise") gives them to nobody else. PyTorch's own switch
(THP_MEM_ALLOC_ENABLE) is read once, at its first allocation (in practice before `import torch`
returns), and then applies to every allocation of 2 MiB or more; this applies to the tensors that
ask for it, wherever the model is loaded (formats.RowsLinear's weight copies).
"""

import functools
import math
import mmap
import sys
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def huge_pages_available() -> bool:
    """Linux with transparent huge pages given on request ("always" or "madvise")."""
    if not (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def empty_on_huge_pages(shape, dtype=torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor starting on a 2 MiB boundary of memory advised for
    huge pages; a plain torch.empty where that is not available or the tensor is smaller than
    one huge page. The memory is freed with the tensor."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge_pages_available():
        return torch.empty(shape, dtype=dtype)
    # private (a shared anonymous mapping is shmem, which huge pages reach only by another switch),
    # and one huge page longer than the tensor, so that the tensor can start on a boundary
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive as long as it lives
    start = -raw.data_ptr() % HUGE_PAGE
    # advised before the first touch (pages are chosen when first written), and only the whole huge
    # pages inside the tensor: a huge page over its tail would hold up to 2 MiB of nothing
    region.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return raw[start:start + nbytes].view(dtype).view(shape)
