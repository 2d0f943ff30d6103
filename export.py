"""Export a checkpoint to the llama2.c .bin formats that run.c (and llama2.c's run.c/runq.c) load.

    python export.py out/model.bin --checkpoint=out/ckpt.pt                 # version 0, llama2.c legacy
    python export.py out/model_v1.bin --version=1 --checkpoint=out/ckpt.pt  # float32 with the 'ak42' header
    python export.py out/model_q80.bin --version=2 --checkpoint=out/ckpt.pt # int8 Q8_0 groups
    python export.py out/hf --format=hf                                      # a Hugging Face LlamaForCausalLM folder
    python export.py out/model.gguf --format=gguf --type=q8_0                # llama.cpp (f32, f16 or q8_0)
(interop.py writes the last two; the tokenizer is the one the checkpoint records, or --tokenizer_model.)

Layouts (all little-endian):
  v0: int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative when the classifier is not
      shared with the embedding), max_seq_len; then float32 tok_embeddings, attention_norm[L], wq[L], wk[L],
      wv[L], wo[L], ffn_norm[L], w1[L], w2[L], w3[L], norm, freqs_cos, freqs_sin [max_seq_len, head_dim/2],
      output (only when not shared).
  v1: uint32 magic 0x616b3432 ("ak42"), int32 version 1, the seven int32 above (vocab_size positive),
      uint8 shared_classifier, zero padding to 256 bytes (but float32 rope_theta at byte 44 and norm_eps at 48
      where they differ from 10000 and 1e-5); then float32 attention_norm[L], ffn_norm[L], norm,
      tok_embeddings, wq[L], wk[L], wv[L], wo[L], w1[L], w2[L], w3[L], output (only when not shared).
  v2: as v1 with version 2 and an int32 group_size after shared_classifier; then the norms in float32 as
      in v1, and every matrix of v1's list as int8 values followed by one float32 scale per group.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from formats import (HEADER_BYTES, VERSIONS, FormatError, ModelHeader, atomic_write, check_model_size,
                     parse_model_header, read_regular_file)
from model import ModelArgs, Transformer


def _write_fp32(out: BinaryIO, tensor: torch.Tensor) -> None:
    out.write(tensor.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes())


def q80_group_size(args: ModelArgs, requested: int) -> int:
    """The largest power-of-two group size <= requested that divides every row length (dim and hidden_dim)."""
    group_size = requested
    while group_size > 1 and (args.dim % group_size or args.hidden_dim % group_size):
        group_size //= 2
    return group_size


def quantize_q80(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of group_size consecutive values: (int8 values, float32 scale per group)."""
    groups = weight.detach().float().reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(groups / safe_scale[:, None]).to(torch.int8)
    return values.reshape(weight.shape), scale


