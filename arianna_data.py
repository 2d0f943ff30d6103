"""From a folder of markdown to token shards the trainer reads.

    python arianna_data.py prepare [--doc_dir=doc --data_dir=data]
    python arianna_data.py train_vocab --vocab_size=4096
    python arianna_data.py pretokenize --vocab_size=4096
    python arianna_data.py pretokenize --vocab_size=0 --tokenizer_model=PATH   # the Llama 2 tokenizer

Paths are relative to the current directory.

data/arianna_corpus.txt holds the documents one after another. Every document ends with a newline
and is followed by a separator line holding the single ASCII control character RS (U+001E,
"record separator"), so the file is split back into documents by reading lines until one equals
"\\x1e\\n". RS has no use in markdown; a file containing it is skipped by `prepare` with a warning.
`prepare` also removes YAML/TOML front matter and turns CRLF/CR line endings into LF.

Shards (data/tok{N}/ or data/arianna_data/ for the Llama 2 tokenizer): train_000.bin ...,
val_000.bin ... hold raw little-endian uint16 token ids, every document starting with BOS;
a document may continue into the next shard. meta.json holds the token and byte counts.
Validation holds round(val_fraction * documents) whole documents (at least one, never all), those with
the smallest content hash, so the split is the same on every run; a corpus of one document is cut at
the paragraph nearest to (1 - val_fraction) of its length instead. Output is byte-identical across runs
and worker counts. The corpus is streamed: memory is bounded by a few chunks of text and the largest
document, not by the corpus size.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import sentencepiece as spm

from config import add_config_arguments
from formats import atomic_write, find_markdown_files, read_markdown, write_atomically
from tokenizer import llama2_tokenizer_path

CORPUS_NAME = "arianna_corpus.txt"
DOCUMENT_SEPARATOR = "\x1e"  # ASCII record separator, alone on its line after every document
SEPARATOR_LINE = (DOCUMENT_SEPARATOR + "\n").encode("utf-8")
MAX_UINT16_VOCAB = 1 << 16  # ids 0..65535
LLAMA2_DATA_NAME = "arianna_data"


def fail(message: str) -> typing.NoReturn:
    sys.exit(f"error: {message}")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- configs

@dataclass
class PrepareConfig:
    doc_dir: str = field(default="doc", metadata={"help": "folder of .md/.markdown files, searched recursively"})
    data_dir: str = field(default="data", metadata={"help": "where arianna_corpus.txt is written"})


@dataclass
class TrainVocabConfig:
    vocab_size: int = field(metadata={"help": "number of tokens, e.g. 4096"})
    data_dir: str = field(default="data", metadata={"help": "holds arianna_corpus.txt; tok{N}.model is written here"})
    max_sentences: int = field(default=10_000_000, metadata={
        "help": "train on at most this many corpus lines (a seeded sample beyond that bounds memory)"})


@dataclass
class PretokenizeConfig:
    vocab_size: int = field(metadata={"help": "N > 0: data/tok{N}.model; 0: the Llama 2 tokenizer"})
    data_dir: str = field(default="data", metadata={"help": "holds arianna_corpus.txt; shards go to a folder in it"})
    tokenizer_model: Optional[str] = field(default=None, metadata={
        "help": "SentencePiece model to use instead of data/tok{N}.model; for --vocab_size=0 the Llama 2 "
                "tokenizer.model (if not given: $ARIANNA_LLAMA2_TOKENIZER)"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of documents held out for validation"})
    num_workers: int = field(default=0, metadata={"help": "processes; 0: one for small corpora, all cores otherwise"})
    shard_tokens: int = field(default=32 * 1024 * 1024, metadata={"help": "tokens per shard file"})
    chunk_chars: int = field(default=1 << 20, metadata={"help": "text per worker task, in characters"})


# ----------------------------------------------------------------------------- prepare

def read_document(path: Path) -> tuple[Optional[str], str]:
    """(document text, "") or (None, why it is skipped). Text as formats.read_markdown gives it, ending with a
    newline."""
    text, reason = read_markdown(path, warn, reserved=(DOCUMENT_SEPARATOR, f"{CORPUS_NAME} uses to separate documents"))
    if text is None:
        return None, reason
    if not text.strip():
        return None, "no text (empty, or front matter only)"
    return (text if text.endswith("\n") else text + "\n"), ""


def prepare(config: PrepareConfig) -> Path:
    doc_dir, data_dir = Path(config.doc_dir), Path(config.data_dir)
    if not doc_dir.is_dir():
        fail(f"document folder {doc_dir} does not exist; create it and put your .md files in it, "
             "or point to yours with --doc_dir=PATH")
    paths = find_markdown_files(doc_dir)
    if not paths:
        fail(f"no markdown files (.md, .markdown) in {doc_dir}; put your documents there, "
             "or point to yours with --doc_dir=PATH")
    make_data_dir(data_dir)
    corpus_path = data_dir / CORPUS_NAME
    n_files = n_chars = n_bytes = 0
    with atomic_write(corpus_path) as corpus:
        for path in paths:
            text, reason = read_document(path)
            if text is None:
                warn(f"skipping {path}: {reason}")
                continue
            encoded = text.encode("utf-8")
            corpus.write(encoded)
            corpus.write(SEPARATOR_LINE)
            n_files += 1
            n_chars += len(text)
            n_bytes += len(encoded)
        if n_files == 0:
            fail(f"none of the {len(paths)} markdown files in {doc_dir} could be used (see the warnings above); "
                 "fix them and run prepare again")
    skipped = len(paths) - n_files
    print(f"gathered {n_files} files, {n_chars} characters, {n_bytes} bytes from {doc_dir} into {corpus_path}"
          + (f" ({skipped} skipped)" if skipped else ""))
    return corpus_path


def make_data_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        fail(f"--data_dir={data_dir} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create the folder --data_dir={data_dir} ({error.strerror or error}); pass a folder you can "
             "write to")


# ----------------------------------------------------------------------------- reading the corpus

def corpus_path_checked(data_dir: Path) -> Path:
    corpus_path = data_dir / CORPUS_NAME
    if not corpus_path.is_file():
        fail(f"corpus {corpus_path} not found; run `python arianna_data.py prepare` first")
    return corpus_path


def iter_corpus_documents(corpus_path: str | os.PathLike) -> Iterator[str]:
    """The documents of arianna_corpus.txt in order, read line by line (one document in memory at a time)."""
    lines: list[bytes] = []
    with open(corpus_path, "rb") as corpus:
        for line in corpus:
            if line == SEPARATOR_LINE:
                yield decode_corpus_text(b"".join(lines), corpus_path)
                lines = []
            else:
                lines.append(line)
    if lines:  # a hand-edited corpus may lack the final separator
        yield decode_corpus_text(b"".join(lines), corpus_path)


def decode_corpus_text(raw: bytes, corpus_path: str | os.PathLike) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        fail(f"{corpus_path} is not UTF-8 (byte 0x{raw[error.start]:02x}); run `python arianna_data.py prepare` again")


def iter_training_lines(corpus_path: Path) -> Iterator[str]:
    """Corpus lines for SentencePiece: no separators, no blank lines (SentencePiece trains on single lines)."""
    for document in iter_corpus_documents(corpus_path):
        for line in document.split("\n"):
            if line.strip():
                yield line


# ----------------------------------------------------------------------------- train_vocab

def check_vocab_fits_uint16(vocab_size: int, what: str) -> None:
    if vocab_size > MAX_UINT16_VOCAB:
        fail(f"{what} is too large: shards store token ids as uint16, so at most {MAX_UINT16_VOCAB} tokens "
             "(ids 0..65535); choose a smaller --vocab_size")


def train_vocab(config: TrainVocabConfig) -> Path:
    if config.vocab_size <= 0:
        fail(f"--vocab_size must be positive to train a tokenizer (got {config.vocab_size}); "
             "--vocab_size=0 means the ready-made Llama 2 tokenizer, which needs no training")
    check_vocab_fits_uint16(config.vocab_size, f"--vocab_size={config.vocab_size}")
    data_dir = Path(config.data_dir)
    corpus_path = corpus_path_checked(data_dir)
    model_writer = io.BytesIO()  # not model_prefix: SentencePiece would store that path inside the model
    # Sampling of lines beyond max_sentences is random inside SentencePiece: seed it so runs agree.
    spm.set_random_generator_seed(1337)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_training_lines(corpus_path),
            model_writer=model_writer,
            model_type="bpe",
            vocab_size=config.vocab_size,
            byte_fallback=True,  # any byte is a token, so nothing is ever unknown
            character_coverage=1.0,
            split_digits=True,
            normalization_rule_name="identity",  # text round-trips exactly: no NFKC, no case folding
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become tokens
            max_sentence_length=1 << 20,  # bytes; long markdown lines (tables, paragraphs) must not be dropped
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # errors only: SentencePiece's progress logs would bury our messages
        )
    except RuntimeError as error:
        fail(explain_training_error(str(error), config.vocab_size, corpus_path))
    model_path = data_dir / f"tok{config.vocab_size}.model"
    vocab_path = model_path.with_suffix(".vocab")
    sp = spm.SentencePieceProcessor(model_proto=model_writer.getvalue())
    # The .vocab file as SentencePiece writes it: piece, tab, score; for people to read.
    vocab_lines = "".join(f"{sp.id_to_piece(index)}\t{sp.get_score(index):g}\n" for index in range(sp.vocab_size()))
    write_atomically(model_path, model_writer.getvalue())
    write_atomically(vocab_path, vocab_lines.encode("utf-8"))
    print(f"wrote {model_path} and {vocab_path} ({config.vocab_size} tokens); next: "
          f"`python tokenizer.py --tokenizer-model={model_path}` and "
          f"`python arianna_data.py pretokenize --vocab_size={config.vocab_size}`")
    return model_path


def explain_training_error(message: str, vocab_size: int, corpus_path: Path) -> str:
    too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (f"--vocab_size={vocab_size} is too large for {corpus_path}: the largest size that works is "
                f"{too_high.group(1)}; use --vocab_size={too_high.group(1)} or less, or add more text")
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return (f"--vocab_size={vocab_size} is too small for {corpus_path}: the 256 byte tokens, 3 special tokens "
                f"and every distinct character need {too_low.group(1)}; use --vocab_size={too_low.group(1)} or more")
    return f"training the tokenizer on {corpus_path} failed: {message.splitlines()[-1] if message else 'unknown error'}"


# ----------------------------------------------------------------------------- pretokenize

class ShardWriter:
    """Appends token arrays to {prefix}_000.bin, {prefix}_001.bin, ... of at most shard_tokens tokens each."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.n_tokens = self.n_bytes = self.n_documents = 0
        self.paths: list[Path] = []
        self.file: Optional[typing.BinaryIO] = None
        self.room = 0  # tokens the open shard can still take

    def write(self, tokens: np.ndarray, n_text_bytes: int) -> None:
        self.n_tokens += len(tokens)
        self.n_bytes += n_text_bytes
        self.n_documents += 1
        while len(tokens):
            if self.room == 0:
                self._open_next()
            head, tokens = tokens[:self.room], tokens[self.room:]
            head.astype("<u2", copy=False).tofile(self.file)
            self.room -= len(head)

    def _open_next(self) -> None:
        self.close()
        path = self.out_dir / f"{self.prefix}_{len(self.paths):03d}.bin"
        self.paths.append(path)
        self.file = open(path, "wb")
        self.room = self.shard_tokens

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# Worker state: each process loads the tokenizer once, not once per task.
_worker_sp: Optional[spm.SentencePieceProcessor] = None
_worker_threads = -1


