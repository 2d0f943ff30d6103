"""The dispatching engine (`make run`, librun.so): one x86-64 build holding the kernels for AVX-512 VNNI, AVX-VNNI,
AVX2 and baseline x86-64, chosen when a model loads. Each path this CPU runs, forced with ARIANNA_ISA (or ./run
--isa), against PyTorch and against the scalar path; the choice ./run reports; a forced path the CPU lacks (faked with
ARIANNA_MAX_ISA) refused in one line; and the binary on older CPUs, emulated by qemu-x86_64 (`make test` installs
Debian's qemu-user).

Reuses test_run_c.py's tiny tokenizer and model, its references and its ctypes wrapper.
"""
from __future__ import annotations

import ctypes
import platform
import shutil
import signal
import subprocess

import pytest
import torch

from model import ModelArgs, Transformer
from export import export_model
from tokenizer import Tokenizer
from test_run_c import (ENV, REPO, Engine, cpu_flags, expected_text, int8_error, load_library, model_files,  # noqa: F401
                        q80_reference_model, run_binary, tiny_model, tokenizer_files, torch_greedy, workdir)

# Each path, best first, with the CPU flags it needs (as /proc/cpuinfo spells them).
X86_64_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
PATHS = {
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"},
    "avxvnni": X86_64_V3 | {"avx_vnni"},
    "avx2": X86_64_V3,
    "scalar": set(),
}

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason=f"runtime dispatch is built on x86-64 only, this is {platform.machine()}")