def dequantize_q80(values: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    return (values.float().reshape(-1, group_size) * scale[:, None]).reshape(values.shape)


def _matrices(model: Transformer, shared_classifier: bool) -> list[torch.Tensor]:
    """The weight matrices in the order v1 and v2 store them."""
    layers = model.layers
    matrices = [model.tok_embeddings.weight]
    for name in ("wq", "wk", "wv", "wo"):
        matrices += [getattr(layer.attention, name).weight for layer in layers]
    for name in ("w1", "w2", "w3"):
        matrices += [getattr(layer.feed_forward, name).weight for layer in layers]
    if not shared_classifier:
        matrices.append(model.output.weight)
    return matrices


def _norms(model: Transformer) -> list[torch.Tensor]:
    return ([layer.attention_norm.weight for layer in model.layers]
            + [layer.ffn_norm.weight for layer in model.layers] + [model.norm.weight])


def export_model(model: Transformer, path: str | os.PathLike, version: int = 0, group_size: int = 64) -> Path:
    """Write model as a llama2.c .bin of the given version; atomic (temp file, then rename)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown .bin version {version}: expected one of {VERSIONS}")
    args = model.args
    if args.rope_scaling != 1.0:
        raise FormatError(f"linear RoPE scaling {args.rope_scaling:g} is not carried by the .bin formats: "
                          "export with --format=gguf or --format=hf")
    shared_classifier = model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr() or torch.equal(
        model.output.weight, model.tok_embeddings.weight)
    if version == 2:
        group_size = q80_group_size(args, group_size)
    header = ModelHeader(version, args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                         args.vocab_size, args.max_seq_len, shared_classifier, group_size if version == 2 else 0,
                         args.rope_theta, args.norm_eps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), atomic_write(path) as out:
        out.write(header.pack())
        if version == 0:
            layers = model.layers
            tensors = [model.tok_embeddings.weight]
            tensors += [layer.attention_norm.weight for layer in layers]
            for name in ("wq", "wk", "wv", "wo"):
                tensors += [getattr(layer.attention, name).weight for layer in layers]
            tensors += [layer.ffn_norm.weight for layer in layers]
            for name in ("w1", "w2", "w3"):
                tensors += [getattr(layer.feed_forward, name).weight for layer in layers]
            tensors += [model.norm.weight, model.freqs_cos, model.freqs_sin]
            if not shared_classifier:
                tensors.append(model.output.weight)
            for tensor in tensors:
                _write_fp32(out, tensor)
        else:
            for norm in _norms(model):
                _write_fp32(out, norm)
            for matrix in _matrices(model, shared_classifier):
                if version == 1:
                    _write_fp32(out, matrix)
                else:
                    values, scale = quantize_q80(matrix, group_size)
                    out.write(values.numpy().tobytes())
                    _write_fp32(out, scale)
    return path


def read_model_bin(path: str | os.PathLike) -> tuple[int, ModelArgs, dict[str, torch.Tensor]]:
    """Read a .bin back: (version, ModelArgs, state dict loadable by Transformer). Version 2 comes back dequantized.
    A file run.c would refuse raises FormatError (a ValueError) with a one-line message."""
    try:
        data = read_regular_file(path)
    except OSError as e:
        raise FormatError(f"cannot read model {path}: {e.strerror or e}") from None
    header = parse_model_header(data[:HEADER_BYTES], path)
    check_model_size(header, len(data), path)
    version, shared_classifier, group_size, offset = (header.version, header.shared_classifier, header.group_size,
                                                      header.header_bytes)
    dim, hidden_dim, n_layers, n_heads, vocab_size = (header.dim, header.hidden_dim, header.n_layers, header.n_heads,
                                                      header.vocab_size)
    args = ModelArgs(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=header.n_kv_heads,
                     vocab_size=vocab_size, max_seq_len=header.seq_len, rope_theta=header.rope_theta,
                     norm_eps=header.norm_eps)
    kv_dim = header.kv_dim
    shapes = {"wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
              "w1": (hidden_dim, dim), "w2": (dim, hidden_dim), "w3": (hidden_dim, dim)}
    block = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
             "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}

    def take(count: int, dtype: str) -> np.ndarray:
        nonlocal offset
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += array.nbytes
        return array

    def fp32(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(take(int(np.prod(shape)), "<f4").copy()).reshape(shape)

    def matrix(shape: tuple[int, int]) -> torch.Tensor:
        if version != 2:
            return fp32(shape)
        values = torch.from_numpy(take(shape[0] * shape[1], "i1").copy()).reshape(shape)
        return dequantize_q80(values, fp32((shape[0] * shape[1] // group_size,)), group_size)

    state: dict[str, torch.Tensor] = {}
    def layer_names(name: str) -> list[str]:
        return [f"layers.{i}.{block[name]}.{name}.weight" for i in range(n_layers)]

    if version == 0:
        state["tok_embeddings.weight"] = fp32((vocab_size, dim))
        state.update({f"layers.{i}.attention_norm.weight": fp32((dim,)) for i in range(n_layers)})
        for name in ("wq", "wk", "wv", "wo"):
            state.update({key: fp32(shapes[name]) for key in layer_names(name)})
        state.update({f"layers.{i}.ffn_norm.weight": fp32((dim,)) for i in range(n_layers)})
        for name in ("w1", "w2", "w3"):
            state.update({key: fp32(shapes[name]) for key in layer_names(name)})
        state["norm.weight"] = fp32((dim,))
        take(header.seq_len * header.head_size, "<f4")  # RoPE tables: recomputed by the model
    else:
        state.update({f"layers.{i}.attention_norm.weight": fp32((dim,)) for i in range(n_layers)})
        state.update({f"layers.{i}.ffn_norm.weight": fp32((dim,)) for i in range(n_layers)})
        state["norm.weight"] = fp32((dim,))
        state["tok_embeddings.weight"] = matrix((vocab_size, dim))
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            state.update({key: matrix(shapes[name]) for key in layer_names(name)})
    state["output.weight"] = state["tok_embeddings.weight"] if shared_classifier else matrix((vocab_size, dim))
    return version, args, state


def checkpoint_tokenizer(checkpoint: dict) -> str:
    """The SentencePiece model a checkpoint was trained with: recorded by finetune.py, else train_arianna.py's."""
    config = checkpoint.get("config", {})
    if checkpoint.get("tokenizer_model") or config.get("tokenizer_model"):
        return checkpoint.get("tokenizer_model") or config["tokenizer_model"]
    if config.get("vocab_source") == "llama2":
        from tokenizer import llama2_tokenizer_path

        return str(llama2_tokenizer_path(None))
    return str(Path(config.get("data_dir", "data")) / f"tok{checkpoint['model_args']['vocab_size']}.model")


def main() -> None:
    parser = argparse.ArgumentParser(description="Export a checkpoint to a llama2.c .bin, Hugging Face or GGUF")
    parser.add_argument("filepath", help="the .bin / .gguf file or the Hugging Face folder to write")
    parser.add_argument("--format", default="bin", choices=("bin", "hf", "gguf"),
                        help="bin: llama2.c (run.c), hf: transformers' LlamaForCausalLM folder, gguf: llama.cpp")
    parser.add_argument("--version", type=int, default=0, choices=VERSIONS,
                        help="bin: 0: llama2.c legacy float32, 1: float32 'ak42', 2: int8 Q8_0")
    parser.add_argument("--type", default="f16", choices=("f32", "f16", "q8_0"), help="gguf: the weights' type")
    parser.add_argument("--checkpoint", default="out/ckpt.pt", help="the training checkpoint to export")
    parser.add_argument("--group_size", type=int, default=64, help="Q8_0 group size for version 2")
    parser.add_argument("--tokenizer_model", default="", help="hf/gguf: the SentencePiece .model; "
                        "empty: the one the checkpoint records")
    args = parser.parse_args()
    from training import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    if "model" not in checkpoint or "model_args" not in checkpoint:
        sys.exit(f"error: {args.checkpoint} holds no full model (a LoRA adapter checkpoint?); "
                 "export the merged model with `python finetune.py ... --merge`")
    model = model_from_checkpoint(checkpoint)
    if args.format != "bin":
        import interop

        tokenizer_model = args.tokenizer_model or checkpoint_tokenizer(checkpoint)
        if args.format == "hf":
            path = interop.export_hf(model, tokenizer_model, args.filepath)
        else:
            path = interop.export_gguf(model, tokenizer_model, args.filepath, args.type)
        print(f"wrote {path} ({args.format}{' ' + args.type if args.format == 'gguf' else ''})")
        return
    try:
        path = export_model(model, args.filepath, args.version, args.group_size)
    except FormatError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path} (version {args.version}, {path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