def _init_worker(model_path: str, encode_threads: int) -> None:
    global _worker_sp, _worker_threads
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)
    _worker_threads = encode_threads


def _encode_texts(texts: list[str]) -> list[np.ndarray]:
    """BOS + tokens of each text, as uint16 arrays."""
    assert _worker_sp is not None
    bos = _worker_sp.bos_id()
    return [np.array([bos] + ids, dtype=np.uint16) for ids in _worker_sp.encode(texts, num_threads=_worker_threads)]


def document_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def choose_validation_documents(hashes: list[int], val_fraction: float) -> set[int]:
    """Indices of held-out documents: the round(n * val_fraction) ones with the smallest content hash (at least one,
    never all). The choice depends only on the texts, so it is the same on every run; identical documents share a
    hash and land on the same side, so validation never holds text the model trained on."""
    n_val = min(len(hashes) - 1, max(1, round(len(hashes) * val_fraction)))
    order = sorted(range(len(hashes)), key=lambda index: (hashes[index], index))
    while n_val < len(hashes) - 1 and hashes[order[n_val]] == hashes[order[n_val - 1]]:
        n_val += 1
    return set(order[:n_val])


def split_single_document(text: str, val_fraction: float) -> tuple[str, str]:
    """One document: the last ~val_fraction of it, from a paragraph start (else a line start), is validation."""
    target = round(len(text) * (1 - val_fraction))
    for boundary in ("\n\n", "\n"):
        starts = [match.end() for match in re.finditer(re.escape(boundary), text) if 0 < match.end() < len(text)]
        if starts:
            cut = min(starts, key=lambda start: (abs(start - target), start))
            return text[:cut], text[cut:]
    cut = min(max(target, 1), len(text) - 1)
    return text[:cut], text[cut:]


