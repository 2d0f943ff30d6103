"""Fine-tune a trained checkpoint: supervised instruction/chat tuning (SFT), full or with LoRA/QLoRA adapters;
--method=dpo|reward|ppo hands over to preference.py with the same flags and machinery.

    python finetune.py --init_from=out/ckpt.pt --data=train.jsonl --method=sft --lora_r=8 --epochs=3 --out_dir=out/sft
    torchrun --standalone --nproc_per_node=2 finetune.py ...      # any method, with DistributedDataParallel

Data (JSON lines; the format is detected on each line):
    {"instruction": ..., "input": ... (optional), "output": ...}   user = instruction [+ "\\n\\n" + input]
    {"prompt": ..., "completion": ...}
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
every example is rendered through tokenizer.encode_dialog (the one chat template) and the loss is taken on the
assistant tokens (and their EOS) only. Malformed lines are reported as FILE:LINE and skipped; a file without one
usable line is an error. Examples longer than the context are dropped (or cut with --truncate), with a count.

Outputs in --out_dir: ckpt.pt (resumable; the full model for a full fine-tune, only the adapters plus the base
checkpoint's path and sha256 with LoRA), phoenix_{step}.pt every --checkpoint_every steps (the last --keep_last
kept), log.jsonl, model.bin (adapters merged, via export.py), merged.pt with --merge (a plain full checkpoint).

Reusable pieces (preference.py builds on them):
    FinetuneConfig, parse_finetune_config(argv)       every flag of every method
    read_jsonl(path) -> [(line_number, dict)]          line-numbered warnings, error when nothing is usable
    warn_line(path, line_number, reason)               the same warning format for your own checks
    load_base_model(path) -> (Transformer, ckpt)       a train_arianna.py checkpoint, or a LoRA fine-tune's (merged)
    load_policy(cfg, runtime) -> (model, base)         base model (+ LoRA/QLoRA per cfg) on the device; base: BaseCheckpoint
    load_tokenizer(cfg, base) -> Tokenizer             --tokenizer_model, else the one the base was trained with
    Trainer(cfg, runtime, model, base, total_steps, extra_modules={})
        .run(micro_step, evaluate=None)                the optimizer loop: schedules, accumulation, clipping, AMP,
                                                       progress, eval, ckpt.pt / phoenix checkpoints, Ctrl-C, resume
        .save(path)                                    resumable checkpoint of the current state
        .forward(function, *args)                      a loss computed through DistributedDataParallel under torchrun
        .agree(metrics, stop)                          metrics averaged over the processes, and a common stop
    export_finetuned(cfg, model, base) -> Path         merges a copy, writes out_dir/model.bin (+ merged.pt with --merge)
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import interop
import lora
from config import parse_config
from export import export_model
from model import Transformer
from schedules import BATCH_SCHEDULES, LR_SCHEDULES, accumulation_steps, batch_boundaries, learning_rate, parse_boundaries
from tokenizer import Tokenizer, encode_dialog, llama2_tokenizer_path
from training import (ProgressLog, Runtime, StopFlag, clean_state_dict, load_checkpoint, make_optimizer,
                      model_from_checkpoint, save_checkpoint, setup_runtime)

METHODS = ("sft", "dpo", "reward", "ppo")
ROLES = ("system", "user", "assistant")
MAX_WARNINGS_PER_FILE = 20


@dataclass
class FinetuneConfig:
    init_from: str = field(default="out/ckpt.pt", metadata={"help": "base checkpoint (train_arianna.py's, or a LoRA fine-tune's)"})
    base_model: str = field(default="", metadata={
        "help": "a local Hugging Face LlamaForCausalLM directory to start from (the same as --init_from=DIR)"})
    data: str = field(default="", metadata={
        "help": "training JSONL (sft: instruction/prompt-completion/messages; dpo/reward: preference pairs)"})
    method: str = field(default="sft", metadata={"choices": METHODS})
    out_dir: str = "out/sft"
    init: str = field(default="scratch", metadata={"choices": ("scratch", "resume"), "help": "resume: continue from out_dir/ckpt.pt"})
    tokenizer_model: str = field(default="", metadata={"help": "SentencePiece .model; empty: the one the base was trained with"})
    # data
    val_data: str = field(default="", metadata={"help": "validation JSONL; empty: hold out --val_fraction of --data"})
    val_fraction: float = 0.1
    max_seq_len: int = field(default=0, metadata={"help": "longest example in tokens; 0: the model's context"})
    truncate: bool = field(default=False, metadata={"help": "cut examples longer than the context instead of dropping them"})
    pretrain_mix: float = field(default=0.0, metadata={"help": "share of batch rows that are pretraining windows (0 <= F < 1)"})
    pretrain_data: str = field(default="", metadata={"help": "folder of train_*.bin uint16 shards, e.g. data/tok4096"})
    # optimisation
    epochs: float = 3.0
    max_iters: int = field(default=0, metadata={"help": "optimizer steps; 0: as many as --epochs take"})
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    min_lr: float = 0.0
    lr_schedule: str = field(default="cosine", metadata={"choices": LR_SCHEDULES})
    warmup_iters: int = 10
    batch_schedule: str = field(default="constant", metadata={"choices": BATCH_SCHEDULES})
    trinity_steps: str = field(default="", metadata={
        "help": "steps where --batch_schedule=trinity triples the batch, e.g. 100,300,600"})
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    # LoRA / QLoRA
    lora_r: int = field(default=8, metadata={"help": "adapter rank; 0: full fine-tune"})
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: str = field(default="wq,wk,wv,wo", metadata={"help": f"comma list of {','.join(lora.LORA_TARGETS)}"})
    qlora: bool = field(default=False, metadata={"help": "store the frozen base in NF4 (4-bit), dequantized on the fly"})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: quantize the NF4 block scales to 8 bits too"})
    # bookkeeping
    log_interval: int = field(default=10, metadata={"help": "append loss, lr and batch to out_dir/log.jsonl every N steps"})
    eval_interval: int = field(default=100, metadata={"help": "evaluate and save ckpt.pt every N steps (and at the end)"})
    checkpoint_every: int = field(default=0, metadata={"help": "phoenix checkpoints out_dir/phoenix_{step}.pt every N steps; 0: off"})
    keep_last: int = field(default=3, metadata={"help": "phoenix checkpoints kept (older ones deleted); 0: keep all"})
    merge: bool = field(default=False, metadata={
        "help": "also write out_dir/merged.pt, a full checkpoint with the adapters folded in"})
    export_version: int = field(default=0, metadata={"choices": (0, 1, 2), "help": "model.bin format (export.py)"})
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337
    # preference methods (preference.py)
    beta: float = field(default=0.1, metadata={"help": "dpo: strength of the implicit KL to the reference"})
    reward_model: str = field(default="", metadata={"help": "ppo: reward model checkpoint (--method=reward's ckpt.pt)"})
    reward_fn: str = field(default="", metadata={
        "help": "ppo: a Python reward function as module:function, instead of a reward model"})
    prompts: str = field(default="", metadata={"help": "ppo: JSONL of prompts"})
    kl_coef: float = field(default=0.05, metadata={"help": "ppo: per-token penalty on log pi - log ref (the start value "
                                                           "with --target_kl)"})
    target_kl: float = field(default=0.0, metadata={
        "help": "ppo: adapt kl_coef towards this KL per answer (Ziegler et al. 2019, TRL's adap_kl_ctrl); 0: fixed"})
    kl_horizon: int = field(default=10000, metadata={"help": "ppo: answers over which kl_coef may change by about e^0.2"})
    cliprange: float = field(default=0.2, metadata={"help": "ppo: clip of the policy ratio and of the value change"})
    vf_coef: float = field(default=0.1, metadata={"help": "ppo: weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"help": "ppo: discount of later rewards"})
    lam: float = field(default=0.95, metadata={"help": "ppo: GAE lambda (bias against variance of advantages)"})
    ppo_epochs: int = field(default=4, metadata={"help": "ppo: passes over each batch of sampled answers"})
    ppo_minibatches: int = field(default=4, metadata={"help": "ppo: minibatches per PPO epoch"})
    max_new_tokens: int = field(default=64, metadata={"help": "ppo: longest sampled answer"})
    temperature: float = field(default=1.0, metadata={"help": "ppo: sampling temperature of the answers"})

    def __post_init__(self) -> None:
        self.init_from = self.base_model or self.init_from
        if not 0.0 <= self.pretrain_mix < 1.0:
            sys.exit(f"error: --pretrain_mix={self.pretrain_mix} must be in [0, 1): the share of rows from pretraining text")
        if self.pretrain_mix > 0 and not self.pretrain_data:
            sys.exit("error: --pretrain_mix needs --pretrain_data=DIR with train_*.bin shards, e.g. --pretrain_data=data/tok4096")
        if not 0.0 <= self.val_fraction < 1.0:
            sys.exit(f"error: --val_fraction={self.val_fraction} must be in [0, 1)")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            sys.exit("error: --batch_size and --gradient_accumulation_steps must be at least 1")
        try:
            batch_boundaries(self.batch_schedule, self.trinity_steps)
        except ValueError as exc:
            sys.exit(f"error: {exc}")
        unknown = set(self.targets) - set(lora.LORA_TARGETS)
        if self.lora_r > 0 and (unknown or not self.targets):
            sys.exit(f"error: --lora_targets={self.lora_targets}: pick from {','.join(lora.LORA_TARGETS)}")
        if self.qlora and self.lora_r <= 0:
            sys.exit("error: --qlora needs LoRA adapters: set --lora_r > 0")
        if self.target_kl < 0 or self.kl_horizon < 1:
            sys.exit(f"error: --target_kl={self.target_kl} must be >= 0 (0: fixed kl_coef) and --kl_horizon={self.kl_horizon} >= 1")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.lora_targets.split(",") if part.strip())

    @property
    def boundaries(self) -> list[int]:
        return parse_boundaries(self.trinity_steps)

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0


def parse_finetune_config(argv: Optional[list[str]] = None) -> FinetuneConfig:
    return parse_config(FinetuneConfig, argv, description="Fine-tune a checkpoint: SFT (full, LoRA, QLoRA), DPO, reward model, PPO")


def fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")


# ----------------------------------------------------------------------------- JSON lines

def warn_line(path: str | Path, line_number: int, reason: str) -> None:
    """One warning for one skipped line, as FILE:LINE: reason; skipped."""
    print(f"{path}:{line_number}: {reason}; skipped", file=sys.stderr)


class LineWarnings:
    """Prints the first MAX_WARNINGS_PER_FILE skipped-line warnings of a file, then a count of the rest."""

    def __init__(self, path: str | Path):
        self.path, self.count = path, 0

    def __call__(self, line_number: int, reason: str) -> None:
        self.count += 1
        if self.count <= MAX_WARNINGS_PER_FILE:
            warn_line(self.path, line_number, reason)

    def summary(self) -> None:
        if self.count > MAX_WARNINGS_PER_FILE:
            print(f"{self.path}: {self.count - MAX_WARNINGS_PER_FILE} more lines skipped (not shown)", file=sys.stderr)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every line that holds a JSON object; blank lines are ignored.

    Any other line is reported as "FILE:LINE: not valid JSON (...); skipped". A file with no JSON object at all
    is an error (SystemExit).
    """
    path = Path(path)
    if not path.is_file():
        fail(f"{path} not found")
    records: list[tuple[int, dict]] = []
    warnings = LineWarnings(path)
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                warnings(line_number, f"not UTF-8 (byte {exc.start})")
                continue
            except json.JSONDecodeError as exc:
                warnings(line_number, f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                warnings(line_number, f"a JSON {type(record).__name__}, not an object")
                continue
            records.append((line_number, record))
    warnings.summary()
    if not records:
        fail(f"{path} has no valid JSON line; expected one JSON object per line")
    return records


# ----------------------------------------------------------------------------- SFT examples

def _text_field(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, not {type(value).__name__}')
    return value


def sft_messages(record: dict) -> tuple[str, list[dict]]:
    """(format name, chat messages) of one SFT record; ValueError with the reason if it fits no format."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(f'messages[{index}] must be {{"role": system|user|assistant, "content": string}}')
        if not any(message["role"] == "assistant" for message in messages):
            raise ValueError("no assistant message to learn from")
        return "messages", [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record and "output" in record:
        user = _text_field(record, "instruction")
        if record.get("input"):
            user += "\n\n" + _text_field(record, "input")
        return "instruction", [{"role": "user", "content": user}, {"role": "assistant", "content": _text_field(record, "output")}]
    if "prompt" in record and "completion" in record:
        return "prompt", [{"role": "user", "content": _text_field(record, "prompt")},
                          {"role": "assistant", "content": _text_field(record, "completion")}]
    raise ValueError(f'expected "messages", "instruction"+"output" or "prompt"+"completion", found {sorted(record)[:6]}')


@dataclass
class SFTExample:
    tokens: list[int]
    mask: list[int]  # 1 where the token is trained on (assistant content and its EOS)


def load_sft_examples(path: str | Path, tokenizer: Tokenizer, context: int, truncate: bool) -> list[SFTExample]:
    """Read, validate and tokenize an SFT JSONL file. Examples are kept up to context + 1 tokens (context inputs)."""
    path = Path(path)
    warnings = LineWarnings(path)
    examples: list[SFTExample] = []
    formats: dict[str, int] = {}
    too_long = cut = 0

    def encode(text: str) -> list[int]:  # the chat template's encode(): no BOS/EOS of its own
        return tokenizer.encode(text, bos=False, eos=False)

    for line_number, record in read_jsonl(path):
        try:
            kind, messages = sft_messages(record)
        except ValueError as exc:
            warnings(line_number, str(exc))
            continue
        tokens, mask = encode_dialog(encode, messages, tokenizer.bos_id, tokenizer.eos_id)
        if len(tokens) > context + 1:
            if not truncate or not any(mask[1:context + 1]):
                too_long += 1
                continue
            tokens, mask = tokens[:context + 1], mask[:context + 1]
            cut += 1
        formats[kind] = formats.get(kind, 0) + 1
        examples.append(SFTExample(tokens, mask))
    warnings.summary()
    if too_long:
        print(f"{path}: {too_long} examples longer than the context ({context} tokens) dropped"
              + ("" if truncate else "; --truncate=true cuts them instead"), file=sys.stderr)
    if not examples:
        fail(f"{path} has no usable example; expected lines like {{\"messages\": [...]}}, "
             f"{{\"instruction\", \"output\"}} or {{\"prompt\", \"completion\"}}")
    kinds = ", ".join(f"{name} {count}" for name, count in sorted(formats.items()))
    print(f"{path}: {len(examples)} examples ({kinds})" + (f", {cut} cut to the context" if cut else ""))
    return examples


def collate(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, L], targets [B, L]) from (tokens, mask) rows: targets are the next tokens where mask is 1, else -1.

    Rows are right-padded; causal attention keeps the padding from touching the real positions.
    """
    length = max(len(tokens) for tokens, _ in rows) - 1
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for row, (tokens, mask) in enumerate(rows):
        tokens_t = torch.tensor(tokens, dtype=torch.long)
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[row, : len(tokens) - 1] = tokens_t[:-1]
        targets[row, : len(tokens) - 1] = torch.where(trained, tokens_t[1:], -1)
    return inputs, targets


class PretrainWindows:
    """Random windows of pretraining tokens from the uint16 shards train_*.bin of a folder (arianna_data.py's output)."""

    def __init__(self, data_dir: str | Path, vocab_size: int):
        data_dir = Path(data_dir)
        paths = sorted(data_dir.glob("train_*.bin"))
        if not paths:
            fail(f"--pretrain_data={data_dir} holds no train_*.bin shards; run `python arianna_data.py pretokenize` first")
        meta_path = data_dir / "meta.json"
        if meta_path.is_file():
            shard_vocab = json.loads(meta_path.read_text()).get("vocab_size")
            if shard_vocab is not None and shard_vocab != vocab_size:
                fail(f"--pretrain_data={data_dir} was tokenized with {shard_vocab} tokens but the model has {vocab_size}")
        self.shards = [np.memmap(path, dtype=np.uint16, mode="r") for path in paths]
        self.weights = np.array([len(shard) for shard in self.shards], dtype=np.float64)
        self.weights /= self.weights.sum()

    def window(self, length: int, rng: np.random.Generator) -> list[int]:
        shard = self.shards[rng.choice(len(self.shards), p=self.weights)]
        if len(shard) < length:
            fail(f"pretraining shard has {len(shard)} tokens, fewer than one window of {length}")
        start = int(rng.integers(0, len(shard) - length + 1))
        return shard[start:start + length].astype(np.int64).tolist()


class SFTStream:
    """The micro-batches of an SFT run, a pure function of the micro-batch index (so resuming needs only the step).

    Examples are visited epoch by epoch in a seeded shuffle; with pretrain_mix F, micro-batch m carries
    floor((m+1) F B) - floor(m F B) pretraining windows among its B rows, so their share is exactly F over time.
    """

    def __init__(self, examples: list[SFTExample], batch_size: int, seed: int,
                 pretrain: Optional[PretrainWindows] = None, pretrain_mix: float = 0.0, context: int = 256):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.pretrain, self.pretrain_mix, self.context = pretrain, pretrain_mix, context
        self._orders: dict[int, list[int]] = {}

    def pretrain_rows(self, micro: int) -> int:
        share = self.pretrain_mix * self.batch_size
        return math.floor((micro + 1) * share) - math.floor(micro * share) if self.pretrain else 0

    def sft_rows_before(self, micro: int) -> int:
        share = self.pretrain_mix * self.batch_size if self.pretrain else 0.0
        return micro * self.batch_size - math.floor(micro * share)

    def example(self, position: int) -> SFTExample:
        epoch, index = divmod(position, len(self.examples))
        if epoch not in self._orders:
            shuffle = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=shuffle).tolist()}
        return self.examples[self._orders[epoch][index]]

    def batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_pretrain = self.pretrain_rows(micro)
        first = self.sft_rows_before(micro)
        rows = [(ex.tokens, ex.mask) for ex in map(self.example, range(first, first + self.batch_size - n_pretrain))]
        if n_pretrain:
            length = max((len(tokens) for tokens, _ in rows), default=self.context + 1)
            rng = np.random.default_rng([self.seed, micro])
            rows += [(window, [1] * length) for window in (self.pretrain.window(length, rng) for _ in range(n_pretrain))]
        return collate(rows)


