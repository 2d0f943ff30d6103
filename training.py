"""Runtime and bookkeeping shared by train_arianna.py, finetune.py and preference.py.

Device and dtype choice, DDP set-up under torchrun, config parsing from dataclasses, atomic
checkpoints, the optimizer, the progress bar with its JSON log, and Ctrl-C handling. The training
loops themselves stay in their scripts, where they can be read top to bottom.
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
from typing import Any, Iterator

import torch
from tqdm import tqdm

from formats import atomic_write
from model import ModelArgs, Transformer

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