def resolve_tokenizer(config: PretokenizeConfig, data_dir: Path) -> tuple[Path, Path]:
    """(tokenizer .model, shard folder)."""
    if config.vocab_size == 0:
        return llama2_tokenizer_path(config.tokenizer_model), data_dir / LLAMA2_DATA_NAME
    if config.vocab_size < 0:
        fail(f"--vocab_size must be 0 (Llama 2 tokenizer) or the size of a trained tokenizer, got {config.vocab_size}")
    check_vocab_fits_uint16(config.vocab_size, f"--vocab_size={config.vocab_size}")
    model_path = Path(config.tokenizer_model or data_dir / f"tok{config.vocab_size}.model")
    if not model_path.is_file():
        fail(f"tokenizer {model_path} not found; run `python arianna_data.py train_vocab "
             f"--vocab_size={config.vocab_size}` first")
    return model_path, data_dir / f"tok{config.vocab_size}"


def iter_pieces(corpus_path: Path, val_fraction: float) -> Iterator[tuple[str, bool]]:
    """(text, is_validation) for every piece of text that starts with BOS: the documents, or the two halves of a
    single document."""
    hashes = [document_hash(document) for document in iter_corpus_documents(corpus_path)]
    if not hashes:
        fail(f"{corpus_path} holds no documents; run `python arianna_data.py prepare` again")
    if len(hashes) == 1:
        train_text, val_text = split_single_document(next(iter_corpus_documents(corpus_path)), val_fraction)
        yield train_text, False
        yield val_text, True
        return
    val_indices = choose_validation_documents(hashes, val_fraction)
    for index, document in enumerate(iter_corpus_documents(corpus_path)):
        yield document, index in val_indices


