"""The toolkit's file formats in one place: atomic writes, the model .bin header, reading markdown.

Every output file (checkpoints, model and tokenizer .bin, corpus, dialogs, saved chats) goes through
atomic_write: a temp file with a unique name beside the target, flushed to disk, then renamed over it.
A reader never sees half a file, and on any exception (Ctrl-C included) the temp file is removed and the
target left as it was.

The model .bin header (the full layouts are in export.py's docstring): version 0 is llama2.c's seven int32
(vocab_size negative when the classifier is not shared); versions 1 and 2 start with the magic "ak42" and
the version, then the seven int32, a shared-classifier byte and (version 2) the Q8_0 group size, zero-padded
to 256 bytes; a model whose RoPE base or RMSNorm epsilon differ from Llama 2's (10000, 1e-5) keeps them in that
padding as float32 at bytes 44 and 48 (zero there: the default, so llama2.c, which skips the padding, loads every
file of a default model). Version 0 cannot carry them. ModelHeader packs it, parse_model_header reads and checks it as run.c does.

Files are opened without blocking and refused unless regular: a FIFO given as a model or a markdown file
would otherwise wait forever for a writer.

    python formats.py out/model.bin [seq_len]    # a model's header (or one field of it)
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import re
import secrets
import stat
import struct
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, BinaryIO, Callable, Iterator, Optional

# ----------------------------------------------------------------------------- reading and writing files


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """path opened for binary reading; OSError if it is missing, unreadable or not a regular file. The open does
    not block, so a FIFO is refused rather than waited on."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file but a FIFO, socket or device", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike) -> bytes:
    with open_regular_file(path) as f:
        return f.read()


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: Optional[str] = None,
                 newline: Optional[str] = None) -> Iterator[IO]:
    """Write path through a uniquely named temp file in its folder (never clobbering a file of the user's): on
    leaving the block without an exception the temp file is flushed, fsynced and renamed over path; on any
    exception, KeyboardInterrupt included, it is removed and path keeps its old content."""
    path = Path(path)
    while True:
        tmp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:  # O_EXCL: the name is ours alone; 0o666 minus the umask, as open() would give path itself
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """atomic_write for bytes already in memory."""
    with atomic_write(path) as f:
        f.write(data)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable where the system allows it (POSIX; not Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the model .bin header

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32 (the file's first bytes are "24ka")
HEADER_BYTES = 256  # versions 1 and 2
LEGACY_HEADER_BYTES = 28  # version 0: seven int32
VERSIONS = (0, 1, 2)
DEFAULT_ROPE_THETA, DEFAULT_NORM_EPS = 10000.0, 1e-5
ROPE_THETA_AT, NORM_EPS_AT = 44, 48  # float32 in the padding of versions 1 and 2, zero for the default
# run.c's limits: far above any model it can run, low enough that its size arithmetic cannot overflow.
LIMITS = dict(dim=1 << 16, hidden_dim=1 << 18, n_layers=1024, n_heads=1024, vocab_size=1 << 22, seq_len=1 << 20)


class FormatError(ValueError):
    """A file that is not what it should be; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class ModelHeader:
    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # positive; version 0 stores it negated when the classifier is not shared
    seq_len: int
    shared_classifier: bool
    group_size: int = 0  # version 2 only
    rope_theta: float = DEFAULT_ROPE_THETA  # versions 1 and 2 only, where not the default
    norm_eps: float = DEFAULT_NORM_EPS

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def header_bytes(self) -> int:
        return HEADER_BYTES if self.version else LEGACY_HEADER_BYTES

    def pack(self) -> bytes:
        vocab = self.vocab_size if self.version or self.shared_classifier else -self.vocab_size
        ints = struct.pack("<7i", self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, vocab,
                           self.seq_len)
        extras = {ROPE_THETA_AT: (self.rope_theta, DEFAULT_ROPE_THETA), NORM_EPS_AT: (self.norm_eps, DEFAULT_NORM_EPS)}
        if self.version == 0:
            if self.rope_theta != DEFAULT_ROPE_THETA or self.norm_eps != DEFAULT_NORM_EPS:
                raise FormatError(f"version 0 (llama2.c's legacy header) cannot carry rope_theta={self.rope_theta:g} "
                                  f"and norm_eps={self.norm_eps:g} (only 10000 and 1e-05); export version 1 or 2")
            return ints
        header = struct.pack("<Ii", MAGIC, self.version) + ints + struct.pack("<B", int(self.shared_classifier))
        if self.version == 2:
            header += struct.pack("<i", self.group_size)
        header = bytearray(header.ljust(HEADER_BYTES, b"\0"))
        for offset, (value, default) in extras.items():
            if value != default:
                struct.pack_into("<f", header, offset, value)
        return bytes(header)

    def file_size(self) -> int:
        """The bytes a file with this header holds: header, norms, matrices (int8 + a float32 scale per group in
        version 2), version 0's RoPE tables."""
        dim, layers, vocab = self.dim, self.n_layers, self.vocab_size
        per_layer = dim * dim * 2 + dim * self.kv_dim * 2 + dim * self.hidden_dim * 3  # wq wo, wk wv, w1 w2 w3
        norms = layers * dim * 2 + dim
        classifier = 0 if self.shared_classifier else vocab * dim
        values = vocab * dim + layers * per_layer + classifier
        if self.version == 2:
            return HEADER_BYTES + norms * 4 + values + values // self.group_size * 4
        rope = self.seq_len * self.head_size if self.version == 0 else 0
        return self.header_bytes + 4 * (norms + values + rope)

    def check(self, path: str | os.PathLike) -> None:
        """FormatError unless run.c would accept these dimensions."""
        if any(not 0 < getattr(self, name) <= limit for name, limit in LIMITS.items()) or self.n_kv_heads <= 0:
            raise FormatError(
                f"{path}: implausible model header (dim={self.dim} hidden_dim={self.hidden_dim} "
                f"n_layers={self.n_layers} n_heads={self.n_heads} n_kv_heads={self.n_kv_heads} "
                f"vocab_size={self.vocab_size} seq_len={self.seq_len}): not a model .bin, or corrupt; "
                "re-export it with export.py")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or self.head_size % 2:
            raise FormatError(
                f"{path}: inconsistent heads (dim={self.dim} n_heads={self.n_heads} n_kv_heads={self.n_kv_heads}: "
                "dim must divide by n_heads into an even head size, n_heads by n_kv_heads); the file is corrupt, "
                "re-export it")
        if not (0 < self.rope_theta < math.inf and 0 < self.norm_eps < 1):
            raise FormatError(f"{path}: corrupt header (rope_theta={self.rope_theta:g}, norm_eps={self.norm_eps:g}: "
                              "a positive base and an epsilon in (0, 1) expected); re-export it")
        if self.version == 2 and (self.group_size <= 0 or self.dim % self.group_size
                                  or self.hidden_dim % self.group_size):
            raise FormatError(
                f"{path}: Q8_0 group size {self.group_size} does not divide dim={self.dim} and "
                f"hidden_dim={self.hidden_dim}; the file is corrupt, re-export it")


def parse_model_header(head: bytes, path: str | os.PathLike) -> ModelHeader:
    """The header at the start of a model file (head: its first HEADER_BYTES bytes, or all of a shorter file),
    checked as run.c checks it."""
    if len(head) < LEGACY_HEADER_BYTES:
        raise FormatError(f"{path}: file of {len(head)} bytes is too short for a model header; "
                          "export one with `python export.py`")
    if struct.unpack_from("<I", head)[0] == MAGIC:
        if len(head) < HEADER_BYTES:
            raise FormatError(f"{path}: truncated header ({len(head)} of {HEADER_BYTES} bytes); re-export it")
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in VERSIONS[1:]:
            raise FormatError(f"{path}: model file version {version} is not supported (this toolkit reads "
                              f"{', '.join(map(str, VERSIONS))}); re-export it with export.py")
        dims = struct.unpack_from("<7i", head, 8)
        if head[36] > 1:
            raise FormatError(f"{path}: corrupt header (shared_classifier byte is {head[36]}); re-export it")
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        rope_theta, norm_eps = (struct.unpack_from("<f", head, at)[0] for at in (ROPE_THETA_AT, NORM_EPS_AT))
        header = ModelHeader(version, *dims, shared_classifier=bool(head[36]), group_size=group_size,
                             rope_theta=rope_theta or DEFAULT_ROPE_THETA, norm_eps=norm_eps or DEFAULT_NORM_EPS)
    else:
        dims = struct.unpack_from("<7i", head)
        header = ModelHeader(0, *dims[:5], abs(dims[5]), dims[6], shared_classifier=dims[5] > 0)
    header.check(path)
    return header


def read_model_header(path: str | os.PathLike) -> ModelHeader:
    """The checked header of a model .bin whose size matches it; FormatError (one line) otherwise."""
    try:
        with open_regular_file(path) as f:
            head, size = f.read(HEADER_BYTES), os.fstat(f.fileno()).st_size
    except OSError as e:
        raise FormatError(f"cannot read model {path}: {e.strerror or e}") from None
    header = parse_model_header(head, path)
    check_model_size(header, size, path)
    return header


def check_model_size(header: ModelHeader, size: int, path: str | os.PathLike) -> None:
    expected = header.file_size()
    if size != expected:
        raise FormatError(f"{path}: file is {size} bytes but its version {header.version} header (dim={header.dim}, "
                          f"{header.n_layers} layers, vocab {header.vocab_size}) implies {expected}: truncated or "
                          "corrupt, re-export it")


# ----------------------------------------------------------------------------- markdown

MARKDOWN_SUFFIXES = (".md", ".markdown")
# Front matter: an opening fence line at the very top, anything, then the closing fence line (YAML --- or TOML +++).
FRONT_MATTER = re.compile(r"\A(?:---[ \t]*\n(?:.*?\n)?(?:---|\.\.\.)|\+\+\+[ \t]*\n(?:.*?\n)?\+\+\+)[ \t]*(?:\n|\Z)",
                          re.DOTALL)
# Control characters other than tab and line endings: not text.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def find_markdown_files(doc_dir: Path) -> list[Path]:
    """Every .md/.markdown path under doc_dir (not folders), ordered by relative path so output is stable."""
    found = [path for path in doc_dir.rglob("*")
             if path.suffix.lower() in MARKDOWN_SUFFIXES and not path.is_dir()]
    return sorted(found, key=lambda path: path.relative_to(doc_dir).parts)


def strip_front_matter(text: str) -> str:
    """Drop a YAML (--- ... ---) or TOML (+++ ... +++) block at the very top, and the blank lines after it."""
    match = FRONT_MATTER.match(text)
    return text[match.end():].lstrip("\n") if match else text


def read_markdown(path: Path, warn: Callable[[str], None],
                  reserved: Optional[tuple[str, str]] = None) -> tuple[Optional[str], str]:
    """(text, "") or (None, why the file is skipped). The text is UTF-8 decoded (a BOM dropped), with LF line
    endings, no front matter and no control characters but tab and newline (their removal is reported through
    warn). reserved: (character, what uses it): a file containing it is skipped."""
    try:
        raw = read_regular_file(path)
    except OSError as error:
        return None, f"cannot read it ({error.strerror or error}); check that it exists and is readable"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start}); re-save it as UTF-8"
    if reserved and reserved[0] in text:
        character, use = reserved
        offset = len(text[:text.index(character)].encode("utf-8"))
        return None, (f"contains the control character U+{ord(character):04X} (at byte {offset}), which {use}; "
                      "remove it")
    control = CONTROL.search(text)
    if control:
        text, count = CONTROL.subn("", text)
        offset = len(text[:control.start()].encode("utf-8"))
        warn(f"{path}: removed {count} control character{'s' if count != 1 else ''} "
             f"(the first U+{ord(control.group()):04X} at byte {offset}); they are not text")
    return strip_front_matter(text.replace("\r\n", "\n").replace("\r", "\n")), ""


# ----------------------------------------------------------------------------- command line

def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Print a model .bin's header, checked as run.c checks it.")
    parser.add_argument("model", help="model .bin written by export.py")
    parser.add_argument("field", nargs="?", choices=[f.name for f in fields(ModelHeader)],
                        help="print only this field's value")
    args = parser.parse_args(argv)
    try:
        header = read_model_header(args.model)
    except FormatError as e:
        sys.exit(f"error: {e}")
    values = asdict(header)
    print(values[args.field] if args.field else "\n".join(f"{name}={value}" for name, value in values.items()))


if __name__ == "__main__":
    main()
