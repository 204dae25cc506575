"""The small transformer of both case studies (no LayerNorm), read out at the last position.

It is the architecture of Nanda et al. ("Progress measures for grokking via mechanistic
interpretability") that Palumbo et al. also use for 2-SAT: token embedding, learned absolute
position embedding, blocks of causal multi-head attention (no biases) and a ReLU MLP (with
biases), residual connections, an unembedding without bias, no LayerNorm. Both tasks read the
answer at the last position only, so :meth:`Transformer.forward` returns the logits of the last
position ``[B, d_vocab_out]`` and the final block computes only what those need (the last query
of its attention and the last position's MLP). :meth:`Transformer.forward_all` is the plain
all-positions computation; ``forward(x) == forward_all(x)[:, -1]`` up to float rounding (tested).

Every boundary an interpretation needs is a module whose output is one tensor, so that
:func:`semlens_fast.validate.validate` can record and patch it with forward hooks:

* ``embed``: the token embedding ``W_E[x]`` ``[B, T, d]`` (before the position embedding);
* ``blocks.<i>``: the residual stream after block ``i`` (``[B, T, d]``; ``[B, 1, d]`` for the
  final block);
* ``blocks.<i>.mid``: the pair *(residual stream after attention, MLP hidden activations)*
  packed into one tensor ``[B, T, d + d_mlp]`` (``T = 1`` in the final block): the rest of the
  block (the MLP output layer and the residual sum) reads only this pair, so replacing it
  replaces everything the rest of the network sees.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Hook", "Attention", "Block", "Transformer"]


class Hook(nn.Module):
    """Identity: a named hook point."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Attention(nn.Module):
    """Causal multi-head attention without biases (``W_Q, W_K, W_V`` fused, then ``W_O``)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, H, T, dh]
        b, n, _ = t.shape
        return t.reshape(b, n, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``[B, T, d]`` -> ``[B, T, d]`` (``[B, 1, d]``: the last query only)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if last_only:
            q = q[:, -1:]
        q, k, v = self._split(q), self._split(k), self._split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # [B, H, Tq, T]
        if not last_only:
            n = x.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        z = scores.softmax(-1) @ v  # [B, H, Tq, dh]
        b, _, tq, _ = z.shape
        return self.out(z.transpose(1, 2).reshape(b, tq, -1))


class Block(nn.Module):
    """``r = x + attn(x)``; ``h = relu(W_in r + b_in)``; ``mid = [r, h]``; ``x' = r + W_out h + b_out``."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.d_model = d_model
        self.attn = Attention(d_model, n_heads)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mid = Hook()
        self.mlp_out = nn.Linear(d_mlp, d_model)

    def finish(self, mid: torch.Tensor) -> torch.Tensor:
        """The rest of the block from the packed ``[r, h]`` state."""
        r, h = mid[..., : self.d_model], mid[..., self.d_model :]
        return r + self.mlp_out(h)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        r = (x[:, -1:] if last_only else x) + self.attn(x, last_only)
        h = F.relu(self.mlp_in(r))
        return self.finish(self.mid(torch.cat([r, h], dim=-1)))


class Transformer(nn.Module):
    """Token ids ``[B, T]`` -> logits of the last position ``[B, d_vocab_out]``."""

    def __init__(self, d_vocab: int, n_ctx: int, d_model: int, n_heads: Sequence[int], d_mlp: int,
                 d_vocab_out: int | None = None):
        super().__init__()
        self.config = dict(d_vocab=d_vocab, n_ctx=n_ctx, d_model=d_model, n_heads=list(n_heads), d_mlp=d_mlp,
                           d_vocab_out=d_vocab_out or d_vocab)
        self.embed = nn.Embedding(d_vocab, d_model)
        self.pos = nn.Parameter(torch.empty(n_ctx, d_model))
        self.blocks = nn.ModuleList(Block(d_model, h, d_mlp) for h in n_heads)
        self.unembed = nn.Linear(d_model, d_vocab_out or d_vocab, bias=False)
        s = 1 / math.sqrt(d_model)
        nn.init.normal_(self.embed.weight, std=s)
        nn.init.normal_(self.pos, std=s)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=s)
            nn.init.normal_(blk.attn.out.weight, std=s)
            nn.init.normal_(blk.mlp_in.weight, std=s)
            nn.init.normal_(blk.mlp_out.weight, std=1 / math.sqrt(d_mlp))
            nn.init.zeros_(blk.mlp_in.bias)
            nn.init.zeros_(blk.mlp_out.bias)
        nn.init.normal_(self.unembed.weight, std=s)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for i, blk in enumerate(self.blocks):
            x = blk(x, last_only=i == len(self.blocks) - 1)
        return self.unembed(x[:, -1])

    def forward_all(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position ``[B, T, d_vocab_out]`` (the plain causal transformer)."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.unembed(x)

    def from_embed(self, e: torch.Tensor) -> torch.Tensor:
        """Logits from the token embedding ``[B, T, d]`` (the output of ``embed``)."""
        return self.from_block(e + self.pos[: e.shape[1]], 0)

    def from_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Logits from the residual stream ``x`` entering block ``i`` (``i = len(blocks)``: after the last)."""
        for j in range(i, len(self.blocks)):
            x = self.blocks[j](x, last_only=j == len(self.blocks) - 1)
        return self.unembed(x[:, -1])

    def tail(self, mid: torch.Tensor) -> torch.Tensor:
        """Logits from the packed ``[r, h]`` state of the final block (``blocks.<-1>.mid``)."""
        return self.unembed(self.blocks[-1].finish(mid)[:, -1])
