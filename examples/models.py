"""Models of the examples and benchmarks (DESIGN.md), with their loss closures and synthetic batches.

* ResNet-18 (torchvision, no weights) adapted to 32x32 inputs: 3x3 stem, no max-pool.
* A GPT: pre-LayerNorm blocks, causal ``F.scaled_dot_product_attention``, learned positions.
Batches are random (no downloads); curvature on random data is still a real workload.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def image_batch(batch_size: int, device: torch.device, seed: int = 0, classes: int = 10):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only transformer (nanoGPT-like)."""

    def __init__(self, vocab: int = 512, d: int = 384, layers: int = 6, heads: int = 6, context: int = 256) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, d)
        self.position = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.ln(self.blocks(self.token(tokens) + self.position(positions))))


def token_batch(batch_size: int, context: int, vocab: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch_size, context + 1), generator=generator)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
