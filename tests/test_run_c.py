"""run.c against the PyTorch model and SentencePiece: greedy output, the encoder, the chat template, bad input.

Builds ./run, ./rundebug and ./runsan (ASan + UBSan, portable, and dispatching + OpenMP) and librun.so with make, trains a tiny SentencePiece model and
a tiny Transformer (briefly, so its greedy choices are not coin flips), exports it in all three .bin
versions and drives the binary and the library.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import random
import re
import struct
import subprocess
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chat import SamplerSettings  # noqa: E402
from export import export_model, q80_group_size, read_model_bin  # noqa: E402
from formats import FormatError  # noqa: E402
from model import ModelArgs, Sampling, Transformer, next_token_probs  # noqa: E402
from tokenizer import Tokenizer, encode_dialog  # noqa: E402

LLAMA2_TOKENIZER = REPO.parent / "shared" / "llama2" / "tokenizer.model"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}

CORPUS_LINES = [
    "Модель учится на тексте автора и говорит его языком.",
    "Резонанс возникает, когда частота толчков совпадает с собственной частотой системы.",
    "The model learns from its author's text and speaks in that voice.",
    "A tokenizer cuts text into pieces that the model sees as numbers 12345.",
    "def train(steps: int) -> float:\n    loss = 0.0\n    for step in range(steps):\n        loss += step * 0.5",
    "for (int i = 0; i < n; i++) {\n    out[i] = x[i] * w[i];\n}",
    "<|user|>\nКак дела?\n<|assistant|>\nХорошо, спасибо.",
    "<|system|>\nYou are Arianna.\n<|user|>\nWho are you?\n<|assistant|>\nI am a small model.",
]


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def built() -> Path:
    subprocess.run(["make", "-s", "run", "rundebug", "runsan", "librun.so"], cwd=REPO, check=True, capture_output=True)
    return REPO


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run_c")


@pytest.fixture(scope="session")
def tokenizer_files(workdir) -> tuple[Path, Path]:
    """A ~400-token BPE SentencePiece model trained as arianna_data.py trains one, and its llama2.c .bin."""
    rng = random.Random(0)
    lines = [rng.choice(CORPUS_LINES) + " " + rng.choice(CORPUS_LINES) for _ in range(400)]
    model_path = workdir / "tok.model"
    with open(model_path, "wb") as out:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=400, byte_fallback=True,
            character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, minloglevel=2, num_threads=1)
    return model_path, Tokenizer(model_path).export(workdir / "tok.bin")


@pytest.fixture(scope="session")
def tiny_model(tokenizer_files) -> Transformer:
    """A 2-layer model with grouped-query attention, trained 100 steps on the corpus so its argmax is clear."""
    torch.manual_seed(0)
    tokenizer = Tokenizer(tokenizer_files[0])
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words, max_seq_len=96)
    model = Transformer(args)
    data = []
    for line in CORPUS_LINES * 8:
        data += tokenizer.encode(line, bos=True, eos=True)
    data = torch.tensor(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention on a busy machine
    for _ in range(100):
        starts = torch.randint(0, len(data) - 65, (16,))
        batch = torch.stack([data[s:s + 65] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def model_files(workdir, tiny_model) -> dict[int, Path]:
    return {v: export_model(tiny_model, workdir / f"model_v{v}.bin", version=v) for v in (0, 1, 2)}


class Engine:
    """librun.so through ctypes, the way chat.py uses it."""

    def __init__(self, lib: ctypes.CDLL, model: Path, tokenizer: Path, threads: int = 1):
        self.lib = lib
        err = ctypes.create_string_buffer(512)
        self.handle = lib.arianna_open(str(model).encode(), str(tokenizer).encode(), threads, err, len(err))
        if not self.handle:
            raise RuntimeError(err.value.decode())

    def close(self) -> None:
        self.lib.arianna_close(self.handle)

    def _ids(self, call, *args) -> list[int]:
        out = (ctypes.c_int * 16)()
        n = call(self.handle, *args, out, 16)
        if n < 0:
            out = (ctypes.c_int * -n)()
            n = call(self.handle, *args, out, -n)
        return list(out[:n])

    def encode(self, text: bytes | str, bos: bool = False, eos: bool = False) -> list[int]:
        raw = text.encode() if isinstance(text, str) else text
        return self._ids(self.lib.arianna_encode, raw, int(bos), int(eos))

    def chat_turn(self, system: str | None, user: str, first_turn: bool) -> list[int]:
        return self._ids(self.lib.arianna_chat_turn, system.encode() if system is not None else None, user.encode(),
                         int(first_turn))

    def logits(self, tokens: list[int], batch: bool) -> torch.Tensor:
        """The logits after feeding tokens from position 0, in one call or one token per call."""
        if batch:
            assert self.lib.arianna_feed(self.handle, (ctypes.c_int * len(tokens))(*tokens), len(tokens), 0) == 0
        else:
            for pos, token in enumerate(tokens):
                assert self.lib.arianna_feed(self.handle, (ctypes.c_int * 1)(token), 1, pos) == 0
        vocab = self.lib.arianna_vocab_size(self.handle)
        return torch.tensor(self.lib.arianna_logits(self.handle)[:vocab])

    def greedy(self, prompt: list[int], steps: int, pos: int = 0, batch: bool = True) -> list[int]:
        """Feeds prompt at pos, then generates greedily; returns the new tokens (stops at EOS)."""
        if batch:
            assert self.lib.arianna_feed(self.handle, (ctypes.c_int * len(prompt))(*prompt), len(prompt), pos) == 0
        else:
            for i, token in enumerate(prompt):
                assert self.lib.arianna_feed(self.handle, (ctypes.c_int * 1)(token), 1, pos + i) == 0
        pos += len(prompt)
        rng, out = ctypes.c_ulonglong(1), []
        for _ in range(steps):
            token = self.lib.arianna_sample(self.handle, ctypes.c_float(0.0), ctypes.c_float(0.9), ctypes.byref(rng))
            out.append(token)
            if token == self.lib.arianna_eos(self.handle):
                break
            assert self.lib.arianna_feed(self.handle, (ctypes.c_int * 1)(token), 1, pos) == 0
            pos += 1
        return out


def load_library(path: Path) -> ctypes.CDLL:
    """librun.so with the signatures of the functions the tests call."""
    library = ctypes.CDLL(str(path))
    library.arianna_open.restype = ctypes.c_void_p
    library.arianna_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.arianna_close.argtypes = [ctypes.c_void_p]
    for name in ("arianna_seq_len", "arianna_vocab_size", "arianna_bos", "arianna_eos"):
        getattr(library, name).argtypes = [ctypes.c_void_p]
    int_p = ctypes.POINTER(ctypes.c_int)
    library.arianna_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, int_p, ctypes.c_int]
    library.arianna_chat_turn.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, int_p,
                                          ctypes.c_int]
    library.arianna_feed.argtypes = [ctypes.c_void_p, int_p, ctypes.c_int, ctypes.c_int]
    library.arianna_sample.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_float,
                                       ctypes.POINTER(ctypes.c_ulonglong)]
    settings_p = ctypes.POINTER(SamplerSettings)
    library.arianna_sample_with.argtypes = [ctypes.c_void_p, settings_p, int_p, ctypes.c_int,
                                            ctypes.POINTER(ctypes.c_ulonglong)]
    library.arianna_distribution.argtypes = [ctypes.c_void_p, settings_p, int_p, ctypes.c_int,
                                             ctypes.POINTER(ctypes.c_float)]
    library.arianna_logits.restype = ctypes.POINTER(ctypes.c_float)
    library.arianna_logits.argtypes = [ctypes.c_void_p]
    library.arianna_decode.restype = ctypes.c_char_p
    library.arianna_decode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return library


@pytest.fixture(scope="session")
def lib(built) -> ctypes.CDLL:
    return load_library(built / "librun.so")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="session")
def kernel_builds(built, workdir) -> dict[str, ctypes.CDLL]:
    """librun.so as `make` builds it for this CPU, and with the int8 kernels it would pick on an AVX2 CPU without
    AVX-512, with and without AVX-VNNI, and on any other (the plain loop), so each kernel is checked wherever the
    tests run (the AVX-VNNI one where the CPU has some VNNI)."""
    builds = {"native": load_library(built / "librun.so")}
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags():
        warnings.warn("this CPU has no AVX-512 VNNI: the AVX-512 kernels are compared with PyTorch only on hosts "
                      "that have it; here the native build runs the AVX2 or plain ones")
    variants = {"portable": []}
    if "avx2" in cpu_flags():
        variants["avx2"] = ["-march=x86-64-v3"]  # AVX2, FMA, F16C, BMI2: the level of an AVX2-only CPU
    # AVX2 with AVX-VNNI's vpdpbusd; where the CPU has only AVX-512 VNNI, that extension's encoding of it
    if "avx_vnni" in cpu_flags():
        variants["avxvnni"] = ["-march=x86-64-v3", "-mavxvnni"]
    elif {"avx2", "avx512vl", "avx512_vnni"} <= cpu_flags():
        variants["avxvnni"] = ["-march=x86-64-v3", "-mavxvnni", "-DARIANNA_EVEX_VNNI"]
    for name, flags in variants.items():
        path = workdir / f"librun_{name}.so"
        subprocess.run(["cc", "-O3", "-std=gnu11", *flags, "-fopenmp", "-shared", "-fPIC", "-DARIANNA_LIBRARY", "-o",
                        str(path), str(REPO / "run.c"), "-lm"], check=True, capture_output=True)
        builds[name] = load_library(path)
    return builds


def torch_greedy(model: Transformer, prompt: list[int], steps: int, eos_id: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), steps, temperature=0.0, eos_id=eos_id)
    return out[0, len(prompt):].tolist()


def dequantized_model(path: Path) -> Transformer:
    _, args, state = read_model_bin(path)
    model = Transformer(args)
    model.load_state_dict(state)
    return model.eval()


def q80_reference_model(path: Path, flip: tuple[int, int] | None = None,
                        scaled: list[torch.Tensor] | None = None) -> Transformer:
    """The version 2 file's dequantized weights, each Linear's input rounded to Q8_0 first, as run.c rounds it: the
    engine's arithmetic in PyTorch. Each product's inputs over their scales (the values rounded) are appended to
    scaled; flip = (product call, flat index): that value is rounded the other way."""
    model = dequantized_model(path)
    group_size = q80_group_size(model.args, 64)  # what export_model chose
    calls: list[torch.Tensor] = [] if scaled is None else scaled

    def round_to_q80(module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        groups = inputs[0].unflatten(-1, (-1, group_size))
        scale = groups.abs().amax(-1, keepdim=True) / 127.0
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        values = groups * inverse
        rounded = values.round()  # half to even, as lrintf
        if flip is not None and flip[0] == len(calls):
            value = values.reshape(-1)[flip[1]]
            rounded.view(-1)[flip[1]] = value.floor() if rounded.view(-1)[flip[1]] > value else value.ceil()
        calls.append(values)
        return (rounded * scale).flatten(-2),

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(round_to_q80)
    return model


def int8_reference_logits(path: Path, tokens: list[int], flip: tuple[int, int] | None = None
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The last token's logits of q80_reference_model, and each product's scaled inputs."""
    scaled: list[torch.Tensor] = []
    model = q80_reference_model(path, flip, scaled)
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0, -1], scaled


