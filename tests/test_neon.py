"""run.c's aarch64 kernels, cross-compiled with Debian's gcc-aarch64-linux-gnu and run under qemu-user (`make
aarch64-tools` installs both; `make test` runs it first).

Three builds: NEON with the dot-product extension (sdot), plain NEON (smull/sadalp), and no NEON at all (the
portable kernels), each on a qemu CPU that has no more than it needs: Cortex-A76 for sdot, Cortex-A72 (no sdot)
for the others. Their logits (tests/logits.c prints them) match PyTorch within test_run_c.py's tolerances, the
int8 sums of both NEON paths agree bit for bit, and ./run's greedy text equals the x86 build's.
"""
from __future__ import annotations

import itertools
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export import export_model  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from test_run_c import (ENV, REPO, built, int8_error, model_files, run_binary, tiny_model,  # noqa: E402,F401,F811
                        tokenizer_files, workdir)
from tokenizer import Tokenizer  # noqa: E402

CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"
BUILDS = {  # name: (-march, the qemu CPU it runs on)
    "dotprod": ("armv8.2-a+dotprod", "cortex-a76"),
    "neon": ("armv8-a", "cortex-a72"),
    "portable": ("armv8-a+nosimd", "cortex-a72"),
}


def install_tools() -> None:
    """The cross compiler and qemu-user through the Makefile's rule, or a skip saying why this platform cannot."""
    if shutil.which(CC) and shutil.which(QEMU):
        return
    if platform.machine() != "x86_64":
        pytest.skip(f"this is {platform.machine()}, not x86-64: Debian's cross gcc and qemu-user are for x86-64 hosts "
                    "(on an aarch64 machine test_run_c.py tests its own NEON build)")
    if not shutil.which("apt-get"):
        pytest.skip(f"no apt-get: the aarch64 tests need Debian's {CC} and {QEMU} (packages gcc-aarch64-linux-gnu, "
                    "qemu-user)")
    if os.geteuid() != 0:
        pytest.skip("not root: `make aarch64-tools` (apt-get install gcc-aarch64-linux-gnu qemu-user) needs root")
    subprocess.run(["make", "-s", "aarch64-tools"], cwd=REPO, check=True, capture_output=True)
    assert shutil.which(CC) and shutil.which(QEMU), "make aarch64-tools installed no gcc-aarch64-linux-gnu, qemu-user"


@pytest.fixture(scope="module")
def aarch64(workdir) -> dict[str, dict[str, Path]]:
    """Per build, its ./run and its logits printer, compiled side by side."""
    install_tools()
    out = workdir / "aarch64"
    out.mkdir(exist_ok=True)
    builds, jobs = {}, []
    for name, (march, _) in BUILDS.items():
        builds[name] = {"run": out / f"run_{name}", "logits": out / f"logits_{name}"}
        for kind, source in (("run", "run.c"), ("logits", "tests/logits.c")):
            # the flags of `make run-aarch64`
            jobs.append(subprocess.Popen([CC, "-O3", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
                                          "-std=gnu11", f"-march={march}", "-fopenmp", "-o", str(builds[name][kind]),
                                          str(REPO / source), "-lm"], stderr=subprocess.PIPE))
    for job in jobs:
        assert job.wait() == 0, job.stderr.read().decode()
    return builds


def qemu(build: str, binary: Path, *args, cpu: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU, "-cpu", cpu or BUILDS[build][1], "-L", SYSROOT, str(binary), *map(str, args)],
                          capture_output=True, timeout=120, env=ENV)


def aarch64_logits(builds, build: str, model: Path, tokenizer: Path, tokens: list[int], threads: int,
                   batch: bool) -> torch.Tensor:
    result = qemu(build, builds[build]["logits"], model, tokenizer, threads, "batch" if batch else "single", *tokens)
    assert result.returncode == 0, result.stderr.decode()
    return torch.frombuffer(bytearray(result.stdout), dtype=torch.float32)


