"""The fine-tuning machinery every method shares (finetune.py's SFT, preference.py's DPO, KTO, reward model, PPO).

    FinetuneConfig                                     the flags every method takes (preference.PreferenceConfig adds its own)
    read_jsonl(path) -> [(line_number, dict)]          line-numbered warnings, error when nothing is usable
    LineWarnings(path)(line_number, reason)            the same FILE:LINE: reason; skipped warning for your own checks
    load_base_model(path) -> (Transformer, ckpt)       a train_arianna.py checkpoint, or a LoRA fine-tune's (merged)
    load_policy(cfg, runtime) -> (model, base)         base model (+ LoRA/QLoRA per cfg) on the device; base: BaseCheckpoint
    load_tokenizer(cfg, base) -> Tokenizer             --tokenizer_model, else the one the base was trained with
    FinetuneTrainer(cfg, runtime, model, base, total_steps, extra_modules={})
                                                       training.Trainer with a fine-tune's checkpoint: LoRA adapters or
                                                       the full model, extra modules (heads), the base's path and sha256
    export_finetuned(cfg, model, base) -> Path | None merges a copy, writes out_dir/model.bin (+ merged.pt with --merge)
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, TypeVar

import torch
from torch import nn

import interop
import lora
from export import export_model
from formats import DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, FormatError
from model import Transformer
from schedules import BATCH_SCHEDULES, LR_SCHEDULES, accumulation_steps, batch_boundaries, parse_boundaries
from tokenizer import Tokenizer, llama2_tokenizer_path
from training import (CPU_BF16_FINETUNE_MIN_DIM, LoopSettings, Runtime, Schedule, Trainer, clean_state_dict,
                      finetune_runtime, load_checkpoint, model_from_checkpoint, save_checkpoint, setup_runtime)

METHODS = ("sft", "dpo", "kto", "reward", "ppo")
ROLES = ("system", "user", "assistant")
MAX_WARNINGS_PER_FILE = 20
T = TypeVar("T")


@dataclass
class FinetuneConfig:
    init_from: str = field(default="out/ckpt.pt", metadata={
        "help": "base checkpoint (train_arianna.py's, or a LoRA fine-tune's); resume: continue from out_dir/ckpt.pt "
                "on the base it records"})
    base_model: str = field(default="", metadata={
        "help": "a local Hugging Face LlamaForCausalLM directory to start from (the same as --init_from=DIR)"})
    data: str = field(default="", metadata={
        "help": "training JSONL (sft: instruction/prompt-completion/messages; dpo/reward: preference pairs; "
                "kto: prompt/completion/label)"})
    method: str = field(default="sft", metadata={"choices": METHODS})
    out_dir: str = "out/sft"
    init: str = field(default="scratch", metadata={
        "choices": ("scratch", "resume"),
        "help": "deprecated: --init=resume is --init_from=resume with the base named in --init_from"})
    tokenizer_model: str = field(default="", metadata={"help": "SentencePiece .model; empty: the one the base was trained with"})
    # data
    val_data: str = field(default="", metadata={"help": "validation JSONL; empty: hold out --val_fraction of --data"})
    val_fraction: float = 0.1
    max_seq_len: int = field(default=0, metadata={"help": "longest example in tokens; 0: the model's context"})
    dropout: Optional[float] = field(default=None, metadata={"help": "dropout while fine-tuning; empty: the base model's"})
    truncate: bool = field(default=False, metadata={"help": "cut examples longer than the context instead of dropping them"})
    answer_prefix: int = field(default=0, metadata={
        "help": "sft: an answer already trained whole in --full_answers examples (other wordings of one question) is "
                "trained on its first N tokens only; 0: every example whole"})
    full_answers: int = field(default=3, metadata={"help": "sft: examples per answer trained whole when --answer_prefix > 0"})
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
    early_stop_patience: int = field(default=0, metadata={
        "help": "stop after this many evaluations without a better val loss; 0: never"})
    checkpoint_every: int = field(default=0, metadata={"help": "phoenix checkpoints out_dir/phoenix_{step}.pt every N steps; 0: off"})
    keep_last: int = field(default=3, metadata={"help": "phoenix checkpoints kept (older ones deleted); 0: keep all"})
    merge: bool = field(default=False, metadata={
        "help": "also write out_dir/merged.pt, a full checkpoint with the adapters folded in"})
    export_version: int = field(default=0, metadata={"choices": (0, 1, 2), "help": "model.bin format (export.py)"})
    device: str = "auto"
    dtype: str = field(default="auto", metadata={
        "help": "auto: bf16 where the device has it natively (float16 on older GPUs; on a CPU for models of dim >= "
                f"{CPU_BF16_FINETUNE_MIN_DIM} only), else float32"})
    seed: int = 1337
    def __post_init__(self) -> None:
        self.init_from = self.base_model or self.init_from
        if not 0.0 <= self.pretrain_mix < 1.0:
            sys.exit(f"error: --pretrain_mix={self.pretrain_mix} must be in [0, 1): the share of rows from pretraining text")
        if self.pretrain_mix > 0 and not self.pretrain_data:
            sys.exit("error: --pretrain_mix needs --pretrain_data=DIR with train_*.bin shards, e.g. --pretrain_data=data/tok4096")
        if self.answer_prefix < 0 or self.full_answers < 1:
            sys.exit(f"error: --answer_prefix={self.answer_prefix} must be >= 0 and --full_answers={self.full_answers} >= 1")
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
        if self.init == "resume":
            print("note: --init=resume is deprecated; use --init_from=resume (the base is read from out_dir/ckpt.pt)",
                  file=sys.stderr)

    @property
    def resuming(self) -> bool:
        return self.init_from == "resume" or self.init == "resume"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out_dir) / "ckpt.pt"

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.lora_targets.split(",") if part.strip())

    @property
    def boundaries(self) -> list[int]:
        return parse_boundaries(self.trinity_steps)

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0


def fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")


def segment_encoder(tokenizer: Tokenizer) -> Callable[[str], list[int]]:
    """The chat template's encode(): SentencePiece without BOS/EOS of its own."""
    return lambda text: tokenizer.encode(text, bos=False, eos=False)


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