def int8_error(got: torch.Tensor, path: Path, tokens: list[int]) -> float:
    """The relative error of run.c's logits against int8_reference_logits, or, where that is over 1e-4, the least
    error against the references with one value within 1e-4 of a rounding tie rounded the other way. The engine
    sums in another order than PyTorch, so such a value can round either way (measured: one flip moves the logits
    by ~2e-3; the flipped reference then matches to ~1e-7)."""
    def error(want: torch.Tensor) -> float:
        return ((got - want).abs().max() / want.abs().max()).item()

    want, scaled = int8_reference_logits(path, tokens)
    best = error(want)
    ties = []
    for call, values in enumerate(scaled):
        distance = (values - values.floor() - 0.5).abs().reshape(-1)
        ties += [(distance[i].item(), call, i) for i in (distance < 1e-4).nonzero().flatten().tolist()]
    for _, call, index in sorted(ties)[:8]:
        if best < 1e-4:
            break
        best = min(best, error(int8_reference_logits(path, tokens, (call, index))[0]))
    return best


def run_binary(binary: Path, *args: str, stdin: str | None = None, timeout: float = 60,
               env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], input=stdin.encode() if stdin is not None else None,
                          capture_output=True, timeout=timeout, env=ENV if env is None else env)


def varied_lines() -> list[str | bytes]:
    """A few hundred lines: Russian, English, code, emoji, whitespace runs, mixed scripts, invalid UTF-8."""
    rng = random.Random(1)
    pieces = ["Привет, мир!", "Hello, world!", "    return x  # comment", "\tindent\ttabs", "😀🚀 emoji ✨",
              "数字 123456 和 中文", "  leading", "trailing   ", "a  b   c    d", "\n\n", "ёЁ й", "x=1;y=2",
              "<|user|>", "▁literal▁", "ﬁ ligature", "", " ", "Ω≈ç√∫", "naïve café", "<s></s><unk>"]
    lines: list[str | bytes] = list(CORPUS_LINES) + pieces
    for _ in range(260):
        lines.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))))
    for _ in range(40):
        raw = bytearray(rng.choice(pieces).encode())
        raw.insert(rng.randint(0, len(raw)), rng.choice([0xFF, 0xC0, 0x80, 0xE2, 0xED, 0xF5]))
        lines.append(bytes(raw))
    lines += [b"\xe2\x96", b"\xed\xa0\x80 surrogate", b"\xc0\x80 overlong", b"\xef\xbf\xbd ok"]
    return lines


