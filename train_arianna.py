"""Pretrain a Llama-architecture model on the pretokenized corpus.

    python train_arianna.py                                   # custom 4096 tokenizer, sizes chosen for the corpus
    python train_arianna.py --vocab_source=llama2 --vocab_size=32000 --device=cuda --batch_size=64
    torchrun --standalone --nproc_per_node=2 train_arianna.py --gradient_accumulation_steps=2

Writes to --out_dir: ckpt.pt (the latest state; --init_from=resume continues from it exactly),
best.pt (the weights with the lowest validation loss), log.jsonl (one JSON object per evaluation)
and, at the end, model.bin exported from best.pt.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from config import parse_config
from export import export_model
from model import ModelArgs, Transformer
from schedules import BATCH_SCHEDULES, LR_SCHEDULES, batch_boundaries
from training import (LoopSettings, Runtime, Schedule, TokenShards, Trainer, bits_per_byte, clean_state_dict,
                      load_checkpoint, model_from_checkpoint, rolling_nll, save_checkpoint, setup_runtime)


def _option(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # data
    data_dir: str = _option("data", "where arianna_data.py wrote the shards")
    vocab_source: str = _option("custom", "custom: data/tok{vocab_size}/, llama2: data/arianna_data/",
                                choices=["custom", "llama2"])
    vocab_size: int = _option(4096, "tokenizer size (32000 for llama2)")
    # output
    out_dir: str = _option("out", "checkpoints, log.jsonl and model.bin go here")
    init_from: str = _option("scratch", "scratch, or resume from out_dir/ckpt.pt", choices=["scratch", "resume"])
    export_version: int = _option(0, "model.bin format written at the end (0, 1 or 2)", choices=[0, 1, 2])
    # model; None = sized to the corpus (see auto_model_size)
    dim: Optional[int] = _option(None, "model width")
    n_layers: Optional[int] = _option(None, "transformer blocks")
    n_heads: Optional[int] = _option(None, "attention heads")
    n_kv_heads: Optional[int] = _option(None, "key/value heads (grouped-query attention); default n_heads")
    multiple_of: int = _option(32, "SwiGLU hidden size is rounded up to a multiple of this")
    max_seq_len: int = _option(256, "context length in tokens")
    dropout: Optional[float] = _option(None, "dropout; default from the corpus size")
    # optimisation
    batch_size: int = _option(16, "sequences per micro-batch")
    gradient_accumulation_steps: int = _option(1, "micro-batches per optimizer step (split across DDP ranks)")
    max_iters: Optional[int] = _option(None, "optimizer steps; default from the corpus size")
    learning_rate: float = _option(1e-3, "peak learning rate")
    min_lr: Optional[float] = _option(None, "final learning rate; default learning_rate / 10")
    warmup_iters: Optional[int] = _option(None, "warmup steps; default 5% of max_iters, at most 100")
    lr_schedule: str = _option("cosine", "learning-rate schedule (formulas in schedules.py)", choices=list(LR_SCHEDULES))
    batch_schedule: str = _option("constant", "trinity: the effective batch triples at each --trinity_steps step",
                                  choices=list(BATCH_SCHEDULES))
    trinity_steps: str = _option("", "steps where --batch_schedule=trinity triples the batch, e.g. 1000,3000,6000")
    weight_decay: float = _option(0.1, "AdamW weight decay on matrices")
    beta1: float = _option(0.9, "AdamW beta1")
    beta2: float = _option(0.95, "AdamW beta2")
    grad_clip: float = _option(1.0, "clip the gradient norm to this (0: off)")
    # evaluation and stopping
    eval_interval: Optional[int] = _option(None, "steps between evaluations and checkpoints; default max_iters / 20, "
                                                 "at least 25")
    eval_iters: int = _option(4, "batches per loss estimate")
    early_stop_patience: int = _option(5, "stop after this many evaluations without a better val loss (0: never)")
    # system
    device: str = _option("auto", "auto (cuda, mps, cpu), cuda, cuda:N, mps or cpu")
    dtype: str = _option("auto", "auto, float32, bfloat16 or float16",
                         choices=["auto", "float32", "bfloat16", "float16"])
    compile: bool = _option(False, "torch.compile the model (faster steps after a slow first one)")
    seed: int = _option(1337, "seeds weights, batches and dropout")


# ----------------------------------------------------------------------------- data

def stack_windows(shards: TokenShards, starts: list[int], length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [len(starts), length] from windows of length + 1 tokens."""
    rows = np.stack([shards.window(start, length + 1) for start in starts]).astype(np.int64)
    batch = torch.from_numpy(rows)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]


def train_batch(shards: TokenShards, micro: int, cfg: TrainConfig, runtime: Runtime):
    """Micro-batch number micro (counted over all processes, training.MicroStep): a pure function of it, so a
    resumed run sees the same data, and 2 processes the micro-batches 1 process with twice the accumulation sees."""
    starts = shards.random_starts(cfg.max_seq_len + 1, cfg.batch_size, cfg.seed * 1_000_003 + micro)
    return stack_windows(shards, starts, cfg.max_seq_len, runtime.device)


