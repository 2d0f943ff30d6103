"""The one training loop, and the runtime around it, for train_arianna.py and every fine-tuning method.

Device and dtype choice, DDP set-up under torchrun, atomic checkpoints, the optimizer, the learning-rate
and batch schedule, the token shards and seeded data order, the progress bar with its JSON log, Ctrl-C
handling, and Trainer: the optimizer loop (accumulation, DDP gradient sync, clipping, AMP, evaluation,
early stopping, checkpoints, resume) that pretraining, SFT, DPO, KTO, the reward model and PPO share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from formats import atomic_write
from model import ModelArgs, Transformer
from schedules import accumulation_steps, learning_rate

# ----------------------------------------------------------------------------- device, dtype, DDP

@dataclass
class Runtime:
    device: torch.device
    device_type: str  # "cuda", "mps" or "cpu"
    dtype: torch.dtype
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    scaler: torch.amp.GradScaler = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        # float16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def shutdown(self) -> None:
        if self.ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so autocast speeds training up."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device_type: str) -> torch.dtype:
    if requested != "auto":
        if requested not in DTYPES:
            sys.exit(f"error: --dtype={requested} is not one of auto, {', '.join(DTYPES)}")
        if requested == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            sys.exit("error: this GPU has no bfloat16; use --dtype=float16")
        return DTYPES[requested]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32  # MPS autocast is still patchy; float32 is the safe default there


# A fine-tuning step is short (one batch of dialogs, about a thousand tokens), and on a CPU bf16 autocast pays for
# such steps only in wider models: narrower ones fine-tune faster in float32. Pretraining's 4,096-token steps gain
# from bf16 at every size.
CPU_BF16_FINETUNE_MIN_DIM = 384


def finetune_runtime(runtime: Runtime, requested_dtype: str, dim: int) -> Runtime:
    """The runtime a fine-tune of a model of width dim runs in: float32 instead of the automatic bf16 on a CPU
    below CPU_BF16_FINETUNE_MIN_DIM; otherwise runtime unchanged (an explicit --dtype is always kept)."""
    if (requested_dtype == "auto" and runtime.device_type == "cpu" and runtime.dtype == torch.bfloat16
            and dim < CPU_BF16_FINETUNE_MIN_DIM):
        return dataclasses.replace(runtime, dtype=torch.float32)
    return runtime


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int = 1337) -> Runtime:
    """Pick the device (auto: CUDA, then MPS, then CPU) and dtype; join the DDP group under torchrun."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device_type = device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device=cuda but no CUDA GPU is visible; use --device=auto or --device=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        sys.exit("error: --device=mps but MPS is not available; use --device=auto or --device=cpu")
    if ddp:
        backend = "nccl" if device_type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device_type == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    torch.manual_seed(seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(torch.device(device), device_type, pick_dtype(dtype, device_type), ddp, rank, local_rank, world_size)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """torch.save to a temp file beside path, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(payload, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        sys.exit(f"error: checkpoint {path} not found; train one with `python train_arianna.py` or pass --checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file; all mean the same to the user
        sys.exit(f"error: checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                 "it is damaged or not a checkpoint: retrain or pick another file")


def model_from_checkpoint(checkpoint: dict) -> Transformer:
    model = Transformer(ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model: torch.compile and DDP wrappers stripped."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return model.state_dict()


# ----------------------------------------------------------------------------- optimizer

def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float,
                   betas: tuple[float, float], runtime: Runtime) -> torch.optim.AdamW:
    """AdamW on the trainable parameters: weight decay on matrices and embeddings, not on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in one pass on CUDA and CPU.
    fused = runtime.device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def bits_per_byte(loss_nats: float, tokens: int, text_bytes: int) -> float:
    """Cross-entropy in nats per token turned into bits per UTF-8 byte of the text, comparable across tokenizers."""
    if text_bytes <= 0:
        return float("nan")
    return loss_nats * tokens / (text_bytes * math.log(2))


def rolling_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """lm-evaluation-harness's rolling windows over a stream of n_tokens whose first token is only context:
    (start, end, scored) with inputs tokens[start:end] predicting tokens[start+1:end+1], of which the last `scored`
    count. The first window scores all it sees; each later one scores the next `stride` tokens with up to `window`
    tokens of context. stride == window: disjoint windows, as training sees text; every token but the first is
    scored exactly once."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    windows, done = [], min(window, n_tokens - 1)
    if done > 0:
        windows.append((0, done, done))
    while done < n_tokens - 1:
        end = min(done + stride, n_tokens - 1)
        windows.append((max(0, end - window), end, end - done))
        done = end
    return windows


@torch.no_grad()
def rolling_nll(model: torch.nn.Module, tokens: torch.Tensor, window: int, stride: int, batch_size: int,
                device: torch.device, autocast: Any = contextlib.nullcontext, max_windows: int = 0,
                on_batch: Any = None) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of a 1-D token stream over rolling_windows, at most
    max_windows of them (0: all); windows of one length go through the model in batches of batch_size."""
    windows = rolling_windows(len(tokens), window, stride)[:max_windows or None]
    total, count = 0.0, 0
    for first in range(0, len(windows), batch_size):
        for length in sorted({end - start for start, end, _ in windows[first:first + batch_size]}):
            group = [w for w in windows[first:first + batch_size] if w[1] - w[0] == length]
            rows = torch.stack([tokens[start:end + 1] for start, end, _ in group]).to(device)
            targets = rows[:, 1:].clone()
            for row, (_, _, scored) in enumerate(group):
                targets[row, :length - scored] = -1
            with autocast():
                logits, _ = model(rows[:, :-1])
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                       ignore_index=-1, reduction="sum").item()
            count += sum(scored for _, _, scored in group)
        if on_batch is not None:
            on_batch(min(batch_size, len(windows) - first))
    return total, count


