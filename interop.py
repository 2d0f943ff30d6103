"""Hugging Face and GGUF: a local Hugging Face Llama in as a Transformer, our models out to transformers and llama.cpp.

    model, checkpoint = load_hf_llama("models/Llama-dir")            # finetune.py --base_model=DIR (or --init_from=DIR)
    export_hf(model, "data/tok4096.model", "out/hf")                  # export.py --format=hf out/hf
    export_gguf(model, "data/tok4096.model", "out/model.gguf", "q8_0")  # export.py --format=gguf out/model.gguf --type=q8_0

The Hugging Face directory is a LlamaForCausalLM: config.json, model.safetensors (or shards listed in
model.safetensors.index.json) in float32, float16 or bfloat16, and a SentencePiece tokenizer.model. The safetensors
files are memory-mapped and read one tensor at a time into the float32 model, so the weights are never in memory
twice; with QLoRA each layer is quantized to NF4 as soon as it is read, so the float32 copy of a 7B base never exists.

RoPE layout. This project (as Meta's Llama and llama2.c) rotates adjacent pairs (x[2i], x[2i+1]) of each head;
Hugging Face rotates the halves (x[i], x[i + head_dim/2]). The two give the same attention once the rows of wq and
wk are reordered within each head: Hugging Face's row i < head_dim/2 is our row 2i, its row head_dim/2 + i our row
2i + 1. GGUF keeps Meta's order (llama.cpp's converter undoes the Hugging Face order too), so it needs no reordering.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

import numpy as np
import torch
from sentencepiece import SentencePieceProcessor
from torch import nn

from formats import atomic_write
from model import ModelArgs, Transformer, rope_tables
from tokenizer import ASSISTANT_HEADER, SYSTEM_HEADER, USER_HEADER

GGUF_TYPES = ("f32", "f16", "q8_0")
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
# Hugging Face keeps these non-weights in some older checkpoints; the model recomputes them.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")


# ----------------------------------------------------------------------------- names and the RoPE reordering

@dataclass(frozen=True)
class Weight:
    ours: str  # name in model.py's state dict; {i} is the layer
    hf: str  # name in a Hugging Face LlamaForCausalLM
    gguf: str  # name in llama.cpp's GGUF
    heads: str = ""  # "n_heads" / "n_kv_heads": rows reordered per head between the two RoPE layouts


WEIGHTS = (
    Weight("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    Weight("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    Weight("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight",
           "n_heads"),
    Weight("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight",
           "n_kv_heads"),
    Weight("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    Weight("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    Weight("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    Weight("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    Weight("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    Weight("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    Weight("norm.weight", "model.norm.weight", "output_norm.weight"),
    Weight("output.weight", "lm_head.weight", "output.weight"),
)


def weight_names(args: ModelArgs) -> Iterator[tuple[str, str, str, int]]:
    """(our name, Hugging Face name, GGUF name, heads to reorder or 0) of every weight the model stores, the shared
    classifier once (as the embedding)."""
    for weight in WEIGHTS:
        if weight.ours == "output.weight" and args.tie_embeddings:
            continue
        heads = getattr(args, weight.heads) if weight.heads else 0
        for i in range(args.n_layers) if "{i}" in weight.ours else (0,):
            yield weight.ours.format(i=i), weight.hf.format(i=i), weight.gguf.format(i=i), heads


def rotate_half_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Hugging Face q_proj/k_proj [heads * head_dim, in] in our order (see the module docstring)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_rotate_half(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of rotate_half_to_interleaved: our wq/wk rows in Hugging Face's order."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------- Hugging Face in

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{path} not found: a Hugging Face model directory needs it")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path} cannot be read as JSON ({exc})")
    if not isinstance(data, dict):
        fail(f"{path} holds no JSON object")
    return data


def args_from_hf_config(directory: str | os.PathLike) -> ModelArgs:
    """ModelArgs of DIR/config.json; SystemExit naming the field for anything this model cannot represent."""
    path = Path(directory) / "config.json"
    config = _read_json(path)

    def refuse(field: str, why: str) -> NoReturn:
        fail(f"{path}: {field}={json.dumps(config.get(field))} {why}")

    if config.get("model_type") != "llama" or "LlamaForCausalLM" not in config.get("architectures", ["LlamaForCausalLM"]):
        refuse("model_type", f"(architectures={config.get('architectures')}) is not a Llama: only LlamaForCausalLM "
                             "is supported")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(field), int) or config[field] <= 0:
            refuse(field, "must be a positive integer")
    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "is not supported: Llama's SwiGLU needs silu")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            refuse(field, "is not supported: the projections here have no biases")
    n_heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // n_heads
    if config.get("head_dim") not in (None, head_dim) or config["hidden_size"] % n_heads:
        refuse("head_dim", f"is not supported: only hidden_size / num_attention_heads = {head_dim}")
    # transformers 5 writes rope_parameters (theta and scaling together), 4.x rope_theta and rope_scaling.
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        refuse(field, "is not supported: only no RoPE scaling or linear scaling")
    scaling = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
    rope_theta = float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)
    try:
        return ModelArgs(
            dim=config["hidden_size"], hidden_dim=config["intermediate_size"], n_layers=config["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
            norm_eps=float(config.get("rms_norm_eps", 1e-6)), max_seq_len=int(config.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta, rope_scaling=scaling, tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    except ValueError as exc:
        refuse("num_key_value_heads", f"is not supported ({exc})")


def check_tokenizer(directory: str | os.PathLike, vocab_size: int) -> Path:
    """DIR/tokenizer.model, a SentencePiece model of exactly vocab_size pieces."""
    path = Path(directory) / "tokenizer.model"
    if not path.is_file():
        other = " (its tokenizer.json is a BPE/other tokenizer, not supported)" if (path.parent / "tokenizer.json").is_file() else ""
        fail(f"{path} not found: only SentencePiece tokenizers are supported{other}")
    try:
        pieces = SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (RuntimeError, OSError) as exc:
        fail(f"{path} is not a SentencePiece model ({str(exc).splitlines()[0][:200]})")
    if pieces != vocab_size:
        fail(f"{path} has {pieces} pieces but {path.parent / 'config.json'} vocab_size is {vocab_size}: "
             "the tokenizer does not belong to this model")
    return path


class SafetensorsWeights:
    """The tensors of a Hugging Face directory's safetensors file(s), memory-mapped, read one at a time."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index_path = directory / HF_INDEX
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                fail(f"{index_path}: weight_map is missing or empty")
            for shard in sorted(set(weight_map.values())):
                if not (directory / shard).is_file():
                    fail(f"{index_path}: weight_map names shard {shard}, which is missing from {directory}")
        elif (directory / HF_SINGLE).is_file():
            weight_map = None
        else:
            fail(f"{directory} has neither {HF_SINGLE} nor {HF_INDEX} (pytorch_model.bin checkpoints are not read: "
                 "save the model with safe_serialization=True)")
        self.files: dict[str, object] = {}
        shards = sorted(set(weight_map.values())) if weight_map else [HF_SINGLE]
        for shard in shards:
            try:
                self.files[shard] = safe_open(str(directory / shard), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for damaged headers
                fail(f"{directory / shard} cannot be read as safetensors ({str(exc).splitlines()[0][:200]})")
        self.where = weight_map or {name: HF_SINGLE for name in self.files[HF_SINGLE].keys()}
        self.directory = directory

    def names(self) -> set[str]:
        return set(self.where)

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor as float32, checked against the shape the model expects."""
        if name not in self.where:
            fail(f"{self.directory}: tensor {name} is missing from the safetensors weights")
        path = self.directory / self.where[name]
        tensor = self.files[self.where[name]].get_tensor(name)
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            fail(f"{path}: tensor {name} is {tensor.dtype}; only float32, float16 and bfloat16 weights are read")
        if tuple(tensor.shape) != shape:
            fail(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies {shape}")
        return tensor.float()


def load_hf_llama(directory: str | os.PathLike,
                  per_layer: Optional[Callable[[nn.Module], object]] = None) -> tuple[Transformer, dict]:
    """A float32 Transformer from a Hugging Face LlamaForCausalLM directory, and a checkpoint-like dict:
    {"model_args", "tokenizer_model", "hf_dir", "weights_sha256"} (of the float32 weights by name: the base's identity).

    per_layer(block) runs on each TransformerBlock as soon as its weights are in (QLoRA quantizes it there). Every
    tensor goes from the memory-mapped file straight into its place; the model is built on the meta device first.
    """
    directory = Path(directory)
    if not directory.is_dir():
        fail(f"{directory} is not a directory")
    args = args_from_hf_config(directory)
    tokenizer_model = check_tokenizer(directory, args.vocab_size)
    weights = SafetensorsWeights(directory)
    expected = {hf for _, hf, _, _ in weight_names(args)}
    ignored = HF_IGNORED_SUFFIXES + (("lm_head.weight",) if args.tie_embeddings else ())  # a tied copy, if saved
    unknown = sorted(name for name in weights.names() - expected if not name.endswith(ignored))
    if unknown:
        fail(f"{directory}: tensor {unknown[0]} (and {len(unknown) - 1} more) is not part of a Llama of this "
             "config.json (biases? another architecture?)")
    with torch.device("meta"):
        model = Transformer(args)
    model.requires_grad_(False)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    digest = hashlib.sha256()
    names = sorted(weight_names(args))  # each layer's weights together, so per_layer sees a finished block
    for position, (ours, hf, _, heads) in enumerate(names):
        tensor = weights.read(hf, shapes[ours])
        if heads:
            tensor = rotate_half_to_interleaved(tensor, heads)
        digest.update(f"{ours}:{tuple(tensor.shape)}\n".encode() + tensor.numpy().tobytes())
        module_name, _, param_name = ours.rpartition(".")
        setattr(model.get_submodule(module_name), param_name, nn.Parameter(tensor.contiguous(), requires_grad=False))
        layer = ours.split(".")[1] if ours.startswith("layers.") else None
        next_name = names[position + 1][0] if position + 1 < len(names) else ""
        if per_layer is not None and layer is not None and not next_name.startswith(f"layers.{layer}."):
            per_layer(model.layers[int(layer)])
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.freqs_cos, model.freqs_sin = rope_tables(args.dim // args.n_heads, args.max_seq_len, args.rope_theta,
                                                   args.rope_scaling)
    if per_layer is None:
        model.requires_grad_(True)
    checkpoint = {"model_args": args.to_dict(), "tokenizer_model": str(tokenizer_model), "hf_dir": str(directory),
                  "weights_sha256": digest.hexdigest()}
    return model, checkpoint


# ----------------------------------------------------------------------------- files out

def _write_through_path(path: Path, write: Callable[[Path], object]) -> None:
    """write(temp path), then rename over path; the temp file is removed if write fails. For the libraries that
    write to a path themselves (safetensors, gguf); everything else goes through formats.atomic_write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path, "w", encoding="utf-8") as out:
        out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def is_shared_classifier(model: Transformer) -> bool:
    return model.output.weight is model.tok_embeddings.weight or torch.equal(model.output.weight,
                                                                             model.tok_embeddings.weight)


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The chat template of tokenizer.encode_dialog as Jinja, for transformers' apply_chat_template and llama.cpp.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    f"{{% if message['role'] == 'system' %}}{{{{ {_jinja_string(SYSTEM_HEADER)} + message['content'] + '\\n' }}}}"
    f"{{% elif message['role'] == 'user' %}}{{{{ {_jinja_string(USER_HEADER)} + message['content'] + "
    f"{_jinja_string(ASSISTANT_HEADER)} }}}}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _tokenizer(path: str | os.PathLike, vocab_size: int) -> SentencePieceProcessor:
    if not Path(path).is_file():
        fail(f"tokenizer {path} not found; pass --tokenizer_model=PATH to the model's SentencePiece .model")
    sp = SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() != vocab_size:
        fail(f"tokenizer {path} has {sp.vocab_size()} pieces but the model's vocab_size is {vocab_size}; "
             "pass the tokenizer it was trained with")
    return sp


def hf_config(args: ModelArgs, bos_id: int, eos_id: int) -> dict:
    """config.json of a LlamaForCausalLM equal to a model of these args."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.dim // args.n_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": {"rope_type": "linear", "factor": args.rope_scaling} if args.rope_scaling != 1.0 else None,
        "tie_word_embeddings": args.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32", "use_cache": True,
    }


def export_hf(model: Transformer, tokenizer_model: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write out_dir as a Hugging Face LlamaForCausalLM (float32 safetensors, the shared classifier stored once)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    args = _export_args(model)
    sp = _tokenizer(tokenizer_model, args.vocab_size)
    state = dict(model.state_dict())
    tensors = {}
    for ours, hf, _, heads in weight_names(args):
        tensor = state[ours].detach().float().cpu()
        tensors[hf] = (interleaved_to_rotate_half(tensor, heads) if heads else tensor).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_through_path(out_dir / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_json(out_dir / "config.json", hf_config(args, sp.bos_id(), sp.eos_id()))
    _write_json(out_dir / "generation_config.json", {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()})
    with atomic_write(out_dir / "tokenizer.model") as out:
        out.write(Path(tokenizer_model).read_bytes())
    special = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
               "unk_token": sp.id_to_piece(sp.unk_id())}
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", **special, "pad_token": None, "add_bos_token": True,
        "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False,
        "model_max_length": args.max_seq_len, "chat_template": CHAT_TEMPLATE})
    return out_dir


def _export_args(model: Transformer) -> ModelArgs:
    """The model's args with tie_embeddings as the weights are (a fine-tune may have untied them)."""
    args = ModelArgs(**model.args.to_dict())
    args.tie_embeddings = is_shared_classifier(model)
    return args


# ----------------------------------------------------------------------------- GGUF out

def _gguf_tensor(tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, object]:
    """(data, ggml type) of one tensor in a file of kind f32/f16/q8_0; vectors (the norms) stay float32, as in
    llama.cpp's converter, and rows that Q8_0's blocks of 32 do not divide fall back to float16."""
    import gguf

    array = tensor.detach().float().cpu().numpy()
    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or kind == "f32":
        return array, types.F32
    if kind == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0:
        return gguf.quants.quantize(array, types.Q8_0), types.Q8_0
    return array.astype(np.float16), types.F16


def gguf_token_types(sp: SentencePieceProcessor) -> list[int]:
    import gguf

    kinds = gguf.TokenType
    def kind(token_id: int) -> int:
        if sp.is_unknown(token_id):
            return kinds.UNKNOWN
        if sp.is_control(token_id):
            return kinds.CONTROL
        if sp.is_byte(token_id):
            return kinds.BYTE
        if sp.is_unused(token_id):
            return kinds.UNUSED
        return kinds.NORMAL
    return [int(kind(i)) for i in range(sp.vocab_size())]


def export_gguf(model: Transformer, tokenizer_model: str | os.PathLike, path: str | os.PathLike, kind: str = "f32",
                name: str = "") -> Path:
    """Write model as a llama.cpp GGUF file of kind f32, f16 or q8_0, with its SentencePiece vocabulary."""
    import gguf

    if kind not in GGUF_TYPES:
        fail(f"--type={kind}: expected one of {', '.join(GGUF_TYPES)}")
    path = Path(path)
    args = _export_args(model)
    sp = _tokenizer(tokenizer_model, args.vocab_size)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name or path.stem)
        writer.add_context_length(args.max_seq_len)
        writer.add_embedding_length(args.dim)
        writer.add_block_count(args.n_layers)
        writer.add_feed_forward_length(args.hidden_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.n_kv_heads)
        writer.add_rope_dimension_count(args.dim // args.n_heads)
        writer.add_rope_freq_base(args.rope_theta)
        if args.rope_scaling != 1.0:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(args.rope_scaling)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        writer.add_vocab_size(args.vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("llama")
        writer.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in range(sp.vocab_size())])
        writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
        writer.add_token_types(gguf_token_types(sp))
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
        state = model.state_dict()
        for ours, _, gguf_name, _ in weight_names(args):
            data, ggml_type = _gguf_tensor(state[ours], kind)
            writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_through_path(path, write)
    return path
