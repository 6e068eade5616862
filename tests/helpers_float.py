"""Comparing float32 results that two computations reach by summing in different orders.

Chunked vs whole, cached vs not, sharded vs not, JAX vs torch: the same float32 sums, ordered differently,
differ by accumulation error. For a sum of n terms the error is at most about n·2^-24 of the terms'
magnitude, and typically sqrt(n)·2^-24 of it. So an entry's error follows the size of the terms summed
into it, not the entry's own size. An entry that cancelled to near zero keeps an error set by its terms.
The comparisons therefore take an rtol for the large entries, plus an atol for the entries near zero that
is a fraction of the largest entry of the compared arrays.
"""

from __future__ import annotations

import jax
import numpy as np


def assert_trees_close(got, want, *, rtol: float = 1e-4, atol_fraction: float = 1e-6) -> None:
    """Checks each leaf of `got` (e.g. a gradient tree) against the same leaf of `want`.

    The tolerance is rtol (default 1e-4, which bounds sums of a few hundred float32 products) plus an
    atol of `atol_fraction` times the largest |entry| in all of `want`.
    """
    scale = max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want))
    assert scale > 0, "the reference is all zeros: nothing to compare against"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol,
                                                         atol=atol_fraction * scale), got, want)