def split_validation(examples: list[SFTExample], fraction: float, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val): a seeded random `fraction` of the examples held out (at least one when fraction > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(examples) * fraction))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


# ----------------------------------------------------------------------------- base checkpoint, policy, tokenizer

@dataclass
class BaseCheckpoint:
    path: str
    sha256: str  # of the plain base model's state dict (the model the adapters or the fine-tune start from)
    checkpoint: dict


def state_sha256(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the plain model's state dict (identity of a base)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clean_state_dict(model).items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def lora_settings(cfg: FinetuneConfig) -> dict:
    return dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=list(cfg.targets),
                qlora=cfg.qlora, double_quant=cfg.double_quant)


def check_base(saved: dict, base: BaseCheckpoint, what: str) -> None:
    """SystemExit unless the checkpoint `saved` was trained from exactly this base."""
    recorded = saved.get("base") or {}
    if recorded.get("sha256") != base.sha256:
        fail(f"{what} was trained from base {recorded.get('path')} (sha256 {str(recorded.get('sha256'))[:12]}), "
             f"but --init_from={base.path} has sha256 {base.sha256[:12]}; pass the base checkpoint it was trained from")


def load_base_model(path: str | Path) -> tuple[Transformer, dict]:
    """The plain float32 Transformer of a checkpoint: train_arianna.py's or a full fine-tune's, or a LoRA
    fine-tune's (its recorded base is loaded, checked against the recorded sha256 and the adapters merged in)."""
    if Path(path).is_dir():  # a Hugging Face Llama (interop.py)
        return interop.load_hf_llama(path)
    checkpoint = load_checkpoint(path)
    if "model" in checkpoint:
        return model_from_checkpoint(checkpoint), checkpoint
    if "lora" not in checkpoint:
        fail(f"{path} holds neither model weights nor LoRA adapters; pass a checkpoint from train_arianna.py or finetune.py")
    recorded = checkpoint["base"]
    model, base_checkpoint = load_base_model(recorded["path"])
    if (base_checkpoint.get("weights_sha256") or state_sha256(model)) != recorded["sha256"]:
        fail(f"the adapters in {path} were trained on a different {recorded['path']} (sha256 {recorded['sha256'][:12]} "
             "expected); restore that base checkpoint")
    settings = checkpoint["lora_config"]
    lora.apply_lora(model, settings["r"], settings["alpha"], settings["dropout"], settings["targets"],
                    settings["qlora"], settings["double_quant"])
    lora.load_lora_state_dict(model, checkpoint["lora"])
    return lora.merge_lora(model).requires_grad_(True), checkpoint


