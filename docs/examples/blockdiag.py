"""Block-diagonal matrices: an example of a structured family, to show what adding one takes.

Copied to ``src/surm/structures/blockdiag.py`` and registered with one line in ``STRUCTURES``
(``"blockdiag": BlockDiagonal,``), it is a full surm family: ``SurmConfig(structure="blockdiag", block=8)``,
``surm finetune --structure blockdiag --block 8``, part of ``surm search``'s space, and in every family test
(``docs/adding_a_family.md``). ``tests/test_docs_example.py`` checks it against its dense form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from surm.structures.base import Cost, Init, StructuredMatrix, compute_dtype, kaiming_uniform_, thin_flops
from surm.structures.options import Option, require_size_option


class BlockDiagonal(StructuredMatrix):
    """M = the top-left (m, n) block of blockdiag(B_1, ..., B_K), B_k in R^{s x s}, K = ceil(N / s), N = max(m, n).

    Applied as one batched matmul: x zero-padded to K s and viewed as (K, s), y_k = B_k x_k, the first m outputs kept.
    Parameters: ``K s^2``. Init ``"zero"``: B = 0 (M = 0, dM/dB != 0).

    Args:
        out_features: m.
        in_features: n.
        block: s, the side of each block, 1 <= s <= N.
        init: ``"zero"`` or ``"random"``.

    Raises:
        ValueError: if ``block`` is not an integer in 1..N.
    """

    options = (Option("block", int, 4, "s, the side of each diagonal block", search=(2, 4, 8, 16)),)
    default_lr = 3e-3

    def __init__(self, out_features: int, in_features: int, block: int = 4, init: Init = "zero") -> None:
        super().__init__(out_features, in_features, init)
        self.block = require_size_option("blockdiag", "block", block, out_features, in_features)
        self.count = math.ceil(max(out_features, in_features) / block)  # K
        self.blocks = nn.Parameter(torch.empty(self.count, block, block))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "random":
            kaiming_uniform_(self.blocks, self.block)
        else:
            with torch.no_grad():
                self.blocks.zero_()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        count, block = self.count, self.block
        dtype = compute_dtype(x, self.blocks)
        lead = x.shape[:-1]
        h = F.pad(x.to(dtype).reshape(-1, self.in_features), (0, count * block - self.in_features))
        y = torch.einsum("kij,bkj->bki", self.blocks.to(dtype), h.view(-1, count, block))
        return y.reshape(-1, count * block)[:, : self.out_features].reshape(*lead, self.out_features).to(x.dtype)

    def dense(self) -> Tensor:
        return torch.block_diag(*self.blocks)[: self.out_features, : self.in_features]

    def num_parameters(self) -> int:
        return self.count * self.block**2

    def structured_cost(self, tokens: int, backward: bool, reused: bool = False) -> Cost:
        flops = 2 * tokens * self.count * self.block**2
        return Cost(small_gemm=thin_flops((3 if backward else 1) * flops, self.block),
                    elementwise=tokens * (self.count * self.block + self.out_features))

    def dense_cost(self, backward: bool) -> Cost:
        return Cost(elementwise=(2 if backward else 1) * self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}"
