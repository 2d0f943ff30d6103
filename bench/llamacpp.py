"""make bench-llamacpp: the same random-weight models through llama.cpp and through this project's engine.

Shapes B, A and C of `make bench` (bench_run.c), each written once as GGUF (f32, f16, q8_0; interop.py) and as our
.bin (version 1 fp32, version 2 int8 in groups of 32, as Q8_0's blocks), with a SentencePiece vocabulary of the
shape's size made up for the purpose. llama.cpp runs through node-llama-cpp's prebuilt CPU binary
(bench/llamacpp.mjs); our engine through librun.so, the code ./run runs. Both are timed the same way: prompt = the
prompt's tokens but the last fed in one call, generation = the last prompt token and GEN greedy steps one token
at a time; the best of REPEATS runs. Weights are uniform in +-0.05 (bench_run.c's), BOS and EOS never chosen.
--clock=cpu reports tokens per CPU second of each process (times the threads) instead of per wall second: on a
machine other work shares, the wall clock measures the neighbours.

--isa=avx2 compares AVX2 with AVX2 on a CPU that has more: our engine built for x86-64-v3 (AVX2, FMA, F16C, BMI2;
no AVX-512) and llama.cpp with only ggml's `haswell` CPU variant present (the same instruction set), so ggml cannot
pick its AVX-512 one. Which ggml CPU variant ran is printed.

    python bench/llamacpp.py [--shapes=BAC] [--threads=12] [--gen=128] [--prompt=128] [--repeats=3] [--isa=native]
                              [--clock=wall]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sentencepiece import sentencepiece_model_pb2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import interop  # noqa: E402  (the repository's modules, imported after putting it on the path)
from export import export_model  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from cpu import cpu_description  # noqa: E402  (bench/cpu.py, beside this file)

# name: (dim, hidden_dim, n_layers, n_heads, vocab_size, seq_len), as in bench_run.c
SHAPES = {"B": (288, 768, 6, 6, 4096, 256), "A": (288, 768, 6, 6, 32000, 256), "C": (768, 2048, 12, 12, 32000, 1024)}


def synthetic_tokenizer(vocab_size: int, path: Path) -> Path:
    """A SentencePiece BPE model of vocab_size pieces (unk, <s>, </s>, the 256 bytes, then made-up words)."""
    proto = sentencepiece_model_pb2.ModelProto()
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    pieces = [("<unk>", kinds.UNKNOWN), ("<s>", kinds.CONTROL), ("</s>", kinds.CONTROL)]
    pieces += [(f"<0x{byte:02X}>", kinds.BYTE) for byte in range(256)]
    pieces += [(f"\u2581w{i}", kinds.NORMAL) for i in range(vocab_size - len(pieces))]
    for index, (piece, kind) in enumerate(pieces):
        proto.pieces.add(piece=piece, score=-float(index), type=kind)
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = vocab_size
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 0, 1, 2, -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    path.write_bytes(proto.SerializeToString())
    return path


def random_model(shape: tuple[int, ...]) -> Transformer:
    dim, hidden_dim, n_layers, n_heads, vocab_size, seq_len = shape
    model = Transformer(ModelArgs(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                                  vocab_size=vocab_size, max_seq_len=seq_len))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_((torch.rand(param.shape, generator=generator) - 0.5) * 0.1)
        model.tok_embeddings.weight[1:3] = 0.0  # BOS and EOS score 0: greedy decoding never stops or restarts
    return model


# --isa: our engine's compiler flags (None: librun.so as make builds it) and the one ggml CPU variant left to
# llama.cpp (None: all of them, ggml loads the best this CPU runs).
ISAS = {"native": (None, None), "avx2": (["-march=x86-64-v3"], "haswell")}


def llamacpp_script(variant: str | None, folder: Path) -> Path:
    """bench/llamacpp.mjs, or for a variant a copy beside a copy of node_modules (hard links where the file system
    allows) holding only that ggml CPU library."""
    script = REPO / "bench" / "llamacpp.mjs"
    if variant is None:
        return script

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    modules = folder / "node_modules"
    shutil.copytree(REPO / "bench" / "node_modules", modules, symlinks=True, copy_function=link_or_copy)
    wanted = f"libggml-cpu-{variant}.so"
    for library in modules.glob("@node-llama-cpp/*/bins/*/libggml-cpu-*.so"):
        if library.name != wanted:
            library.unlink()
    if not any(modules.glob(f"@node-llama-cpp/*/bins/*/{wanted}")):
        sys.exit(f"error: node-llama-cpp has no libggml-cpu-{variant}.so for this platform")
    return Path(shutil.copy2(script, folder / script.name))


def run_llamacpp(script: Path, paths: list[Path], threads: int, prompt: list[int], gen: int, repeats: int,
                 context: int) -> tuple[list[dict], str | None]:
    """Best prompt and generation seconds of each GGUF file, in one node process, and the ggml CPU library it ran."""
    request = {"threads": threads, "context": context,
               "models": [{"path": str(p), "generate": [{"prompt": prompt, "steps": gen}] * repeats} for p in paths]}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(request, file)
        file.flush()
        result = subprocess.run(["node", script, file.name], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: llama.cpp (node bench/llamacpp.mjs) failed: {result.stderr.strip()[-500:]}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    keys = ("prompt_s", "generate_s", "prompt_cpu_s", "generate_cpu_s")
    return [{key: min(r[key] for r in m["generate"]) for key in keys} for m in answer["models"]], answer.get("cpu_backend")


def run_ours(library: ctypes.CDLL, path: Path, tokenizer_bin: Path, threads: int, prompt: list[int], gen: int,
             repeats: int) -> dict:
    """The same measurement through librun.so (arianna_feed and greedy arianna_sample, as ./run generates)."""
    error = ctypes.create_string_buffer(512)
    engine = library.arianna_open(str(path).encode(), str(tokenizer_bin).encode(), threads, error, len(error))
    if not engine:
        sys.exit(f"error: {error.value.decode()}")
    best = dict.fromkeys(("prompt_s", "generate_s", "prompt_cpu_s", "generate_cpu_s"), float("inf"))
    head = (ctypes.c_int * (len(prompt) - 1))(*prompt[:-1])
    for _ in range(repeats):
        cpu_start, start = time.process_time(), time.perf_counter()
        library.arianna_feed(engine, head, len(prompt) - 1, 0)
        prompted, cpu_prompted = time.perf_counter(), time.process_time()
        token, rng = ctypes.c_int(prompt[-1]), ctypes.c_ulonglong(1)
        for pos in range(len(prompt) - 1, len(prompt) - 1 + gen):
            library.arianna_feed(engine, ctypes.byref(token), 1, pos)
            token = ctypes.c_int(library.arianna_sample(engine, ctypes.c_float(0.0), ctypes.c_float(0.9), ctypes.byref(rng)))
        done, cpu_done = time.perf_counter(), time.process_time()
        measured = {"prompt_s": prompted - start, "generate_s": done - prompted, "prompt_cpu_s": cpu_prompted - cpu_start,
                    "generate_cpu_s": cpu_done - cpu_prompted}
        best = {key: min(best[key], measured[key]) for key in best}
    library.arianna_close(engine)
    return best


def per_second(timing: dict, step: str, clock: str, threads: int) -> float:
    """1 / the step's wall seconds, or threads / its CPU seconds (the tokens per second the threads would give if
    nothing else ran)."""
    return 1.0 / timing[f"{step}_s"] if clock == "wall" else threads / timing[f"{step}_cpu_s"]


def load_library(flags: list[str] | None, folder: Path) -> ctypes.CDLL:
    """librun.so, or run.c built with flags into folder."""
    path = REPO / "librun.so"
    if flags is not None:
        path = folder / "librun_isa.so"
        subprocess.run(["cc", "-O3", "-std=gnu11", *flags, "-fopenmp", "-shared", "-fPIC", "-DARIANNA_LIBRARY", "-o",
                        str(path), str(REPO / "run.c"), "-lm"], check=True)
    if not path.is_file():
        sys.exit("error: librun.so not found; build it with `make librun.so`")
    library = ctypes.CDLL(str(path))
    library.arianna_open.restype = ctypes.c_void_p
    library.arianna_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.arianna_close.argtypes = [ctypes.c_void_p]
    library.arianna_feed.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
    library.arianna_sample.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.POINTER(ctypes.c_ulonglong)]
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="BAC")
    parser.add_argument("--threads", default="12", help="thread counts, one digit each")
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="tokens per wall second, or per CPU second of each process times the threads")
    parser.add_argument("--isa", choices=ISAS, default="native",
                        help="native: librun.so and ggml's best CPU variant; avx2: both built for AVX2 (x86-64-v3)")
    args = parser.parse_args()
    if not (REPO / "bench" / "node_modules" / "node-llama-cpp").is_dir():
        sys.exit("error: node-llama-cpp is not installed; `make bench-llamacpp` installs it")
    flags, variant = ISAS[args.isa]
    print(f"CPU: {cpu_description()}")
    print(f"ours: {'librun.so (make)' if flags is None else 'run.c built with ' + ' '.join(flags)}")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        library = load_library(flags, folder)
        script = llamacpp_script(variant, folder)
        header = False
        for name in args.shapes:
            shape = SHAPES[name]
            model = random_model(shape)
            tokenizer_model = synthetic_tokenizer(shape[4], folder / f"tok{name}.model")
            tokenizer_bin = Tokenizer(tokenizer_model).export(folder / f"tok{name}.bin")
            ours = {"fp32": export_model(model, folder / f"{name}_v1.bin", version=1),
                    "int8": export_model(model, folder / f"{name}_v2.bin", version=2, group_size=32)}
            gguf = {kind: interop.export_gguf(model, tokenizer_model, folder / f"{name}_{kind}.gguf", kind)
                    for kind in interop.GGUF_TYPES}
            del model
            prompt = [1] + torch.randint(3, shape[4], (args.prompt - 1,), generator=torch.Generator().manual_seed(1)).tolist()
            gen = min(args.gen, shape[5] - args.prompt)
            for threads in (int(t) for t in args.threads):
                timings, backend = run_llamacpp(script, list(gguf.values()), threads, prompt, gen, args.repeats, shape[5])
                theirs = dict(zip(gguf, timings))
                if not header:
                    print(f"llama.cpp: node-llama-cpp {backend or ''}; tokens per {args.clock} second"
                          f"{' times the threads' if args.clock == 'cpu' else ''}\n\n| shape | weights: ours / llama.cpp | threads | "
                          "gen tok/s ours | gen tok/s llama.cpp | prompt tok/s ours | prompt tok/s llama.cpp |\n"
                          "|---|---|---|---|---|---|---|")
                    header = True
                mine = {kind: run_ours(library, path, tokenizer_bin, threads, prompt, gen, args.repeats)
                        for kind, path in ours.items()}
                for our_kind, their_kind in (("fp32", "f32"), ("fp32", "f16"), ("int8", "q8_0")):
                    a, b = mine[our_kind], theirs[their_kind]
                    print(f"| {name} | {our_kind} / {their_kind} | {threads} | "
                          f"{gen * per_second(a, 'generate', args.clock, threads):.0f} | "
                          f"{gen * per_second(b, 'generate', args.clock, threads):.0f} | "
                          f"{(len(prompt) - 1) * per_second(a, 'prompt', args.clock, threads):.0f} | "
                          f"{(len(prompt) - 1) * per_second(b, 'prompt', args.clock, threads):.0f} |", flush=True)
            for path in [*ours.values(), *gguf.values()]:
                path.unlink()


if __name__ == "__main__":
    main()
