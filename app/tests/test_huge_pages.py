"""The provider maps its heap with huge pages before forking kernels: fewer page-table entries to copy at
each fork and to tear down at each kernel's exit."""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

import pytest

from cellserver.kernel_provider import (
    HUGE_PAGE_BYTES,
    collapse_heap_into_huge_pages,
    dense_anonymous_regions,
    huge_page_span,
)

SMAPS = """\
55d0c0000000-55d0c0800000 rw-p 00000000 00:00 0                          [heap]
Size:               8192 kB
Rss:                8000 kB
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
Size:               8192 kB
Rss:                  64 kB
7f1000000000-7f1000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
7f2000000000-7f2000400000 r--p 00000000 08:01 1234                       /usr/lib/libsage.so
Size:               4096 kB
Rss:                4096 kB
7f3000000000-7f3000400000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
Size:               4096 kB
Rss:                4096 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                 132 kB
"""


def test_only_dense_private_anonymous_mappings_are_collapsed() -> None:
    regions = list(dense_anonymous_regions(SMAPS))
    # the heap and the dense anonymous mapping; not a sparse thread stack, a library, shared memory, the stack
    assert regions == [(0x55D0C0000000, 0x55D0C0800000), (0x7F1000000000, 0x7F1000400000)]


def test_the_span_is_the_whole_huge_pages_inside_a_mapping() -> None:
    huge, small = HUGE_PAGE_BYTES, 4096
    assert huge_page_span(huge + small, 4 * huge - small) == (2 * huge, 3 * huge)
    assert huge_page_span(huge, 3 * huge) == (huge, 3 * huge)
    assert huge_page_span(huge + small, 2 * huge + small) is None


def kernel_release() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", os.uname().release).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


def anonymous_huge_bytes() -> int:
    found = re.search(r"AnonHugePages:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text())
    assert found is not None
    return int(found.group(1)) * 1024


def test_a_dense_heap_ends_up_in_huge_pages() -> None:
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this kernel has no transparent huge pages")
    if kernel_release() < (6, 1):
        pytest.skip("MADV_COLLAPSE came with Linux 6.1")
    size = 64 * HUGE_PAGE_BYTES
    heap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    heap.madvise(mmap.MADV_NOHUGEPAGE)  # faulted in small pages, as a heap grown by small allocations is
    for offset in range(0, size, mmap.PAGESIZE):
        heap[offset] = 1
    heap.madvise(mmap.MADV_HUGEPAGE)
    before = anonymous_huge_bytes()

    collapsed = collapse_heap_into_huge_pages()

    assert collapsed >= size - 2 * HUGE_PAGE_BYTES
    assert anonymous_huge_bytes() - before >= size - 2 * HUGE_PAGE_BYTES
    assert heap[size - 1] == 0 and heap[0] == 1  # the contents survive
    heap.close()
