"""Walk same-shaped tensors in aligned, cache-sized chunks: the server's passes over a contribution (its update
norm, its fold into a float64 sum) run chunk by chunk, so their temporaries stay in the CPU cache.

Why: on the CPU, torch makes a whole-tensor temporary for an operation between tensors of different dtypes (a
float32 body added into a float64 sum is first copied to float64), and for a difference that is then reduced.
Written out to memory and read back, such temporaries cost more than the arithmetic. In chunks of 2^18 elements
(1 MB of float32) they never leave the cache; on one MiniLM body (22.7M parameters, 2-core machine) the float64
fold takes 27 ms in chunks against 87 ms whole, and the update norm 26 ms against 112 ms
(``benchmarks/aggregation.py --passes minilm``). The fold's arithmetic is the same per element either way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK = 1 << 18  # elements


def chunks(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Aligned chunks of ``tensors`` (all of one shape): flat slices, or the tensors themselves when they fit in one
    chunk. The chunks of a contiguous tensor are views, so an in-place operation on one writes into the tensor."""
    if tensors[0].numel() <= CHUNK:  # most tensors of a body (biases, norms): no reshaping or slicing to pay for
        yield tensors
        return
    flats = [t.reshape(-1) for t in tensors]
    for start in range(0, flats[0].numel(), CHUNK):
        yield tuple(flat[start:start + CHUNK] for flat in flats)


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum((a - b) ** 2)``: the difference in the tensors' own dtype (exact for nearby floats, by Sterbenz's
    lemma), widened to float32 when it is narrower (so its square cannot overflow), squared and summed per chunk
    by torch's cascade summation (within ~1e-9 of a float64 computation here), the chunk sums added in float64.
    Non-finite when a value is, or when a float32 square overflowed (a difference above ~1.8e19)."""
    total = 0.0
    for x, y in chunks(a, b):
        d = torch.sub(x, y)
        if torch.finfo(d.dtype).bits < 32:
            d = d.float()
        total += float(d.mul_(d).sum())
    return total
