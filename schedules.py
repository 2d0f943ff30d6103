"""Learning-rate and batch-size schedules shared by train_arianna.py and finetune.py.

Learning rate (--lr_schedule), with peak = --learning_rate, min = --min_lr, W = --warmup_iters, D = --lr_decay_iters:

    cosine (default)   step < W:        lr = peak * (step + 1) / (W + 1)                       linear warmup
                       W <= step < D:   lr = min + (peak - min) * (1 + cos(pi * (step - W) / (D - W))) / 2
                       step >= D:       lr = min
    phi                step < W:        lr = peak * phi ** -(K - floor(step * K / W)),  phi = (1 + sqrt 5) / 2, K = 8
                       then as cosine.
                       The golden-ratio warmup cuts the W warmup steps into K equal stages; the rate starts at
                       peak / phi^8 (about 2% of peak) and is multiplied by phi at every stage boundary, reaching
                       peak / phi in the last stage and peak at step W, where the cosine decay begins.

Effective batch (--batch_schedule), with base = --gradient_accumulation_steps and boundaries b1 < b2 < ... = --trinity_steps:

    constant (default) accumulation = base
    trinity            accumulation = base * 3 ** (number of boundaries b_i <= step)
                       so the effective batch (batch_size * accumulation * processes) triples at each boundary,
                       e.g. 32 -> 96 -> 288 -> 864 sequences per step with --trinity_steps=1000,3000,6000.
"""
from __future__ import annotations

import math
from typing import Sequence

LR_SCHEDULES = ("cosine", "phi")
BATCH_SCHEDULES = ("constant", "trinity")
PHI = (1 + math.sqrt(5)) / 2
PHI_WARMUP_POWERS = 8  # K: the phi warmup starts at peak / phi^8, about 2% of the peak


def learning_rate(step: int, schedule: str, peak_lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Learning rate at step for schedule "cosine" or "phi" (formulas in the module docstring)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_iters:
        if schedule == "phi":
            return peak_lr * PHI ** -(PHI_WARMUP_POWERS - step * PHI_WARMUP_POWERS // warmup_iters)
        return peak_lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def parse_boundaries(text: str) -> list[int]:
    """'1000,3000,6000' -> [1000, 3000, 6000]; a clear ValueError unless positive and strictly increasing."""
    try:
        boundaries = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--trinity_steps={text!r}: expected comma-separated step numbers like 1000,3000,6000") from None
    if any(b <= 0 for b in boundaries) or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"--trinity_steps={text!r}: steps must be positive and increasing, like 1000,3000,6000")
    return boundaries


def batch_boundaries(schedule: str, text: str) -> list[int]:
    """The --trinity_steps boundaries for a batch schedule; a clear ValueError when trinity has none."""
    boundaries = parse_boundaries(text)
    if schedule == "trinity" and not boundaries:
        raise ValueError("--batch_schedule=trinity needs --trinity_steps=a,b,c (the steps where the batch triples)")
    return boundaries


def accumulation_steps(step: int, base_accum: int, schedule: str, boundaries: Sequence[int]) -> int:
    """Gradient-accumulation micro-steps at optimizer step `step` (formulas in the module docstring)."""
    if schedule not in BATCH_SCHEDULES:
        raise ValueError(f"unknown batch schedule {schedule!r}: expected one of {', '.join(BATCH_SCHEDULES)}")
    if schedule == "constant":
        return base_accum
    return base_accum * 3 ** sum(1 for boundary in boundaries if step >= boundary)
