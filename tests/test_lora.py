"""LoRA and QLoRA: only adapters train, merging is exact, NF4 stays within its rounding bound."""
from __future__ import annotations

import pytest
import torch

import lora
from model import ModelArgs, Transformer

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=32))


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (4, 17), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train(model: Transformer, steps: int, lr: float = 1e-2) -> list[float]:
    inputs, targets = fixed_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def randomize_adapters(model: Transformer) -> None:
    """B starts at zero (adapters are a no-op then); give it values so merging has something to fold."""
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)


def test_lora_r4_trains_only_adapters_and_leaves_the_base_bytes_unchanged() -> None:
    model = tiny_model()
    base_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora.apply_lora(model, r=4, alpha=8, targets=ALL_TARGETS)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B on 7 projections in 2 layers
    layer = model.layers[0].attention.wq
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (64, 4) and layer.scale == 2.0
    assert not layer.lora_B.any()
    losses = train(model, 10)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    for name, before in base_before.items():
        wrapped = name.replace(".weight", ".base.weight") if any(f".{t}." in name + "." for t in ALL_TARGETS) else name
        assert torch.equal(after[wrapped], before), name
    adapters = lora.lora_state_dict(model)
    assert set(adapters) == {f"{name}" for name in trainable}
    assert any(t.abs().sum() > 0 for key, t in adapters.items() if key.endswith("lora_B"))


@pytest.mark.parametrize("qlora", [False, True])
def test_merged_model_gives_the_adapted_logits(qlora: bool) -> None:
    model = lora.apply_lora(tiny_model(), r=4, alpha=8, targets=ALL_TARGETS, qlora=qlora)
    randomize_adapters(model)
    inputs, _ = fixed_batch()
    with torch.no_grad():
        adapted, _ = model(inputs)
        with lora.adapters_disabled(model):
            base_only, _ = model(inputs)
        lora.merge_lora(model)
        merged, _ = model(inputs)
    assert not any(True for _ in lora.lora_layers(model))
    assert isinstance(model.layers[1].feed_forward.w2, torch.nn.Linear)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert (adapted - base_only).abs().max() > 1e-3  # the adapters really changed something


def test_adapters_disabled_is_the_base_model_and_restores_afterwards() -> None:
    model = tiny_model()
    inputs, _ = fixed_batch()
    with torch.no_grad():
        original, _ = model(inputs)
        lora.apply_lora(model, r=4)
        randomize_adapters(model)
        with lora.adapters_disabled(model):
            disabled, _ = model(inputs)
        adapted, _ = model(inputs)
    torch.testing.assert_close(disabled, original)
    assert (adapted - original).abs().max() > 1e-3


def test_nf4_round_trip_error_is_within_half_the_widest_level_gap_times_absmax() -> None:
    torch.manual_seed(3)
    weight = torch.randn(96, 200) * 0.02
    weight[5, :64] = 0.0  # an all-zero block must survive too
    quantized = lora.quantize_nf4(weight, double_quant=False)
    assert quantized["packed"].dtype == torch.uint8 and quantized["packed"].numel() * 2 == weight.numel()
    restored = lora.dequantize_nf4(quantized, weight.shape)
    blocks = weight.flatten().view(-1, lora.NF4_BLOCK_SIZE)
    error = (restored - weight).abs().flatten().view(-1, lora.NF4_BLOCK_SIZE).amax(dim=1)
    absmax = blocks.abs().amax(dim=1)
    assert lora.NF4_MAX_ROUNDING_ERROR == pytest.approx((1.0 - 0.6961928009986877) / 2)  # between -1 and the next level
    assert torch.all(error <= lora.NF4_MAX_ROUNDING_ERROR * absmax * (1 + 1e-6))
    # Every block's largest value is a level (+-1) and comes back exactly.
    assert torch.allclose(restored.flatten().view(-1, 64).abs().amax(dim=1), absmax)
    print(f"NF4 max error / absmax: {(error / absmax.clamp_min(1e-12)).max():.4f} "
          f"(bound {lora.NF4_MAX_ROUNDING_ERROR:.4f})")


def test_double_quantized_scales_add_at_most_their_own_int8_error() -> None:
    torch.manual_seed(4)
    weight = torch.randn(300, 256) * 0.05  # 1200 blocks -> 5 scale blocks of 256
    plain = lora.quantize_nf4(weight, double_quant=False)
    double = lora.quantize_nf4(weight, double_quant=True)
    assert double["absmax_codes"].dtype == torch.int8 and "absmax" not in double
    n_blocks = weight.numel() // lora.NF4_BLOCK_SIZE
    scale_error = (lora.dequantize_scales(double, n_blocks) - plain["absmax"]).abs()
    # The bound from the float32 scales alone, not from the code's own scale-of-scales: int8 rounding of the
    # mean-centred scales, block of 256 by block, is off by at most half of (largest |centred scale| / 127).
    centered = plain["absmax"] - plain["absmax"].mean()
    step = torch.stack([block.abs().max() / 127 for block in centered.split(lora.SCALE_BLOCK_SIZE)])
    scale_bound = step.repeat_interleave(lora.SCALE_BLOCK_SIZE)[:n_blocks] / 2
    assert torch.all(scale_error <= scale_bound * (1 + 1e-4) + 1e-9)
    error = (lora.dequantize_nf4(double, weight.shape) - weight).abs().flatten().view(n_blocks, -1).amax(dim=1)
    assert torch.all(error <= lora.NF4_MAX_ROUNDING_ERROR * plain["absmax"] + scale_error + 1e-7)


def test_qlora_base_memory_is_about_an_eighth_and_fine_tuning_lowers_loss() -> None:
    model = tiny_model()
    stored_before, full_before = lora.base_memory_bytes(model)
    assert stored_before == full_before
    lora.apply_lora(model, r=4, targets=ALL_TARGETS, qlora=True)
    stored, full = lora.base_memory_bytes(model)
    assert full == full_before
    projections = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, lora.NF4Linear))
    # The projections shrink from 4 bytes to ~0.5 byte per weight (+ scales); embeddings and norms stay float32.
    assert stored < full_before - projections * 4 * 0.8
    assert isinstance(model.layers[0].feed_forward.w1.base, lora.NF4Linear)
    losses = train(model, 25)
    assert losses[-1] < 0.9 * losses[0]


def test_lora_state_dict_round_trip_and_mismatch() -> None:
    source = lora.apply_lora(tiny_model(), r=4)
    randomize_adapters(source)
    target = lora.apply_lora(tiny_model(), r=4)
    lora.load_lora_state_dict(target, lora.lora_state_dict(source))
    inputs, _ = fixed_batch()
    with torch.no_grad():
        torch.testing.assert_close(target(inputs)[0], source(inputs)[0])
    with pytest.raises(ValueError, match="--lora_r and --lora_targets"):
        lora.load_lora_state_dict(lora.apply_lora(tiny_model(), r=4, targets=("wq",)), lora.lora_state_dict(source))
    with pytest.raises(ValueError, match="shape"):
        lora.load_lora_state_dict(lora.apply_lora(tiny_model(), r=2), lora.lora_state_dict(source))


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="targets among"):
        lora.apply_lora(tiny_model(), targets=("output",))
