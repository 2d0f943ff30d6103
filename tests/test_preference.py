"""Preference training (preference.py): DPO, the reward model and PPO, on tiny models trained here on CPU."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch

import finetune
import lora
import preference
import training
import tuning
from conftest import REPO, run_script, stop_after
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, encode_dialog
from training import setup_runtime


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
            sentence_iterator=iter(lines), model_writer=model_file, vocab_size=128, model_type="bpe",
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


def test_kto_loss_matches_hand_computation():
    """Fixed log-probabilities through the KTO formulas written out, with TRL's batch KL reference point."""
    pi_w, ref_w = [-3.0, -6.0], [-4.0, -5.5]        # desirable answers
    pi_l, ref_l = [-2.0, -7.0, -4.0], [-3.0, -6.0, -4.5]  # undesirable answers
    pi_kl, ref_kl = [-5.0, -4.0, -9.0, -6.0, -3.0], [-5.5, -4.5, -8.0, -6.2, -3.1]
    beta, dw, uw = 0.5, 1.5, 0.7
    z = max(0.0, sum(p - r for p, r in zip(pi_kl, ref_kl)) / len(pi_kl))  # 0.26
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    losses = [dw * (1 - sigmoid(beta * ((p - r) - z))) for p, r in zip(pi_w, ref_w)]
    losses += [uw * (1 - sigmoid(beta * (z - (p - r)))) for p, r in zip(pi_l, ref_l)]
    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    loss, chosen, rejected, kl = preference.kto_loss(t(pi_w), t(pi_l), t(pi_kl), t(ref_w), t(ref_l), t(ref_kl),
                                                     beta, dw, uw)
    assert kl.item() == pytest.approx(z, rel=1e-12) and z > 0
    assert loss.item() == pytest.approx(sum(losses) / 5, rel=1e-12)
    np.testing.assert_allclose(chosen.numpy(), [beta * (p - r) for p, r in zip(pi_w, ref_w)], rtol=1e-12)
    np.testing.assert_allclose(rejected.numpy(), [beta * (p - r) for p, r in zip(pi_l, ref_l)], rtol=1e-12)
    # The reference point is clamped at zero and carries no gradient.
    _, _, _, kl = preference.kto_loss(t(pi_w), t(pi_l), t([-5.0]), t(ref_w), t(ref_l), t([-4.0]), beta)
    assert kl.item() == 0.0
    summary = preference.kto_summary({"kl": 0.3, "count/chosen": 2.0, "count/rejected": 4.0, "rewards/chosen_sum": 1.0,
                                      "rewards/rejected_sum": -2.0, "logps/chosen_sum": -6.0, "logps/rejected_sum": -8.0})
    assert summary == pytest.approx({"kl": 0.3, "count/chosen": 2.0, "count/rejected": 4.0, "rewards/chosen": 0.5,
                                     "rewards/rejected": -0.5, "rewards/margins": 1.0, "logps/chosen": -3.0,
                                     "logps/rejected": -2.0})


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


# ----------------------------------------------------------------------------- training runs

def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def supervised_base(tokenizer: Tokenizer, conversations: list[list[dict]], steps: int, path) -> str:
    """A tiny model taught the conversations by plain next-token training, saved as train_arianna.py would."""
    model = tiny_model(tokenizer.n_words)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = [encode_dialog(encoder(tokenizer), c, tokenizer.bos_id, tokenizer.eos_id) for c in conversations]
    for step in range(steps):
        inputs, targets = finetune.collate(random.Random(step).sample(rows, 16))
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"model": model.state_dict(), "model_args": model.args.to_dict(),
                "tokenizer_model": str(tokenizer.model_path)}, path)
    return str(path)


def greedy_answers(model: Transformer, tokenizer: Tokenizer, questions: list[str]) -> list[str]:
    model.eval()
    answers = []
    for question in questions:
        prompt, _ = encode_dialog(encoder(tokenizer), [user(question)], tokenizer.bos_id, tokenizer.eos_id)
        out = model.generate(torch.tensor([prompt]), 8, temperature=0.0, eos_id=tokenizer.eos_id)[0, len(prompt):]
        answers.append(tokenizer.decode([t for t in out.tolist() if t != tokenizer.eos_id]))
    return answers


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def run_flags(**flags) -> list[str]:
    defaults = dict(device="cpu", dtype="float32", warmup_iters=0, val_fraction=0, log_interval=1)
    return [f"--{key}={value}" for key, value in {**defaults, **flags}.items()]