@pytest.mark.parametrize("shape", [
    dict(dim=72, n_heads=3, n_kv_heads=3),  # head 24, Q8_0 groups of 8 (2 quads: the one-quad tail), 72 rows
    dict(dim=96, n_heads=6, n_kv_heads=2),  # grouped-query attention, groups of 32
    dict(dim=144, n_heads=3, n_kv_heads=3),  # head 48, groups of 16
])
def test_logits_match_pytorch(shape, aarch64, workdir, tokenizer_files):
    """A 70-token prompt (attention tiles of 4 and then 2; keys in 4 blocks of 16, the last partial), fed as one batch
    on 3 threads and token by token on 1, through each build: fp32 (2 layers) within 1e-5 of PyTorch, int8 (1
    layer) within 1e-4 of PyTorch on Q8_0-rounded inputs (int8_error), as test_run_c.py asks of the x86 builds.
    int8: both feeding modes bit for bit equal (the same arithmetic per token), and the sdot and smull paths too
    (exact integer sums, the same float steps); fp32: the NEON builds within 1e-5 of the portable one as well."""
    torch.manual_seed(2)
    vocab = Tokenizer(tokenizer_files[0]).n_words
    tokens = torch.randint(3, vocab, (70,)).tolist()
    for version, n_layers in ((1, 2), (2, 1)):
        model = Transformer(ModelArgs(**shape, n_layers=n_layers, vocab_size=vocab, max_seq_len=80)).eval()
        path = export_model(model, workdir / f"neon{shape['dim']}_v{version}.bin", version=version)
        with torch.no_grad():
            want = model(torch.tensor([tokens]))[0][0, -1]
        got = {}
        for build, (threads, batch) in itertools.product(BUILDS, ((3, True), (1, False))):
            logits = aarch64_logits(aarch64, build, path, tokenizer_files[1], tokens, threads, batch)
            got[build, batch] = logits
            if version == 2:
                error = int8_error(logits, path, tokens)
                assert error < 1e-4, (build, batch, error)
            else:
                error = ((logits - want).abs().max() / want.abs().max()).item()
                assert error < 1e-5, (build, batch, error)
        if version == 2:
            for build in BUILDS:
                assert torch.equal(got[build, True], got[build, False]), build
            assert torch.equal(got["dotprod", True], got["neon", True])
        else:  # the NEON kernels against the portable ones, directly
            for build, batch in itertools.product(("dotprod", "neon"), (True, False)):
                portable = got["portable", batch]
                error = ((got[build, batch] - portable).abs().max() / portable.abs().max()).item()
                assert error < 1e-5, (build, batch, error)


@pytest.mark.parametrize("build", ["dotprod", "neon"])
def test_greedy_text_equals_x86(build, aarch64, built, model_files, tokenizer_files):
    """./run on 2 threads, greedy, fp32 and int8 model files (versions 0, 1, 2): the aarch64 build prints what the
    x86 build prints."""
    prompts = ["Модель учится", "<|user|>\nWho are you?\n<|assistant|>\n"]
    for version, text in itertools.product((0, 1, 2), prompts):
        args = (model_files[version], "-z", tokenizer_files[1], "-t", "0", "-n", 40, "-i", text, "-T", 2)
        want = run_binary(built / "run", *args)
        got = qemu(build, aarch64[build]["run"], *args)
        assert want.returncode == 0 and got.returncode == 0, got.stderr.decode()
        assert got.stdout == want.stdout, (version, text)


def test_only_the_dotprod_build_has_sdot(aarch64):
    """The two NEON builds run two different int8 paths: sdot in one, none in the other (which qemu runs on a CPU
    without the extension anyway)."""
    for build, binaries in aarch64.items():
        for binary in binaries.values():
            code = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(binary)], capture_output=True, text=True,
                                  check=True).stdout
            assert ("\tsdot\t" in code) == (build == "dotprod"), (build, binary.name)
