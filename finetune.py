"""Fine-tune a trained checkpoint: supervised instruction/chat tuning (SFT), full or with LoRA/QLoRA adapters;
--method=dpo|kto|reward|ppo hands over to preference.py with the same flags and machinery (tuning.py).

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
--init_from=resume continues the run in --out_dir from its ckpt.pt (--max_iters may be raised: the schedule's
tail is re-planned from there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import preference
from config import add_config_arguments
from model import Transformer
from tokenizer import Tokenizer, encode_dialog
from training import Runtime, Shuffled, TokenShards, split_validation
from tuning import (ROLES, FinetuneConfig, FinetuneTrainer, context_length, export_finetuned, fail, parsed_lines,
                    planned_steps, segment_encoder, start_method)

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
    examples: list[SFTExample] = []
    formats: dict[str, int] = {}
    too_long = cut = 0
    encode = segment_encoder(tokenizer)

    def tokenize(record: dict) -> tuple[str, list[int], list[int]]:
        kind, messages = sft_messages(record)
        return (kind, *encode_dialog(encode, messages, tokenizer.bos_id, tokenizer.eos_id))

    for kind, tokens, mask in parsed_lines(path, tokenize):
        if len(tokens) > context + 1:
            if not truncate or not any(mask[1:context + 1]):
                too_long += 1
                continue
            tokens, mask = tokens[:context + 1], mask[:context + 1]
            cut += 1
        formats[kind] = formats.get(kind, 0) + 1
        examples.append(SFTExample(tokens, mask))
    if too_long:
        print(f"{path}: {too_long} examples longer than the context ({context} tokens) dropped"
              + ("" if truncate else "; --truncate=true cuts them instead"), file=sys.stderr)
    if not examples:
        fail(f"{path} has no usable example; expected lines like {{\"messages\": [...]}}, "
             f"{{\"instruction\", \"output\"}} or {{\"prompt\", \"completion\"}}")
    kinds = ", ".join(f"{name} {count}" for name, count in sorted(formats.items()))
    print(f"{path}: {len(examples)} examples ({kinds})" + (f", {cut} cut to the context" if cut else ""))
    return examples


def shorten_repeated_answers(examples: list[SFTExample], full: int, prefix: int) -> list[SFTExample]:
    """examples with each answer (its trained tokens) whole in its first `full` examples only; later examples with the
    same answer, the same section asked in other words, keep their first `prefix` trained tokens (and no EOS).

    A chat fine-tune on paraphrased questions spends most of its tokens training the same answers again. Shortened,
    every wording still learns to start the right answer, and the answer itself is learned from the whole copies.
    """
    seen: dict[tuple[int, ...], int] = {}
    shortened = []
    for example in examples:
        answer = tuple(token for token, trained in zip(example.tokens, example.mask) if trained)
        seen[answer] = seen.get(answer, 0) + 1
        if seen[answer] > full:
            end = example.mask.index(1) + prefix
            example = SFTExample(example.tokens[:end], example.mask[:end])
        shortened.append(example)
    return shortened


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


def pretrain_shards(data_dir: str | Path, vocab_size: int) -> TokenShards:
    """The train_*.bin shards of --pretrain_data (arianna_data.py's output), checked against the model's vocabulary."""
    data_dir = Path(data_dir)
    shards = TokenShards(data_dir, "train")
    if not shards.paths:
        fail(f"--pretrain_data={data_dir} holds no train_*.bin shards; run `python arianna_data.py pretokenize` first")
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        shard_vocab = json.loads(meta_path.read_text()).get("vocab_size")
        if shard_vocab is not None and shard_vocab != vocab_size:
            fail(f"--pretrain_data={data_dir} was tokenized with {shard_vocab} tokens but the model has {vocab_size}")
    return shards


class SFTStream:
    """The micro-batches of an SFT run, a pure function of the micro-batch index (so resuming needs only the step).

    Examples are visited epoch by epoch in a seeded shuffle, batched by similar length (Shuffled); with pretrain_mix
    F, micro-batch m carries floor((m+1) F B) - floor(m F B) pretraining windows among its B rows, so their share is
    exactly F over time.
    """

    def __init__(self, examples: list[SFTExample], batch_size: int, seed: int,
                 pretrain: Optional[TokenShards] = None, pretrain_mix: float = 0.0, context: int = 256):
        self.examples = Shuffled(examples, seed, length=lambda example: len(example.tokens), batch=batch_size)
        self.batch_size, self.seed = batch_size, seed
        self.pretrain, self.pretrain_mix, self.context = pretrain, pretrain_mix, context

    def pretrain_rows(self, micro: int) -> int:
        share = self.pretrain_mix * self.batch_size
        return math.floor((micro + 1) * share) - math.floor(micro * share) if self.pretrain else 0

    def sft_rows_before(self, micro: int) -> int:
        share = self.pretrain_mix * self.batch_size if self.pretrain else 0.0
        return micro * self.batch_size - math.floor(micro * share)

    def batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_pretrain = self.pretrain_rows(micro)
        first = self.sft_rows_before(micro)
        rows = [(ex.tokens, ex.mask) for ex in map(self.examples.item, range(first, first + self.batch_size - n_pretrain))]
        if n_pretrain:
            length = max((len(tokens) for tokens, _ in rows), default=self.context + 1)
            if len(self.pretrain) < length:
                fail(f"--pretrain_data holds {len(self.pretrain)} tokens, fewer than one window of {length}")
            starts = self.pretrain.random_starts(length, n_pretrain, self.seed * 1_000_003 + micro)
            rows += [(self.pretrain.window(start, length).astype(np.int64).tolist(), [1] * length) for start in starts]
        return collate(rows)


# ----------------------------------------------------------------------------- SFT training

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
    if cfg.answer_prefix:
        before = sum(len(example.tokens) for example in train_examples)
        train_examples = shorten_repeated_answers(train_examples, cfg.full_answers, cfg.answer_prefix)
        after = sum(len(example.tokens) for example in train_examples)
        print(f"answers beyond {cfg.full_answers} whole copies trained on their first {cfg.answer_prefix} tokens: "
              f"{before:,} -> {after:,} tokens an epoch")
    pretrain = pretrain_shards(cfg.pretrain_data, model.args.vocab_size) if cfg.pretrain_mix > 0 else None
    stream = SFTStream(train_examples, cfg.batch_size, cfg.seed, pretrain, cfg.pretrain_mix, context)
    total_steps = planned_steps(cfg, lambda micro: cfg.batch_size - stream.pretrain_rows(micro), len(train_examples),
                                runtime.world_size)
    print(f"training on {len(train_examples)} examples, validating on {len(val_examples)}; {total_steps} steps")
    trainer = FinetuneTrainer(cfg, runtime, model, base, total_steps)

    def micro_step(step: int, micro: int) -> tuple[torch.Tensor, int, dict]:
        inputs, targets = stream.batch(micro)
        _, loss = model(inputs.to(runtime.device), targets.to(runtime.device))
        return loss, inputs.numel(), {}

    evaluate = (lambda: {"val_loss": evaluate_sft(model, val_examples, cfg.batch_size, runtime)}) if val_examples else None
    if trainer.run(micro_step, evaluate) and runtime.is_master:
        export_finetuned(cfg, model, base)
    runtime.shutdown()


def parse_finetune_config(argv: Optional[list[str]] = None) -> FinetuneConfig:
    """Every method's flags: FinetuneConfig for --method=sft, preference.PreferenceConfig (which adds the
    preference methods' own flags) for the others."""
    parser = argparse.ArgumentParser(description="Fine-tune a checkpoint: SFT (full, LoRA, QLoRA), DPO, KTO, reward "
                                     "model, PPO", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser, FinetuneConfig)
    add_config_arguments(parser.add_argument_group("preference methods (dpo, kto, reward, ppo)"),
                         preference.PreferenceFlags)
    flags = vars(parser.parse_args(argv))
    if flags["method"] == "sft":
        return FinetuneConfig(**{f.name: flags[f.name] for f in dataclasses.fields(FinetuneConfig)})
    return preference.PreferenceConfig(**flags)


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_finetune_config(argv)
    methods = {"sft": run_sft, "dpo": preference.run_dpo, "kto": preference.run_kto, "reward": preference.run_reward,
               "ppo": preference.run_ppo}
    methods[cfg.method](cfg)


if __name__ == "__main__":
    main()
