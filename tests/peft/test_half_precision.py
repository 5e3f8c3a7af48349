"""Adapters whose own weights are half precision (``model.half()``, or PEFT's ``autocast_adapter_dtype=False`` on a
half-precision base, as LLM users load them): every family's forward on both execution paths, ``get_delta_weight``
and merging work and agree with the same adapter in float32."""

from __future__ import annotations

import pytest
import torch

from ..checks import relative_error
from .common import FAMILIES, tiny_peft
from .helpers import tiny_input

TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("execution", ["structured", "dense"])
def test_a_half_precision_adapter_applies_and_merges_like_its_float32_self(family, dtype, execution):
    torch.manual_seed(0)
    model = tiny_peft(family, init_weights=False, execution=execution).eval()
    x = tiny_input()
    with torch.no_grad():
        reference = model(x)  # float32 weights and adapters
        model = model.to(dtype)  # base and adapter weights in half precision
        unmerged = model(x.to(dtype))
        assert unmerged.dtype == dtype
        assert relative_error(unmerged.float(), reference) < TOLERANCE[dtype]
        merged = model.merge_and_unload()(x.to(dtype))
    assert relative_error(merged.float(), unmerged.float()) < TOLERANCE[dtype]