# What a malformed line can raise anywhere between json.loads and the tokenizer: bad JSON or a too-long integer
# (ValueError), nesting deeper than Python's stack (RecursionError), a lone surrogate that cannot become UTF-8
# (UnicodeError), a value of the wrong type (TypeError, KeyError).
LINE_ERRORS = (ValueError, RecursionError, UnicodeError, TypeError, KeyError)


def line_error(exc: BaseException) -> str:
    """The reason a line is skipped, on one line."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeError):
        return "holds text that is not valid Unicode (a lone surrogate?)"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return message if isinstance(exc, ValueError) else f"{type(exc).__name__}: {message}"


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every line that holds a JSON object; blank lines are ignored.

    Any other line is reported as "FILE:LINE: reason; skipped": not UTF-8, not valid JSON, an integer of
    thousands of digits, nesting deeper than the stack, a lone surrogate in a string, not an object. A file with
    no JSON object at all is an error (SystemExit).
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
                # Surrogates decode from \ud800 escapes but break every later encode: refuse them here.
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeDecodeError as exc:
                warnings(line_number, f"not UTF-8 (byte {exc.start})")
                continue
            except LINE_ERRORS as exc:
                warnings(line_number, line_error(exc))
                continue
            if not isinstance(record, dict):
                warnings(line_number, f"a JSON {type(record).__name__}, not an object")
                continue
            records.append((line_number, record))
    warnings.summary()
    if not records:
        fail(f"{path} has no valid JSON line; expected one JSON object per line")
    return records


def parsed_lines(path: str | Path, parse: Callable[[dict], T]) -> Iterator[T]:
    """parse(record) of each JSON object line of path (tokenizing included); a line it fails on with any of
    LINE_ERRORS is reported as FILE:LINE: reason; skipped, never a traceback."""
    warnings = LineWarnings(path)
    for line_number, record in read_jsonl(path):
        try:
            result = parse(record)
        except LINE_ERRORS as exc:
            warnings(line_number, line_error(exc))
            continue
        yield result
    warnings.summary()



def load_lines(path: str | Path, parse: Callable[[dict], T], length: Callable[[T], int], longest: int, what: str,
               expected: str, hint: str = "") -> list[T]:
    """parsed_lines(path, parse), keeping the items of at most longest tokens: the others are counted in one
    warning (+ hint), and a file left with no item is an error that shows the expected line."""
    items, too_long = [], 0
    for item in parsed_lines(path, parse):
        if length(item) > longest:
            too_long += 1
            continue
        items.append(item)
    if too_long:
        print(f"{path}: {too_long} {what} longer than {longest} tokens dropped{hint}", file=sys.stderr)
    if not items:
        fail(f"{path} has no usable line; expected lines like {expected}")
    return items

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
    path = cfg.init_from
    if path == "resume":  # the base the run in out_dir started from
        if not cfg.checkpoint_path.is_file():
            fail(f"--init_from=resume: {cfg.checkpoint_path} not found; start the run with --init_from=BASE_CHECKPOINT "
                 "(or pass the --out_dir it wrote to)")
        path = load_checkpoint(cfg.checkpoint_path).get("base", {}).get("path")
        if not path:
            fail(f"{cfg.checkpoint_path} records no base checkpoint; pass it as --init_from=BASE --init=resume")
    def add_adapters(module: nn.Module) -> None:
        lora.apply_lora(module, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets, cfg.qlora, cfg.double_quant)

    if cfg.qlora and Path(path).is_dir():  # a Hugging Face Llama quantized layer by layer as it loads
        model, checkpoint = interop.load_hf_llama(path, per_layer=add_adapters)
    else:
        model, checkpoint = load_base_model(path)
    base = BaseCheckpoint(path, checkpoint.get("weights_sha256") or state_sha256(model), checkpoint)
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
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


class FinetuneTrainer(Trainer):
    """training.Trainer for a fine-tune: the policy (and any extra modules, e.g. a value or reward head, trained in
    full and saved under "extra") from cfg's flags; ckpt.pt holds the adapters (LoRA) or the whole model plus the
    base's path and sha256, and --init_from=resume continues from it."""

    def __init__(self, cfg: FinetuneConfig, runtime: Runtime, model: Transformer, base: BaseCheckpoint,
                 total_steps: int, extra_modules: Optional[dict[str, nn.Module]] = None):
        self.cfg, self.model, self.base = cfg, model, base
        self.extra_modules = extra_modules or {}
        schedule = Schedule(cfg.learning_rate, cfg.min_lr, cfg.lr_schedule, cfg.warmup_iters, total_steps,
                            cfg.gradient_accumulation_steps, cfg.batch_schedule, cfg.boundaries)
        settings = LoopSettings(Path(cfg.out_dir), cfg.batch_size, cfg.grad_clip, cfg.log_interval, cfg.eval_interval,
                                cfg.checkpoint_every, cfg.keep_last, cfg.early_stop_patience)
        super().__init__(runtime, nn.ModuleDict({"model": model, **self.extra_modules}), schedule, settings,
                         cfg.weight_decay, (cfg.beta1, cfg.beta2))
        if cfg.resuming:
            self._resume()

    def payload(self) -> dict:
        cfg = self.cfg
        payload = {
            "kind": "finetune", "method": cfg.method, "config": asdict(cfg),
            "model_args": self.base.checkpoint["model_args"],
            "tokenizer_model": str(tokenizer_path(cfg, self.base)),
            "base": {"path": self.base.path, "sha256": self.base.sha256},
            "extra": {name: module.state_dict() for name, module in self.extra_modules.items()},
            **super().payload(),
        }
        if cfg.uses_lora:
            payload["lora"] = lora.lora_state_dict(self.model)
            payload["lora_config"] = lora_settings(cfg)
        else:
            payload["model"] = clean_state_dict(self.model)
        return payload

    def _resume(self) -> None:
        path = self.cfg.checkpoint_path
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
            self.restore(saved, path, self.cfg.max_iters)
        except (ValueError, KeyError, RuntimeError) as exc:
            fail(f"cannot resume from {path} with these settings ({str(exc).splitlines()[0][:200]}); "
                 "use the flags it was trained with")