# ----------------------------------------------------------------------------- progress and log

class ProgressLog:
    """A tqdm bar with loss, tokens/s and lr, plus out_dir/log.jsonl with one JSON object per record()."""

    def __init__(self, out_dir: str | os.PathLike, total_steps: int, initial_step: int = 0, is_master: bool = True):
        self.is_master = is_master
        self.log_path = Path(out_dir) / "log.jsonl"
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not is_master, dynamic_ncols=True,
                        unit="it", file=sys.stderr)
        self.last_time = time.perf_counter()
        self.last_step = initial_step

    def update(self, step: int, loss: float, tokens: int, lr: float, **extra: Any) -> None:
        """Called after each optimizer step; tokens is the number processed since the last call."""
        now = time.perf_counter()
        tokens_per_second = tokens / max(now - self.last_time, 1e-9)
        self.last_time = now
        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_second:.0f}", "lr": f"{lr:.2e}"}
        postfix.update({key: (f"{value:.4g}" if isinstance(value, float) else value) for key, value in extra.items()})
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.last_step)
        self.last_step = step

    def record(self, entry: dict) -> None:
        if not self.is_master:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(json.dumps(entry) + "\n")
        summary = " ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in entry.items())
        self.bar.write(summary, file=sys.stderr)

    def write(self, message: str) -> None:
        if self.is_master:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class StopFlag:
    """Turns the first Ctrl-C into a request to stop at the next safe point; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nstopping: saving a checkpoint (Ctrl-C again to abort at once)", file=sys.stderr)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def oom_guard(runtime: Runtime, save_last: Any) -> Iterator[None]:
    """Turn CUDA out-of-memory into a one-line hint, after saving what can be saved."""
    try:
        yield
    except torch.OutOfMemoryError:
        save_last()
        sys.exit(f"error: {runtime.device_type} ran out of memory; lower --batch_size (and raise "
                 "--gradient_accumulation_steps to keep the effective batch) or lower --max_seq_len; "
                 "the last checkpoint was kept, continue with --init_from=resume")


# ----------------------------------------------------------------------------- data: token shards and seeded order

class TokenShards:
    """The train_*.bin or val_*.bin uint16 shards of a pretokenized corpus, memory-mapped and read as one stream."""

    def __init__(self, directory: str | os.PathLike, split: str):
        self.paths = sorted(Path(directory).glob(f"{split}_*.bin"))
        self.shards = [np.memmap(path, dtype=np.uint16, mode="r") for path in self.paths]
        self.lengths = np.array([len(shard) for shard in self.shards], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.lengths)))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """length tokens from position start of the whole stream, crossing shard boundaries as needed."""
        pieces, position, remaining = [], start, length
        shard = int(np.searchsorted(self.starts, position, side="right") - 1)
        while remaining > 0:
            offset = position - self.starts[shard]
            piece = self.shards[shard][offset:offset + remaining]
            pieces.append(piece)
            remaining -= len(piece)
            position += len(piece)
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def random_starts(self, length: int, count: int, seed: int) -> list[int]:
        """count window starts drawn uniformly from the stream by a generator seeded with seed (any integer)."""
        generator = torch.Generator().manual_seed(seed % 2**63)
        return torch.randint(len(self) - length + 1, (count,), generator=generator).tolist()


class Shuffled:
    """items visited epoch after epoch, each epoch in its own seeded order: item(position) is a pure function of
    the position, so a resumed run sees exactly what the uninterrupted one would have.

    With length (a function of an item) and batch, each epoch's order is grouped by length, as Hugging Face's
    group_by_length: every `pool` batches' worth of the shuffled items is sorted by length and cut into batches, and
    those batches are visited in a random order. Padded batches then hold rows of similar length, so little of a
    step is spent on padding, and every item is still seen once per epoch."""

    def __init__(self, items: Sequence, seed: int, length: Optional[Callable[[Any], int]] = None, batch: int = 1,
                 pool: int = 8):
        self.items, self.seed = items, seed
        self.length, self.batch_size, self.pool = length, batch, pool
        self._epoch, self._order = -1, []

    def item(self, position: int):
        epoch, index = divmod(position, len(self.items))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_order(epoch)
        return self.items[self._order[index]]

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.items), generator=generator).tolist()
        if self.length is None or self.batch_size < 2:
            return order
        grouped, span = [], self.batch_size * self.pool
        for start in range(0, len(order), span):
            pooled = sorted(order[start:start + span], key=lambda i: self.length(self.items[i]))
            batches = [pooled[i:i + self.batch_size] for i in range(0, len(pooled), self.batch_size)]
            for chosen in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[chosen]
        return grouped

    def batch(self, index: int, size: int) -> list:
        """Batch number index of size items."""
        return [self.item(position) for position in range(index * size, (index + 1) * size)]


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random `fraction` of the items held out (at least one when fraction > 0)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(items) * fraction))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


# ----------------------------------------------------------------------------- schedule

@dataclass
class Schedule:
    """Learning rate and gradient accumulation at each optimizer step (formulas in schedules.py).

    A resumed run given a new total re-plans the tail: from step tail_from the rate decays along a cosine from
    tail_lr (the rate the old plan had reached there) to min_lr at the new total_steps.
    """
    peak_lr: float
    min_lr: float
    lr_schedule: str
    warmup_iters: int
    total_steps: int
    accumulation: int  # micro-batches per process per optimizer step, before the batch schedule
    batch_schedule: str = "constant"
    boundaries: Sequence[int] = ()
    tail_from: int = 0
    tail_lr: float = 0.0

    def lr(self, step: int) -> float:
        if self.tail_from and step >= self.tail_from:
            return learning_rate(step - self.tail_from, "cosine", self.tail_lr, self.min_lr, 0, self.total_steps - self.tail_from)
        return learning_rate(step, self.lr_schedule, self.peak_lr, self.min_lr, self.warmup_iters, self.total_steps)

    def accumulation_at(self, step: int) -> int:
        return accumulation_steps(step, self.accumulation, self.batch_schedule, self.boundaries)

    def micro_index(self, step: int) -> int:
        """Micro-batches one process runs before optimizer step `step`."""
        return sum(self.accumulation_at(s) for s in range(step))

    def replan(self, step: int, total_steps: int) -> None:
        """Train to total_steps instead, from step on: the warmup is kept, the decay re-planned after it."""
        if step > self.warmup_iters:
            self.tail_lr, self.tail_from = self.lr(step), step
        self.total_steps = total_steps

    def state(self) -> dict:
        return {"total_steps": self.total_steps, "tail_from": self.tail_from, "tail_lr": self.tail_lr}


# ----------------------------------------------------------------------------- the training loop

MicroStep = Callable[[int, int], tuple[torch.Tensor, int, dict]]
"""micro_step(step, micro_index) -> (loss to backpropagate, tokens processed, metrics to log); micro_index counts
micro-batches from the start of training over all processes (process r of W takes micro-batches r, r + W, ...),
so data order is a pure function of it: resume is exact, and W processes with accumulation A train on the very
micro-batches one process with accumulation W*A does."""


class TrainedModules(nn.Module):
    """The modules being trained, with any function of them as forward: DistributedDataParallel averages the
    gradients of what runs inside its forward, and each method calls its models its own way."""

    def __init__(self, trainable: nn.Module):
        super().__init__()
        self.trainable = trainable
        self.function: Optional[Callable] = None

    def forward(self, *args):
        return self.function(*args)


@dataclass
class LoopSettings:
    """What the loop does between optimizer steps; every interval 0 means never."""
    out_dir: Path
    batch_size: int  # rows per micro-batch, for the logged effective batch
    grad_clip: float = 1.0
    log_interval: int = 0          # a {"step", "loss", "lr", "batch", ...} record in log.jsonl
    eval_interval: int = 0         # evaluate and save ckpt.pt (and always at the end)
    checkpoint_every: int = 0      # phoenix_{step}.pt, the newest keep_last kept
    keep_last: int = 0
    early_stop_patience: int = 0   # stop after this many evaluations without a better val_loss


class Trainer:
    """The optimizer loop of pretraining and every fine-tuning method.

    Each optimizer step runs the schedule's accumulation of micro-steps (loss divided by their number; under
    torchrun the gradients are averaged over the processes once, in the last micro-step's backward), clips, steps
    AdamW at the scheduled lr, logs, evaluates and saves out_dir/ckpt.pt every eval_interval steps and at the end,
    writes phoenix checkpoints, stops early when validation stops improving, and on Ctrl-C saves and stops.
    Subclasses say what a checkpoint holds (payload) and what an improved model means (on_best).
    """

    checkpoint_name = "ckpt.pt"

    def __init__(self, runtime: Runtime, trainable: nn.Module, schedule: Schedule, settings: LoopSettings,
                 weight_decay: float, betas: tuple[float, float]):
        self.runtime, self.schedule, self.settings = runtime, schedule, settings
        self.trained = TrainedModules(trainable)
        # Under torchrun: rank 0's weights to every process now, averaged gradients in every synced backward.
        self.wrapped = self.trained if not runtime.ddp else DistributedDataParallel(
            self.trained, device_ids=[runtime.local_rank] if runtime.device_type == "cuda" else None,
            broadcast_buffers=False)  # the buffers (RoPE tables, NF4 base weights) never change
        self.optimizer = make_optimizer(trainable, schedule.peak_lr, weight_decay, betas, runtime)
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.step = 0
        self.best_val_loss = math.inf
        self.evals_since_best = 0
        self.state: dict[str, float] = {}  # numbers a method carries from step to step (PPO's kl_coef), checkpointed
        self.out_dir = Path(settings.out_dir)
        self.interrupted = False

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    # ------------------------------------------------------------------ one step
    def forward(self, function: Callable, *args):
        """function(*args), computing a loss from the trained modules: under torchrun through
        DistributedDataParallel, so the backward of that loss averages the gradients over the processes."""
        self.trained.function = function
        return self.wrapped(*args)

    def optimizer_step(self, accumulation: int, micro_loss: Callable[[int], tuple[torch.Tensor, int, dict]]
                       ) -> tuple[float, int, dict[str, float]]:
        """One optimizer update from accumulation micro-batches: micro_loss(i) -> (loss, tokens, metrics) for
        i = 0 .. accumulation-1, computed under autocast (and by the caller through forward(), so that DDP syncs).
        Returns their mean loss and metrics and the tokens processed."""
        runtime = self.runtime
        total_loss, tokens, metrics = 0.0, 0, {}
        for index in range(accumulation):
            # DDP averages the gradients once, in the backward of the last micro-batch.
            last = index == accumulation - 1
            with contextlib.nullcontext() if last or not runtime.ddp else self.wrapped.no_sync():
                with runtime.autocast():
                    loss, n_tokens, micro_metrics = micro_loss(index)
                runtime.scaler.scale(loss / accumulation).backward()
            total_loss += loss.item() / accumulation
            tokens += n_tokens
            for key, value in micro_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value / accumulation
        if self.settings.grad_clip > 0:
            runtime.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        runtime.scaler.step(self.optimizer)
        runtime.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens, metrics

    def agree(self, metrics: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
        """The metrics averaged over the processes, and whether any of them was asked to stop (all must stop at
        the same step, or the others would wait for it forever). On one process, as given."""
        if not self.runtime.ddp:
            return metrics, stop
        names = sorted(metrics)
        values = torch.tensor([metrics[name] for name in names] + [float(stop)], dtype=torch.float64,
                              device=self.runtime.device)  # where the backend wants it: NCCL reduces on the GPU
        torch.distributed.all_reduce(values)  # gloo has no mean: sum, then divide
        world = self.runtime.world_size
        return {name: values[i].item() / world for i, name in enumerate(names)}, values[-1].item() > 0

    def start_step(self) -> float:
        """The scheduled lr of the coming optimizer step, set on the optimizer."""
        step_lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = step_lr
        return step_lr

    # ------------------------------------------------------------------ the loop
    def run(self, micro_step: Optional[MicroStep] = None, evaluate: Optional[Callable[[], dict]] = None,
            whole_step: Optional[Callable[[int], tuple[float, int, dict]]] = None,
            summarize: Callable[[dict], dict] = dict) -> bool:
        """Train to total_steps; False if stopped by Ctrl-C (ckpt.pt saved either way). Each step is either the
        accumulation of micro_step's losses, or whole_step(step) -> (loss, tokens, metrics) for methods whose
        step holds updates of its own (PPO). evaluate() -> {"val_loss": ..., ...} runs at every evaluation;
        summarize turns the step's metrics, averaged over micro-batches and processes, into the logged ones."""
        runtime, settings = self.runtime, self.settings
        self.out_dir.mkdir(parents=True, exist_ok=True)
        progress = ProgressLog(self.out_dir, self.total_steps, self.step, runtime.is_master)
        stop = StopFlag()
        micro = self.schedule.micro_index(self.step)
        try:
            with oom_guard(runtime, lambda: self.save(self.out_dir / self.checkpoint_name)):
                while self.step < self.total_steps:
                    step_lr = self.start_step()
                    if whole_step is not None:
                        accumulation = 1
                        loss, tokens, metrics = whole_step(self.step)
                    else:
                        accumulation, first = self.schedule.accumulation_at(self.step), micro
                        loss, tokens, metrics = self.optimizer_step(accumulation, lambda i: self.forward(
                            micro_step, self.step, (first + i) * runtime.world_size + runtime.rank))
                        micro += accumulation
                    self.step += 1
                    metrics, stop_now = self.agree({**metrics, "loss": loss, "tokens": tokens}, stop.requested)
                    loss, tokens = metrics.pop("loss"), round(metrics.pop("tokens") * runtime.world_size)
                    metrics = summarize(metrics)
                    effective_batch = settings.batch_size * accumulation * runtime.world_size
                    self.state["tokens_seen"] = self.state.get("tokens_seen", 0) + tokens
                    progress.update(self.step, loss, tokens, step_lr, batch=effective_batch, **metrics)
                    record = {"step": self.step, "loss": loss, "lr": step_lr, "batch": effective_batch, **metrics}
                    if not self.finish_step(progress, record, stop_now, evaluate):
                        break
        finally:
            stop.restore()
            progress.close()
        return not self.interrupted

    def finish_step(self, progress: ProgressLog, record: dict, stop_now: bool,
                    evaluate: Optional[Callable[[], dict]] = None) -> bool:
        """After an optimizer step: log record every log_interval steps, evaluate and save ckpt.pt every
        eval_interval, phoenix checkpoints, early stopping, and on a Ctrl-C save and say so. False to stop."""
        settings = self.settings
        at_end = self.step == self.total_steps
        at_eval = at_end or (settings.eval_interval > 0 and self.step % settings.eval_interval == 0)
        if settings.log_interval > 0 and (at_end or self.step % settings.log_interval == 0):
            progress.record(record)
        if evaluate and at_eval:
            self.trained.eval()
            results = evaluate()
            self.trained.train()
            val_loss = results.get("val_loss", math.inf)
            if val_loss < self.best_val_loss:
                self.best_val_loss, self.evals_since_best = val_loss, 0
                self.on_best(results)
            else:
                self.evals_since_best += 1
            progress.record(self.eval_record(results, record))
        if at_eval:
            self.save(self.out_dir / self.checkpoint_name)
        if settings.checkpoint_every > 0 and self.step % settings.checkpoint_every == 0:
            self.save_phoenix()
        if stop_now and not at_end:
            if not at_eval:
                self.save(self.out_dir / self.checkpoint_name)
            progress.write(f"stopped at step {self.step}; saved {self.out_dir / self.checkpoint_name}. "
                           "Continue with --init_from=resume")
            self.interrupted = True
            return False
        if evaluate and at_eval and settings.early_stop_patience and self.evals_since_best >= settings.early_stop_patience:
            progress.write(f"early stop: val loss has not improved for {self.evals_since_best} evaluations")
            return False
        return True

    def eval_record(self, results: dict, step_record: dict) -> dict:
        """The log.jsonl line of an evaluation."""
        return {"step": self.step, **results}

    def on_best(self, results: dict) -> None:
        """Called when an evaluation's val_loss is the best so far (pretraining keeps best.pt)."""

    # ------------------------------------------------------------------ checkpoints
    def payload(self) -> dict:
        """What ckpt.pt holds: the loop's own state here; subclasses add the model and their settings."""
        return {"iter_num": self.step, **self.schedule.state(), "best_val_loss": self.best_val_loss,
                "evals_since_best": self.evals_since_best, "optimizer": self.optimizer.state_dict(),
                "rng_state": torch.get_rng_state(), "state": dict(self.state)}

    def restore(self, saved: dict, path: Path, requested_total: int = 0) -> None:
        """The loop's state back from a checkpoint written by payload(); a requested_total other than the saved
        one re-plans the schedule's tail from the saved step (refused if the run is already past it)."""
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved.get("rng_state", saved.get("rng")))  # "rng": fine-tunes before the keys were one
        self.step, self.best_val_loss = saved["iter_num"], saved["best_val_loss"]
        self.evals_since_best = saved.get("evals_since_best", 0)
        self.state.update(saved.get("state", {}))
        self.schedule.total_steps = saved["total_steps"]
        self.schedule.tail_from, self.schedule.tail_lr = saved.get("tail_from", 0), saved.get("tail_lr", 0.0)
        if requested_total and requested_total != self.total_steps:
            if requested_total <= self.step:
                sys.exit(f"error: --max_iters={requested_total} but {path} is already at step {self.step}; pass a larger "
                         f"--max_iters to train longer, or leave it out to finish the planned {self.total_steps} steps")
            old_total = self.total_steps
            self.schedule.replan(self.step, requested_total)
            print(f"re-planned the schedule from step {self.step}: {requested_total} steps instead of {old_total}, "
                  f"the learning rate decaying from {self.schedule.lr(self.step):.2e} to {self.schedule.min_lr:.2e}")
        print(f"resuming from {path} at step {self.step} of {self.total_steps}")

    def save(self, path: str | Path) -> None:
        if self.runtime.is_master:
            save_checkpoint(path, self.payload())

    def save_phoenix(self) -> None:
        """out_dir/phoenix_{step}.pt, then delete all but the newest keep_last of them (rank 0 only)."""
        if not self.runtime.is_master:
            return
        self.save(self.out_dir / f"phoenix_{self.step}.pt")
        if self.settings.keep_last > 0:
            phoenixes = sorted(self.out_dir.glob("phoenix_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            for old in phoenixes[: -self.settings.keep_last]:
                old.unlink()
