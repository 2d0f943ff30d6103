"""Preference training: DPO, KTO, a Bradley-Terry reward model, and PPO from human (or computed) feedback.

    python finetune.py --method=dpo    --init_from=out/sft/ckpt.pt --data=prefs.jsonl --beta=0.1
    python finetune.py --method=kto    --init_from=out/sft/ckpt.pt --data=answers.jsonl
    python finetune.py --method=reward --init_from=out/sft/ckpt.pt --data=prefs.jsonl --out_dir=out/rm
    python finetune.py --method=ppo    --init_from=out/sft/ckpt.pt --prompts=prompts.jsonl \\
                       --reward_model=out/rm/ckpt.pt          (or --reward_fn=my_rewards:contains_yes)

finetune.py parses the flags (PreferenceConfig: tuning.FinetuneConfig plus this file's PreferenceFlags) and
calls run_dpo / run_kto / run_reward / run_ppo here; the loop, checkpoints and model loading are tuning.py's
and training.py's. Every text goes through the toolkit's one chat template (tokenizer.encode_dialog).
Preference lines are either {"prompt": str, "chosen": str, "rejected": str} or the messages form, where
"chosen" and "rejected" are whole conversations (lists of {"role", "content"}) that share their opening
messages (a "prompt" list of messages may also be given separately, as TRL's conversational format does).
KTO lines are unpaired: {"prompt", "completion", "label": true|false}, prompt and completion strings or messages.

Conventions follow TRL, so numbers read the same as there:
- DPO: loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))),
  with the implicit rewards beta * (log pi - log ref) logged as rewards/chosen, rewards/rejected,
  their difference as rewards/margins and how often chosen beats rejected as rewards/accuracies.
- KTO (Ethayarajh et al. 2024): 1 - sigmoid(beta * (log pi/ref - z)) for desirable answers and
  1 - sigmoid(beta * (z - log pi/ref)) for undesirable ones, weighted, with the reference point z the batch's
  KL estimate on mismatched prompt/answer pairs; logged as kl, rewards/chosen, rewards/rejected, logps/...
- PPO: per-token reward -kl_coef * (log pi - log ref), with the score added on the last response
  token; GAE(gamma, lam) on a value head over the policy's hidden states; advantages whitened;
  clipped policy and value losses. Logged as env/reward_mean, objective/kl, objective/entropy,
  policy/clipfrac, loss/value.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lora import adapters_disabled, lora_layers, merge_lora
from model import Transformer
from tokenizer import Tokenizer, encode_dialog
from training import (Runtime, Shuffled, clean_state_dict, load_checkpoint, model_from_checkpoint, save_checkpoint,
                      split_validation)
from tuning import (ROLES, BaseCheckpoint, FinetuneConfig, FinetuneTrainer, context_length, export_finetuned, fail,
                    load_base_model, load_lines, planned_steps, segment_encoder, start_method, tokenizer_path)

Messages = list[dict]
REWARD_MODEL_KIND = "reward_model"
REWARD_HEAD = "reward_head"  # the head's name in a reward run's ckpt.pt ("extra")
VALUE_HEAD = "value_head"    # the value head's name in a PPO run's ckpt.pt ("extra")


# ----------------------------------------------------------------------------- flags

@dataclass
class PreferenceFlags:
    """The preference methods' own flags (TRL's names and defaults where TRL has them)."""
    beta: float = field(default=0.1, metadata={"help": "dpo, kto: strength of the implicit KL to the reference"})
    desirable_weight: float = field(default=1.0, metadata={
        "help": "kto: weight of the desirable (label true) answers' losses"})
    undesirable_weight: float = field(default=1.0, metadata={
        "help": "kto: weight of the undesirable (label false) answers' losses"})
    reward_model: str = field(default="", metadata={"help": "ppo: reward model checkpoint (--method=reward's ckpt.pt)"})
    reward_fn: str = field(default="", metadata={
        "help": "ppo: a Python reward function as module:function or file.py:function, instead of a reward model. "
                "It is imported and run as it is, with your rights: pass only code you trust"})
    prompts: str = field(default="", metadata={"help": "ppo: JSONL of prompts"})
    kl_coef: float = field(default=0.05, metadata={"help": "ppo: per-token penalty on log pi - log ref (the start value "
                                                           "with --target_kl)"})
    target_kl: float = field(default=0.0, metadata={
        "help": "ppo: adapt kl_coef towards this KL per answer (Ziegler et al. 2019, TRL's adap_kl_ctrl); 0: fixed"})
    kl_horizon: int = field(default=10000, metadata={"help": "ppo: answers over which kl_coef may change by about e^0.2"})
    cliprange: float = field(default=0.2, metadata={"help": "ppo: clip of the policy ratio and of the value change"})
    vf_coef: float = field(default=0.1, metadata={"help": "ppo: weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"help": "ppo: discount of later rewards"})
    lam: float = field(default=0.95, metadata={"help": "ppo: GAE lambda (bias against variance of advantages)"})
    ppo_epochs: int = field(default=4, metadata={"help": "ppo: passes over each batch of sampled answers"})
    ppo_minibatches: int = field(default=4, metadata={"help": "ppo: minibatches per PPO epoch"})
    max_new_tokens: int = field(default=64, metadata={"help": "ppo: longest sampled answer"})
    temperature: float = field(default=1.0, metadata={"help": "ppo: sampling temperature of the answers"})



@dataclass
class PreferenceConfig(FinetuneConfig, PreferenceFlags):
    """FinetuneConfig plus the preference methods' flags: what run_dpo, run_kto, run_reward and run_ppo take."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_kl < 0 or self.kl_horizon < 1:
            fail(f"--target_kl={self.target_kl} must be >= 0 (0: fixed kl_coef) and --kl_horizon={self.kl_horizon} >= 1")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            fail("--desirable_weight and --undesirable_weight must be >= 0")