def load_policy(cfg: FinetuneConfig, runtime: Runtime) -> tuple[Transformer, BaseCheckpoint]:
    """The model to train, on the device: the base of --init_from, with LoRA/QLoRA adapters when --lora_r > 0."""
    def add_adapters(module: nn.Module) -> None:
        lora.apply_lora(module, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets, cfg.qlora, cfg.double_quant)

    if cfg.qlora and Path(cfg.init_from).is_dir():  # a Hugging Face Llama quantized layer by layer as it loads
        model, checkpoint = interop.load_hf_llama(cfg.init_from, per_layer=add_adapters)
    else:
        model, checkpoint = load_base_model(cfg.init_from)
    base = BaseCheckpoint(cfg.init_from, checkpoint.get("weights_sha256") or state_sha256(model), checkpoint)
    if cfg.uses_lora:
        if not any(lora.lora_layers(model)):
            add_adapters(model)
        stored, full = lora.base_memory_bytes(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kind = "NF4" if cfg.qlora else "float32"
        print(f"base weights: {stored / 2**20:.2f} MiB as stored ({kind}) vs {full / 2**20:.2f} MiB in float32; "
              f"{trainable:,} trainable adapter parameters (r={cfg.lora_r}, targets {','.join(cfg.targets)})")
    return model.to(runtime.device), base


def tokenizer_path(cfg: FinetuneConfig, base: BaseCheckpoint) -> Path:
    """--tokenizer_model, else the tokenizer recorded in the base checkpoint or implied by its vocab settings."""
    train_config = base.checkpoint.get("config", {})
    recorded = (cfg.tokenizer_model or base.checkpoint.get("tokenizer_model")
                or base.checkpoint.get("meta", {}).get("tokenizer_model") or train_config.get("tokenizer_model"))
    if recorded:
        return Path(recorded)
    if train_config.get("vocab_source") == "llama2":
        return llama2_tokenizer_path(None)
    return Path(train_config.get("data_dir", "data")) / f"tok{base.checkpoint['model_args']['vocab_size']}.model"


def load_tokenizer(cfg: FinetuneConfig, base: BaseCheckpoint) -> Tokenizer:
    """The tokenizer of tokenizer_path(), checked against the model's vocabulary size."""
    path = tokenizer_path(cfg, base)
    tokenizer = Tokenizer(path)
    vocab_size = base.checkpoint["model_args"]["vocab_size"]
    if tokenizer.n_words != vocab_size:
        fail(f"tokenizer {path} has {tokenizer.n_words} tokens but {base.path} expects {vocab_size}; "
             "pass the right one with --tokenizer_model")
    return tokenizer


# ----------------------------------------------------------------------------- the training loop

def planned_steps(cfg: FinetuneConfig, rows_per_micro: Callable[[int], int], n_examples: int, world_size: int = 1) -> int:
    """--max_iters, else the optimizer steps needed to show every example --epochs times (batch schedule included;
    under torchrun every process takes its own micro-batches)."""
    if cfg.max_iters > 0:
        return cfg.max_iters
    needed, seen, micro, step = math.ceil(cfg.epochs * n_examples), 0, 0, 0
    while seen < needed:
        for _ in range(world_size * accumulation_steps(step, cfg.gradient_accumulation_steps, cfg.batch_schedule,
                                                       cfg.boundaries)):
            seen += rows_per_micro(micro)
            micro += 1
        step += 1
    return max(step, 1)


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


class Trainer:
    """The optimizer loop every fine-tuning method shares.

    Each optimizer step runs accumulation_steps(step) micro-steps (loss divided by their number), clips, steps
    AdamW at the scheduled lr, logs lr and the effective batch, evaluates and saves out_dir/ckpt.pt every
    --eval_interval steps and at the end, writes phoenix checkpoints, and on Ctrl-C saves and stops.
    extra_modules (e.g. a value or reward head) are trained in full and saved under "extra" in the checkpoint.
    Under torchrun the model and extra modules are wrapped in DistributedDataParallel, the logged numbers are
    means over the processes, and only rank 0 writes files.
    """

    def __init__(self, cfg: FinetuneConfig, runtime: Runtime, model: Transformer, base: BaseCheckpoint,
                 total_steps: int, extra_modules: Optional[dict[str, nn.Module]] = None):
        self.cfg, self.runtime, self.model, self.base = cfg, runtime, model, base
        self.total_steps = total_steps
        self.extra_modules = extra_modules or {}
        trainable = nn.ModuleDict({"model": model, **self.extra_modules})
        self.trained = TrainedModules(trainable)
        # Under torchrun: rank 0's weights to every process now, averaged gradients in every backward.
        self.wrapped = self.trained if not runtime.ddp else DistributedDataParallel(
            self.trained, device_ids=[runtime.local_rank] if runtime.device_type == "cuda" else None,
            broadcast_buffers=False)  # the buffers (RoPE tables, NF4 base weights) never change
        self.optimizer = make_optimizer(trainable, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), runtime)
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.step = 0
        self.best_val_loss = float("inf")
        self.state: dict[str, float] = {}  # numbers a method carries from step to step (PPO's kl_coef), checkpointed
        self.out_dir = Path(cfg.out_dir)
        if cfg.init == "resume":
            self._resume()

    def forward(self, function: Callable, *args):
        """function(*args), computing a loss from the trained modules: under torchrun through
        DistributedDataParallel, so the backward of that loss averages the gradients over the processes."""
        self.trained.function = function
        return self.wrapped(*args)

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

    def micro_index(self, step: int) -> int:
        """Micro-batches run before optimizer step `step` under the batch schedule."""
        return sum(self.accumulation(s) for s in range(step))

    def accumulation(self, step: int) -> int:
        return accumulation_steps(step, self.cfg.gradient_accumulation_steps, self.cfg.batch_schedule, self.cfg.boundaries)

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return learning_rate(step, cfg.lr_schedule, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, self.total_steps)

    # ------------------------------------------------------------------ checkpoints
    def payload(self) -> dict:
        cfg = self.cfg
        payload = {
            "kind": "finetune", "method": cfg.method, "config": asdict(cfg),
            "model_args": self.base.checkpoint["model_args"],
            "tokenizer_model": str(tokenizer_path(cfg, self.base)),
            "base": {"path": self.base.path, "sha256": self.base.sha256},
            "iter_num": self.step, "total_steps": self.total_steps, "best_val_loss": self.best_val_loss,
            "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
            "extra": {name: module.state_dict() for name, module in self.extra_modules.items()},
            "state": dict(self.state),
        }
        if self.cfg.uses_lora:
            payload["lora"] = lora.lora_state_dict(self.model)
            payload["lora_config"] = lora_settings(cfg)
        else:
            payload["model"] = clean_state_dict(self.model)
        return payload

    def save(self, path: str | Path) -> None:
        if self.runtime.is_master:
            save_checkpoint(path, self.payload())

    def save_phoenix(self) -> None:
        """out_dir/phoenix_{step}.pt, then delete all but the newest --keep_last of them (rank 0 only)."""
        if not self.runtime.is_master:
            return
        self.save(self.out_dir / f"phoenix_{self.step}.pt")
        if self.cfg.keep_last > 0:
            phoenixes = sorted(self.out_dir.glob("phoenix_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            for old in phoenixes[: -self.cfg.keep_last]:
                old.unlink()

    def _resume(self) -> None:
        path = self.out_dir / "ckpt.pt"
        saved = load_checkpoint(path)
        check_base(saved, self.base, str(path))
        if self.cfg.uses_lora != ("lora" in saved):
            fail(f"{path} is a {'LoRA' if 'lora' in saved else 'full'} fine-tune; resume with the same --lora_r")
        try:
            if self.cfg.uses_lora:
                lora.load_lora_state_dict(self.model, saved["lora"])
            else:
                self.model.load_state_dict(saved["model"])
            for name, module in self.extra_modules.items():
                module.load_state_dict(saved["extra"][name])
            self.state.update(saved.get("state", {}))
            self.optimizer.load_state_dict(saved["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            fail(f"cannot resume from {path} with these settings ({str(exc).splitlines()[0][:200]}); "
                 "use the flags it was trained with")
        torch.set_rng_state(saved["rng"])
        self.step, self.best_val_loss = saved["iter_num"], saved["best_val_loss"]
        self.total_steps = saved["total_steps"]  # the schedule planned at the start stays fixed
        print(f"resuming from {path} at step {self.step} of {self.total_steps}")

    # ------------------------------------------------------------------ the loop
    def run(self, micro_step: MicroStep, evaluate: Optional[Callable[[], dict]] = None) -> bool:
        """Train to total_steps; returns False if stopped early by Ctrl-C (ckpt.pt saved either way)."""
        cfg, runtime = self.cfg, self.runtime
        self.out_dir.mkdir(parents=True, exist_ok=True)
        progress = ProgressLog(self.out_dir, self.total_steps, self.step, runtime.is_master)
        stop = StopFlag()
        micro = self.micro_index(self.step)
        finished = True
        try:
            while self.step < self.total_steps:
                step_lr = self.start_step()
                accumulation = self.accumulation(self.step)
                self.model.train()
                total_loss, tokens, metrics = 0.0, 0, {}
                for index in range(accumulation):
                    # DDP averages the gradients once, in the backward of the last micro-batch.
                    last = index == accumulation - 1
                    with contextlib.nullcontext() if last or not runtime.ddp else self.wrapped.no_sync():
                        with runtime.autocast():
                            loss, n_tokens, micro_metrics = self.forward(micro_step, self.step,
                                                                         micro * runtime.world_size + runtime.rank)
                        runtime.scaler.scale(loss / accumulation).backward()
                    total_loss += loss.item() / accumulation
                    tokens += n_tokens
                    for key, value in micro_metrics.items():
                        metrics[key] = metrics.get(key, 0.0) + value / accumulation
                    micro += 1
                if cfg.grad_clip > 0:
                    runtime.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                runtime.scaler.step(self.optimizer)
                runtime.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                metrics, stop_now = self.agree({**metrics, "loss": total_loss, "tokens": tokens}, stop.requested)
                total_loss, tokens = metrics.pop("loss"), round(metrics.pop("tokens") * runtime.world_size)
                effective_batch = cfg.batch_size * accumulation * runtime.world_size
                progress.update(self.step, total_loss, tokens, step_lr, batch=effective_batch, **metrics)
                record = {"step": self.step, "loss": total_loss, "lr": step_lr, "batch": effective_batch, **metrics}
                if not self.finish_step(progress, record, stop_now, evaluate):
                    finished = False
                    break
        finally:
            stop.restore()
            progress.close()
        return finished

    def start_step(self) -> float:
        """The scheduled lr of the coming optimizer step, set on the optimizer."""
        step_lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = step_lr
        return step_lr

    def finish_step(self, progress: ProgressLog, record: dict, stop_now: bool,
                    evaluate: Optional[Callable[[], dict]] = None) -> bool:
        """After an optimizer step: log record every --log_interval steps, evaluate and save ckpt.pt every
        --eval_interval, phoenix checkpoints, and on a Ctrl-C save and say so. False when training must stop."""
        cfg = self.cfg
        at_end = self.step == self.total_steps
        at_eval = at_end or (cfg.eval_interval > 0 and self.step % cfg.eval_interval == 0)
        if at_end or (cfg.log_interval > 0 and self.step % cfg.log_interval == 0):
            progress.record(record)
        if evaluate and at_eval:
            self.model.eval()
            results = evaluate()
            self.best_val_loss = min(self.best_val_loss, results.get("val_loss", self.best_val_loss))
            progress.record({"step": self.step, **results})
        if at_eval:
            self.save(self.out_dir / "ckpt.pt")
        if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0:
            self.save_phoenix()
        if stop_now and not at_end:
            self.save(self.out_dir / "ckpt.pt")
            progress.write(f"stopped at step {self.step}; {self.out_dir / 'ckpt.pt'} saved, continue with --init=resume")
            return False
        return True


def export_finetuned(cfg: FinetuneConfig, model: Transformer, base: BaseCheckpoint) -> Path:
    """Fold the adapters into a CPU copy of model and write out_dir/model.bin (and out_dir/merged.pt with --merge)."""
    merged = lora.merge_lora(copy.deepcopy(model).cpu())
    out_dir = Path(cfg.out_dir)
    if cfg.merge:
        save_checkpoint(out_dir / "merged.pt", {"model": clean_state_dict(merged), "model_args": merged.args.to_dict(),
                                                "config": asdict(cfg), "tokenizer_model": str(tokenizer_path(cfg, base))})
        print(f"wrote {out_dir / 'merged.pt'} (adapters merged)")
    path = export_model(merged, out_dir / "model.bin", cfg.export_version)
    print(f"wrote {path} (version {cfg.export_version})")
    return path


# ----------------------------------------------------------------------------- SFT

@torch.no_grad()
def evaluate_sft(model: Transformer, examples: list[SFTExample], batch_size: int, runtime: Runtime) -> float:
    """Mean loss per trained token over examples."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        inputs, targets = collate([(ex.tokens, ex.mask) for ex in examples[start:start + batch_size]])
        inputs, targets = inputs.to(runtime.device), targets.to(runtime.device)
        with runtime.autocast():
            _, loss = model(inputs, targets)
        n = int((targets != -1).sum())
        if n:
            total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def start_method(cfg: FinetuneConfig) -> tuple[Runtime, Transformer, BaseCheckpoint, Tokenizer]:
    """What every method begins with: the runtime, the policy (with LoRA/QLoRA per cfg), its base and tokenizer."""
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    if not runtime.is_master:  # under torchrun the other processes would print the same report again
        sys.stdout = open(os.devnull, "w")
    model, base = load_policy(cfg, runtime)
    return runtime, model, base, load_tokenizer(cfg, base)


def context_length(cfg: FinetuneConfig, model: Transformer) -> int:
    """The longest example in tokens: --max_seq_len, capped by (and defaulting to) the model's context."""
    return min(cfg.max_seq_len or model.args.max_seq_len, model.args.max_seq_len)


def run_sft(cfg: FinetuneConfig) -> None:
    if not cfg.data:
        fail("--data=FILE.jsonl is needed for --method=sft")
    runtime, model, base, tokenizer = start_method(cfg)
    context = context_length(cfg, model)
    examples = load_sft_examples(cfg.data, tokenizer, context, cfg.truncate)
    if cfg.val_data:
        train_examples, val_examples = examples, load_sft_examples(cfg.val_data, tokenizer, context, cfg.truncate)
    else:
        train_examples, val_examples = split_validation(examples, cfg.val_fraction, cfg.seed)
    pretrain = PretrainWindows(cfg.pretrain_data, model.args.vocab_size) if cfg.pretrain_mix > 0 else None
    stream = SFTStream(train_examples, cfg.batch_size, cfg.seed, pretrain, cfg.pretrain_mix, context)
    total_steps = planned_steps(cfg, lambda micro: cfg.batch_size - stream.pretrain_rows(micro), len(train_examples),
                                runtime.world_size)
    print(f"training on {len(train_examples)} examples, validating on {len(val_examples)}; {total_steps} steps")
    trainer = Trainer(cfg, runtime, model, base, total_steps)

    def micro_step(step: int, micro: int) -> tuple[torch.Tensor, int, dict]:
        inputs, targets = stream.batch(micro)
        _, loss = model(inputs.to(runtime.device), targets.to(runtime.device))
        return loss, inputs.numel(), {}

    evaluate = (lambda: {"val_loss": evaluate_sft(model, val_examples, cfg.batch_size, runtime)}) if val_examples else None
    if trainer.run(micro_step, evaluate) and runtime.is_master:
        export_finetuned(cfg, model, base)
    runtime.shutdown()


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_finetune_config(argv)
    if cfg.method == "sft":
        run_sft(cfg)
        return
    import preference  # only the preference methods need it

    {"dpo": preference.run_dpo, "reward": preference.run_reward, "ppo": preference.run_ppo}[cfg.method](cfg)


if __name__ == "__main__":
    main()