def read_meta(data_dir: Path, cfg: TrainConfig) -> dict:
    pretokenize = f"python arianna_data.py pretokenize --vocab_size={0 if cfg.vocab_source == 'llama2' else cfg.vocab_size}"
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file() or not list(data_dir.glob("train_*.bin")):
        sys.exit(f"error: no .bin shards in {data_dir}/; run `{pretokenize}` first")
    meta = json.loads(meta_path.read_text())
    if meta["vocab_size"] != cfg.vocab_size:
        sys.exit(f"error: {data_dir} was tokenized with a {meta['vocab_size']}-token vocab but --vocab_size="
                 f"{cfg.vocab_size}; pass --vocab_size={meta['vocab_size']} or rerun `{pretokenize}`")
    return meta


# ----------------------------------------------------------------------------- model size

def auto_model_size(train_tokens: int) -> dict:
    """A model size and regularisation that fit the corpus: small corpora overfit big models within minutes."""
    if train_tokens < 300_000:
        return dict(dim=192, n_layers=4, n_heads=6, dropout=0.2)
    if train_tokens < 3_000_000:
        return dict(dim=288, n_layers=6, n_heads=6, dropout=0.1)
    if train_tokens < 30_000_000:
        return dict(dim=512, n_layers=8, n_heads=8, dropout=0.05)
    return dict(dim=768, n_layers=12, n_heads=12, dropout=0.0)


def auto_max_iters(train_tokens: int, tokens_per_step: int) -> int:
    """About 20 passes over the corpus, 400 to 20000 steps. On ~300 KB of markdown the validation loss bottoms out
    after 10-15 passes at the peak rate; 20 lets the cosine decay finish near that point. Smaller corpora still
    gain from 400 steps (120 KB: best val loss 4.14 against 4.24 with 200), and early stopping ends the run
    once validation turns up."""
    return int(min(20_000, max(400, 20 * train_tokens / tokens_per_step)))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def estimate_losses(model: torch.nn.Module, train: TokenShards, val: TokenShards, cfg: TrainConfig,
                    runtime: Runtime) -> dict[str, float]:
    """Mean loss per token on the validation stream (rolling_windows from its start, disjoint, the same every time:
    what `evaluate.py text` scores) and on train windows drawn with a fixed seed, so successive estimates compare
    like with like."""
    model.eval()
    val_stream = torch.from_numpy(val.window(0, len(val)).astype(np.int64))
    nll, count = rolling_nll(model, val_stream, cfg.max_seq_len, cfg.max_seq_len, cfg.batch_size, runtime.device,
                             runtime.autocast, max_windows=cfg.eval_iters * cfg.batch_size)
    losses = {"val": nll / count}
    train_starts = train.random_starts(cfg.max_seq_len + 1, cfg.eval_iters * cfg.batch_size, cfg.seed)
    total = 0.0
    for first in range(0, len(train_starts), cfg.batch_size):
        chunk = train_starts[first:first + cfg.batch_size]
        inputs, targets = stack_windows(train, chunk, cfg.max_seq_len, runtime.device)
        with runtime.autocast():
            _, loss = model(inputs, targets)
        total += loss.item() * len(chunk)
    losses["train"] = total / len(train_starts)
    model.train()
    return losses


# ----------------------------------------------------------------------------- training

