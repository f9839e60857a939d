"""How all_reduce cuts a tensor into chunks: pipelined at mid sizes, even, never above chunk_bytes."""

from __future__ import annotations

import pytest

from macfleet.comm.collectives import MIN_CHUNK_BYTES, PIPELINE_CHUNKS, _ranges, chunk_elems


@pytest.mark.parametrize("nbytes", [10_000_000, 25_000_000, 100_000_000, 300_000, 4096])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_segments_travel_as_even_pipelined_chunks(nbytes, n):
    numel, chunk_bytes = nbytes // 4, 4 << 20
    step = chunk_elems(numel, 4, n, chunk_bytes)
    seg = -(-numel // n)
    chunks = _ranges(0, seg, step)
    assert step * 4 <= chunk_bytes
    assert len(chunks) >= PIPELINE_CHUNKS or step * 4 <= MIN_CHUNK_BYTES + 4
    sizes = [b - a for a, b in chunks]
    assert max(sizes) - min(sizes) <= len(chunks)  # no runt tail behind full chunks


def test_a_small_chunk_size_is_kept():
    # Tests force many chunks with a tiny chunk_bytes; the pipelining floor must not override it.
    step = chunk_elems(70_001, 4, 2, 4096)
    assert step <= 1024 and len(_ranges(0, 35_001, step)) == len(_ranges(0, 35_001, 1024))
