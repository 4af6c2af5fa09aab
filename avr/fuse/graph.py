"""Temporal graph network over token sequences (docs/methods.md (iv)): HTAV's "Temporal RoBERTa
Graph Network" text encoder, made concrete as a stack of GCN or GAT layers on a fixed graph.

Graph: one node per token; an edge joins tokens i and j when ``|i - j| <= window`` (the
sequential edges ``|i - j| = 1`` are the ``window = 1`` case, larger windows add the windowed
edges), plus a self-loop on every node; an edge that touches a padded token is removed. The
graph is dense, [B, L, L]: cheap for L <= 64 and free of sparse batching.

- GCN (Kipf & Welling, ICLR 2017, arXiv 1609.02907)::

      A_hat = A + I,  D_hat_ii = sum_j A_hat_ij,  H' = ReLU(D_hat^-1/2 A_hat D_hat^-1/2 H W)

- GAT (Velickovic et al., ICLR 2018, arXiv 1710.10903), ``heads`` heads concatenated::

      e_ij = LeakyReLU_0.2(a_src . W h_i + a_dst . W h_j)   # = a^T [W h_i ; W h_j]
      alpha_ij = softmax over neighbours j of i (e_ij),  h_i' = ELU(sum_j alpha_ij W h_j)

Each layer is followed by a residual connection and LayerNorm (docs/methods.md (iv)); padded
tokens come out as zeros. Self-loops on padded nodes keep every softmax row and every degree
non-empty, so an all-padding sequence gives zeros, not NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avr.errors import AvrError

GRAPH_KINDS = ("gcn", "gat")


def temporal_adjacency(mask: torch.Tensor, window: int) -> torch.Tensor:
    """Adjacency with self-loops [B, L, L] (bool) of tokens with padding ``mask`` [B, L]:
    ``|i - j| <= window`` between valid tokens, and ``i == j`` for every token."""
    length = mask.shape[1]
    position = torch.arange(length, device=mask.device)
    distance = (position[:, None] - position[None, :]).abs()  # [L, L]
    near = (distance <= window)[None]
    both_valid = mask[:, :, None] & mask[:, None, :]
    return (near & both_valid) | (distance == 0)[None]


def normalized_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of an adjacency that already holds self-loops [B, L, L] -> float."""
    weights = adjacency.float()
    inv_sqrt_degree = weights.sum(-1).clamp(min=1.0).rsqrt()  # [B, L]
    return inv_sqrt_degree[:, :, None] * weights * inv_sqrt_degree[:, None, :]


class GCNLayer(nn.Module):
    """H' = LN(H + ReLU(D^-1/2 A D^-1/2 H W))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        # tokens [B, L, D], adjacency [B, L, L] bool with self-loops
        propagated = normalized_adjacency(adjacency).to(tokens.dtype) @ self.linear(tokens)
        return self.norm(tokens + F.relu(propagated))


class GATLayer(nn.Module):
    """H' = LN(H + ELU(concat_heads sum_j alpha_ij W h_j)), additive attention over edges."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise AvrError(f"GAT width {dim} is not divisible by its {heads} heads; "
                           f"pick a width that is a multiple of the head count")
        self.heads = heads
        self.linear = nn.Linear(dim, dim, bias=False)
        self.attend_source = nn.Parameter(torch.empty(heads, dim // heads))
        self.attend_target = nn.Parameter(torch.empty(heads, dim // heads))
        nn.init.xavier_uniform_(self.attend_source)
        nn.init.xavier_uniform_(self.attend_target)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        B, L, D = tokens.shape
        projected = self.linear(tokens).view(B, L, self.heads, D // self.heads)  # [B, L, H, Dh]
        source = torch.einsum("blhd,hd->bhl", projected, self.attend_source)  # a_src . W h_i
        target = torch.einsum("blhd,hd->bhl", projected, self.attend_target)  # a_dst . W h_j
        scores = F.leaky_relu(source[:, :, :, None] + target[:, :, None, :], 0.2)  # [B, H, L, L]
        scores = scores.masked_fill(~adjacency[:, None], float("-inf"))  # self-loops: never empty
        weights = scores.softmax(-1)
        attended = torch.einsum("bhij,bjhd->bihd", weights, projected).reshape(B, L, D)
        return self.norm(tokens + F.elu(attended))


class TemporalGraph(nn.Module):
    """``layers`` GCN or GAT layers over the temporal token graph: [B, L, D] + mask [B, L] ->
    [B, L, D], zero at padded tokens."""

    def __init__(self, dim: int, layers: int, kind: str = "gcn", window: int = 2, heads: int = 4):
        super().__init__()
        if kind not in GRAPH_KINDS:
            raise AvrError(f"graph kind {kind!r} is unknown; "
                           f"choose one of {', '.join(GRAPH_KINDS)}")
        if window < 1:
            raise AvrError(f"graph window {window} must be >= 1 (1 keeps only sequential edges)")
        self.window = window
        self.layers = nn.ModuleList(GCNLayer(dim) if kind == "gcn" else GATLayer(dim, heads)
                                    for _ in range(layers))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        adjacency = temporal_adjacency(mask, self.window)
        keep = mask[:, :, None].to(tokens.dtype)
        tokens = tokens * keep
        for layer in self.layers:
            tokens = layer(tokens, adjacency) * keep
        return tokens