class Pretrainer(Trainer):
    """training.Trainer with pretraining's checkpoints: ckpt.pt (the whole state), best.pt (the weights with the
    lowest validation loss so far) and log.jsonl lines per evaluation with bits per byte."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, model: Transformer, schedule: Schedule, meta: dict):
        self.cfg, self.model, self.meta = cfg, model, meta
        self.started = time.perf_counter()
        settings = LoopSettings(Path(cfg.out_dir), cfg.batch_size, cfg.grad_clip, eval_interval=cfg.eval_interval,
                                early_stop_patience=cfg.early_stop_patience)
        super().__init__(runtime, model, schedule, settings, cfg.weight_decay, (cfg.beta1, cfg.beta2))

    def weights(self) -> dict:
        return dict(model=clean_state_dict(self.model), model_args=self.model.args.to_dict(), config=asdict(self.cfg),
                    meta=self.meta)

    def payload(self) -> dict:
        return {**self.weights(), **super().payload()}

    def on_best(self, results: dict) -> None:
        if self.runtime.is_master:
            save_checkpoint(self.out_dir / "best.pt", {**self.weights(), "iter_num": self.step, "val_loss": self.best_val_loss})

    def eval_record(self, results: dict, step_record: dict) -> dict:
        meta = self.meta
        return dict(iter=self.step, train_loss=results["train_loss"], val_loss=results["val_loss"],
                    train_bpb=bits_per_byte(results["train_loss"], meta["train_tokens"], meta["train_bytes"]),
                    val_bpb=bits_per_byte(results["val_loss"], meta["val_tokens"] - 1, meta["val_bytes"]),  # all but the first scored
                    best_val_loss=self.best_val_loss, lr=step_record["lr"], batch=step_record["batch"],
                    tokens=int(self.state["tokens_seen"]), elapsed_s=round(time.perf_counter() - self.started, 1))


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[0])
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    out_dir = Path(cfg.out_dir)
    data_dir = Path(cfg.data_dir) / ("arianna_data" if cfg.vocab_source == "llama2" else f"tok{cfg.vocab_size}")
    meta = read_meta(data_dir, cfg)
    train, val = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    if len(train) < cfg.max_seq_len + 2:
        sys.exit(f"error: {data_dir} holds only {len(train)} training tokens, fewer than --max_seq_len="
                 f"{cfg.max_seq_len}; add text to doc/ or lower --max_seq_len")
    if len(val) < 2:
        sys.exit(f"error: {data_dir} has no validation tokens; rerun `python arianna_data.py pretokenize` with more documents")
    if cfg.gradient_accumulation_steps % runtime.world_size:
        sys.exit(f"error: --gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
                 f"{runtime.world_size} torchrun processes")
    accumulation = cfg.gradient_accumulation_steps // runtime.world_size
    try:
        trinity_boundaries = batch_boundaries(cfg.batch_schedule, cfg.trinity_steps)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    tokens_per_step = cfg.batch_size * cfg.max_seq_len * accumulation * runtime.world_size

    checkpoint = None
    requested_iters = cfg.max_iters
    if cfg.init_from == "resume":
        checkpoint = load_checkpoint(out_dir / "ckpt.pt")
        model_args = ModelArgs(**checkpoint["model_args"])
        if model_args.vocab_size != cfg.vocab_size:
            sys.exit(f"error: {out_dir / 'ckpt.pt'} was trained with a {model_args.vocab_size}-token vocab, "
                     f"the data has {cfg.vocab_size}; pass the matching --vocab_size/--vocab_source")
        # The sizes and schedule decided at the start stay; a new --max_iters re-plans the schedule's tail.
        for name in ("max_iters", "warmup_iters", "min_lr", "dropout", "eval_interval"):
            setattr(cfg, name, checkpoint["config"][name])
    else:
        sizes = auto_model_size(len(train))
        for name, value in sizes.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        model_args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                               vocab_size=cfg.vocab_size, multiple_of=cfg.multiple_of, max_seq_len=cfg.max_seq_len,
                               dropout=cfg.dropout)
    if cfg.max_iters is None:
        cfg.max_iters = auto_max_iters(len(train), tokens_per_step)
    if cfg.eval_interval is None:
        cfg.eval_interval = max(25, min(250, cfg.max_iters // 20))
    if cfg.warmup_iters is None:
        cfg.warmup_iters = min(100, cfg.max_iters // 20)
    if cfg.min_lr is None:
        cfg.min_lr = cfg.learning_rate / 10

    model = Transformer(model_args).to(runtime.device)
    schedule = Schedule(cfg.learning_rate, cfg.min_lr, cfg.lr_schedule, cfg.warmup_iters, cfg.max_iters, accumulation,
                        cfg.batch_schedule, trinity_boundaries)
    trainer = Pretrainer(cfg, runtime, model, schedule, meta)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if "total_steps" not in checkpoint:  # written before the loop was shared: the plan was config["max_iters"]
            checkpoint = {**checkpoint, "total_steps": cfg.max_iters, "state": {"tokens_seen": checkpoint["tokens_seen"]}}
        trainer.restore(checkpoint, out_dir / "ckpt.pt", requested_iters or 0)
        cfg.max_iters = trainer.total_steps
        checkpoint = None  # free the memory before training
    n_params = sum(p.numel() for p in model.parameters())
    train_model = torch.compile(model) if cfg.compile else model
    if trainer.step == 0 and runtime.is_master:
        print(f"model: dim {model_args.dim}, {model_args.n_layers} layers, {model_args.n_heads} heads "
              f"({model_args.n_kv_heads} kv), {n_params / 1e6:.2f}M parameters, dropout {model_args.dropout}; "
              f"{len(train):,} train / {len(val):,} val tokens; {cfg.max_iters} steps of {tokens_per_step:,} "
              f"tokens on {runtime.device} in {str(runtime.dtype).removeprefix('torch.')}", file=sys.stderr)

    def micro_step(step: int, micro: int) -> tuple[torch.Tensor, int, dict]:
        inputs, targets = train_batch(train, micro, cfg, runtime)
        _, loss = train_model(inputs, targets)
        return loss, inputs.numel(), {}

    def evaluate() -> dict:
        losses = estimate_losses(model, train, val, cfg, runtime)
        return {"train_loss": losses["train"], "val_loss": losses["val"]}

    if trainer.run(micro_step, evaluate) and runtime.is_master:
        best_path = out_dir / "best.pt"
        best = model_from_checkpoint(load_checkpoint(best_path)) if best_path.exists() else model.cpu()
        bin_path = export_model(best, out_dir / "model.bin", cfg.export_version)
        print(f"best val loss {trainer.best_val_loss:.4f}; wrote {bin_path} from {best_path}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