def skip_unless_cpu_runs(path: str) -> None:
    missing = PATHS[path] - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))} (the {path} path's flags): not forced here")


@pytest.fixture(scope="module")
def built() -> ctypes.CDLL:
    """./run and librun.so as `make` builds them: dispatching, with arianna_isa declared."""
    subprocess.run(["make", "-s", "run", "librun.so"], cwd=REPO, check=True, capture_output=True)
    lib = load_library(REPO / "librun.so")
    lib.arianna_isa.restype, lib.arianna_isa.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    return lib


def open_engine(lib: ctypes.CDLL, monkeypatch, path: str | None, model, tokenizer) -> Engine:
    """An engine loaded with ARIANNA_ISA=path (the choice is made, and int8 weights packed, when it opens)."""
    with monkeypatch.context() as env:
        if path:
            env.setenv("ARIANNA_ISA", path)
        else:
            env.delenv("ARIANNA_ISA", raising=False)
        engine = Engine(lib, model, tokenizer)
    assert lib.arianna_isa(engine.handle).decode() == (path or best_path())
    return engine


def best_path() -> str:
    return next(path for path, flags in PATHS.items() if flags <= cpu_flags())


@pytest.fixture(scope="module")
def one_layer_models(workdir, tokenizer_files) -> dict[int, tuple[Transformer, object]]:
    """fp32 and int8 files of a 1-layer model (grouped-query attention, Q8_0 groups of 32): through one layer, no
    near-tie in the int8 reference rounds twice (see int8_error)."""
    torch.manual_seed(1)
    vocab = Tokenizer(tokenizer_files[0]).n_words
    model = Transformer(ModelArgs(dim=96, n_heads=6, n_kv_heads=2, n_layers=1, vocab_size=vocab, max_seq_len=150)).eval()
    return {v: (model, export_model(model, workdir / f"dispatch_v{v}.bin", version=v)) for v in (1, 2)}


@pytest.mark.parametrize("path", PATHS)
def test_forced_path_matches_pytorch_and_the_scalar_path(path, built, monkeypatch, one_layer_models, tokenizer_files):
    """Logits after a 131-token prompt (a batch) and a 64-token one fed token by token, fp32 and int8, within
    test_run_c.py's tolerances of PyTorch (int8: of the engine's arithmetic in PyTorch) and of the scalar path. Every
    path's engine stays open while the others run: each model keeps the kernels it was loaded (and packed) for."""
    skip_unless_cpu_runs(path)
    torch.manual_seed(2)
    vocab = Tokenizer(tokenizer_files[0]).n_words
    for version, (model, file) in one_layer_models.items():
        engines = {p: open_engine(built, monkeypatch, p, file, tokenizer_files[1]) for p in dict.fromkeys((path, "scalar"))}
        try:
            for length, batch in ((131, True), (64, False)):
                tokens = torch.randint(3, vocab, (length,)).tolist()
                got, scalar = (engines[p].logits(tokens, batch) for p in (path, "scalar"))
                if version == 2:
                    assert int8_error(got, file, tokens) < 1e-4, (path, length)
                    continue
                with torch.no_grad():
                    want = model(torch.tensor([tokens]))[0][0, -1]
                for reference in (want, scalar):
                    error = ((got - reference).abs().max() / reference.abs().max()).item()
                    assert error < 1e-5, (path, length, error)
        finally:
            for engine in engines.values():
                engine.close()


GREEDY_TEXT, GREEDY_STEPS = "<|user|>\nWho are you?\n<|assistant|>\n def train(steps", 32


@pytest.fixture(scope="module")
def greedy_references(tiny_model, model_files, tokenizer_files) -> dict[int, tuple[list[int], list[int], bytes]]:
    """The prompt's tokens, PyTorch's greedy continuation and what ./run prints for them (it stops at EOS without
    printing it), for the fp32 and the int8 file of the 2-layer model."""
    tokenizer = Tokenizer(tokenizer_files[0])
    prompt = tokenizer.encode(GREEDY_TEXT, bos=True, eos=False)
    references = {}
    for version, model in ((1, tiny_model), (2, q80_reference_model(model_files[2]))):
        want = torch_greedy(model, prompt, GREEDY_STEPS, tokenizer.eos_id)
        printed = expected_text(tokenizer_files[1], prompt + [t for t in want if t != tokenizer.eos_id]) + b"\n"
        references[version] = prompt, want, printed
    return references


@pytest.mark.parametrize("path", PATHS)
def test_forced_path_generates_pytorchs_greedy_tokens(path, built, monkeypatch, greedy_references, model_files,
                                                      tokenizer_files):
    """The 2-layer model's greedy tokens, fp32 and int8, through librun.so and ./run forced to the path (ARIANNA_ISA,
    and --isa), equal PyTorch's; ./run's statistics line names the path."""
    skip_unless_cpu_runs(path)
    for version, (prompt, want, printed) in greedy_references.items():
        engine = open_engine(built, monkeypatch, path, model_files[version], tokenizer_files[1])
        try:
            assert engine.greedy(prompt, GREEDY_STEPS) == want, version
        finally:
            engine.close()
        args = (REPO / "run", model_files[version], "-z", tokenizer_files[1], "-t", "0", "-n",
                len(prompt) + GREEDY_STEPS, "-i", GREEDY_TEXT, "-T", "1")
        for result in (run_binary(*args, env={**ENV, "ARIANNA_ISA": path}), run_binary(*args, "--isa", path)):
            assert result.returncode == 0, result.stderr.decode()
            assert result.stdout == printed, version
            assert f"; {path} kernels; 1 thread" in result.stderr.decode(), result.stderr


def test_auto_takes_the_best_path_and_refuses_one_the_cpu_lacks(built, monkeypatch, model_files, tokenizer_files):
    """Unforced, ./run and librun.so take the best path this CPU runs (the usage says which). ARIANNA_MAX_ISA=avx2
    makes the CPU look like an AVX2-only one (=avxvnni, like one without AVX-512): the default becomes that path where
    the CPU runs it, and forcing avx512 is a one-line error naming what the CPU lacks, from ./run (exit 1, nothing
    generated) and from arianna_open; so is a name no build has."""
    run = (REPO / "run", model_files[2], "-z", tokenizer_files[1], "-t", "0", "-n", "8")
    result = run_binary(*run)
    assert result.returncode == 0 and f"; {best_path()} kernels;" in result.stderr.decode(), result.stderr
    assert f"here {best_path()}\n" in run_binary(REPO / "run").stderr.decode()
    for cap in list(PATHS)[list(PATHS).index(best_path()) + 1:-1]:  # the SIMD paths below the best one
        if PATHS[cap] <= cpu_flags():
            result = run_binary(*run, env={**ENV, "ARIANNA_MAX_ISA": cap})
            assert result.returncode == 0 and f"; {cap} kernels;" in result.stderr.decode(), result.stderr
    lacks = "this CPU lacks AVX-512 VNNI (avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni"
    cases = [({"ARIANNA_ISA": "avx512", "ARIANNA_MAX_ISA": "avx2"}, [], lacks),
             ({"ARIANNA_MAX_ISA": "avx2"}, ["--isa", "avx512"], lacks),
             ({"ARIANNA_ISA": "avx9"}, [], "ARIANNA_ISA=avx9 (or --isa): not an instruction set of this build "
                                          "(avx512, avxvnni, avx2, scalar, or auto)"),
             ({"ARIANNA_MAX_ISA": "sse9"}, [], "ARIANNA_MAX_ISA=sse9: not an instruction set of this build")]
    for env, flags, message in cases:
        result = run_binary(*run, *flags, env={**ENV, **env})
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 1 and result.stdout == b"", (env, flags, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (env, flags, lines)
        with monkeypatch.context() as patched:
            for name, value in env.items():
                patched.setenv(name, value)
            if not flags:
                with pytest.raises(RuntimeError, match=message.split(" (")[0]):
                    Engine(built, model_files[2], tokenizer_files[1])


# QEMU's baseline x86-64 CPU, and a Haswell (AVX2, FMA; QEMU emulates no AVX-512): the path each should take.
QEMU_CPUS = {"qemu64": "scalar", "Haswell-v4": "avx2"}


def test_older_cpus_take_their_path_where_a_native_build_dies(built, workdir, greedy_references, model_files,
                                                              tokenizer_files):
    """`make run`'s binary on CPUs older than this one (qemu-x86_64 -cpu): it finds the path each runs in its CPUID
    and generates PyTorch's greedy tokens with it; forcing AVX-512 there is the one-line error; a -march=native
    build of run.c dies there with SIGILL, as the dispatching one would without dispatch."""
    if not shutil.which("qemu-x86_64"):
        pytest.skip("no qemu-x86_64: `make test` installs Debian's qemu-user as root on Debian/Ubuntu (apt-get)")
    native = workdir / "run_native"
    subprocess.run(["cc", "-O3", "-std=gnu11", "-march=native", "-o", str(native), str(REPO / "run.c"), "-lm"],
                   check=True, capture_output=True)
    for cpu, path in QEMU_CPUS.items():
        emulated = ("qemu-x86_64", "-cpu", cpu)
        for version, (prompt, want, printed) in greedy_references.items():
            result = run_binary(*emulated, REPO / "run", model_files[version], "-z", tokenizer_files[1], "-t", "0",
                                "-n", len(prompt) + GREEDY_STEPS, "-i", GREEDY_TEXT, "-T", "1", timeout=300)
            assert result.returncode == 0, (cpu, result.stderr.decode())
            assert result.stdout == printed, (cpu, version)
            assert f"; {path} kernels; 1 thread" in result.stderr.decode(), (cpu, result.stderr)
        result = run_binary(*emulated, REPO / "run", model_files[2], "-z", tokenizer_files[1], "--isa", "avx512")
        assert result.returncode == 1, (cpu, result.stderr)
        assert "error: ARIANNA_ISA=avx512 (or --isa): this CPU lacks AVX-512 VNNI" in result.stderr.decode()
    if "avx2" in cpu_flags():  # then -march=native uses AVX, which QEMU's baseline CPU has not
        result = run_binary("qemu-x86_64", "-cpu", "qemu64", native, model_files[2], "-z", tokenizer_files[1],
                            "-n", "8")
        assert result.returncode == -signal.SIGILL, (result.returncode, result.stderr)