def iter_chunks(pieces: Iterator[tuple[str, bool]], chunk_chars: int) -> Iterator[list[tuple[str, bool]]]:
    """Consecutive pieces grouped into chunks of about chunk_chars characters (the unit of work of one worker task)."""
    chunk: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[0])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def iter_encoded_chunks(chunks: Iterator[list[tuple[str, bool]]], model_path: Path,
                        num_workers: int) -> Iterator[tuple[list[tuple[str, bool]], list[np.ndarray]]]:
    """(chunk, its token arrays) in corpus order. With workers, at most 2 tasks per worker are in flight, so memory
    stays bounded however large the corpus (Pool.imap would read the whole corpus ahead)."""
    if num_workers <= 1:
        _init_worker(str(model_path), encode_threads=-1)  # SentencePiece spreads one batch over all cores
        for chunk in chunks:
            yield chunk, _encode_texts([text for text, _ in chunk])
        return
    with multiprocessing.Pool(num_workers, initializer=_init_worker, initargs=(str(model_path), 1)) as pool:
        in_flight: collections.deque = collections.deque()
        for chunk in chunks:
            in_flight.append((chunk, pool.apply_async(_encode_texts, ([text for text, _ in chunk],))))
            if len(in_flight) >= 2 * num_workers:
                done_chunk, result = in_flight.popleft()
                yield done_chunk, result.get()
        while in_flight:
            done_chunk, result = in_flight.popleft()
            yield done_chunk, result.get()


