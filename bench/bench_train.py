"""Training throughput benchmark: tokens/s of a training step, llama2.c's recipe against ours in each dtype.

    python bench/bench_train.py                # dim 288, 6 layers, 6 heads, vocab 4096, batch 8 x 256
    python bench/bench_train.py --compile=true # also time torch.compile (slow first step, not counted)

Every setting trains the same initial weights on the same batches of a synthetic corpus with structure
to learn, so the loss curves can be compared side by side: the speed-up must not change them beyond noise.
Each runs without dropout (llama2.c's default) and with the dropout the pipeline trains with; where dropout draws
its masks, the losses differ by that noise. Timings are ratios measured in one run; other load on the machine
moves all of them together.
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
from training import cpu_has_fast_bf16, make_optimizer, pick_dtype, setup_runtime  # noqa: E402
from cpu import cpu_description  # noqa: E402
from llama2c_recipe import RecipeTransformer  # noqa: E402


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
    compile: bool = field(default=False, metadata={"help": "also benchmark torch.compile, float32 and bfloat16"})
    bf16: str = field(default="auto", metadata={
        "choices": ("auto", "true", "false"),
        "help": "bfloat16 rows: auto (where the CPU has native bf16; elsewhere PyTorch emulates it, minutes per row)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: all cores)"})
    dropout: float = field(default=0.1, metadata={
        "help": "the second round's dropout: train_arianna.py's for corpora of 0.3-3 M tokens, which get this shape"})


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


@dataclass
class Setting:
    name: str
    dtype: torch.dtype
    dropout: float = 0.0
    compiled: bool = False
    recipe: bool = False  # llama2.c's recipe (bench/llama2c_recipe.py) instead of model.py + training.py


def build(cfg: BenchConfig, setting: Setting) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                     max_seq_len=cfg.seq_len, dropout=setting.dropout)
    model = Transformer(args)
    if setting.recipe:  # the same initial weights in llama2.c's recipe
        recipe = RecipeTransformer(args.dim, args.n_layers, args.n_heads, args.vocab_size, args.max_seq_len,
                                   args.hidden_dim, args.dropout)
        recipe.load_state_dict(model.state_dict())
        return recipe, recipe.optimizer(1e-3)
    return model, make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), setup_runtime("cpu", "float32"))


def run_setting(cfg: BenchConfig, setting: Setting,
                batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, list[float]]:
    """(tokens/s over the timed steps, loss per step) for one setting."""
    model, optimizer = build(cfg, setting)
    step_model = torch.compile(model) if setting.compiled else model
    autocast = (torch.autocast("cpu", dtype=setting.dtype) if setting.dtype != torch.float32
                else contextlib.nullcontext())
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
    pipeline_dtype = pick_dtype("auto", "cpu")  # what train_arianna.py chooses on this CPU
    native_bf16 = cpu_has_fast_bf16()
    dtypes = [torch.float32] + ([torch.bfloat16] if cfg.bf16 == "true" or (cfg.bf16 == "auto" and native_bf16) else [])
    settings = []
    for dropout in (0.0, cfg.dropout):
        suffix = f", dropout {dropout:g}"
        settings.append(Setting("llama2.c recipe, float32" + suffix, torch.float32, dropout, recipe=True))
        for dtype in dtypes:
            name = f"ours, {str(dtype).removeprefix('torch.')}"
            settings.append(Setting(name + suffix, dtype, dropout))
            if cfg.compile:
                settings.append(Setting(name + " + compile" + suffix, dtype, dropout, compiled=True))
    print(f"CPU: {cpu_description()}; PyTorch {torch.__version__} kernels: {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    print(f"the pipeline trains in {str(pipeline_dtype).removeprefix('torch.')} here (native bf16: "
          f"{native_bf16}); shape: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"vocab {cfg.vocab_size}, batch {cfg.batch_size} x {cfg.seq_len}")
    if cfg.bf16 == "auto" and not native_bf16:
        print("no bfloat16 rows: this CPU has no native bf16 (--bf16=true times PyTorch's emulation, minutes a row)")
    print(f"{'setting':<40}{'tokens/s':>10}{'vs llama2.c':>13}{'first loss':>12}{'last loss':>11}{'max |dloss|':>13}")
    baseline_speed, baseline_losses = None, None
    for setting in settings:
        speed, losses = run_setting(cfg, setting, batches)
        if setting.recipe:  # each row is compared with llama2.c's recipe at the same dropout
            baseline_speed, baseline_losses = speed, losses
        gap = max(abs(a - b) for a, b in zip(losses, baseline_losses))
        default = "  <- the pipeline's default" if setting.dtype == pipeline_dtype and not setting.compiled \
            and not setting.recipe and setting.dropout == cfg.dropout else ""
        print(f"{setting.name:<40}{speed:>10.0f}{speed / baseline_speed:>12.2f}x{losses[0]:>12.4f}"
              f"{losses[-1]:>11.4f}{gap:>13.4f}{default}")


if __name__ == "__main__":
    main()