# ------------------------------------------------------------------------------------------------
# Tests


def test_encoder_matches_sentencepiece(lib, tokenizer_files, model_files):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_files[0]))
    engine = Engine(lib, model_files[1], tokenizer_files[1])
    try:
        for line in varied_lines():
            assert engine.encode(line) == sp.encode(line), repr(line)
        assert engine.encode("Hi", bos=True, eos=True) == [sp.bos_id()] + sp.encode("Hi") + [sp.eos_id()]
    finally:
        engine.close()


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason="no Llama 2 tokenizer at ../shared/llama2")
def test_encoder_matches_sentencepiece_llama2(lib, workdir):
    llama = Tokenizer(LLAMA2_TOKENIZER)
    tok_bin = llama.export(workdir / "llama2_tok.bin")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=llama.n_words, max_seq_len=8))
    model_bin = export_model(model, workdir / "llama2_vocab_model.bin", version=1)
    engine = Engine(lib, model_bin, tok_bin)
    try:
        for line in varied_lines():
            assert engine.encode(line) == llama.sp.encode(line), repr(line)
    finally:
        engine.close()


def printable(raw: bytes) -> bytes:
    """raw as ./run and chat.py write it: invalid UTF-8 replaced, control characters but newline and tab dropped."""
    text = raw.decode("utf-8", errors="replace")
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc").encode()


