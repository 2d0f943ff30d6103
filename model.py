"""The Llama 2 architecture in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Module names follow llama2.c (tok_embeddings, layers[i].attention.wq, ...) so export.py and run.c
read the weights in the same order llama2.c does.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None  # None: same as n_heads (plain multi-head attention)
    vocab_size: int = 4096
    hidden_dim: Optional[int] = None  # None: Llama's rule, 2/3 of 4*dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0  # on the embeddings and each residual branch; not on attention weights (see Attention)
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear RoPE scaling (positions divided by it), as some imported Llamas use
    tie_embeddings: bool = True  # the classifier shares the embedding table (Llama 3 and others do not)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"dim={self.dim} must divide by n_heads={self.n_heads}, "
                f"and n_heads by n_kv_heads={self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size dim/n_heads={self.dim // self.n_heads} must be even for RoPE")

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused kernel; under autocast the residual stream it normalises stays float32.
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0,
                scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position / scaling * frequency, each [max_seq_len, head_dim // 2]."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float() / scaling, freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x [B, T, H, D] by the position's angle, as llama2.c does.

    Eager: one complex multiplication per pair, a third of the time of the same rotation in real arithmetic.
    Under torch.compile, real arithmetic, which inductor fuses into one kernel (it cannot generate complex code).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if torch.compiler.is_compiling():
        real, imag = pairs.unbind(-1)
        return torch.stack((real * cos - imag * sin, real * sin + imag * cos), -1).flatten(-2).type_as(x)
    rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class LayerKV:
    """One layer's keys and values of the positions fed so far, for generation: [B, n_kv_heads, length, head_dim],
    allocated at the first write in the dtype the layer computes in (bfloat16 under autocast)."""

    def __init__(self, length: int):
        self.length = length
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def update(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys, values [B, H, T, D] at positions start..start+T-1; all of positions 0..start+T-1."""
        if self.keys is None:
            shape = (*keys.shape[:2], self.length, keys.shape[3])
            self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)
        end = start + keys.shape[2]
        self.keys[:, :, start:end], self.values[:, :, start:end] = keys, values
        return self.keys[:, :, :end], self.values[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # Dropout on the attention weights would force PyTorch off its fused attention kernels onto the unfused
        # path (a third of a CPU training step); dropping the attention output instead regularises as well.
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: Optional[LayerKV] = None,
                start: int = 0) -> torch.Tensor:
        """x [B, T, dim] at positions start..start+T-1; with kv, attends over everything kv holds before them too."""
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        mask = None
        if kv is not None:
            k, v = kv.update(start, k, v)
            if start > 0 and seq_len > 1:  # new queries see all cached positions, and the new ones causally
                mask = torch.ones(seq_len, start + seq_len, dtype=torch.bool, device=x.device).tril(start)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seq_len > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1)))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: Optional[LayerKV] = None,
                start: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, kv, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args.dim // args.n_heads, args.max_seq_len, args.rope_theta, args.rope_scaling)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, param in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def set_dropout(self, p: float) -> None:
        """Change the dropout of every layer (fine-tuning to recall wants none where pretraining wanted some)."""
        self.args.dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, tokens: torch.Tensor, kv: Optional[list[LayerKV]] = None, start: int = 0) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim] of tokens [B, T] at positions start..start+T-1 (kv: the cache of
        every layer, holding the positions before start)."""
        end = start + tokens.shape[1]
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence of {end} tokens is longer than max_seq_len={self.args.max_seq_len}")
        cos, sin = self.freqs_cos[start:end], self.freqs_sin[start:end]
        h = self.dropout(self.tok_embeddings(tokens))
        for layer, layer_kv in zip(self.layers, kv or [None] * len(self.layers)):
            h = layer(h, cos, sin, layer_kv, start)
        return self.norm(h)

    def forward(
        self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, kv: Optional[list[LayerKV]] = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits [B, T, vocab] and, given targets [B, T] (-1 = ignored), the mean cross-entropy."""
        logits = self.output(self.hidden(tokens, kv, start))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
        min_p: Optional[float] = None,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> torch.Tensor:
        """Extend idx [B, T] by up to max_new_tokens sampled tokens; temperature 0 is greedy. The sampling settings
        are run.c's (see Sampling); the penalties look at the last repeat_last_n tokens of each row, prompt included.

        Stops early once every row has produced eos_id (rows that finished first are padded with it). With the KV
        cache each new token costs one position's forward pass; past max_seq_len the window slides and every
        step recomputes the window (RoPE positions move), as without the cache.
        """
        sampling = Sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty,
                            frequency_penalty)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        length = min(idx.shape[1] + max_new_tokens, self.args.max_seq_len)
        kv = [LayerKV(length) for _ in self.layers] if use_cache and idx.shape[1] < length else None
        fed = 0  # positions already in kv
        for _ in range(max_new_tokens):
            if kv is not None and idx.shape[1] <= length:
                logits, _ = self(idx[:, fed:], kv=kv, start=fed)
                fed = idx.shape[1]
            else:
                logits, _ = self(idx[:, -self.args.max_seq_len:])
            next_token = sample_next(logits[:, -1, :], sampling, idx, generator)
            if eos_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
                finished |= next_token == eos_id
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        return idx


