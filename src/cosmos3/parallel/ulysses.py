"""Ulysses sequence parallelism (DeepSpeed-Ulysses, as in xDiT): the generation tokens are split over K ranks; around
attention one all-to-all trades the sequence split for a head split (every rank sees every token of its heads),
and another trades it back. The understanding keys/values (the prompt) are computed once per request on every rank;
each rank reads the heads its queries use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cosmos3.errors import RequestError


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of a sequence-parallel pass: `tokens` generation rows per branch, split in `size` chunks
    of `chunk` rows (the last padded); this rank holds chunk `rank`."""

    group: dist.ProcessGroup
    rank: int
    size: int
    tokens: int

    @property
    def chunk(self) -> int:
        return -(-self.tokens // self.size)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, tokens, ...]` -> this rank's `[B, chunk, ...]` (zero rows past the end)."""
        pad = self.chunk * self.size - self.tokens
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
        return x[:, self.rank * self.chunk : (self.rank + 1) * self.chunk]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `[B, chunk, ...]` -> `[B, tokens, ...]` on every rank."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, : self.tokens]

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, chunk, heads, D]` (this rank's rows, all heads) -> `[B, size * chunk, heads / size, D]` (all rows,
        this rank's heads)."""
        b, n, h, d = x.shape
        send = x.reshape(b, n, self.size, h // self.size, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[r] = rank r's rows of this rank's heads
        return recv.permute(1, 0, 2, 3, 4).reshape(b, self.size * n, h // self.size, d)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_heads` for the attention output `[B, size * chunk, F]` -> `[B, chunk, size * F]`."""
        b, _, f = x.shape
        send = x.reshape(b, self.size, self.chunk, f).permute(1, 0, 2, 3).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[r] = this rank's rows of rank r's heads
        return recv.permute(1, 2, 0, 3).reshape(b, self.chunk, self.size * f)

    def kv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Key/value heads `[..., kv_heads, D]` made splittable `size` ways: with fewer key/value heads than ranks
        (GQA), each is repeated so that every rank gets the one its query heads use."""
        heads = x.shape[-2]
        if heads % self.size == 0:
            return x
        return x.repeat_interleave(self.size // heads, dim=-2)

    def own_kv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's key/value heads of a full `[..., kv_heads, D]` tensor (the prompt's, computed everywhere)."""
        x = self.kv_heads(x)
        per_rank = x.shape[-2] // self.size
        return x[..., self.rank * per_rank : (self.rank + 1) * per_rank, :]


def check_degree(degree: int, heads: int, kv_heads: int) -> None:
    """Ulysses splits the (per-TP-rank) query heads; key/value heads must split or repeat evenly."""
    if heads % degree or (kv_heads % degree and degree % kv_heads):
        raise RequestError(
            "ulysses_degree",
            degree,
            f"a divisor of the query heads per tensor-parallel rank ({heads}) that divides or is divided by the "
            f"key/value heads ({kv_heads})",
        )