DPO_QUESTIONS = [f"tell me about the {thing}" for thing in THINGS]


@pytest.fixture(scope="module")
def dpo_setup(tokenizer, tmp_path_factory):
    """A model that mostly answers "it is bad" (greedy: always), and pairs preferring "it is good"."""
    folder = tmp_path_factory.mktemp("dpo")
    conversations = [[user(f"tell me about the {thing}"), assistant(f"it is {answer}")]
                     for thing in THINGS for answer in ("bad", "bad", "bad", "good")]
    base = supervised_base(tokenizer, conversations, 150, folder / "base.pt")
    prefs = write_jsonl(folder / "prefs.jsonl", [
        {"prompt": f"tell me about the {thing}", "chosen": "it is good", "rejected": "it is bad"} for thing in THINGS])
    return base, prefs


def test_dpo_through_the_cli_prefers_the_chosen_answers(dpo_setup, tokenizer, tmp_path):
    base, prefs = dpo_setup
    before, _ = tuning.load_base_model(base)
    assert greedy_answers(before, tokenizer, DPO_QUESTIONS) == ["it is bad"] * len(DPO_QUESTIONS)
    out_dir = tmp_path / "dpo"
    flags = run_flags(method="dpo", init_from=base, data=prefs, out_dir=out_dir, lora_r=0, max_iters=40,
                      batch_size=12, learning_rate=5e-4, eval_interval=20, beta=0.1)
    run_finetune(*flags, timeout=120)
    evaluations = [r for r in log_records(out_dir) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [20, 40]
    assert evaluations[-1]["rewards/accuracies"] > 0.9
    assert evaluations[-1]["rewards/margins"] > evaluations[0]["rewards/margins"] > 0
    after, _ = tuning.load_base_model(out_dir / "ckpt.pt")
    answers = greedy_answers(after, tokenizer, DPO_QUESTIONS)
    assert sum(answer == "it is good" for answer in answers) >= 0.75 * len(answers), answers
    assert (out_dir / "model.bin").stat().st_size > 0


def test_kto_with_lora_lowers_its_loss_prefers_the_desirable_answers_and_resumes(dpo_setup, tokenizer, tmp_path,
                                                                                 monkeypatch, capsys):
    base, _ = dpo_setup
    data = write_jsonl(tmp_path / "kto.jsonl", kto_lines(
        [{"prompt": f"tell me about the {thing}", "chosen": "it is good", "rejected": "it is bad"} for thing in THINGS]))
    common = dict(method="kto", init_from=base, data=data, lora_r=4, max_iters=12, batch_size=8, learning_rate=2e-2,
                  beta=1.0, eval_interval=100)
    preference.run_kto(finetune.parse_finetune_config(run_flags(out_dir=tmp_path / "straight", **common)))
    records = [r for r in log_records(tmp_path / "straight") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "count/chosen", "count/rejected"} <= set(records[-1])
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-3:]) < losses[0] - 0.02, losses
    evaluation = log_records(tmp_path / "straight")[-1]
    assert evaluation["eval/rewards/margins"] > 0 and evaluation["val_loss"] < losses[0]
    assert (tmp_path / "straight" / "model.bin").exists()
    # Stopped after step 5, resumed with the new spelling: the same adapters as the uninterrupted run.
    monkeypatch.setattr(training, "StopFlag", stop_after(5))
    preference.run_kto(finetune.parse_finetune_config(run_flags(out_dir=tmp_path / "resumed", **common)))
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["iter_num"] == 5
    capsys.readouterr()
    preference.run_kto(finetune.parse_finetune_config(run_flags(out_dir=tmp_path / "resumed", **{
        **common, "init_from": "resume"})))
    assert "resuming from" in capsys.readouterr().out
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["lora"]
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["lora"]
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_dpo_with_lora_uses_the_base_as_reference_and_resumes_at_the_same_step(dpo_setup, tmp_path, monkeypatch, capsys):
    base, prefs = dpo_setup
    common = dict(method="dpo", init_from=base, data=prefs, lora_r=4, max_iters=16, batch_size=12,
                  learning_rate=2e-3, beta=0.5, eval_interval=100)
    preference.run_dpo(finetune.parse_finetune_config(run_flags(out_dir=tmp_path / "straight", **common)))
    evaluation = log_records(tmp_path / "straight")[-1]
    assert evaluation["rewards/accuracies"] > 0.9 and evaluation["rewards/margins"] > 0

    # The reference is the base: with the adapters off the trained policy computes exactly the starting model.
    policy, saved = tuning.load_policy(finetune.parse_finetune_config(run_flags(**common)), setup_runtime("cpu", "float32"))
    lora.load_lora_state_dict(policy, torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["lora"])
    reference = preference.Reference(policy)
    assert reference.frozen is None  # no second copy of the model
    start, _ = tuning.load_base_model(base)
    tokens = torch.tensor([[1, 5, 9, 14, 20, 3]])
    with reference.model() as ref:
        torch.testing.assert_close(ref(tokens)[0], start(tokens)[0])
    assert not torch.allclose(policy(tokens)[0], start(tokens)[0])

    # Interrupted after step 8, then resumed: same steps, same adapters as the uninterrupted run.
    monkeypatch.setattr(training, "StopFlag", stop_after(8))
    preference.run_dpo(finetune.parse_finetune_config(run_flags(out_dir=tmp_path / "resumed", **common)))
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["iter_num"] == 8
    assert not (tmp_path / "resumed" / "model.bin").exists()
    monkeypatch.undo()
    capsys.readouterr()
    preference.run_dpo(finetune.parse_finetune_config(run_flags(out_dir=tmp_path / "resumed", init="resume", **common)))
    assert "resuming from" in capsys.readouterr().out
    steps = [r["step"] for r in log_records(tmp_path / "resumed") if "loss" in r]
    assert steps == list(range(1, 17))
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["lora"]
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["lora"]
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "resumed" / "model.bin").exists()