# ----------------------------------------------------------------------------- data

@dataclass
class TokenizedPair:
    """One preference pair through the chat template: each side is the whole conversation and a mask on its answer."""
    chosen: list[int]
    chosen_mask: list[int]  # 1 on the answer's tokens (the ones the log-probability sums over)
    rejected: list[int]
    rejected_mask: list[int]


def _as_messages(value: object, field: str, default_role: str) -> Messages:
    """A string becomes one message of default_role; a list must already be {"role", "content"} messages."""
    if isinstance(value, str) and value.strip():
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f'"{field}" must be a non-empty string or a list of {{"role", "content"}} messages')
    for message in value:
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise ValueError(f'"{field}" has a message that is not {{"role": system|user|assistant, "content": str}}')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_prompt(prompt: Messages, where: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError(f"{where} must end with a user message (the one being answered)")


def _check_answer(answer: Messages, field: str) -> None:
    if not answer or answer[-1]["role"] != "assistant":
        raise ValueError(f'"{field}" must end with an assistant message after the shared prompt')


def preference_messages(record: object) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen answer, rejected answer) as message lists from one JSON line; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError('expected a JSON object with "chosen" and "rejected"')
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise ValueError(f'missing {", ".join(repr(k) for k in missing)}; expected {{"prompt", "chosen", "rejected"}} '
                         'or the messages form {"chosen": [...], "rejected": [...]}')
    chosen = _as_messages(record["chosen"], "chosen", "assistant")
    rejected = _as_messages(record["rejected"], "rejected", "assistant")
    if "prompt" in record:
        prompt = _as_messages(record["prompt"], "prompt", "user")
    else:
        # Messages form: the shared opening of both conversations is the prompt.
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise ValueError('"chosen" and "rejected" share no opening messages, so there is no prompt; add "prompt"')
    _check_prompt(prompt, '"prompt"' if "prompt" in record else "the shared messages")
    _check_answer(chosen, "chosen")
    _check_answer(rejected, "rejected")
    return prompt, chosen, rejected


def prompt_messages(record: object) -> Messages:
    """The conversation to answer from one prompts.jsonl line: {"prompt": str} or {"messages": [...]}."""
    if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
        raise ValueError('expected {"prompt": str} or {"messages": [...]} (one of the two)')
    if "prompt" in record:
        messages = _as_messages(record["prompt"], "prompt", "user")
    else:
        messages = _as_messages(record["messages"], "messages", "user")
    _check_prompt(messages, "the prompt")
    return messages


def tokenize_answer(encode: Callable[[str], list[int]], prompt: Messages, answer: Messages,
                    bos_id: int, eos_id: int) -> tuple[list[int], list[int]]:
    """Tokens of prompt + answer and a mask that is 1 on the answer's trained (assistant) tokens only."""
    prompt_tokens, _ = encode_dialog(encode, prompt, bos_id, eos_id)
    tokens, trained = encode_dialog(encode, prompt + answer, bos_id, eos_id)
    # Segments simply follow each other in the template, so the prompt's tokens are a prefix of the whole.
    return tokens, [0] * len(prompt_tokens) + trained[len(prompt_tokens):]


def tokenize_pair(encode: Callable[[str], list[int]], messages: tuple[Messages, Messages, Messages],
                  bos_id: int, eos_id: int) -> TokenizedPair:
    prompt, chosen, rejected = messages
    chosen_tokens, chosen_mask = tokenize_answer(encode, prompt, chosen, bos_id, eos_id)
    rejected_tokens, rejected_mask = tokenize_answer(encode, prompt, rejected, bos_id, eos_id)
    return TokenizedPair(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask)


def pad_right(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A [B, longest] long tensor with rows padded on the right.

    Right padding is invisible to the real tokens: attention is causal, so no real position sees a pad.
    """
    longest = max(len(row) for row in rows)
    return torch.tensor([list(row) + [pad] * (longest - len(row)) for row in rows], dtype=torch.long, device=device)


def pair_batch(pairs: Sequence[TokenizedPair], pad_id: int,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [2B, T], answer mask [2B, T], lengths [2B]): the chosen sides first, then the rejected, one forward pass."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long, device=device)
    return pad_right(rows, pad_id, device), pad_right(masks, 0, device), lengths


# ----------------------------------------------------------------------------- log-probabilities

def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: [B, T] from logits [B, T, V] and targets [B, T]."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def sequence_logps(model: Transformer, tokens: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked (answer) tokens of log p(token | everything before it): [B] for tokens [B, T]."""
    # The last position predicts nothing we score, so it is not fed: sequences may be context + 1 long.
    logits, _ = model(tokens[:, :-1])
    return (token_logps(logits, tokens[:, 1:]) * answer_mask[:, 1:]).sum(dim=-1)


# ----------------------------------------------------------------------------- DPO

def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean DPO loss, chosen rewards [B], rejected rewards [B]); the rewards are detached, for logging."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    # logsigmoid is the stable form of log(sigmoid(x)) for large |x|.
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins (means over the batch)."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
    }


# ----------------------------------------------------------------------------- KTO

@dataclass
class KTOExample:
    """One unpaired answer through the chat template, split where the answer starts (the segments of the template
    simply follow each other, so prompt + any answer is a valid conversation: that builds the KL rows)."""
    prompt: list[int]       # the conversation up to the assistant header
    answer: list[int]       # the answer's tokens
    answer_mask: list[int]  # 1 on the answer's trained (assistant) tokens
    desirable: bool


