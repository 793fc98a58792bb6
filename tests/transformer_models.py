"""Tiny models built the way transformer and adapter libraries build them, for known-answer tests.

* :class:`TinyGPT`: token and position embeddings, pre-LayerNorm attention through
  ``scaled_dot_product_attention``, a GELU MLP, a bias on the residual stream and a final LayerNorm;
  optionally each block under ``checkpoint(..., use_reentrant=True)``, as Hugging Face's gradient
  checkpointing runs it. `bias_gain` scales the residual-stream bias: the Hessian's top direction
  then lies on that bias, where the third derivative is large (GPT-2's top eigenvector lies on its
  residual-stream biases, where a finite difference's eps^2 term is 4 orders above a random
  direction's).
* :class:`LoRANet`: low-rank adapters (A, B) on frozen Linear layers under a frozen embedding, each
  block under a reentrant checkpoint, inputs made to require grad by a forward hook on the embedding
  (what ``enable_input_require_grads()`` installs): ``torch.autograd.grad`` then returns None for
  every adapter while ``loss.backward()`` reaches them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal attention (SDPA) and a GELU MLP, residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(d, dim=-1)
        q, k, v = (x.view(b, t, self.heads, d // self.heads).transpose(1, 2) for x in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.norm2(h))


class TinyGPT(nn.Module):
    def __init__(
        self, vocab: int = 7, width: int = 4, length: int = 4, heads: int = 1, *, bias_gain: float = 1.0, reentrant: bool = False
    ) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Parameter(0.1 * torch.randn(length, width))
        self.block = Block(width, heads)
        self.residual_bias = nn.Parameter(0.1 * torch.randn(width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.bias_gain, self.reentrant = bias_gain, reentrant

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        h = checkpoint(self.block, h, use_reentrant=True) if self.reentrant else self.block(h)
        return self.head(self.norm(h + self.bias_gain * self.residual_bias))


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    ids = batch
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def token_batch(vocab: int = 7, length: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(seed))


class LoRALinear(nn.Module):
    """A frozen Linear plus the low-rank update B A (scaled by alpha / rank), as peft builds it."""

    def __init__(self, width_in: int, width_out: int, rank: int, *, zero_b: bool) -> None:
        super().__init__()
        self.base = nn.Linear(width_in, width_out).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, width_in) / width_in**0.5)
        self.lora_B = nn.Parameter(torch.zeros(width_out, rank) if zero_b else 0.3 * torch.randn(width_out, rank))
        self.scale = 2.0 / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class AdapterBlock(nn.Module):
    def __init__(self, width: int, rank: int, *, zero_b: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width).requires_grad_(False)
        self.up, self.down = LoRALinear(width, 2 * width, rank, zero_b=zero_b), LoRALinear(2 * width, width, rank, zero_b=zero_b)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


class LoRANet(nn.Module):
    def __init__(
        self, vocab: int = 11, width: int = 8, rank: int = 2, blocks: int = 2, *, zero_b: bool, checkpointing: bool = True
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width).requires_grad_(False)
        self.blocks = nn.ModuleList(AdapterBlock(width, rank, zero_b=zero_b) for _ in range(blocks))
        self.head = nn.Linear(width, vocab).requires_grad_(False)
        self.checkpointing = checkpointing
        # What transformers' enable_input_require_grads() installs, so reentrant checkpoints record a graph.
        self.embedding.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=True) if self.checkpointing else block(h)
        return self.head(h)
