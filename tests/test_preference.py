"""Preference training (preference.py): DPO, the reward model and PPO, on tiny models trained here on CPU."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch

import preference
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, encode_dialog

THINGS = ["sky", "grass", "sun", "sea", "tree", "fire", "snow", "rock", "bird", "fish", "road", "door"]
FILLER = ["red", "blue", "green", "small", "big", "old", "new", "warm", "cold", "soft"]
ANSWERS = ["yes", "no", "maybe", "later"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A tiny SentencePiece model in which every toy word is one token."""
    words = THINGS + FILLER + ANSWERS + ["good", "bad", "is", "tell", "me", "about", "the", "it"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(400)]
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    with open(path, "wb") as model_file:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model_file, vocab_size=96, model_type="bpe",
            character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
            user_defined_symbols=["<|system|>", "<|user|>", "<|assistant|>"],
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        )
    return Tokenizer(path)


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=vocab_size, max_seq_len=48))


def encoder(tokenizer: Tokenizer):
    return lambda text: tokenizer.encode(text, bos=False, eos=False)


# ----------------------------------------------------------------------------- pure functions

def test_dpo_loss_matches_hand_computation():
    pi_w, pi_l = [-3.0, -10.0, -4.5], [-5.0, -2.0, -4.0]
    ref_w, ref_l = [-4.0, -9.0, -4.0], [-4.5, -3.0, -4.2]
    beta = 0.5
    expected_losses, expected_chosen, expected_rejected = [], [], []
    for a, b, c, d in zip(pi_w, pi_l, ref_w, ref_l):
        logits = beta * ((a - c) - (b - d))
        expected_losses.append(-math.log(1.0 / (1.0 + math.exp(-logits))))
        expected_chosen.append(beta * (a - c))
        expected_rejected.append(beta * (b - d))
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    loss, chosen, rejected = preference.dpo_loss(as_tensor(pi_w), as_tensor(pi_l), as_tensor(ref_w),
                                                 as_tensor(ref_l), beta)
    assert loss.item() == pytest.approx(sum(expected_losses) / 3, rel=1e-12)
    np.testing.assert_allclose(chosen.numpy(), expected_chosen, rtol=1e-12)
    np.testing.assert_allclose(rejected.numpy(), expected_rejected, rtol=1e-12)
    metrics = preference.dpo_metrics(chosen, rejected)
    assert metrics["rewards/accuracies"] == pytest.approx(1 / 3)  # only the first pair has chosen > rejected
    assert metrics["rewards/margins"] == pytest.approx(np.mean(np.subtract(expected_chosen, expected_rejected)))
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def test_sequence_logps_sums_answer_tokens_and_ignores_padding():
    model = tiny_model(40).eval()
    rows = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12], [1, 3, 4, 5, 6, 7, 8, 9, 2]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1]]
    with torch.no_grad():
        batched = preference.sequence_logps(model, preference.pad_right(rows, 0), preference.pad_right(masks, 0))
        for row, mask, got in zip(rows, masks, batched):
            logits, _ = model(torch.tensor([row]))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            expected = sum(logp[t - 1, row[t]].item() for t in range(1, len(row)) if mask[t])
            assert got.item() == pytest.approx(expected, abs=1e-4)


def test_gae_matches_hand_computation():
    rewards = [[1.0, 2.0, 3.0], [0.5, -1.0, 7.0]]
    values = [[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]]
    mask = [[1, 1, 1], [1, 1, 0]]  # the second answer has two tokens; its third column is padding
    gamma, lam = 0.9, 0.8
    expected = []
    for r, v, m in zip(rewards, values, mask):
        n = sum(m)
        v_next = v[1:n] + [0.0]  # no value after the last token
        deltas = [r[t] + gamma * v_next[t] - v[t] for t in range(n)]
        advantages = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
        expected.append(advantages + [0.0] * (len(m) - n))
    advantages, returns = preference.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask, dtype=torch.float),
                                         gamma, lam)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-6)
    expected_returns = np.array(expected) + np.array(values) * np.array(mask)
    np.testing.assert_allclose(returns.numpy(), expected_returns, rtol=1e-6)


def test_kl_penalized_rewards_put_the_score_on_the_last_answer_token():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref_logps = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = preference.kl_penalized_rewards(torch.tensor([10.0, 20.0]), logps, ref_logps, mask, kl_coef=0.1)
    expected = [[-0.05, 0.0, 10.1], [-0.1, 20.0, 0.0]]
    np.testing.assert_allclose(rewards.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_ppo_losses_clip_the_ratio_and_the_value():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.0]]))  # ratios 1.5, 0.5, 1.1, 1.0
    advantages = torch.tensor([[1.0, -1.0, 1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values, old_values, returns = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 4), torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    losses = preference.ppo_losses(new, old, values, old_values, advantages, returns, mask,
                                   cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    # per token max(-A r, -A clip(r)): -1.2, +0.8, -1.1 -> mean -0.5; clipped on the first two tokens
    assert losses.policy_loss.item() == pytest.approx(-0.5 / 1.0, rel=1e-5)
    assert losses.clipfrac.item() == pytest.approx(2 / 3)
    # value 1.0 clipped to 0.2: max((1-2)^2, (0.2-2)^2) = 3.24 on token 0, zero elsewhere -> 0.5 * 3.24 / 3
    assert losses.value_loss.item() == pytest.approx(0.5 * 3.24 / 3, rel=1e-5)
    assert losses.loss.item() == pytest.approx(losses.policy_loss.item() + 0.1 * losses.value_loss.item())


def test_whitened_advantages_have_zero_mean_and_unit_variance_on_the_mask():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -100.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    whitened = preference.masked_whiten(values, mask)[mask.bool()]
    assert whitened.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened.std().item() == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- data

def test_preference_formats_render_through_the_chat_template(tokenizer):
    flat = {"prompt": "tell me about the sky", "chosen": "it is blue", "rejected": "it is red"}
    messages_form = {
        "chosen": [{"role": "system", "content": "be good"}, {"role": "user", "content": "tell me about the sky"},
                   {"role": "assistant", "content": "it is blue"}],
        "rejected": [{"role": "system", "content": "be good"}, {"role": "user", "content": "tell me about the sky"},
                     {"role": "assistant", "content": "it is red"}],
    }
    prompt, chosen, rejected = preference.preference_messages(flat)
    assert prompt == [{"role": "user", "content": "tell me about the sky"}]
    assert chosen == [{"role": "assistant", "content": "it is blue"}]
    prompt, chosen, rejected = preference.preference_messages(messages_form)
    assert [m["role"] for m in prompt] == ["system", "user"] and rejected[0]["content"] == "it is red"

    encode = encoder(tokenizer)
    pair = preference.tokenize_pair(encode, preference.preference_messages(flat), tokenizer.bos_id, tokenizer.eos_id)
    whole, _ = encode_dialog(encode, [{"role": "user", "content": "tell me about the sky"},
                                      {"role": "assistant", "content": "it is blue"}], tokenizer.bos_id, tokenizer.eos_id)
    assert pair.chosen == whole
    answer = [t for t, m in zip(pair.chosen, pair.chosen_mask) if m]
    assert answer == encode("it is blue") + [tokenizer.eos_id]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "hi", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, '"chosen" must be'),
    ({"prompt": "hi", "chosen": [{"role": "robot", "content": "x"}], "rejected": "b"}, "not {"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "share no opening messages"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "must end with a user message"),
    (["not", "an", "object"], "JSON object"),
])
def test_malformed_preference_records_say_what_is_wrong(record, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
        preference.preference_messages(record)