def kto_messages(record: object) -> tuple[Messages, Messages, bool]:
    """(prompt, completion, label) from one {"prompt", "completion", "label": true|false} line (strings or messages)."""
    if not isinstance(record, dict) or not {"prompt", "completion", "label"} <= set(record):
        raise ValueError('expected {"prompt": ..., "completion": ..., "label": true|false}')
    if not isinstance(record["label"], bool):
        raise ValueError(f'"label" must be true or false, not {json.dumps(record["label"])[:40]}')
    prompt = _as_messages(record["prompt"], "prompt", "user")
    completion = _as_messages(record["completion"], "completion", "assistant")
    _check_prompt(prompt, '"prompt"')
    _check_answer(completion, "completion")
    return prompt, completion, record["label"]


def load_kto_examples(path: str | Path, tokenizer: Tokenizer, longest: int) -> list[KTOExample]:
    """KTO lines of a JSONL file; malformed lines reported as FILE:LINE and skipped, overlong answers counted."""
    encode = segment_encoder(tokenizer)

    def tokenize(record: dict) -> KTOExample:
        prompt, completion, label = kto_messages(record)
        prompt_tokens, _ = encode_dialog(encode, prompt, tokenizer.bos_id, tokenizer.eos_id)
        tokens, mask = encode_dialog(encode, prompt + completion, tokenizer.bos_id, tokenizer.eos_id)
        return KTOExample(prompt_tokens, tokens[len(prompt_tokens):], mask[len(prompt_tokens):], label)

    examples = load_lines(path, tokenize, lambda example: len(example.prompt) + len(example.answer), longest,
                          "answers", '{"prompt": ..., "completion": ..., "label": true}')
    desirable = sum(example.desirable for example in examples)
    print(f"{path}: {len(examples)} answers ({desirable} desirable, {len(examples) - desirable} undesirable)")
    return examples


