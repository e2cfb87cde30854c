"""Numeric constants and integer helpers shared by every kernel family.

The kernels keep scores in log2 units and use exp2: with no softcap or ALiBi, log2(e) folds into the
softmax scale, so each score costs one multiply before exp2 (FA2's Triton kernels do the same). A
logsumexp leaves a kernel in natural-log units again through LN2.
"""

from __future__ import annotations

import math

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def is_power_of_two(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def next_power_of_two(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(int(x) - 1, 0).bit_length()
