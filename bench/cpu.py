"""The CPU a benchmark ran on, in one line: model, core count and the SIMD features the kernels and PyTorch use."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

# x86 (/proc/cpuinfo "flags") and ARM ("Features", macOS hw.optional) names of the features that change speed.
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "asimd", "asimddp", "bf16", "sve")


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and model in ("", platform.machine()):
                model = value.strip()
            if key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    elif platform.system() == "Darwin":
        def sysctl(name: str) -> str:
            result = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True)
            return result.stdout.strip() if result.returncode == 0 else ""
        model = sysctl("machdep.cpu.brand_string") or model
        flags = {"asimd"} | {name for name, key in (("asimddp", "hw.optional.arm.FEAT_DotProd"),
                                                    ("bf16", "hw.optional.arm.FEAT_BF16")) if sysctl(key) == "1"}
    features = [name for name in FEATURES if name in flags]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(features) or 'no SIMD flags found'}"


if __name__ == "__main__":
    print(cpu_description())