def export_finetuned(cfg: FinetuneConfig, model: Transformer, base: BaseCheckpoint) -> Optional[Path]:
    """Fold the adapters into a CPU copy of model and write out_dir/model.bin (and out_dir/merged.pt with --merge)."""
    merged = lora.merge_lora(copy.deepcopy(model).cpu())
    out_dir = Path(cfg.out_dir)
    if cfg.merge:
        save_checkpoint(out_dir / "merged.pt", {"model": clean_state_dict(merged), "model_args": merged.args.to_dict(),
                                                "config": asdict(cfg), "tokenizer_model": str(tokenizer_path(cfg, base))})
        print(f"wrote {out_dir / 'merged.pt'} (adapters merged)")
    version = cfg.export_version
    if version == 0 and (merged.args.rope_theta, merged.args.norm_eps) != (DEFAULT_ROPE_THETA, DEFAULT_NORM_EPS):
        version = 1
        print("note: llama2.c's version 0 header cannot carry this model's rope_theta/norm_eps: writing version 1")
    try:
        path = export_model(merged, out_dir / "model.bin", version)
    except FormatError as e:
        print(f"note: no {out_dir / 'model.bin'}: {e}")
        return None
    print(f"wrote {path} (version {version})")
    return path


def start_method(cfg: FinetuneConfig) -> tuple[Runtime, Transformer, BaseCheckpoint, Tokenizer]:
    """What every method begins with: the runtime, the policy (with LoRA/QLoRA per cfg), its base and tokenizer."""
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    if not runtime.is_master:  # under torchrun the other processes would print the same report again
        sys.stdout = open(os.devnull, "w")
    model, base = load_policy(cfg, runtime)
    runtime = finetune_runtime(runtime, cfg.dtype, model.args.dim)
    print(f"fine-tuning on {runtime.device} in {str(runtime.dtype).removeprefix('torch.')}")
    return runtime, model, base, load_tokenizer(cfg, base)


def context_length(cfg: FinetuneConfig, model: Transformer) -> int:
    """The longest example in tokens: --max_seq_len, capped by (and defaulting to) the model's context."""
    return min(cfg.max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
