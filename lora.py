"""LoRA and QLoRA adapters for the Transformer of model.py, in plain PyTorch (CPU, MPS, CUDA).

LoRA (Hu et al. 2021): a frozen projection W gets a trainable low-rank update,
    y = W x + (alpha / r) * B A dropout(x),   A: [r, in] (Kaiming-uniform as nn.Linear/PEFT), B: [out, r] (zeros),
so training starts exactly at the base model. Only A and B are trained and saved.

QLoRA (Dettmers et al. 2023): the frozen W is stored as 4-bit NormalFloat (NF4): the flattened weight is cut into
blocks of 64 values, each block divided by its absolute maximum and every value replaced by the index of the
nearest of the 16 NF4 levels; two 4-bit indices are packed per byte (first value in the high nibble). With double
quantization the float32 block scales are themselves quantized: their mean is subtracted and the remainder
stored as int8 with one float32 scale per 256 block scales. W is dequantized on the fly in every forward pass.

    apply_lora(model, r=8, alpha=8, dropout=0.0, targets=("wq","wk","wv","wo"), qlora=False, double_quant=True)
    lora_state_dict(model) / load_lora_state_dict(model, state)
    merge_lora(model)                      # plain nn.Linear weights again, ready for export.py
    adapters_disabled(model)               # the frozen base alone (reference model for DPO/PPO)
    base_memory_bytes(model) -> (as stored, as float32)
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
NF4_BLOCK_SIZE = 64
SCALE_BLOCK_SIZE = 256
# The 16 NormalFloat-4 levels of the QLoRA paper: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# Rounding to the nearest level is off by at most half the widest gap between neighbours (in units of absmax).
NF4_MAX_ROUNDING_ERROR = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2


def _pad_to_multiple(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(flat, (0, (-flat.numel()) % multiple))


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """NF4 codes of weight, two per uint8, plus its block scales (int8 + float32 with double_quant, else float32)."""
    blocks = _pad_to_multiple(weight.detach().float().flatten(), NF4_BLOCK_SIZE).view(-1, NF4_BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    codes = torch.bucketize(normalized, midpoints.to(normalized.device)).to(torch.uint8).flatten()
    quantized = {"packed": (codes[0::2] << 4) | codes[1::2]}
    if double_quant:
        offset = absmax.mean()
        centered = _pad_to_multiple(absmax - offset, SCALE_BLOCK_SIZE).view(-1, SCALE_BLOCK_SIZE)
        scale_of_scales = centered.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        quantized["absmax_codes"] = torch.round(centered / scale_of_scales[:, None]).to(torch.int8).flatten()
        quantized["absmax_scale"] = scale_of_scales
        quantized["absmax_offset"] = offset.reshape(1)
    else:
        quantized["absmax"] = absmax
    return quantized


def dequantize_scales(quantized: dict[str, torch.Tensor], n_blocks: int) -> torch.Tensor:
    """The float32 absmax of each NF4 block (undoing double quantization if it was used)."""
    if "absmax" in quantized:
        return quantized["absmax"]
    codes = quantized["absmax_codes"].view(-1, SCALE_BLOCK_SIZE).float()
    centered = (codes * quantized["absmax_scale"][:, None]).flatten()[:n_blocks]
    return centered + quantized["absmax_offset"]


def dequantize_nf4(quantized: dict[str, torch.Tensor], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of the given shape back from quantize_nf4's output."""
    packed = quantized["packed"]
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).flatten().long()
    n_blocks = codes.numel() // NF4_BLOCK_SIZE
    absmax = dequantize_scales(quantized, n_blocks)
    values = NF4_LEVELS.to(packed.device)[codes].view(n_blocks, NF4_BLOCK_SIZE) * absmax[:, None]
    return values.flatten()[: math.prod(shape)].view(*shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer whose weight lives in NF4 buffers and is dequantized at each call."""

    def __init__(self, linear: nn.Linear, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        for name, tensor in quantize_nf4(linear.weight, double_quant).items():
            self.register_buffer(name, tensor)

    def quantized(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.quantized(), (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype))


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(dropout(x))) with the base frozen (an nn.Linear, or NF4Linear for QLoRA)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.r, self.scale = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as PEFT does
        self.lora_dropout = nn.Dropout(dropout)
        self.adapter_enabled = True

    def base_weight(self) -> torch.Tensor:
        base = self.base
        return base.dequantized_weight() if isinstance(base, NF4Linear) else base.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.adapter_enabled:
            return out
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return out + self.scale * update


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 8,
    dropout: float = 0.0,
    targets: Sequence[str] = ("wq", "wk", "wv", "wo"),
    qlora: bool = False,
    double_quant: bool = True,
) -> nn.Module:
    """Wrap every nn.Linear named in targets with a LoRA adapter (in place) and freeze everything else.

    targets are the projection names of model.py (wq wk wv wo w1 w2 w3); the tied output layer is left alone
    because its weight is the embedding table. With qlora the wrapped bases are stored in NF4.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if r <= 0 or unknown or not targets:
        raise ValueError(f"LoRA needs r > 0 and targets among {','.join(LORA_TARGETS)} (got r={r}, targets={list(targets)})")
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA adapters")
    model.requires_grad_(False)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets]
    for name, linear in chosen:
        base = NF4Linear(linear, double_quant) if qlora else linear
        adapter = LoRALinear(base, r, alpha, dropout).to(linear.weight.device)
        _replace_module(model, name, adapter)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: {"layers.0.attention.wq.lora_A": ..., ...}."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach().cpu().clone()
        state[f"{name}.lora_B"] = layer.lora_B.detach().cpu().clone()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors into a model that apply_lora prepared with the same targets and rank."""
    own = {f"{name}.{part}": getattr(layer, part) for name, layer in lora_layers(model) for part in ("lora_A", "lora_B")}
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"LoRA adapters do not match the model (missing {missing[:3]}, unexpected {extra[:3]}): "
                         "use the same --lora_r and --lora_targets as when they were trained")
    with torch.no_grad():
        for key, param in own.items():
            if param.shape != state[key].shape:
                raise ValueError(f"LoRA tensor {key} has shape {tuple(state[key].shape)}, model expects {tuple(param.shape)}")
            param.copy_(state[key])


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base: W' = W + (alpha / r) B A, as a plain float32 nn.Linear (in place)."""
    for name, layer in list(lora_layers(model)):
        merged = nn.Linear(layer.base.in_features, layer.base.out_features, bias=False, device=layer.lora_A.device)
        merged.weight.copy_(layer.base_weight() + layer.scale * (layer.lora_B.float() @ layer.lora_A.float()))
        merged.requires_grad_(False)
        _replace_module(model, name, merged)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes with its frozen base only."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.adapter_enabled = enabled


def base_memory_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the frozen base takes as stored now, bytes it would take in float32); adapters are not counted.

    Tied weights are counted once; NF4 layers count their packed codes and scales.
    """
    stored = full = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            stored += sum(t.numel() * t.element_size() for t in module.quantized().values())
            full += module.in_features * module.out_features * 4
            continue
        for name, param in module.named_parameters(recurse=False):
            if name in ("lora_A", "lora_B") or id(param) in seen:
                continue
            seen.add(id(param))
            stored += param.numel() * param.element_size()
            full += param.numel() * 4
    return stored, full
