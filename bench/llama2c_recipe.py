"""The baseline bench_train.py compares with: the same Llama model trained the way llama2.c's model.py and train.py
train it on a CPU (our own code, written from their description).

What differs from model.py and training.py: RMSNorm as composite float32 arithmetic (not the fused kernel), RoPE as
real arithmetic on (even, odd) pairs (not one complex multiplication), and AdamW in its multi-tensor ("foreach")
form with weight decay on the matrices only (llama2.c asks for the fused AdamW on CUDA alone). Attention is
scaled_dot_product_attention, the classifier shares the embedding table, the loss is cross-entropy over every
position: as in model.py, so the two differ only where the recipes do. Dropout, as llama2.c places it, also drops
attention weights (model.py does not: see its Attention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RecipeRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]: each (x[2i], x[2i+1]) rotated by the position's angle, in real arithmetic."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2).type_as(x)


class RecipeBlock(nn.Module):
    """Module names as llama2.c's (and model.py's), so a model.Transformer's state dict loads into it."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, nn.Dropout(dropout)
        self.attention = nn.ModuleDict({name: nn.Linear(dim, dim, bias=False) for name in ("wq", "wk", "wv", "wo")})
        self.feed_forward = nn.ModuleDict({"w1": nn.Linear(dim, hidden_dim, bias=False),
                                           "w2": nn.Linear(hidden_dim, dim, bias=False),
                                           "w3": nn.Linear(dim, hidden_dim, bias=False)})
        self.attention_norm, self.ffn_norm = RecipeRMSNorm(dim), RecipeRMSNorm(dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        attention, feed_forward = self.attention, self.feed_forward
        h = self.attention_norm(x)
        q, k, v = (attention[name](h).view(batch, seq_len, self.n_heads, -1) for name in ("wq", "wk", "wv"))
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             dropout_p=self.dropout.p if self.training else 0.0)
        x = x + self.dropout(attention["wo"](out.transpose(1, 2).reshape(batch, seq_len, dim)))
        h = self.ffn_norm(x)
        return x + self.dropout(feed_forward["w2"](F.silu(feed_forward["w1"](h)) * feed_forward["w3"](h)))


class RecipeTransformer(nn.Module):
    """Same shapes and parameter count as model.Transformer(ModelArgs(dim, n_layers, n_heads, vocab_size, seq_len))."""

    def __init__(self, dim: int, n_layers: int, n_heads: int, vocab_size: int, seq_len: int, hidden_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(RecipeBlock(dim, n_heads, hidden_dim, dropout) for _ in range(n_layers))
        self.norm = RecipeRMSNorm(dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight
        head_dim = dim // n_heads
        angles = torch.outer(torch.arange(seq_len).float(),
                             1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("cos", torch.cos(angles), persistent=False)
        self.register_buffer("sin", torch.sin(angles), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.tok_embeddings(tokens))
        cos, sin = self.cos[: tokens.size(1)], self.sin[: tokens.size(1)]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def optimizer(self, learning_rate: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
        matrices = [p for p in self.parameters() if p.dim() >= 2]
        vectors = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                                  {"params": vectors, "weight_decay": 0.0}], lr=learning_rate, betas=(0.9, 0.95))