def expected_text(tokenizer_bin: Path, tokens: list[int]) -> bytes:
    """The bytes ./run prints for tokens (after the BOS): each piece decoded as llama2.c does, then printable."""
    data = tokenizer_bin.read_bytes()
    pieces, offset = [], 4
    while offset < len(data):
        length = struct.unpack_from("<i", data, offset + 4)[0]
        pieces.append(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    out = b""
    for prev, token in zip(tokens, tokens[1:]):
        piece = pieces[token]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        elif prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        out += piece
    return printable(out)


@pytest.mark.parametrize("kernels", ["native", "avxvnni", "avx2", "portable"])
@pytest.mark.parametrize("shape", [
    # head 24 (not a SIMD width), Q8_0 groups of 8, 72 rows (a partial block of 16), 3 kv heads that 2 threads
    # cannot split evenly, so each thread's rows of k and v start mid-block.
    dict(dim=72, n_heads=3, n_kv_heads=3),
    dict(dim=96, n_heads=6, n_kv_heads=2),  # grouped-query attention, Q8_0 groups of 32 as in shape B
    dict(dim=144, n_heads=3, n_kv_heads=3),  # head 48 as in shapes A and B: value passes of 3 vectors
    dict(dim=160, n_heads=2, n_kv_heads=1),  # head 80: two passes over the values' channels, 64 then 16
    dict(dim=100, n_heads=2, n_kv_heads=2),  # rows of 100 (a partial vector at the end), Q8_0 groups of 4
])
def test_logits_match_pytorch_for_batches_and_threads(shape, kernels, kernel_builds, workdir, tokenizer_files):
    """Logits after 150-, 131- and 64-token prompts (batches of 75 and 75, 65 and 66, and one of 64, whose attention
    takes the tokens 4 at a time and then 3, 1, 2 or none; the first fills the 150-position context, whose last keys
    sit in a partial block of 16) against PyTorch, fed as a batch and token by token, on 1 and 2 threads (and 3 for
    a batch), through 1 and 2 layers. Version 2 is compared with its dequantized weights applied to inputs rounded
    to Q8_0 as the engine rounds them (int8_error). Threads split or share out rows and heads, which changes no sum;
    the int8 kernels, and attention, do the same arithmetic per row and token in both feeding modes: those must
    agree bit for bit."""
    if kernels not in kernel_builds:
        pytest.skip(f"this CPU cannot run the {kernels} build")
    lib = kernel_builds[kernels]
    torch.manual_seed(1)
    vocab = Tokenizer(tokenizer_files[0]).n_words
    prompts = [torch.randint(3, vocab, (length,)).tolist() for length in (150, 131, 64)]
    for n_layers in (1, 2):
        model = Transformer(ModelArgs(**shape, n_layers=n_layers, vocab_size=vocab, max_seq_len=150)).eval()
        for version, tokens in itertools.product((1, 2), prompts):
            path = export_model(model, workdir / f"shape{shape['dim']}_{n_layers}_v{version}.bin", version=version)
            got = {}
            # 3 threads on this 2-core machine: uneven shares, and a descheduled thread's items taken by the others
            for threads, batch in [*itertools.product((1, 2), (True, False)), (3, True)]:
                engine = Engine(lib, path, tokenizer_files[1], threads=threads)
                try:
                    got[threads, batch] = engine.logits(tokens, batch)
                finally:
                    engine.close()
            assert torch.equal(got[1, True], got[2, True]) and torch.equal(got[1, False], got[2, False]), version
            assert torch.equal(got[1, True], got[3, True]), version
            if version == 2:
                assert torch.equal(got[1, True], got[1, False])
                if n_layers == 1:  # through 2, more near-ties than one to flip: the bitwise checks apply there
                    error = int8_error(got[1, True], path, tokens)
                    assert error < 1e-4, (len(tokens), error)
                continue
            with torch.no_grad():
                want = model(torch.tensor([tokens]))[0][0, -1]
            for (threads, batch), logits in got.items():
                error = ((logits - want).abs().max() / want.abs().max()).item()
                assert error < 1e-5, (n_layers, len(tokens), threads, batch, error)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_greedy_matches_pytorch(version, built, lib, tiny_model, model_files, tokenizer_files):
    tokenizer = Tokenizer(tokenizer_files[0])
    # int8: the reference rounds activations to Q8_0 as the engine does, so a near-tie between two tokens cannot
    # flip the comparison on CPUs whose PyTorch kernels train slightly different weights.
    reference = tiny_model if version < 2 else q80_reference_model(model_files[2])
    for text in ["Модель учится", "<|user|>\nWho are you?\n<|assistant|>\n def train(steps"]:
        prompt = tokenizer.encode(text, bos=True, eos=False)
        steps = 32
        want = torch_greedy(reference, prompt, steps, tokenizer.eos_id)
        engine = Engine(lib, model_files[version], tokenizer_files[1])
        try:
            assert engine.greedy(prompt, steps) == want, text
            assert engine.greedy(prompt, steps, batch=False) == want, text
        finally:
            engine.close()
        # The binary: -n counts all positions; it stops at EOS without printing it.
        generated = [t for t in want if t != tokenizer.eos_id]
        # ./runsan: the SIMD kernels and the threads' sharing of a batch under ASan and UBSan.
        for binary, threads in (("run", "2"), ("runsan", "3")):
            result = run_binary(built / binary, model_files[version], "-z", tokenizer_files[1], "-t", "0",
                                "-n", len(prompt) + steps, "-i", text, "-T", threads)
            assert result.returncode == 0, result.stderr.decode()
            assert result.stdout == expected_text(tokenizer_files[1], prompt + generated) + b"\n"


SAMPLER_CASES = [  # (settings, history): every control alone, then together; greedy where a penalty moves the argmax
    (dict(temperature=0.7), []),
    (dict(temperature=1.0, top_k=20), []),
    (dict(temperature=1.0, top_p=0.8), []),
    (dict(temperature=0.9, min_p=0.05), []),
    (dict(temperature=1.3, top_k=60, top_p=0.9, min_p=0.02), []),
    (dict(temperature=1.0, repeat_penalty=1.3, repeat_last_n=8), "history"),
    (dict(temperature=0.8, top_k=40, repeat_penalty=1.2, repeat_last_n=-1, presence_penalty=0.4,
          frequency_penalty=0.3), "history"),
    (dict(temperature=1.0, presence_penalty=-0.5, frequency_penalty=0.7, repeat_last_n=64), "history"),
    (dict(temperature=0.0, repeat_penalty=3.0, repeat_last_n=-1), "best"),
    (dict(temperature=0.0, frequency_penalty=4.0, repeat_last_n=-1), "best"),
]


def test_sampler_distribution_matches_pytorch(lib, model_files, tokenizer_files):
    """On fixed logits (positive and negative, a few equal-ish), the probabilities run.c's sampler draws from equal
    model.py's next_token_probs for every setting (the same tokens kept, each probability within 1e-6), and 20000
    draws follow them (each token's count within 5 standard deviations; the seed is fixed, so this cannot flake)."""
    engine = Engine(lib, model_files[1], tokenizer_files[1])
    try:
        vocab = lib.arianna_vocab_size(engine.handle)
        torch.manual_seed(3)
        logits = torch.randn(vocab) * 2.5
        best = int(logits.argmax())
        c_logits = lib.arianna_logits(engine.handle)
        ctypes.memmove(c_logits, (ctypes.c_float * vocab)(*logits.tolist()), vocab * 4)
        repeated = [best, 7, 7, 7, 12, 30, 12, 101, 5, 7] + [int(i) for i in logits.topk(6).indices]
        for settings, which in SAMPLER_CASES:
            history = {"history": repeated, "best": [best, 3, best], "": []}[which if which else ""]
            c_settings = SamplerSettings(**{"top_p": 1.0, "repeat_penalty": 1.0, "repeat_last_n": 64, **settings})
            array = (ctypes.c_int * max(1, len(history)))(*history)
            out = (ctypes.c_float * vocab)()
            kept = lib.arianna_distribution(engine.handle, ctypes.byref(c_settings), array, len(history), out)
            got = torch.tensor(out[:])
            want = next_token_probs(logits[None], Sampling(**settings), torch.tensor([history], dtype=torch.long))[0]
            assert torch.equal(got > 0, want > 0) and kept == int((want > 0).sum()), settings
            assert (got - want).abs().max().item() < 1e-6, settings
            if settings["temperature"] == 0.0:
                assert int(got.argmax()) != best  # the penalty changed the greedy choice
                continue
            rng, counts = ctypes.c_ulonglong(12345), torch.zeros(vocab)
            for _ in range(20000):
                counts[lib.arianna_sample_with(engine.handle, ctypes.byref(c_settings), array, len(history),
                                               ctypes.byref(rng))] += 1
            assert counts[got == 0].sum() == 0, settings
            spread = 5 * (20000 * got * (1 - got)).sqrt() + 2  # 5 standard deviations of each token's count
            assert ((counts - 20000 * got).abs() <= spread).all(), settings
    finally:
        engine.close()


def test_penalties_in_run_follow_the_whole_context(built, tiny_model, model_files, tokenizer_files):
    """Greedy ./run with penalties over the prompt and what it generated equals model.generate with the same
    settings, in generate mode and in chat (whose context holds the template and the system prompt)."""
    tokenizer = Tokenizer(tokenizer_files[0])
    flags = {"repeat_penalty": 1.8, "repeat_last_n": 24, "presence_penalty": 0.5, "frequency_penalty": 0.25}
    cli = [x for name, value in flags.items() for x in (f"--{name.replace('_', '-')}", str(value))]
    text = "Модель учится"
    prompt = tokenizer.encode(text, bos=True, eos=False)
    want = tiny_model.generate(torch.tensor([prompt]), 30, temperature=0.0, eos_id=tokenizer.eos_id, **flags)
    want = [t for t in want[0, len(prompt):].tolist() if t != tokenizer.eos_id]
    assert want != torch_greedy(tiny_model, prompt, 30, tokenizer.eos_id)[:len(want)]  # the penalties matter
    result = run_binary(built / "run", model_files[1], "-z", tokenizer_files[1], "-t", "0", "-n", len(prompt) + 30,
                        "-i", text, *cli)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == expected_text(tokenizer_files[1], prompt + want) + b"\n"

    system, user = "You are Arianna.", "Who are you?"
    encode = lambda line: tokenizer.encode(line, bos=False, eos=False)  # noqa: E731
    turn = encode_dialog(encode, [{"role": "system", "content": system}, {"role": "user", "content": user}],
                         tokenizer.bos_id, tokenizer.eos_id)[0]
    answer = tiny_model.generate(torch.tensor([turn]), 20, temperature=0.0, eos_id=tokenizer.eos_id, **flags)
    answer = [t for t in answer[0, len(turn):].tolist() if t != tokenizer.eos_id]
    result = run_binary(built / "run", model_files[1], "-z", tokenizer_files[1], "-m", "chat", "-t", "0", "-n", "20",
                        "-y", system, *cli, stdin=user + "\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == expected_text(tokenizer_files[1], [0] + answer) + b"\n"


def test_rope_theta_and_norm_eps_travel_in_the_header(built, lib, tiny_model, model_files, tokenizer_files, workdir):
    """The trained weights with rope_theta=500000 and norm_eps=1e-6 (values that change the logits): versions 1 and
    2 carry them, ./run gives PyTorch's greedy tokens and librun.so its logits. A default model's header padding
    stays zero, as llama2.c writes it; version 0 refuses the values."""
    tokenizer = Tokenizer(tokenizer_files[0])
    model = Transformer(ModelArgs(**{**tiny_model.args.to_dict(), "rope_theta": 500000.0, "norm_eps": 1e-6}))
    model.load_state_dict(tiny_model.state_dict())
    model.eval()
    text = "<|user|>\nWho are you?\n<|assistant|>\n def train(steps"
    prompt = tokenizer.encode(text, bos=True, eos=False)
    with torch.no_grad():
        want_logits = model(torch.tensor([prompt]))[0][0, -1]
        assert (want_logits - tiny_model(torch.tensor([prompt]))[0][0, -1]).abs().max() > 1e-2
    for version in (1, 2):
        path = export_model(model, workdir / f"theta_v{version}.bin", version=version)
        args = read_model_bin(path)[1]
        assert (args.rope_theta, args.norm_eps) == (500000.0, pytest.approx(1e-6))
        reference = model if version == 1 else q80_reference_model(path)
        want = [t for t in torch_greedy(reference, prompt, 32, tokenizer.eos_id) if t != tokenizer.eos_id]
        result = run_binary(built / "run", path, "-z", tokenizer_files[1], "-t", "0", "-n", len(prompt) + 32,
                            "-i", text)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == expected_text(tokenizer_files[1], prompt + want) + b"\n", version
        if version == 1:
            engine = Engine(lib, path, tokenizer_files[1])
            try:
                got = engine.logits(prompt, batch=True)
            finally:
                engine.close()
            assert ((got - want_logits).abs().max() / want_logits.abs().max()).item() < 1e-5
    with pytest.raises(FormatError, match="version 0"):
        export_model(model, workdir / "theta_v0.bin", version=0)
    assert model_files[1].read_bytes()[37:256] == bytes(219) and model_files[2].read_bytes()[41:256] == bytes(215)


def test_fewer_threads_than_asked_for_change_nothing(built, model_files, tokenizer_files):
    """OpenMP may start fewer threads than -T asks for (here OMP_THREAD_LIMIT): a batch's work items of the missing
    threads are then taken by the others, and greedy output equals one thread's."""
    text = "<|user|>\nWho are you? Кто ты?\n<|assistant|>\n"
    for version in (1, 2):
        outputs = []
        for threads, limit in (("1", "1"), ("4", "2"), ("3", "1")):
            result = run_binary(built / "run", model_files[version], "-z", tokenizer_files[1], "-t", "0", "-n", "48",
                                "-i", text, "-T", threads, env={**ENV, "OMP_THREAD_LIMIT": limit})
            assert result.returncode == 0, result.stderr.decode()
            outputs.append(result.stdout)
        assert outputs[1] == outputs[0] and outputs[2] == outputs[0], (version, outputs)


def test_chat_template_matches_encode_dialog(lib, tokenizer_files, model_files):
    tokenizer = Tokenizer(tokenizer_files[0])
    engine = Engine(lib, model_files[0], tokenizer_files[1])
    try:
        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, bos=False, eos=False)
        system, user1, answer, user2 = "Ты Арианна.  Be brief.", "Привет! How are you?", "Fine.", "  code:\n\tx = 1"
        first, _ = encode_dialog(encode, [{"role": "system", "content": system}, {"role": "user", "content": user1}],
                                 tokenizer.bos_id, tokenizer.eos_id)
        assert engine.chat_turn(system, user1, True) == first
        assert engine.chat_turn(None, user1, True) == encode_dialog(
            encode, [{"role": "user", "content": user1}], tokenizer.bos_id, tokenizer.eos_id)[0]
        full, _ = encode_dialog(encode, [{"role": "system", "content": system}, {"role": "user", "content": user1},
                                         {"role": "assistant", "content": answer}, {"role": "user", "content": user2}],
                                tokenizer.bos_id, tokenizer.eos_id)
        later = engine.chat_turn("", user2, False)
        assert full == first + encode(answer) + [tokenizer.eos_id] + later
        long_user = "слово " * 5000  # far beyond any fixed buffer
        assert len(engine.chat_turn(None, long_user, False)) > 5000
    finally:
        engine.close()


def test_chat_mode_keeps_history_and_survives_a_full_context(built, tiny_model, model_files, tokenizer_files):
    """Each reply equals PyTorch's greedy continuation of the whole conversation; a full context starts over."""
    tokenizer = Tokenizer(tokenizer_files[0])
    system, turns = "You are Arianna.", ["Who are you?", "Как дела?", "Who are you?"]
    result = run_binary(built / "run", model_files[1], "-z", tokenizer_files[1], "-m", "chat", "-t", "0",
                        "-y", system, "-n", "20", stdin="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr.decode()
    encode = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
    # The engine's history holds each reply's own tokens (re-encoding the reply's text could differ).
    history, expected, compared = [], b"", 0
    for index, turn in enumerate(turns):
        messages = ([{"role": "system", "content": system}] if index == 0 else []) + [{"role": "user", "content": turn}]
        segment = encode_dialog(encode, messages, tokenizer.bos_id, tokenizer.eos_id)[0]
        history += segment if index == 0 else segment[1:]
        if len(history) + 20 >= tiny_model.args.max_seq_len:
            break
        answer = [t for t in torch_greedy(tiny_model, history, 20, tokenizer.eos_id) if t != tokenizer.eos_id]
        expected += expected_text(tokenizer_files[1], [0] + answer) + b"\n"  # replies may hold newlines themselves
        history += answer + [tokenizer.eos_id]
        compared += 1
    assert compared >= 2  # the KV cache carried the first turn into the second
    assert result.stdout.startswith(expected)
    # Many turns overflow the 96-token context: the conversation restarts instead of crashing.
    result = run_binary(built / "rundebug", model_files[2], "-z", tokenizer_files[1], "-m", "chat", "-t", "0",
                        "-y", "S " * 30, stdin="Who are you? Tell me more.\n" * 12 + "x " * 200 + "\n")
    assert result.returncode == 0, result.stderr.decode()
    assert b"context of 96 tokens is full" in result.stderr
    assert b"does not fit" in result.stderr
    assert b"Sanitizer" not in result.stderr and b"runtime error" not in result.stderr


def test_chat_mode_keeps_a_whole_reply_free(built, tiny_model, model_files, tokenizer_files):
    """A turn is taken into the conversation only if a whole reply (-n, at most 3/4 of the context) still fits after
    it, as chat.py does; otherwise it starts a new conversation and is answered as PyTorch answers it alone."""
    tokenizer = Tokenizer(tokenizer_files[0])
    encode = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
    seq_len, turns = tiny_model.args.max_seq_len, ["Tell me who you are and what you can do.", "Как дела?"]
    prompts = [encode_dialog(encode, [{"role": "user", "content": turn}], tokenizer.bos_id, tokenizer.eos_id)[0]
               for turn in turns]
    replies = [[t for t in torch_greedy(tiny_model, prompt, 40, tokenizer.eos_id) if t != tokenizer.eos_id]
               for prompt in prompts]
    # Both turns fit together (the rule before this one kept them), but not with room for a 40-token reply after.
    together = len(prompts[0]) + len(replies[0]) + 1 + len(prompts[1]) - 1
    assert together < seq_len < together + 41
    result = run_binary(built / "run", model_files[1], "-z", tokenizer_files[1], "-m", "chat", "-t", "0", "-n", "40",
                        stdin="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.count(b"no room left for a reply") == 1
    assert result.stdout == b"".join(expected_text(tokenizer_files[1], [0] + reply) + b"\n" for reply in replies)


def test_sampling_is_reproducible_with_a_seed(built, model_files, tokenizer_files):
    outputs = [run_binary(built / "run", model_files[1], "-z", tokenizer_files[1], "-t", "1.0", "-p", p, "-s", s,
                          "-n", "60").stdout for s, p in [("7", "0.9"), ("7", "0.9"), ("8", "0.9"), ("7", "1")]]
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2] or outputs[0] != outputs[3]


def thread_count(built: Path, model: Path, tokenizer: Path, env: dict, *flags: str) -> int:
    """The thread count ./run reports on its statistics line."""
    result = run_binary(built / "run", model, "-z", tokenizer, "-n", "4", *flags, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return int(result.stderr.decode().rsplit("; ", 1)[1].split()[0])


def test_default_thread_count_leaves_busy_cpus_alone(built, model_files, tokenizer_files):
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    args = (built, model_files[1], tokenizer_files[1])
    assert thread_count(*args, {**env, "OMP_NUM_THREADS": "3"}) == 3
    assert thread_count(*args, env, "-T", "2") == 2
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)  # until both are running
        allowed, online = len(os.sched_getaffinity(0)), os.cpu_count() or 1
        assert thread_count(*args, env) <= max(1, allowed - 2 * allowed // online)  # its share of the 2 when a container
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def corrupt_cases(model: Path, tokenizer: Path, tmp: Path) -> list[tuple[str, list, str]]:
    """(name, args, expected message part) for bad files and flags."""
    data = model.read_bytes()
    files = {
        "truncated": data[:len(data) // 2],
        "truncated_header": data[:100],
        "wrong_magic": b"XXXX" + data[4:],
        "wrong_version": data[:4] + struct.pack("<i", 7) + data[8:],
        "absurd_dims": data[:8] + struct.pack("<i", 1 << 30) + data[12:],
        "zero_heads": data[:20] + struct.pack("<i", 0) + data[24:],
        "extra_bytes": data + b"\0" * 16,
        "empty": b"",
    }
    cases = []
    for name, content in files.items():
        path = tmp / f"bad_{name}.bin"
        path.write_bytes(content)
        cases.append((name, [path, "-z", tokenizer], str(path)))
    tok = tokenizer.read_bytes()
    bad_tokenizers = {
        "tok_truncated": tok[:-3],
        "tok_bad_length": tok[:8] + struct.pack("<i", 1 << 30) + tok[12:],
        "tok_bad_max_len": struct.pack("<i", -5) + tok[4:],
        "tok_vocab_mismatch": tok + struct.pack("<fi", 0.0, 1) + b"x",
    }
    for name, content in bad_tokenizers.items():
        path = tmp / f"{name}.bin"
        path.write_bytes(content)
        cases.append((name, [model, "-z", path], "tokenizer" if name == "tok_vocab_mismatch" else str(path)))
    cases += [
        ("missing_model", [tmp / "nope.bin", "-z", tokenizer], "nope.bin"),
        ("missing_tokenizer", [model, "-z", tmp / "nope_tok.bin"], "nope_tok.bin"),
        ("prompt_too_long", [model, "-z", tokenizer, "-i", "слово " * 3000], "prompt"),
        ("steps_beyond_context", [model, "-z", tokenizer, "-n", "100000"], "-n 100000"),
        ("bad_mode", [model, "-z", tokenizer, "-m", "dance"], "mode"),
        ("bad_temperature", [model, "-z", tokenizer, "-t", "abc"], "-t"),
        ("bad_top_k", [model, "-z", tokenizer, "-k", "-1"], "-k"),
        ("bad_repeat_penalty", [model, "-z", tokenizer, "--repeat-penalty", "0"], "--repeat-penalty"),
        ("bad_min_p", [model, "-z", tokenizer, "--min-p", "1.5"], "--min-p"),
        ("unknown_option", [model, "-z", tokenizer, "--top-q", "1"], "--top-q"),
    ]
    return cases


@pytest.mark.parametrize("version", [0, 2])
def test_bad_input_fails_cleanly_under_sanitizers(version, built, model_files, tokenizer_files, workdir):
    tmp = workdir / f"bad_v{version}"
    tmp.mkdir(exist_ok=True)
    for name, args, message in corrupt_cases(model_files[version], tokenizer_files[1], tmp):
        result = run_binary(built / "rundebug", *args)
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 1, (name, stderr)
        assert "Sanitizer" not in stderr and "runtime error" not in stderr, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (name, stderr)


def test_thread_counts_beyond_the_limit_are_one_line_errors(built, model_files, tokenizer_files):
    """-T or OMP_NUM_THREADS far beyond any machine: one line naming the limit, not a crash inside the OpenMP
    runtime or a signed overflow in the work sharing (rundebug: no OpenMP)."""
    big = {**ENV, "OMP_NUM_THREADS": "100000"}
    cases = [("run", ["-T", "100000"], ENV), ("runsan", ["-T", "100000"], ENV), ("rundebug", ["-T", "100000"], ENV),
             ("run", [], big), ("runsan", ["-T", "2"], big)]
    for binary, flags, env in cases:
        result = run_binary(built / binary, model_files[2], "-z", tokenizer_files[1], "-n", "8", *flags, env=env)
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 1, (binary, flags, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "1024" in lines[0], (binary, flags, stderr)


def test_one_feed_longer_than_half_a_million_tokens(built, workdir, tokenizer_files):
    """A single arianna_feed of 540k tokens (a chat turn): its batch bounds n * i / batches pass 2^31 there. Under
    the sanitizers, on a 1-layer model with the header's largest context, where the batches only fill the cache."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=Tokenizer(tokenizer_files[0]).n_words,
                                  max_seq_len=1 << 20))
    path = export_model(model, workdir / "long_context.bin", version=1)
    turn = "1234567890" * 54000  # digits are split: a token each
    result = run_binary(built / "runsan", path, "-z", tokenizer_files[1], "-m", "chat", "-t", "0", "-n", "2",
                        "-T", "2", stdin=turn + "\n", timeout=240)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0 and "Sanitizer" not in stderr and "runtime error" not in stderr, stderr[-2000:]
    assert "does not fit" not in stderr


def test_tokenizer_pieces_cannot_send_terminal_escapes(built, workdir):
    """A tokenizer whose pieces hold ESC sequences and C1 controls (CSI as U+009B), and a prompt that encodes to
    them: ./run writes the text around them, valid UTF-8 without a control character but newline and tab."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    pieces += [b" ", b"A", b"B", b"\x1b", b"[", b"2", b"J", b"\x1b[", b"\x1b[2", b"\x1b[2J", b"\xc2\x9b", b"\xc2\x9b2J",
               b"\x07", b" B"]
    tok = workdir / "hostile_tok.bin"
    tok.write_bytes(struct.pack("<i", 16) + b"".join(struct.pack("<fi", float(i), len(p)) + p
                                                   for i, p in enumerate(pieces)))
    torch.manual_seed(0)
    model = export_model(Transformer(ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=len(pieces), max_seq_len=64)),
                         workdir / "hostile.bin", version=1)
    prompt = "A\x1b[2J B\u009b2J\x07B\x1b[2"
    for mode in ("generate", "chat"):
        result = run_binary(built / "runsan", model, "-z", tok, "-i", prompt, "-m", mode, "-t", "1", "-s", "3",
                            "-n", "40", stdin="")
        assert result.returncode == 0, result.stderr.decode()
        text = result.stdout.decode("utf-8")  # valid UTF-8
        assert not [ch for ch in text if ch not in "\n\t" and unicodedata.category(ch) == "Cc"], repr(text)
        if mode == "generate":
            assert text.startswith("A[2J B2JB[2"), repr(text)  # the controls alone are dropped


def test_bench_prints_a_row_per_setting(built):
    """`make bench`'s program, on the smallest shape with few tokens: the CPU and the build's kernels, the fp32 and
    int8 products' speed, then one table row per weights x threads, each with its memory roof."""
    subprocess.run(["make", "-s", "bench/bench_run"], cwd=REPO, check=True, capture_output=True)
    result = run_binary(REPO / "bench" / "bench_run", "4", "4", "B", "12", "12")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("CPU: ") and "flags:" in lines[0], lines[0]
    flags = cpu_flags()
    assert all(flag in lines[0].split("flags:")[1].split() for flag in {"avx2", "fma", "avx512f"} & flags), lines[0]
    assert re.fullmatch(r"build: .+ kernels, (OpenMP|no OpenMP \(one thread\))", lines[1]), lines[1]
    for kind, line in zip(("fp32", "int8"), lines[3:5]):
        speed = re.fullmatch(kind + r" products alone, 1 thread, in cache: ([\d.]+) GMAC/s; a B prompt token's 5\.14 M "
                             r"multiply-adds take ([\d.]+) us at that speed \((\d+) tok/s\)", line)
        assert speed and float(speed[1]) > 0 and float(speed[2]) > 0, line
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| B ")]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [("fp32", "1"), ("fp32", "2"), ("int8", "1"), ("int8", "2")]
    assert all(float(value) > 0 for row in rows for value in row[3:6])  # generation (best, first run), prompt
    # the weights a token reads (B: 28.6 MB fp32, 8.0 MB int8), the roof's GB/s and tokens/s, generation's share
    assert [float(row[9]) for row in rows] == [28.6, 28.6, 8.0, 8.0], rows
    assert all(float(row[10]) > 0 and float(row[11]) > 0 and row[12].strip().endswith("%") for row in rows), rows