@dataclass
class Sampling:
    """How the next token is picked, with llama.cpp's meanings, in run.c's order: the penalties change the logits of
    the tokens among the last repeat_last_n of the history; then temperature 0 is greedy, else the softmax of
    logits / temperature is cut to the top_k most probable tokens, then to the most probable of those whose mass
    (within them) reaches top_p, then to those at least min_p times as probable as the most probable one."""

    temperature: float = 1.0
    top_k: Optional[int] = None  # None or 0: off
    top_p: Optional[float] = None  # None, 0 or 1: off
    min_p: Optional[float] = None  # None or 0: off
    repeat_penalty: float = 1.0  # a seen token's logit divided by it when positive, multiplied when not; 1: off
    repeat_last_n: int = 64  # how many of the history's last tokens the penalties look at; -1: all, 0: none
    presence_penalty: float = 0.0  # subtracted from a seen token's logit
    frequency_penalty: float = 0.0  # subtracted once per time a token was seen


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [B, vocab] with the repeat, presence and frequency penalties for the tokens of history [B, T]."""
    s = sampling
    active = (s.repeat_penalty > 0 and s.repeat_penalty != 1) or s.presence_penalty or s.frequency_penalty
    if not active or s.repeat_last_n == 0 or history.shape[1] == 0:
        return logits
    window = history if s.repeat_last_n < 0 else history[:, -s.repeat_last_n:]
    counts = torch.zeros_like(logits).scatter_add_(1, window, torch.ones(window.shape, dtype=logits.dtype,
                                                                          device=logits.device))
    seen = counts > 0
    if s.repeat_penalty > 0 and s.repeat_penalty != 1:
        repeated = torch.where(logits > 0, logits / s.repeat_penalty, logits * s.repeat_penalty)
        logits = torch.where(seen, repeated, logits)
    return logits - (counts * s.frequency_penalty + seen.to(logits.dtype) * s.presence_penalty)


def next_token_probs(logits: torch.Tensor, sampling: Sampling, history: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """The distribution [B, vocab] the next token is drawn from (one-hot at temperature 0), given the logits
    [B, vocab] and the tokens so far [B, T] that the penalties look at."""
    s = sampling
    logits = logits.float()
    if history is not None:
        logits = apply_penalties(logits, history, s)
    if s.temperature == 0.0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.size(-1):
        kth_best = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if s.top_p is not None and 0.0 < s.top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it already does.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= s.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)
    if s.min_p:
        probs = probs.masked_fill(probs < s.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, sampling: Sampling, history: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id per row of logits [B, vocab], drawn from next_token_probs (the argmax at temperature 0)."""
    if sampling.temperature == 0.0:
        logits = logits if history is None else apply_penalties(logits.float(), history, sampling)
        return logits.argmax(dim=-1)
    return torch.multinomial(next_token_probs(logits, sampling, history), 1, generator=generator).squeeze(-1)