def reward_pairs(seed: int, count: int) -> list[dict]:
    """Pairs whose chosen answer says "good" and rejected says "bad", amid random other words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        thing = rng.choice(THINGS)
        a, b = rng.sample(FILLER, 2)
        chosen, rejected = (f"the {a} {thing} is good", f"the {b} {thing} is bad") if rng.random() < 0.5 else \
            (f"good {a} {thing}", f"bad {b} {thing}")
        pairs.append({"prompt": f"tell me about the {thing}", "chosen": chosen, "rejected": rejected})
    return pairs


@pytest.fixture(scope="module")
def reward_run(dpo_setup, tmp_path_factory):
    base, _ = dpo_setup
    folder = tmp_path_factory.mktemp("reward")
    train = write_jsonl(folder / "train.jsonl", reward_pairs(0, 48))
    held_out = write_jsonl(folder / "held_out.jsonl", reward_pairs(1, 32))
    flags = run_flags(method="reward", init_from=base, data=train, val_data=held_out, out_dir=folder / "out",
                      lora_r=0, max_iters=40, batch_size=16, learning_rate=1e-3, eval_interval=40)
    preference.run_reward(finetune.parse_finetune_config(flags))
    return folder


def test_reward_model_separates_held_out_pairs(reward_run, tokenizer):
    evaluation = log_records(reward_run / "out")[-1]
    assert evaluation["eval/accuracy"] >= 0.85 and evaluation["val_loss"] < 0.3
    held_out = preference.load_pairs(reward_run / "held_out.jsonl", tokenizer, 48)
    scores = []
    for path in ("reward_model.pt", "ckpt.pt"):  # the exported model and the resumable checkpoint load alike
        reward_model = preference.load_reward_model(reward_run / "out" / path)
        tokens, _, lengths = preference.pair_batch(held_out, tokenizer.eos_id)
        with torch.no_grad():
            scores.append(reward_model(tokens, lengths))
    torch.testing.assert_close(scores[0], scores[1])
    chosen, rejected = scores[0][:len(held_out)], scores[0][len(held_out):]
    assert (chosen > rejected).float().mean().item() >= 0.85


def run_finetune(*flags: str, processes: int = 0, timeout: float = 300) -> None:
    """finetune.py from the repository with one thread per process, as python or under torchrun; fails the test
    with its output if it fails."""
    run_script("finetune.py", *flags, cwd=REPO, env={"OMP_NUM_THREADS": "1"}, processes=processes, timeout=timeout)


def kto_lines(pairs: list[dict]) -> list[dict]:
    """Each preference pair as two unpaired KTO lines: the chosen answer desirable, the rejected one not."""
    return [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
            for pair in pairs for side in ("chosen", "rejected")]


@pytest.mark.parametrize("method, lora_r", [("dpo", 4), ("kto", 4), ("reward", 0)])
def test_torchrun_two_processes_train_as_one_with_twice_the_accumulation(dpo_setup, tmp_path, method, lora_r):
    """DPO and KTO with LoRA (the reference is the adapters-off base) and the reward model (plus its head) under
    DistributedDataParallel: the same weights and logs as one process taking both micro-batches."""
    base, _ = dpo_setup
    pairs = reward_pairs(2, 16)
    data = write_jsonl(tmp_path / "pairs.jsonl", kto_lines(pairs) if method == "kto" else pairs)
    common = dict(method=method, init_from=base, data=data, lora_r=lora_r, lora_dropout=0, max_iters=3, batch_size=4,
                  learning_rate=1e-3, eval_interval=3)
    run_finetune(*run_flags(**common, gradient_accumulation_steps=2, out_dir=tmp_path / "one"))
    run_finetune(*run_flags(**common, gradient_accumulation_steps=1, out_dir=tmp_path / "two"), processes=2)
    logs = [log_records(tmp_path / out) for out in ("one", "two")]
    assert [r.get("batch") for r in logs[1]] == [r.get("batch") for r in logs[0]]
    for record_one, record_two in zip(*logs):
        assert record_two.keys() == record_one.keys()
        for key, value in record_one.items():
            assert record_two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    ckpt_one, ckpt_two = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True) for out in ("one", "two"))
    weights = (lambda c: c["lora"]) if lora_r else (lambda c: {**c["model"], **c["extra"][preference.REWARD_HEAD]})
    for name, tensor in weights(ckpt_one).items():
        torch.testing.assert_close(weights(ckpt_two)[name], tensor, rtol=1e-4, atol=1e-5)


def test_ppo_under_torchrun_answers_different_prompts_and_logs_their_mean(ppo_setup, tmp_path):
    base, prompts, _ = ppo_setup
    seen = tmp_path / "seen"
    seen.mkdir()
    # The reward function notes which process scored which prompt (then rewards "yes" as ppo_setup's does).
    (tmp_path / "noting.py").write_text(
        "import os\n"
        f"SEEN = {str(seen)!r}\n"
        "def says_yes(prompt, answer):\n"
        "    with open(os.path.join(SEEN, os.environ['RANK']), 'a') as notes:\n"
        "        notes.write(prompt + '\\n')\n"
        "    return 1.0 if 'yes' in answer.split() else 0.0\n")
    run_finetune(*run_flags(method="ppo", init_from=base, prompts=prompts, reward_fn=f"{tmp_path / 'noting.py'}:says_yes",
                            out_dir=tmp_path, lora_r=4, max_iters=3, batch_size=4, max_new_tokens=3, learning_rate=1e-3),
                 processes=2)
    by_rank = [(seen / rank).read_text().splitlines() for rank in ("0", "1")]
    assert [len(lines) for lines in by_rank] == [12, 12]  # 3 steps x 4 prompts each
    assert len(set(by_rank[0][:4]) | set(by_rank[1][:4])) == 8, by_rank  # step 1: 8 different prompts of the 12
    for step in range(3):  # (later steps may cross into the next epoch's shuffle, where prompts come round again)
        assert by_rank[0][4 * step:4 * step + 4] != by_rank[1][4 * step:4 * step + 4], (step, by_rank)
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    # 2 processes x 4 answers, each a 0 or 1 reward: the mean over both is a multiple of 1/8.
    assert all(math.isfinite(r["objective/kl"]) and (8 * r["env/reward_mean"]) % 1 == pytest.approx(0) for r in records)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 3 and (tmp_path / "model.bin").exists()


@pytest.fixture(scope="module")
def ppo_setup(tokenizer, tmp_path_factory):
    """A model answering "say a word about the X" with yes, no, maybe or later alike, and a reward for "yes"."""
    folder = tmp_path_factory.mktemp("ppo")
    conversations = [[user(f"say a word about the {thing}"), assistant(answer)] for thing in THINGS for answer in ANSWERS]
    base = supervised_base(tokenizer, conversations, 120, folder / "base.pt")
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": f"say a word about the {thing}"} for thing in THINGS])
    (folder / "rewards.py").write_text("def says_yes(prompt, answer):\n    return 1.0 if 'yes' in answer.split() else 0.0\n")
    return base, prompts, f"{folder / 'rewards.py'}:says_yes"


def test_ppo_with_a_reward_function_raises_the_mean_reward_with_bounded_kl(ppo_setup, tmp_path):
    base, prompts, reward_fn = ppo_setup
    flags = run_flags(method="ppo", init_from=base, prompts=prompts, reward_fn=reward_fn, out_dir=tmp_path, lora_r=0,
                      max_iters=15, batch_size=16, learning_rate=3e-4, max_new_tokens=6, eval_interval=100)
    preference.run_ppo(finetune.parse_finetune_config(flags))
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 16))
    assert {"env/reward_mean", "objective/kl", "objective/entropy", "policy/clipfrac", "loss/value"} <= set(records[0])
    rewards = [r["env/reward_mean"] for r in records]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:3]) + 0.25, rewards
    assert max(r["objective/kl"] for r in records) < 5.0
    assert (tmp_path / "model.bin").exists()


def test_adaptive_kl_coefficient_follows_the_proportional_controller(ppo_setup, tmp_path, monkeypatch):
    assert preference.adapted_kl_coef(0.2, 9.0, 6.0, 16, 10000) == pytest.approx(0.2 * (1 + 0.2 * 16 / 10000))  # clipped
    assert preference.adapted_kl_coef(0.2, 6.6, 6.0, 16, 10000) == pytest.approx(0.2 * (1 + 0.1 * 16 / 10000))
    assert preference.adapted_kl_coef(0.2, 0.0, 6.0, 16, 10000) == pytest.approx(0.2 * (1 - 0.2 * 16 / 10000))
    base, prompts, reward_fn = ppo_setup
    flags = run_flags(method="ppo", init_from=base, prompts=prompts, reward_fn=reward_fn, out_dir=tmp_path, lora_r=0,
                      max_iters=4, batch_size=8, learning_rate=1e-3, max_new_tokens=4, kl_coef=0.05, target_kl=0.01,
                      kl_horizon=16)
    preference.run_ppo(finetune.parse_finetune_config(flags))
    records = log_records(tmp_path)
    coefs = [r["objective/kl_coef"] for r in records] + [torch.load(tmp_path / "ckpt.pt", weights_only=True)["state"]["kl_coef"]]
    assert coefs[0] == 0.05
    for record, coef, following in zip(records, coefs, coefs[1:]):
        assert following == pytest.approx(preference.adapted_kl_coef(coef, record["objective/kl"], 0.01, 8, 16))
    assert len(set(coefs)) > 1
    # Stopped after step 2 and resumed: the adapted kl_coef carries on from the checkpoint, as if never stopped.
    resumed = tmp_path / "resumed"
    monkeypatch.setattr(training, "StopFlag", stop_after(2))
    preference.run_ppo(finetune.parse_finetune_config([*flags, f"--out_dir={resumed}"]))
    monkeypatch.undo()
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["state"]["kl_coef"] == pytest.approx(coefs[2])
    preference.run_ppo(finetune.parse_finetune_config([*flags, f"--out_dir={resumed}", "--init_from=resume"]))
    assert [r["objective/kl_coef"] for r in log_records(resumed)] == pytest.approx(coefs[:4])
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["state"]["kl_coef"] == pytest.approx(coefs[4])


def test_ppo_with_lora_and_a_reward_model(ppo_setup, reward_run, tmp_path):
    base, prompts, _ = ppo_setup
    flags = run_flags(method="ppo", init_from=base, prompts=prompts, reward_model=reward_run / "out" / "reward_model.pt",
                      out_dir=tmp_path, lora_r=4, max_iters=2, batch_size=8, learning_rate=1e-3, max_new_tokens=4)
    preference.run_ppo(finetune.parse_finetune_config(flags))
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["env/reward_mean"]) for r in records)
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first batch: adapters still zero, policy = base
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert "lora" in checkpoint and "model" not in checkpoint and preference.VALUE_HEAD in checkpoint["extra"]
    assert (tmp_path / "model.bin").exists()


def test_malformed_preference_lines_are_reported_by_line_number(tokenizer, tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "tell me about the sky", "chosen": "the sky is good", "rejected": "the sky is bad"}),
        "{not json",
        json.dumps({"prompt": "tell me about the sea", "chosen": "the sea is good"}),
        "",
        json.dumps({"chosen": [assistant("good")], "rejected": [assistant("bad")]}),
        json.dumps({"prompt": "tell me about the sun", "chosen": "the sun is good", "rejected": "the sun is bad"}),
    ]) + "\n")
    pairs = preference.load_pairs(path, tokenizer, 48)
    assert len(pairs) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: not valid JSON" in err
    assert f"{path}:3: missing 'rejected'" in err
    assert f"{path}:5: " in err and "share no opening messages" in err
    assert f"{path}:1:" not in err and f"{path}:6:" not in err


def test_hostile_preference_lines_are_warnings_never_tracebacks(tokenizer, tmp_path, capsys):
    good = {"prompt": "tell me about the sky", "chosen": "the sky is good", "rejected": "the sky is bad"}
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join([
        json.dumps(good),
        '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}",
        '{"prompt": "x", "chosen": "y", "rejected": ' + "7" * 5000 + "}",
        '{"prompt": "x", "chosen": "\\udfff", "rejected": "z"}',
        json.dumps({"prompt": "x", "chosen": 5, "rejected": "z"}),
        json.dumps({"prompt": [{"role": "user", "content": ["x"]}], "chosen": "y", "rejected": "z"}),
    ]) + "\n")
    assert len(preference.load_pairs(path, tokenizer, 48)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for line in range(2, 7):
        assert f"{path}:{line}: " in err, (line, err)
    path.write_text(json.dumps({"prompt": "x", "completion": "y", "label": "yes"}) + "\n" + json.dumps(
        {"prompt": "tell me about the sky", "completion": "it is good", "label": True}) + "\n")
    assert len(preference.load_kto_examples(path, tokenizer, 48)) == 1
    assert f'{path}:1: "label" must be true or false, not "yes"; skipped' in capsys.readouterr().err


def test_reward_functions_that_fail_are_one_line_errors_naming_them(tokenizer, tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "rewards.py").write_text("def crashes(prompt, answer):\n    return 1 / 0\n"
                                         "def words(prompt, answer):\n    return 'good'\n"
                                         "def nan(prompt, answer):\n    return float('nan')\n")
    with pytest.raises(SystemExit, match=r"--reward_fn=.*broken.py:f: importing .*broken.py failed "
                                         r"\(RuntimeError: no GPU here\)"):
        preference.load_reward_fn(f"{tmp_path / 'broken.py'}:f")
    with pytest.raises(SystemExit, match="cannot import no_such_module"):
        preference.load_reward_fn("no_such_module:f")
    prompt = preference.PromptItem([1], "question")
    for name, message in (("crashes", "raised ZeroDivisionError: division by zero"),
                          ("words", "returned 'good' \\(str\\); it must return a finite number"),
                          ("nan", "returned 'nan' \\(float\\)")):
        spec = f"{tmp_path / 'rewards.py'}:{name}"
        score = preference.function_scorer(preference.load_reward_fn(spec), tokenizer, spec)
        with pytest.raises(SystemExit, match=f"--reward_fn=.*rewards.py:{name} {message}"):
            score([prompt], [[tokenizer.eos_id]])
