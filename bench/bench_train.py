"""Training throughput benchmark: tokens/s of a training step, float32 eager against the faster settings.

    python bench/bench_train.py                # dim 288, 6 layers, 6 heads, vocab 4096, batch 8 x 256
    python bench/bench_train.py --compile=true # also time torch.compile (slow first step, not counted)

Every setting trains the same initial weights on the same batches of a synthetic corpus with structure
to learn, so the loss curves can be compared side by side: the speed-up must not change them beyond noise.
Timings are ratios measured in one run; other load on the machine moves all of them together.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the toolkit's modules, from bench/

from model import ModelArgs, Transformer  # noqa: E402
from config import parse_config  # noqa: E402
from training import cpu_has_fast_bf16  # noqa: E402


@dataclass
class BenchConfig:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    vocab_size: int = 4096
    batch_size: int = 8
    seq_len: int = 256
    steps: int = field(default=30, metadata={"help": "timed and compared steps per setting"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (compile happens here)"})
    compile: bool = field(default=False, metadata={"help": "also benchmark torch.compile with bfloat16"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: all cores)"})


def synthetic_batches(cfg: BenchConfig, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token streams from a fixed random bigram table, so the loss has somewhere to fall to."""
    generator = torch.Generator().manual_seed(0)
    successors = torch.randint(cfg.vocab_size, (cfg.vocab_size, 4), generator=generator)
    batches = []
    for _ in range(count):
        tokens = torch.empty(cfg.batch_size, cfg.seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(cfg.vocab_size, (cfg.batch_size,), generator=generator)
        choices = torch.randint(4, (cfg.batch_size, cfg.seq_len), generator=generator)
        for position in range(cfg.seq_len):
            tokens[:, position + 1] = successors[tokens[:, position], choices[:, position]]
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return batches


def run_setting(cfg: BenchConfig, dtype: torch.dtype, compiled: bool,
                batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, list[float]]:
    """(tokens/s over the timed steps, loss per step) for one setting."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                  vocab_size=cfg.vocab_size, max_seq_len=cfg.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
    step_model = torch.compile(model) if compiled else model
    autocast = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    losses, elapsed = [], 0.0
    for index, (inputs, targets) in enumerate(batches):
        started = time.perf_counter()
        with autocast:
            _, loss = step_model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= cfg.warmup:
            elapsed += time.perf_counter() - started
            losses.append(loss.item())
    return cfg.batch_size * cfg.seq_len * len(losses) / elapsed, losses


def main() -> None:
    cfg = parse_config(BenchConfig, description=__doc__.split("\n\n")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    batches = synthetic_batches(cfg, cfg.warmup + cfg.steps)
    settings = [("float32 eager", torch.float32, False), ("bfloat16 autocast", torch.bfloat16, False)]
    if cfg.compile:
        settings.append(("bfloat16 + compile", torch.bfloat16, True))
    print(f"shape: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}, "
          f"batch {cfg.batch_size} x {cfg.seq_len}; {torch.get_num_threads()} threads; "
          f"native bf16 on this CPU: {cpu_has_fast_bf16()}")
    print(f"{'setting':<22}{'tokens/s':>10}{'speed-up':>10}{'first loss':>12}{'last loss':>11}{'max |dloss|':>13}")
    baseline_speed, baseline_losses = None, None
    for name, dtype, compiled in settings:
        speed, losses = run_setting(cfg, dtype, compiled, batches)
        if baseline_speed is None:
            baseline_speed, baseline_losses = speed, losses
        gap = max(abs(a - b) for a, b in zip(losses, baseline_losses))
        print(f"{name:<22}{speed:>10.0f}{speed / baseline_speed:>9.2f}x{losses[0]:>12.4f}{losses[-1]:>11.4f}{gap:>13.4f}")


if __name__ == "__main__":
    main()