def kto_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, policy_kl_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean KTO loss, chosen rewards, rejected rewards, kl) as Ethayarajh et al. (2024) and TRL define them.

    The reference point z = max(0, mean(log pi - log ref) over the KL rows), detached: the rows pair each prompt
    with another example's answer, an estimate of KL(pi || ref) on answers not chosen for that prompt. Then
    desirable answers lose 1 - sigmoid(beta * (log pi/ref - z)) and undesirable ones 1 - sigmoid(beta * (z - log
    pi/ref)), weighted by desirable_weight and undesirable_weight, averaged over all answers of the batch.
    """
    kl = (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


KTO_SUMS = ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")


def kto_batch_loss(policy: Transformer, reference: Reference, examples: Sequence[KTOExample], pad_id: int,
                   longest: int, cfg: PreferenceConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO loss of a batch and TRL's statistics as sums and counts (kto_summary turns them into means), so they
    average correctly over micro-batches and processes whatever each one's mix of labels. The KL estimate is the
    micro-batch's own (TRL gathers it over processes; per micro-batch keeps W processes equal to one with W times
    the accumulation)."""
    device = policy.tok_embeddings.weight.device
    rows = [ex.prompt + ex.answer for ex in examples]
    masks = [[0] * len(ex.prompt) + ex.answer_mask for ex in examples]
    # KL rows: prompt i with the answer of example i-1 (TRL's shift), cut to the context.
    shifted = [examples[i - 1] for i in range(len(examples))]
    kl_rows = [(ex.prompt + other.answer)[:longest] for ex, other in zip(examples, shifted)]
    kl_masks = [([0] * len(ex.prompt) + other.answer_mask)[:longest] for ex, other in zip(examples, shifted)]
    tokens, mask = pad_right(rows, pad_id, device), pad_right(masks, 0, device)
    kl_tokens, kl_mask = pad_right(kl_rows, pad_id, device), pad_right(kl_masks, 0, device)
    policy_logps = sequence_logps(policy, tokens, mask)
    with torch.no_grad():
        policy_kl_logps = sequence_logps(policy, kl_tokens, kl_mask)
        with reference.model() as ref:
            ref_logps = sequence_logps(ref, tokens, mask)
            ref_kl_logps = sequence_logps(ref, kl_tokens, kl_mask)
    chosen = torch.tensor([ex.desirable for ex in examples], device=device)
    loss, chosen_rewards, rejected_rewards, kl = kto_loss(
        policy_logps[chosen], policy_logps[~chosen], policy_kl_logps, ref_logps[chosen], ref_logps[~chosen],
        ref_kl_logps, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    metrics = {"kl": kl.item(), "count/chosen": float(chosen.sum()), "count/rejected": float((~chosen).sum()),
               "rewards/chosen_sum": chosen_rewards.sum().item(), "rewards/rejected_sum": rejected_rewards.sum().item(),
               "logps/chosen_sum": policy_logps[chosen].detach().sum().item(),
               "logps/rejected_sum": policy_logps[~chosen].detach().sum().item()}
    return loss, metrics


def kto_summary(metrics: dict[str, float]) -> dict[str, float]:
    """TRL's logged KTO metrics from kto_batch_loss's sums and counts: rewards/chosen, rewards/rejected,
    rewards/margins, logps/chosen, logps/rejected (means over the answers of that label), kl, count/*."""
    summary = {key: value for key, value in metrics.items() if not key.endswith("_sum")}
    for name in KTO_SUMS:
        count = metrics.get(f"count/{name.split('/')[1]}", 0.0)
        if f"{name}_sum" in metrics and count > 0:
            summary[name] = metrics[f"{name}_sum"] / count
    if "rewards/chosen" in summary and "rewards/rejected" in summary:
        summary["rewards/margins"] = summary["rewards/chosen"] - summary["rewards/rejected"]
    return summary


# ----------------------------------------------------------------------------- reward model and value head

class ScalarHead(nn.Module):
    """A linear map from the final hidden state to one number (a reward, or a value estimate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        # Small start: the head's first outputs are near zero, so early losses and KL terms stay sane.
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(dim + 1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


def last_positions(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D] at each row's last real token (index lengths - 1): [B, D]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


class RewardModel(nn.Module):
    """The Llama backbone with a scalar head on the last token of the conversation."""

    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        self.head = ScalarHead(backbone.args.dim)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores [B] of right-padded tokens [B, T] whose real lengths are lengths [B]."""
        return self.head(last_positions(self.backbone.hidden(tokens), lengths)).float()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged: the pairwise loss of a reward model."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


# ----------------------------------------------------------------------------- PPO pieces

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries, as TRL whitens advantages."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    # Bessel's correction, as TRL's masked_var does, so a batch's statistics are unbiased.
    count = mask.sum()
    if count > 1:
        variance = variance * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens [B, R] (mask 0 after each row's end).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero past the end.
    Returns (advantages, returns = advantages + values), both zero on masked positions.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def kl_penalized_rewards(scores: torch.Tensor, policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, R]: -kl_coef * (log pi - log ref), plus each row's score on its last response token."""
    rewards = -kl_coef * (policy_logps - ref_logps) * mask
    last = mask.sum(dim=1).long() - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards


@dataclass
class PPOLosses:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def adapted_kl_coef(kl_coef: float, kl: float, target: float, answers: int, horizon: int) -> float:
    """Ziegler et al. (2019)'s proportional controller: kl_coef times 1 + e * answers / horizon, where
    e = clip(kl / target - 1, -0.2, 0.2): it grows while the policy's KL to the reference is above target."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * answers / horizon)


def ppo_losses(logps: torch.Tensor, old_logps: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
               advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange: float, cliprange_value: float, vf_coef: float) -> PPOLosses:
    """The clipped surrogate objective and the clipped value loss, averaged over response tokens."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    return PPOLosses(
        loss=policy_loss + vf_coef * value_loss,
        policy_loss=policy_loss,
        value_loss=value_loss,
        clipfrac=masked_mean((clipped > unclipped).float(), mask),
        approx_kl=0.5 * masked_mean((logps - old_logps) ** 2, mask),
    )


# ----------------------------------------------------------------------------- reference model

class Reference:
    """The starting model, for log-probabilities the policy is compared against (DPO, PPO's KL penalty).

    With LoRA it is the policy itself with its adapters switched off (the base never trains), so no second
    copy is held; without LoRA it is a frozen copy taken before training starts.
    """

    def __init__(self, policy: Transformer):
        self.policy = policy
        self.frozen = None if any(True for _ in lora_layers(policy)) else copy.deepcopy(policy).requires_grad_(False).eval()

    @contextlib.contextmanager
    def model(self) -> Iterator[Transformer]:
        if self.frozen is not None:
            yield self.frozen
            return
        # Dropout off too: the reference must score deterministically.
        was_training = self.policy.training
        self.policy.eval()
        try:
            with adapters_disabled(self.policy) as base:
                yield base
        finally:
            self.policy.train(was_training)


# ----------------------------------------------------------------------------- PPO rollouts and updates

def sample_answers(policy: Transformer, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float,
                   eos_id: int, generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """One sampled answer per prompt, through its first EOS (or max_new_tokens tokens without one).

    Prompts of equal length are sampled together: generate() takes no padding mask, and these need none.
    """
    device = policy.tok_embeddings.weight.device
    rows_by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        rows_by_length.setdefault(len(prompt), []).append(row)
    answers: list[list[int]] = [[] for _ in prompts]
    for length, rows in rows_by_length.items():
        context = torch.tensor([prompts[row] for row in rows], dtype=torch.long, device=device)
        sampled = policy.generate(context, max_new_tokens, temperature=temperature, eos_id=eos_id,
                                  generator=generator)[:, length:]
        for row, answer in zip(rows, sampled.tolist()):
            answers[row] = answer[: answer.index(eos_id) + 1] if eos_id in answer else answer
    return answers


@dataclass
class Rollout:
    """A batch of prompt + sampled answer sequences and everything PPO needs about their answer tokens [B, R]."""
    tokens: torch.Tensor          # [B, T] prompt + answer, right-padded
    prompt_lengths: torch.Tensor  # [B]
    mask: torch.Tensor            # [B, R] float, 1 on each answer's tokens
    logps: torch.Tensor           # [B, R] log pi_old(answer token)
    ref_logps: torch.Tensor       # [B, R] log ref(answer token)
    values: torch.Tensor          # [B, R] V_old(state before each answer token)
    scores: torch.Tensor          # [B] reward model or function score of each whole answer
    advantages: torch.Tensor      # [B, R] whitened GAE advantages
    returns: torch.Tensor         # [B, R] value targets


def rollout_tokens(prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int,
                   device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, T], prompt lengths [B], answer mask [B, R]) with R the longest answer and T = longest prompt + R."""
    longest_answer = max(len(answer) for answer in answers)
    width = max(len(prompt) for prompt in prompts) + longest_answer
    rows = [list(p) + list(a) + [pad_id] * (width - len(p) - len(a)) for p, a in zip(prompts, answers)]
    mask = [[1.0] * len(a) + [0.0] * (longest_answer - len(a)) for a in answers]
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device),
            torch.tensor(mask, device=device))


def answer_outputs(model: Transformer, tokens: torch.Tensor, prompt_lengths: torch.Tensor, answer_width: int,
                   temperature: float, value_head: Optional[ScalarHead] = None
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p of each answer token [B, R] (at the sampling temperature) and, given a value head, V of the state before it."""
    hidden = model.hidden(tokens)
    # Position prompt_length - 1 + t predicts answer token t.
    positions = prompt_lengths[:, None] - 1 + torch.arange(answer_width, device=tokens.device)
    answer_hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.output(answer_hidden).float() / temperature
    logps = token_logps(logits, tokens.gather(1, positions + 1))
    values = value_head(answer_hidden).float() if value_head is not None else None
    return logps, values


@dataclass
class PromptItem:
    tokens: list[int]  # the conversation through the chat template, ending with the assistant header
    text: str          # the user message being answered: what a reward function is shown


ScoreAnswers = Callable[[Sequence[PromptItem], Sequence[list[int]]], torch.Tensor]
"""score_answers(prompts, answer tokens) -> scores [B]: a reward model or a reward function behind one interface."""


@torch.no_grad()
def make_rollout(policy: Transformer, value_head: ScalarHead, reference: Reference, prompts: Sequence[PromptItem],
                 score_answers: ScoreAnswers,
                 max_new_tokens: int, temperature: float, eos_id: int, kl_coef: float, gamma: float, lam: float,
                 generator: Optional[torch.Generator] = None) -> Rollout:
    """Sample answers, score them, and compute the old log-probs, values, KL-penalised rewards and GAE advantages."""
    was_training = policy.training
    policy.eval()
    prompt_tokens = [prompt.tokens for prompt in prompts]
    answers = sample_answers(policy, prompt_tokens, max_new_tokens, temperature, eos_id, generator)
    device = policy.tok_embeddings.weight.device
    tokens, prompt_lengths, mask = rollout_tokens(prompt_tokens, answers, eos_id, device)
    width = mask.shape[1]
    logps, values = answer_outputs(policy, tokens, prompt_lengths, width, temperature, value_head)
    with reference.model() as ref:
        ref_logps, _ = answer_outputs(ref, tokens, prompt_lengths, width, temperature)
    policy.train(was_training)
    scores = score_answers(prompts, answers).to(device=device, dtype=torch.float32)
    rewards = kl_penalized_rewards(scores, logps, ref_logps, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return Rollout(tokens, prompt_lengths, mask, logps * mask, ref_logps * mask, values * mask, scores,
                   masked_whiten(advantages, mask) * mask, returns)


def ppo_update(trainer: FinetuneTrainer, value_head: ScalarHead, rollout: Rollout, ppo_epochs: int,
               minibatch_size: int, cliprange: float, vf_coef: float, temperature: float,
               generator: Optional[torch.Generator] = None) -> dict[str, float]:
    """ppo_epochs passes over the rollout in shuffled minibatches, an optimizer update each (trainer.optimizer_step
    through trainer.forward, so under torchrun the processes average their gradients); the means of the losses and
    clip fraction."""
    policy = trainer.model
    policy.train()
    batch, width = rollout.mask.shape
    totals: dict[str, float] = {}
    updates = 0

    def minibatch_losses(rows: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
        logps, values = answer_outputs(policy, rollout.tokens[rows], rollout.prompt_lengths[rows], width,
                                       temperature, value_head)
        # TRL clips the value with cliprange_value, whose default equals cliprange's 0.2.
        losses = ppo_losses(logps, rollout.logps[rows], values, rollout.values[rows], rollout.advantages[rows],
                            rollout.returns[rows], rollout.mask[rows], cliprange, cliprange, vf_coef)
        return losses.loss, 0, {"loss/policy": losses.policy_loss.item(), "loss/value": losses.value_loss.item(),
                                "policy/clipfrac": losses.clipfrac.item(), "policy/approxkl": losses.approx_kl.item()}

    for _ in range(ppo_epochs):
        order = torch.randperm(batch, generator=generator).tolist()
        for start in range(0, batch, minibatch_size):
            rows = torch.tensor(order[start:start + minibatch_size], device=rollout.tokens.device)
            _, _, metrics = trainer.optimizer_step(1, lambda _: trainer.forward(minibatch_losses, rows))
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    return {key: total / updates for key, total in totals.items()}


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """TRL's per-batch statistics: mean score, KL and entropy summed over each answer, then averaged over answers."""
    mask = rollout.mask
    return {
        "env/reward_mean": rollout.scores.mean().item(),
        "env/reward_std": rollout.scores.std().item() if rollout.scores.numel() > 1 else 0.0,
        "objective/kl": ((rollout.logps - rollout.ref_logps) * mask).sum(dim=1).mean().item(),
        "objective/entropy": (-rollout.logps * mask).sum(dim=1).mean().item(),
        "answer_length": mask.sum(dim=1).mean().item(),
    }


# ----------------------------------------------------------------------------- DPO and reward-model steps

def dpo_batch_loss(policy: Transformer, reference: Reference, tokens: torch.Tensor, answer_mask: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO loss of a pair_batch() batch (chosen rows first, then rejected) and its TRL metrics."""
    pairs = tokens.shape[0] // 2
    policy_logps = sequence_logps(policy, tokens, answer_mask)
    with torch.no_grad(), reference.model() as ref:
        ref_logps = sequence_logps(ref, tokens, answer_mask)
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_logps[:pairs], policy_logps[pairs:],
                                                      ref_logps[:pairs], ref_logps[pairs:], beta)
    metrics = dpo_metrics(chosen_rewards, rejected_rewards)
    metrics["logps/chosen"] = policy_logps[:pairs].mean().item()
    metrics["logps/rejected"] = policy_logps[pairs:].mean().item()
    return loss, metrics


def reward_batch_loss(reward_model: RewardModel, tokens: torch.Tensor,
                      lengths: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss of a pair_batch() batch and how often the chosen answer scores higher."""
    pairs = tokens.shape[0] // 2
    scores = reward_model(tokens, lengths)
    chosen, rejected = scores[:pairs], scores[pairs:]
    metrics = {
        "accuracy": (chosen > rejected).float().mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }
    return bradley_terry_loss(chosen, rejected), metrics


@torch.no_grad()
def evaluate_pairs(batch_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
                   pairs: Sequence[TokenizedPair], batch_size: int, pad_id: int,
                   device: torch.device | str) -> dict[str, float]:
    """batch_loss(tokens, answer mask, lengths) over all pairs: the loss and metrics averaged, weighted by batch size."""
    totals: dict[str, float] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        loss, metrics = batch_loss(*pair_batch(chunk, pad_id, device))
        for key, value in {"loss": loss.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value * len(chunk)
    return {key: total / len(pairs) for key, total in totals.items()}


# ----------------------------------------------------------------------------- files

def load_pairs(path: str | Path, tokenizer: Tokenizer, longest: int) -> list[TokenizedPair]:
    """Preference pairs of a JSONL file; malformed lines reported as FILE:LINE and skipped, overlong pairs counted."""
    encode = segment_encoder(tokenizer)
    pairs = load_lines(path, lambda record: tokenize_pair(encode, preference_messages(record), tokenizer.bos_id,
                                                          tokenizer.eos_id),
                       lambda pair: max(len(pair.chosen), len(pair.rejected)), longest, "pairs",
                       '{"prompt": ..., "chosen": ..., "rejected": ...} or {"chosen": [messages], "rejected": [messages]}')
    print(f"{path}: {len(pairs)} preference pairs")
    return pairs


def load_prompts(path: str | Path, tokenizer: Tokenizer, longest: int) -> list[PromptItem]:
    """Prompts of a JSONL file ({"prompt": str} or {"messages": [...]}) that leave room for longest answer tokens."""
    encode = segment_encoder(tokenizer)

    def tokenize(record: dict) -> PromptItem:
        messages = prompt_messages(record)
        tokens, _ = encode_dialog(encode, messages, tokenizer.bos_id, tokenizer.eos_id)
        return PromptItem(tokens, messages[-1]["content"])

    prompts = load_lines(path, tokenize, lambda prompt: len(prompt.tokens), longest, "prompts",
                         '{"prompt": "..."} or {"messages": [...]}',
                         hint=", which leaves no room for --max_new_tokens in the context")
    print(f"{path}: {len(prompts)} prompts")
    return prompts


@dataclass
class DataRun:
    """What a method trained on JSON lines starts from: start_method's four, plus the data and the plan."""
    runtime: Runtime
    model: Transformer
    base: BaseCheckpoint
    tokenizer: Tokenizer
    longest: int  # tokens a line may take
    train: list
    val: list
    total_steps: int


def start_on_data(cfg: FinetuneConfig, load: Callable[[str, Tokenizer, int], list], scores_last_token: bool) -> DataRun:
    """start_method, then --data read by load(path, tokenizer, longest) and split for validation (--val_data, else
    a seeded --val_fraction held out), and the planned steps. A method scoring every token of a line (DPO, KTO)
    takes lines of context + 1 tokens: the last one is scored, never fed."""
    runtime, model, base, tokenizer = start_method(cfg)
    longest = context_length(cfg, model) + int(scores_last_token)
    items = load(cfg.data, tokenizer, longest)
    train, val = (items, load(cfg.val_data, tokenizer, longest)) if cfg.val_data else \
        split_validation(items, cfg.val_fraction, cfg.seed)
    total_steps = planned_steps(cfg, lambda micro: cfg.batch_size, len(train), runtime.world_size)
    return DataRun(runtime, model, base, tokenizer, longest, train, val, total_steps)


# ----------------------------------------------------------------------------- reward model files and functions

def save_reward_model(path: str | Path, reward_model: RewardModel, tokenizer_model: str, config: dict) -> None:
    """A self-contained reward model checkpoint (kind "reward_model"): the backbone with adapters merged, and the head."""
    backbone = merge_lora(copy.deepcopy(reward_model.backbone).cpu())
    save_checkpoint(path, {
        "kind": REWARD_MODEL_KIND, "model": clean_state_dict(backbone), "model_args": backbone.args.to_dict(),
        "head": {k: v.cpu() for k, v in reward_model.head.state_dict().items()},
        "tokenizer_model": tokenizer_model, "config": config,
    })


def load_reward_model(path: str | Path) -> RewardModel:
    """A reward model written by --method=reward: its reward_model.pt, or the run's resumable ckpt.pt."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("kind") == REWARD_MODEL_KIND:
        reward_model = RewardModel(model_from_checkpoint(checkpoint))
        reward_model.head.load_state_dict(checkpoint["head"])
    elif checkpoint.get("kind") == "finetune" and checkpoint.get("method") == "reward":
        backbone, _ = load_base_model(path)  # merges LoRA adapters into their recorded base
        reward_model = RewardModel(backbone)
        reward_model.head.load_state_dict(checkpoint["extra"][REWARD_HEAD])
    else:
        fail(f"{path} is not a reward model; train one with `python finetune.py --method=reward --out_dir=DIR` "
             "and pass DIR/reward_model.pt")
    return reward_model.requires_grad_(False).eval()


def load_reward_fn(spec: str) -> Callable[[str, str], float]:
    """The function named by "module:function" (an importable module) or "path/to/file.py:function".

    This imports and runs that code as it is, with the user's rights (as TRL's reward functions do): only code
    the user trusts belongs here. Whatever goes wrong while importing it is a one-line error naming it.
    """
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        fail(f"--reward_fn={spec} must be module:function or path/to/file.py:function")
    if module_name.endswith(".py") and not Path(module_name).is_file():
        fail(f"--reward_fn={spec}: {module_name} not found")
    try:
        if module_name.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(f"--reward_fn={spec}: cannot import {module_name} ({exc}); give a module on PYTHONPATH or a .py file path")
    except BaseException as exc:  # the module's own code failed (SyntaxError, an exception, even sys.exit)
        fail(f"--reward_fn={spec}: importing {module_name} failed ({type(exc).__name__}: {one_line(exc)})")
    function = getattr(module, function_name, None)
    if not callable(function):
        fail(f"--reward_fn={spec}: {module_name} has no function {function_name}")
    return function


def one_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def reward_model_scorer(reward_model: RewardModel, pad_id: int) -> ScoreAnswers:
    def score(prompts: Sequence[PromptItem], answers: Sequence[list[int]]) -> torch.Tensor:
        rows = [prompt.tokens + answer for prompt, answer in zip(prompts, answers)]
        device = reward_model.head.proj.weight.device
        lengths = torch.tensor([len(row) for row in rows], device=device)
        with torch.no_grad():
            return reward_model(pad_right(rows, pad_id, device), lengths)
    return score


def function_scorer(reward_fn: Callable[[str, str], float], tokenizer: Tokenizer, name: str = "") -> ScoreAnswers:
    """Scores from reward_fn(prompt text, answer text); an exception or a result that is not a finite number is a
    one-line error naming the function (name: its --reward_fn spelling)."""
    name = name or getattr(reward_fn, "__qualname__", repr(reward_fn))

    def call(prompt: str, answer: str) -> float:
        try:
            value = reward_fn(prompt, answer)
        except Exception as exc:
            fail(f"--reward_fn={name} raised {type(exc).__name__}: {one_line(exc)} (answer {answer[:60]!r})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(f"--reward_fn={name} returned {str(value)[:60]!r} ({type(value).__name__}); it must return a finite "
                 "number (int or float)")
        return float(value)

    def score(prompts: Sequence[PromptItem], answers: Sequence[list[int]]) -> torch.Tensor:
        texts = [tokenizer.decode([t for t in answer if t != tokenizer.eos_id]) for answer in answers]
        return torch.tensor([call(prompt.text, text) for prompt, text in zip(prompts, texts)])
    return score


# ----------------------------------------------------------------------------- the methods

def train_on_pairs(trainer: FinetuneTrainer, batch_loss: Callable[..., tuple[torch.Tensor, dict]], train_pairs: list[TokenizedPair],
                   val_pairs: list[TokenizedPair], pad_id: int, eval_prefix: str) -> bool:
    """trainer.run over shuffled batches of pairs, evaluating on val_pairs (else the training pairs); the evaluation's
    metrics are logged as val_loss and eval_prefix + name. False if Ctrl-C stopped it."""
    cfg, runtime = trainer.cfg, trainer.runtime
    shuffled = Shuffled(train_pairs, cfg.seed)

    def micro_step(step: int, micro: int) -> tuple[torch.Tensor, int, dict]:
        batch = pair_batch(shuffled.batch(micro, cfg.batch_size), pad_id, runtime.device)
        loss, metrics = batch_loss(*batch)
        return loss, batch[0].numel(), metrics

    def evaluate() -> dict:
        with runtime.autocast():
            metrics = evaluate_pairs(batch_loss, val_pairs or train_pairs, cfg.batch_size, pad_id, runtime.device)
        return {"val_loss": metrics.pop("loss"), **{eval_prefix + key: value for key, value in metrics.items()}}

    return trainer.run(micro_step, evaluate)


def run_dpo(cfg: PreferenceConfig) -> None:
    """Direct preference optimisation of the policy against the starting model."""
    if not cfg.data:
        fail("--method=dpo needs --data=prefs.jsonl with {\"prompt\", \"chosen\", \"rejected\"} lines")
    run = start_on_data(cfg, load_pairs, scores_last_token=True)
    policy = run.model
    print(f"DPO on {len(run.train)} pairs, evaluating on {len(run.val) or 'the training'} pairs; {run.total_steps} steps")
    reference = Reference(policy)  # before the trainer resumes: the reference is the starting model
    trainer = FinetuneTrainer(cfg, run.runtime, policy, run.base, run.total_steps)

    def batch_loss(tokens: torch.Tensor, answer_mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return dpo_batch_loss(policy, reference, tokens, answer_mask, cfg.beta)

    pad_id = run.tokenizer.eos_id
    if train_on_pairs(trainer, batch_loss, run.train, run.val, pad_id, eval_prefix="") and run.runtime.is_master:
        export_finetuned(cfg, policy, run.base)
    run.runtime.shutdown()


def run_kto(cfg: PreferenceConfig) -> None:
    """Kahneman-Tversky optimisation of the policy against the starting model, on answers labelled good or bad."""
    if not cfg.data:
        fail('--method=kto needs --data=answers.jsonl with {"prompt", "completion", "label": true|false} lines')
    run = start_on_data(cfg, load_kto_examples, scores_last_token=True)
    policy, runtime, train = run.model, run.runtime, run.train
    desirable = sum(example.desirable for example in train)
    if desirable in (0, len(train)):
        print(f"warning: {cfg.data} has only {'desirable' if desirable else 'undesirable'} answers; KTO learns from both",
              file=sys.stderr)
    print(f"KTO on {len(train)} answers, evaluating on {len(run.val) or 'the training'} answers; {run.total_steps} steps")
    reference = Reference(policy)  # before the trainer resumes: the reference is the starting model
    trainer = FinetuneTrainer(cfg, runtime, policy, run.base, run.total_steps)
    shuffled = Shuffled(train, cfg.seed)
    pad_id = run.tokenizer.eos_id

    def micro_step(step: int, micro: int) -> tuple[torch.Tensor, int, dict]:
        batch = shuffled.batch(micro, cfg.batch_size)
        loss, metrics = kto_batch_loss(policy, reference, batch, pad_id, run.longest, cfg)
        return loss, sum(len(ex.prompt) + len(ex.answer) for ex in batch), metrics

    @torch.no_grad()
    def evaluate() -> dict:
        examples, totals = run.val or train, {}
        for start in range(0, len(examples), cfg.batch_size):
            chunk = examples[start:start + cfg.batch_size]
            with runtime.autocast():
                loss, metrics = kto_batch_loss(policy, reference, chunk, pad_id, run.longest, cfg)
            for key, value in {"loss": loss.item() * len(chunk), "kl": metrics.pop("kl") * len(chunk), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value
        summary = kto_summary({**totals, "kl": totals["kl"] / len(examples)})
        return {"val_loss": summary.pop("loss") / len(examples), **{"eval/" + k: v for k, v in summary.items()}}

    if trainer.run(micro_step, evaluate, summarize=kto_summary) and runtime.is_master:
        export_finetuned(cfg, policy, run.base)
    runtime.shutdown()


def run_reward(cfg: PreferenceConfig) -> None:
    """A Bradley-Terry reward model: the backbone (full or LoRA) plus a scalar head, on chosen/rejected pairs."""
    if not cfg.data:
        fail("--method=reward needs --data=prefs.jsonl with {\"prompt\", \"chosen\", \"rejected\"} lines")
    run = start_on_data(cfg, load_pairs, scores_last_token=False)
    print(f"reward model on {len(run.train)} pairs, held out {len(run.val)}; {run.total_steps} steps")
    reward_model = RewardModel(run.model).to(run.runtime.device)
    trainer = FinetuneTrainer(cfg, run.runtime, run.model, run.base, run.total_steps,
                              extra_modules={REWARD_HEAD: reward_model.head})

    def batch_loss(tokens: torch.Tensor, answer_mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return reward_batch_loss(reward_model, tokens, lengths)

    if train_on_pairs(trainer, batch_loss, run.train, run.val, run.tokenizer.eos_id, eval_prefix="eval/") \
            and run.runtime.is_master:
        path = Path(cfg.out_dir) / "reward_model.pt"
        save_reward_model(path, reward_model, str(tokenizer_path(cfg, run.base)), asdict(cfg))
        print(f"wrote {path} (use it with --method=ppo --reward_model={path})")
    run.runtime.shutdown()


def run_ppo(cfg: PreferenceConfig) -> None:
    """PPO: sample answers to prompts, score them, and update the policy and its value head (TRL's recipe)."""
    if not cfg.prompts:
        fail("--method=ppo needs --prompts=prompts.jsonl with {\"prompt\": ...} or {\"messages\": [...]} lines")
    if bool(cfg.reward_model) == bool(cfg.reward_fn):
        fail("--method=ppo needs exactly one of --reward_model=CKPT (from --method=reward) or --reward_fn=module:function")
    if cfg.temperature <= 0:
        fail("--method=ppo samples answers: --temperature must be > 0 (1.0 samples the policy as it is)")
    runtime, policy, base, tokenizer = start_method(cfg)
    context = context_length(cfg, policy)
    if cfg.max_new_tokens >= context:
        fail(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the {context}-token context")
    prompts = load_prompts(cfg.prompts, tokenizer, context - cfg.max_new_tokens)
    if cfg.reward_model:
        reward_model = load_reward_model(cfg.reward_model).to(runtime.device)
        if reward_model.backbone.args.vocab_size != policy.args.vocab_size:
            fail(f"--reward_model={cfg.reward_model} has {reward_model.backbone.args.vocab_size} tokens but the "
                 f"policy has {policy.args.vocab_size}: train the reward model from the same tokenizer")
        if reward_model.backbone.args.max_seq_len < context:
            fail(f"--reward_model={cfg.reward_model} reads {reward_model.backbone.args.max_seq_len} tokens, fewer than "
                 f"the policy's {context}; lower --max_seq_len")
        score_answers = reward_model_scorer(reward_model, tokenizer.eos_id)
    else:
        score_answers = function_scorer(load_reward_fn(cfg.reward_fn), tokenizer, cfg.reward_fn)
    total_steps = cfg.max_iters or max(1, math.ceil(cfg.epochs * len(prompts) / cfg.batch_size))
    print(f"PPO on {len(prompts)} prompts, {cfg.batch_size} answers per step; {total_steps} steps")
    value_head = ScalarHead(policy.args.dim).to(runtime.device)
    reference = Reference(policy)  # before the trainer resumes: the reference is the starting model
    trainer = FinetuneTrainer(cfg, runtime, policy, base, total_steps, extra_modules={VALUE_HEAD: value_head})
    trainer.state.setdefault("kl_coef", cfg.kl_coef)  # a resumed run carries on with its adapted value
    minibatch = max(1, cfg.batch_size // cfg.ppo_minibatches)

    def ppo_step(step: int) -> tuple[float, int, dict]:
        """One step = one batch of sampled answers and its --ppo_epochs of minibatch updates."""
        # Seeded by step: a resumed run samples and shuffles exactly as the uninterrupted one would. Under
        # torchrun, process r of W answers batch step * W + r of the prompts, with its own sampling seed.
        index = step * runtime.world_size + runtime.rank
        generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed * 1_000_003 + index)
        shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with runtime.autocast():
            rollout = make_rollout(policy, value_head, reference, shuffled_prompts.batch(index, cfg.batch_size),
                                   score_answers, cfg.max_new_tokens, cfg.temperature, tokenizer.eos_id,
                                   trainer.state["kl_coef"], cfg.gamma, cfg.lam, generator)
        stats = ppo_update(trainer, value_head, rollout, cfg.ppo_epochs, minibatch, cfg.cliprange, cfg.vf_coef,
                           cfg.temperature, shuffle)
        metrics = {**rollout_metrics(rollout), **stats, "objective/kl_coef": trainer.state["kl_coef"]}
        if cfg.target_kl > 0:  # the controller follows the KL of all processes' answers
            kl = trainer.agree({"kl": metrics["objective/kl"]}, False)[0]["kl"]
            trainer.state["kl_coef"] = adapted_kl_coef(trainer.state["kl_coef"], kl, cfg.target_kl,
                                                       cfg.batch_size * runtime.world_size, cfg.kl_horizon)
        return stats["loss/policy"] + cfg.vf_coef * stats["loss/value"], int(rollout.mask.sum()), metrics

    shuffled_prompts = Shuffled(prompts, cfg.seed)
    if trainer.run(whole_step=ppo_step) and runtime.is_master:
        export_finetuned(cfg, policy, base)
    runtime.shutdown()