def pretokenize(config: PretokenizeConfig) -> Path:
    if not 0 < config.val_fraction < 1:
        fail(f"--val_fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    if config.shard_tokens <= 0 or config.chunk_chars <= 0:
        fail("--shard_tokens and --chunk_chars must be positive")
    data_dir = Path(config.data_dir)
    corpus_path = corpus_path_checked(data_dir)
    model_path, out_dir = resolve_tokenizer(config, data_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    check_vocab_fits_uint16(sp.vocab_size(), f"{model_path} ({sp.vocab_size()} tokens)")
    if config.vocab_size > 0 and sp.vocab_size() != config.vocab_size:
        fail(f"{model_path} has {sp.vocab_size()} tokens, not --vocab_size={config.vocab_size}; "
             f"run `python arianna_data.py train_vocab --vocab_size={config.vocab_size}` again")
    num_workers = config.num_workers
    if num_workers <= 0:  # a pool costs more than it saves on small corpora
        num_workers = 1 if corpus_path.stat().st_size < 8 * config.chunk_chars else (os.cpu_count() or 1)

    # Shards are written into a fresh folder and swapped in at the end: a crash never leaves a half-written set.
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    writers = {False: ShardWriter(tmp_dir, "train", config.shard_tokens),
               True: ShardWriter(tmp_dir, "val", config.shard_tokens)}
    try:
        chunks = iter_chunks(iter_pieces(corpus_path, config.val_fraction), config.chunk_chars)
        for chunk, encoded in iter_encoded_chunks(chunks, model_path, num_workers):
            for (text, is_val), tokens in zip(chunk, encoded):
                writers[is_val].write(tokens, len(text.encode("utf-8")))
        for writer in writers.values():
            writer.close()
        train, val = writers[False], writers[True]
        meta = {
            "vocab_size": sp.vocab_size(), "tokenizer_model": str(model_path),
            "train_tokens": train.n_tokens, "val_tokens": val.n_tokens,
            "train_bytes": train.n_bytes, "val_bytes": val.n_bytes,
            "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
            "train_documents": train.n_documents, "val_documents": val.n_documents,
            "train_shards": [path.name for path in train.paths], "val_shards": [path.name for path in val.paths],
        }
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        old_dir = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old_dir, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old_dir)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    finally:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"wrote {out_dir}: train {train.n_tokens} tokens ({train.n_documents} documents, {len(train.paths)} shards), "
          f"val {val.n_tokens} tokens ({val.n_documents} documents, {len(val.paths)} shards), with {model_path}")
    return out_dir


# ----------------------------------------------------------------------------- command line

COMMANDS = {
    "prepare": (PrepareConfig, prepare, "gather doc/**/*.md into data/arianna_corpus.txt"),
    "train_vocab": (TrainVocabConfig, train_vocab, "train a SentencePiece BPE tokenizer data/tok{N}.model"),
    "pretokenize": (PretokenizeConfig, pretokenize, "tokenize the corpus into uint16 train/val shards"),
}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare markdown for training: corpus, tokenizer, token shards.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (config_class, _, help_text) in COMMANDS.items():
        add_config_arguments(
            subparsers.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter),
            config_class)
    args = vars(parser.parse_args(argv))
    config_class, command, _ = COMMANDS[args.pop("command")]
    command(config_class(**args))


if __name__ == "__main__":
    main()
