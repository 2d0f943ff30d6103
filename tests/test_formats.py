"""formats.py: atomic writes, the model .bin header (Python agrees with run.c on the fuzz seeds and their
corruptions, under the sanitizers), and the bad-file paths of the tools that read files."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import formats  # noqa: E402
from export import export_model, read_model_bin  # noqa: E402
from formats import FormatError, ModelHeader  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SEEDS = REPO / "fuzz" / "seeds"
SANITIZER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ASAN_OPTIONS": "detect_leaks=1",
                 "UBSAN_OPTIONS": "print_stacktrace=1"}


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_the_file_and_leaves_the_users_tmp_alone(tmp_path: Path):
    target, users = tmp_path / "chat.json", tmp_path / "chat.json.tmp"
    users.write_text("the user's own file", encoding="utf-8")
    with formats.atomic_write(target, "w", encoding="utf-8") as f:
        f.write("first")
    with formats.atomic_write(target) as f:
        f.write(b"second")
    assert target.read_bytes() == b"second"
    assert users.read_text(encoding="utf-8") == "the user's own file"
    assert listing(tmp_path) == ["chat.json", "chat.json.tmp"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it, not mkstemp's 0600


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt(), SystemExit(1)])
def test_atomic_write_removes_the_temp_file_on_any_exception(tmp_path: Path, error: BaseException):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with formats.atomic_write(target) as f:
            f.write(b"half a fi")
            raise error
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["model.bin"]
    with pytest.raises(IsADirectoryError):  # the rename itself fails: the temp file goes too
        with formats.atomic_write(tmp_path) as f:
            f.write(b"x")
    assert listing(tmp_path) == ["model.bin"]


# ----------------------------------------------------------------------------- the model .bin header

def tiny_model(n_layers: int = 1, shared: bool = True) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, hidden_dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=40,
                                  max_seq_len=16))
    if not shared:
        model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight))
    return model


@pytest.mark.parametrize("version", formats.VERSIONS)
@pytest.mark.parametrize("shared", [True, False])
def test_header_packs_what_it_parses_and_predicts_the_file_size(tmp_path: Path, version: int, shared: bool):
    path = export_model(tiny_model(shared=shared), tmp_path / "m.bin", version=version, group_size=16)
    header = formats.read_model_header(path)
    assert header == ModelHeader(version, 32, 64, 1, 4, 2, 40, 16, shared, 16 if version == 2 else 0)
    assert path.read_bytes()[:header.header_bytes] == header.pack()
    assert header.file_size() == path.stat().st_size


def header_bytes(version: int = 1, **fields) -> bytes:
    values = dict(version=version, dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=40,
                  seq_len=16, shared_classifier=True, group_size=16 if version == 2 else 0)
    return ModelHeader(**{**values, **fields}).pack()


@pytest.mark.parametrize("data, message", [
    (b"", "file of 0 bytes is too short"),
    (header_bytes()[:100], "truncated header (100 of 256 bytes)"),
    (header_bytes()[:4] + struct.pack("<i", 3) + header_bytes()[8:], "model file version 3 is not supported"),
    (header_bytes()[:36] + b"\x02" + header_bytes()[37:], "shared_classifier byte is 2"),
    (header_bytes(n_heads=0), "implausible model header"),
    (header_bytes(version=0, n_kv_heads=0), "implausible model header"),
    (header_bytes(dim=-32), "implausible model header"),
    (header_bytes(version=0, vocab_size=-(1 << 31)), "implausible model header"),
    (header_bytes(n_heads=3), "inconsistent heads"),
    (header_bytes(n_heads=32), "inconsistent heads"),  # head size 1: RoPE needs pairs
    (header_bytes(version=2, group_size=0), "Q8_0 group size 0"),
    (header_bytes(version=2, group_size=48), "Q8_0 group size 48"),
])
def test_bad_headers_are_one_line_errors(tmp_path: Path, data: bytes, message: str):
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    for read in (formats.read_model_header, read_model_bin):
        with pytest.raises(FormatError) as error:
            read(path)
        assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_read_model_bin_refuses_a_wrong_size_and_non_files(tmp_path: Path):
    path = export_model(tiny_model(), tmp_path / "m.bin", version=2, group_size=16)
    data = path.read_bytes()
    for size in (len(data) - 1, len(data) + 4):
        path.write_bytes((data + bytes(4))[:size])
        with pytest.raises(FormatError, match=rf"file is {size} bytes but its version 2 header .* implies {len(data)}"):
            read_model_bin(path)
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)
    for read in (formats.read_model_header, read_model_bin):  # refused at once, not waiting for a writer
        with pytest.raises(FormatError, match="not a regular file"):
            read(fifo)
        with pytest.raises(FormatError, match="is a folder"):
            read(tmp_path)


def test_header_command_line(tmp_path: Path):
    path = export_model(tiny_model(), tmp_path / "m.bin", version=0)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "formats.py"), *args], capture_output=True, text=True,
                              timeout=60)

    assert run(str(path), "seq_len").stdout == "16\n"
    assert "vocab_size=40\nseq_len=16\nshared_classifier=True" in run(str(path)).stdout
    path.write_bytes(path.read_bytes()[:-1])
    failed = run(str(path), "seq_len")
    assert failed.returncode != 0 and failed.stderr.count("\n") == 1 and "truncated or corrupt" in failed.stderr


# ----------------------------------------------------------------------------- fuzz seeds, run.c and Python

@pytest.fixture(scope="module")
def rundebug() -> Path:
    binary = REPO / "rundebug"  # `make test` builds it; make itself takes seconds here even when nothing changed
    if not binary.exists() or binary.stat().st_mtime < (REPO / "run.c").stat().st_mtime:
        subprocess.run(["make", "-s", "rundebug"], cwd=REPO, check=True, capture_output=True)
    return binary


def seed(name: str) -> bytes:
    """A seed file without its first byte (which picks the loader in fuzz/fuzz_loaders.c)."""
    return (SEEDS / name).read_bytes()[1:]


def tokenizer_with(n_tokens: int) -> bytes:
    """The first n_tokens entries of the tokenizer seed, as a tokenizer .bin."""
    data = seed("tokenizer")
    offset = 4
    for _ in range(n_tokens):
        offset += 8 + struct.unpack_from("<i", data, offset + 4)[0]
    return data[:offset]


def corruptions(data: bytes) -> dict[str, bytes]:
    """The file itself and damaged copies: truncated, lengthened, each header field set to a bad value."""
    magic = struct.unpack_from("<I", data)[0] == formats.MAGIC
    ints = 8 if magic else 0  # where the seven int32 start

    def put(offset: int, fmt: str, value: int) -> bytes:
        return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]

    cases = {"as is": data, "one byte short": data[:-1], "one byte more": data + b"\0", "half": data[:len(data) // 2],
             "27 bytes": data[:27], "dim 0": put(ints, "<i", 0), "dim 33": put(ints, "<i", 33),
             "hidden -1": put(ints + 4, "<i", -1), "no layers": put(ints + 8, "<i", 0),
             "heads 0": put(ints + 12, "<i", 0), "heads 3": put(ints + 12, "<i", 3),
             "kv heads 0": put(ints + 16, "<i", 0), "vocab INT_MIN": put(ints + 20, "<i", -(1 << 31)),
             "vocab 4M+1": put(ints + 20, "<i", (1 << 22) + 1), "seq_len 2^21": put(ints + 24, "<i", 1 << 21),
             "seq_len 2": put(ints + 24, "<i", 2)}
    if magic:
        cases.update({"100 bytes": data[:100], "version 3": put(4, "<i", 3), "version 0": put(4, "<i", 0),
                      "shared 2": put(36, "<B", 2), "not shared": put(36, "<B", 0),
                      "group 0": put(37, "<i", 0), "group 8": put(37, "<i", 8)})
    else:
        cases["vocab negative"] = put(20, "<i", -struct.unpack_from("<i", data, 20)[0])
    return cases


def test_fuzz_seeds_and_their_corruptions_python_agrees_with_run_c_under_sanitizers(rundebug: Path, tmp_path: Path):
    """Every model seed and damaged copies of it through ./rundebug (ASan + UBSan) and export.read_model_bin: no
    sanitizer report, a clean one-line error or a generated text, and Python accepts exactly what run.c accepts."""
    tokenizer = tmp_path / "tok32.bin"
    tokenizer.write_bytes(tokenizer_with(32))  # the seeds' vocabulary
    model = tmp_path / "model.bin"
    accepted = 0
    for name in sorted(path.name for path in SEEDS.glob("model_*")):
        for case, data in corruptions(seed(name)).items():
            model.write_bytes(data)
            result = subprocess.run([str(rundebug), str(model), "-z", str(tokenizer), "-n", "2", "-t", "0"],
                                    capture_output=True, timeout=60, env=SANITIZER_ENV)
            stderr = result.stderr.decode(errors="replace")
            label = f"{name}, {case}: {stderr}"
            assert "Sanitizer" not in stderr and "runtime error" not in stderr, label
            assert result.returncode in (0, 1), label
            if result.returncode == 1:
                assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:"), label
            try:
                read_model_bin(model)
                python_accepts = True
            except FormatError as error:
                python_accepts = False
                assert "\n" not in str(error) and str(model) in str(error), label
            assert python_accepts == (result.returncode == 0), label
            accepted += python_accepts
    assert accepted >= 6  # at least every seed as is


def test_tokenizer_seed_and_its_corruptions_fail_cleanly_under_sanitizers(rundebug: Path, tmp_path: Path):
    model, tokenizer = tmp_path / "model.bin", tmp_path / "tok.bin"
    model.write_bytes(seed("model_v1"))
    whole, first32 = seed("tokenizer"), tokenizer_with(32)
    cases = {"32 tokens": (first32, 0), "300 tokens for a 32-token model": (whole, 1),
             "truncated": (first32[:-1], 1), "no tokens": (first32[:4], 1),
             "max length 0": (b"\0" * 4 + first32[4:], 1),
             "negative length": (first32[:8] + struct.pack("<i", -5) + first32[12:], 1),
             "length past the end": (first32[:8] + struct.pack("<i", 1 << 20) + first32[12:], 1)}
    for case, (data, returncode) in cases.items():
        tokenizer.write_bytes(data)
        result = subprocess.run([str(rundebug), str(model), "-z", str(tokenizer), "-n", "4", "-t", "0"],
                                capture_output=True, timeout=60, env=SANITIZER_ENV)
        stderr = result.stderr.decode(errors="replace")
        assert "Sanitizer" not in stderr and "runtime error" not in stderr, (case, stderr)
        assert result.returncode == returncode, (case, stderr)
        if returncode:
            assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:"), (case, stderr)


def test_run_refuses_a_fifo_at_once(rundebug: Path, tmp_path: Path):
    fifo, tokenizer = tmp_path / "model.bin", tmp_path / "tok.bin"
    os.mkfifo(fifo)
    tokenizer.write_bytes(tokenizer_with(32))
    result = subprocess.run([str(rundebug), str(fifo), "-z", str(tokenizer)], capture_output=True, text=True,
                            timeout=30, env=SANITIZER_ENV)
    assert result.returncode == 1 and result.stderr == f"error: model {fifo}: not a regular file\n"


# ----------------------------------------------------------------------------- chat.py with bad files

def chat_model(folder: Path) -> tuple[Path, Path]:
    """The version 1 model seed with a 256-token context (its file size does not depend on it), and its tokenizer."""
    data = seed("model_v1")
    model, tokenizer = folder / "model.bin", folder / "tok32.bin"
    model.write_bytes(data[:32] + struct.pack("<i", 256) + data[36:])
    tokenizer.write_bytes(tokenizer_with(32))
    return model, tokenizer


def run_chat(args: list[str], stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "chat.py"), *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(cwd)})


def test_chat_load_of_a_bad_file_is_one_line_and_keeps_the_conversation(tmp_path: Path):
    model, tokenizer = chat_model(tmp_path)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    (tmp_path / "digits.json").write_text('{"messages": [], "n": ' + "7" * 5000 + "}", encoding="utf-8")
    (tmp_path / "surrogate.json").write_text(json.dumps({"messages": [
        {"role": "user", "content": "a\ud800"}, {"role": "assistant", "content": "b"}]}), encoding="utf-8")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "saved.json.tmp").write_text("mine", encoding="utf-8")
    commands = ["/load deep.json", "/load digits.json", "/load surrogate.json", "/load fifo.json", "/save saved.json"]
    result = run_chat([str(model), "-t", "0", "-n", "3"], "hello\n" + "\n".join(commands) + "\n", tmp_path)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, result.stderr
    assert "deep.json nests too deeply" in errors[0] and "Exceeds the limit" in errors[1], errors
    assert "message 1 holds a lone surrogate ('\\ud800')" in errors[2], errors
    assert "cannot read fifo.json: not a regular file" in errors[3], errors
    saved = json.loads((tmp_path / "saved.json").read_text(encoding="utf-8"))
    assert [message["role"] for message in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"] == "hello"
    assert (tmp_path / "saved.json.tmp").read_text(encoding="utf-8") == "mine"
    assert sorted(path.name for path in tmp_path.iterdir() if ".tmp" in path.name) == ["saved.json.tmp"]


def test_chat_refuses_fifos_at_once(tmp_path: Path):
    model, tokenizer = chat_model(tmp_path)
    os.mkfifo(tmp_path / "fifo.bin")
    os.mkfifo(tmp_path / "tok1.bin")  # tried (and passed over) while looking for the tokenizer
    for args, message in (([str(tmp_path / "fifo.bin")], "model"), ([str(model), "-z", str(tmp_path / "fifo.bin")],
                                                                     "tokenizer")):
        result = run_chat(args, "hello\n", tmp_path)
        assert result.returncode != 0
        assert result.stderr.startswith(f"error: {message} {tmp_path / 'fifo.bin'} is not a regular file;")
    found = run_chat([str(model), "-t", "0", "-n", "2"], "hello\n", tmp_path)
    assert found.returncode == 0 and found.stderr == "", found.stderr
