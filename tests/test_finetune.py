"""finetune.py: data formats and masking, SFT learning a response, LoRA checkpoints, phoenix, resume, pretrain mix."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import finetune
import training
import tuning
from conftest import TINY_VOCAB, run_script, stop_after
from finetune import SFTStream, collate, load_sft_examples
from training import Shuffled
from tuning import FinetuneConfig, load_base_model, read_jsonl
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, encode_dialog

QUESTION, ANSWER = "Что такое резонанс?", "Резонанс это отклик системы на свою частоту."


@pytest.fixture(scope="module")
def tokenizer_path(tiny_workspace: Path) -> Path:
    return tiny_workspace / "data" / f"tok{TINY_VOCAB}.model"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def write_base(path: Path, tokenizer_path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    args = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TINY_VOCAB, max_seq_len=96)
    model = Transformer(args)
    torch.save({"model": model.state_dict(), "model_args": args.to_dict(), "iter_num": 0,
                "config": {"tokenizer_model": str(tokenizer_path)}}, path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path: Path) -> Path:
    return write_base(tmp_path_factory.mktemp("base") / "ckpt.pt", tokenizer_path, seed=0)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def qa_data(path: Path, copies: int = 8) -> Path:
    return write_jsonl(path, [{"messages": [{"role": "user", "content": QUESTION},
                                            {"role": "assistant", "content": ANSWER}]}] * copies)


def run(*flags: str) -> None:
    finetune.main(["--device=cpu", "--dtype=float32", "--val_fraction=0", "--warmup_iters=0", *flags])


def segment_encoder(tokenizer: Tokenizer):
    """The chat template's encode(): SentencePiece without BOS/EOS."""
    return lambda text: tokenizer.encode(text, bos=False, eos=False)


def greedy_answer(model: Transformer, tokenizer: Tokenizer) -> str:
    prompt, _ = encode_dialog(segment_encoder(tokenizer), [{"role": "user", "content": QUESTION}], tokenizer.bos_id, tokenizer.eos_id)
    model.eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=90, temperature=0.0, eos_id=tokenizer.eos_id)
    return tokenizer.decode([t for t in out[0, len(prompt):].tolist() if t != tokenizer.eos_id])


# ----------------------------------------------------------------------------- data

def test_three_formats_are_read_and_bad_lines_reported_by_number(tmp_path: Path, tokenizer: Tokenizer, capsys) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"instruction": "Переведи", "input": "cat", "output": "кот"},
        {"prompt": "2+2?", "completion": "4"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        "{not json",
        {"question": "no known fields"},
        "",
        {"messages": [{"role": "robot", "content": "x"}]},
        [1, 2],
        {"prompt": 5, "completion": "x"},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ])
    examples = load_sft_examples(path, tokenizer, context=64, truncate=False)
    err = capsys.readouterr()
    assert len(examples) == 3
    assert f"{path}:4: not valid JSON (" in err.err
    assert f'{path}:5: expected "messages", "instruction"+"output" or "prompt"+"completion"' in err.err
    assert f"{path}:7: messages[0] must be" in err.err
    assert f"{path}:8: a JSON list, not an object; skipped" in err.err
    assert f'{path}:9: "prompt" must be a string' in err.err
    assert f"{path}:10: no assistant message to learn from; skipped" in err.err
    assert ":6:" not in err.err  # blank lines are not errors
    assert "3 examples (instruction 1, messages 1, prompt 1)" in err.out
    # The instruction form is the user turn "instruction\n\ninput".
    encode = segment_encoder(tokenizer)
    expected, _ = encode_dialog(encode, [{"role": "user", "content": "Переведи\n\ncat"},
                                         {"role": "assistant", "content": "кот"}], tokenizer.bos_id, tokenizer.eos_id)
    assert examples[0].tokens == expected


def test_an_all_bad_file_is_an_error(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(SystemExit, match="no valid JSON line"):
        read_jsonl(write_jsonl(tmp_path / "bad.jsonl", ["{", "nope"]))
    with pytest.raises(SystemExit, match="no usable example"):
        load_sft_examples(write_jsonl(tmp_path / "bad2.jsonl", [{"a": 1}]), tokenizer, 64, False)


def test_loss_mask_covers_exactly_the_assistant_tokens_and_eos(tokenizer: Tokenizer) -> None:
    encode = segment_encoder(tokenizer)
    messages = [{"role": "system", "content": "Коротко."}, {"role": "user", "content": "Привет"},
                {"role": "assistant", "content": "Здравствуй"}, {"role": "user", "content": "Как дела?"},
                {"role": "assistant", "content": "Хорошо"}]
    tokens, mask = encode_dialog(encode, messages, tokenizer.bos_id, tokenizer.eos_id)
    inputs, targets = collate([(tokens, mask), (tokens[:5], mask[:5])])
    assert inputs.shape == targets.shape == (2, len(tokens) - 1)
    assert inputs[0].tolist() == tokens[:-1]
    trained = [t for t in targets[0].tolist() if t != -1]
    assert trained == encode("Здравствуй") + [tokenizer.eos_id] + encode("Хорошо") + [tokenizer.eos_id]
    # Position i predicts token i+1: a target is set exactly where the next token is an assistant token.
    assert [t != -1 for t in targets[0].tolist()] == [bool(m) for m in mask[1:]]
    assert targets[1].tolist() == [-1] * (len(tokens) - 1)  # padding and prompt are never trained


def test_too_long_examples_are_dropped_or_cut_with_a_count(tmp_path: Path, tokenizer: Tokenizer, capsys) -> None:
    long_answer = " ".join(["резонанс"] * 80)
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Скажи", "completion": long_answer},
                                                 {"prompt": "Скажи", "completion": "да"}])
    assert len(load_sft_examples(path, tokenizer, context=32, truncate=False)) == 1
    assert "1 examples longer than the context (32 tokens) dropped" in capsys.readouterr().err
    examples = load_sft_examples(path, tokenizer, context=32, truncate=True)
    assert [len(ex.tokens) for ex in examples][0] == 33 and "1 cut to the context" in capsys.readouterr().out


def test_repeated_answers_are_whole_only_in_their_first_copies(tokenizer: Tokenizer) -> None:
    encode = segment_encoder(tokenizer)

    def example(question: str, answer: str) -> finetune.SFTExample:
        return finetune.SFTExample(*encode_dialog(encode, [{"role": "user", "content": question},
                                                           {"role": "assistant", "content": answer}],
                                                  tokenizer.bos_id, tokenizer.eos_id))

    long_answer = f"{ANSWER} {ANSWER}"
    examples = [example(question, long_answer) for question in (QUESTION, "Резонанс?", "Объясни резонанс.")]
    examples += [example("Привет", "Здравствуй"), example("Скажи", "да")]
    shortened = finetune.shorten_repeated_answers(examples, full=2, prefix=4)
    assert shortened[:2] == examples[:2] and shortened[3:] == examples[3:]
    first = examples[2].mask.index(1)
    assert shortened[2].tokens == examples[2].tokens[:first + 4]  # the question and the answer's first 4 tokens
    assert shortened[2].mask == [0] * first + [1] * 4  # ...trained on those 4, not on an EOS
    second = finetune.shorten_repeated_answers(examples, full=1, prefix=4)[1]
    assert second.tokens == examples[1].tokens[:examples[1].mask.index(1) + 4]
    _, targets = collate([(ex.tokens, ex.mask) for ex in shortened])
    assert int((targets != -1).sum()) == sum(sum(ex.mask[1:]) for ex in shortened)
    with pytest.raises(SystemExit, match="--answer_prefix=-1 must be >= 0"):
        FinetuneConfig(answer_prefix=-1)


def test_pretrain_mix_puts_that_share_of_windows_into_batches(tiny_workspace: Path, tokenizer: Tokenizer) -> None:
    encode = segment_encoder(tokenizer)
    tokens, mask = encode_dialog(encode, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                 tokenizer.bos_id, tokenizer.eos_id)
    windows = finetune.pretrain_shards(tiny_workspace / "data" / f"tok{TINY_VOCAB}", TINY_VOCAB)
    stream = SFTStream([finetune.SFTExample(tokens, mask)] * 5, batch_size=4, seed=1, pretrain=windows,
                       pretrain_mix=0.25, context=64)
    fully_trained_rows = 0
    for micro in range(8):
        inputs, targets = stream.batch(micro)
        assert inputs.shape == (4, len(tokens) - 1)
        fully_trained_rows += int((targets != -1).all(dim=1).sum())
        assert torch.equal(stream.batch(micro)[0], inputs)  # a pure function of the micro-batch index
    assert fully_trained_rows == 8  # 25% of 32 rows


# ----------------------------------------------------------------------------- training runs

def test_sft_teaches_a_response_the_model_could_not_give_before(tmp_path: Path, base: Path, tokenizer: Tokenizer,
                                                               capsys) -> None:
    before, _ = load_base_model(base)
    assert greedy_answer(before, tokenizer) != ANSWER
    out = tmp_path / "sft"
    run(f"--init_from={base}", f"--data={qa_data(tmp_path / 'qa.jsonl')}", f"--out_dir={out}", "--lora_r=0",
        "--max_iters=60", "--batch_size=4", "--learning_rate=1e-2", "--export_version=1")
    assert "fine-tuning on cpu in float32" in capsys.readouterr().out  # a narrow model, on any CPU (see below)
    checkpoint = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert checkpoint["iter_num"] == 60 and "model" in checkpoint and "lora" not in checkpoint
    after, _ = load_base_model(out / "ckpt.pt")
    assert greedy_answer(after, tokenizer) == ANSWER
    assert (out / "model.bin").stat().st_size > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"lr", "batch", "loss"} <= set(log[-1])


def test_lora_saves_only_adapters_merges_and_refuses_another_base(tmp_path: Path, base: Path, tokenizer: Tokenizer,
                                                                   tokenizer_path: Path) -> None:
    out = tmp_path / "lora"
    data = qa_data(tmp_path / "qa.jsonl")
    flags = [f"--data={data}", f"--out_dir={out}", "--lora_r=4", "--lora_targets=wq,wv,w2", "--batch_size=4",
             "--learning_rate=1e-2"]
    run(f"--init_from={base}", "--max_iters=6", "--merge=true", *flags)
    checkpoint = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert "model" not in checkpoint
    assert set(checkpoint["lora"]) == {f"layers.{i}.{part}.{ab}" for i in range(2)
                                       for part in ("attention.wq", "attention.wv", "feed_forward.w2")
                                       for ab in ("lora_A", "lora_B")}
    assert checkpoint["base"]["path"] == str(base) and len(checkpoint["base"]["sha256"]) == 64
    assert (out / "ckpt.pt").stat().st_size < base.stat().st_size / 4
    # The LoRA checkpoint loads as its base with the adapters folded in, equal to merged.pt.
    merged, _ = load_base_model(out / "ckpt.pt")
    merged_file, _ = load_base_model(out / "merged.pt")
    plain, _ = load_base_model(base)
    inputs = torch.randint(0, TINY_VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs)[0], merged_file(inputs)[0])
        assert (merged(inputs)[0] - plain(inputs)[0]).abs().max() > 1e-4
    other = write_base(tmp_path / "other.pt", tokenizer_path, seed=1)
    with pytest.raises(SystemExit, match="was trained from base .* pass the base checkpoint it was trained from"):
        run(f"--init_from={other}", "--init=resume", "--max_iters=8", *flags)


def test_phoenix_checkpoints_are_pruned_and_resume_continues_exactly(tmp_path: Path, base: Path) -> None:
    data = qa_data(tmp_path / "qa.jsonl", copies=5)
    flags = [f"--init_from={base}", f"--data={data}", "--lora_r=4", "--lora_dropout=0.1", "--batch_size=2",
             "--max_iters=8", "--learning_rate=5e-3", "--lr_schedule=phi", "--warmup_iters=4",
             "--batch_schedule=trinity", "--trinity_steps=5", "--log_interval=1"]
    straight = tmp_path / "straight"
    run(*flags, f"--out_dir={straight}", "--checkpoint_every=2", "--keep_last=3")
    assert sorted(p.name for p in straight.glob("phoenix_*.pt")) == ["phoenix_4.pt", "phoenix_6.pt", "phoenix_8.pt"]
    assert not list(straight.glob(".*tmp*"))
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [entry["batch"] for entry in log] == [2] * 5 + [6] * 3
    # Resume from the step-4 phoenix checkpoint in a fresh folder: the same adapters as the straight run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "phoenix_4.pt", resumed / "ckpt.pt")
    run(*flags, f"--out_dir={resumed}", "--init=resume")
    end_straight = torch.load(straight / "ckpt.pt", weights_only=True)
    end_resumed = torch.load(resumed / "ckpt.pt", weights_only=True)
    assert end_resumed["iter_num"] == 8
    resumed_log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [entry["step"] for entry in resumed_log] == [5, 6, 7, 8]
    assert [entry["loss"] for entry in resumed_log] == pytest.approx([entry["loss"] for entry in log[4:]], rel=1e-5)
    for key, tensor in end_straight["lora"].items():
        torch.testing.assert_close(end_resumed["lora"][key], tensor)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_torchrun_two_processes_train_as_one_with_twice_the_accumulation(tmp_path: Path, base: Path, lora_r: int) -> None:
    """DistributedDataParallel: 2 processes x accumulation 1 see the micro-batches 1 process x accumulation 2 sees,
    and average the same gradients, so weights and logged losses agree (to float rounding)."""
    data = write_jsonl(tmp_path / "varied.jsonl", [
        {"messages": [{"role": "user", "content": f"Вопрос номер {i}: что такое {word}?"},
                      {"role": "assistant", "content": f"{word.capitalize()} — это ответ {i}."}]}
        for i, word in enumerate(["резонанс", "частота", "модель", "текст", "голос", "токен", "слово", "шаг"])])
    flags = [f"--init_from={base}", f"--data={data}", f"--lora_r={lora_r}", "--lora_dropout=0", "--batch_size=2",
             "--max_iters=4", "--learning_rate=1e-2", "--log_interval=1", "--device=cpu", "--dtype=float32",
             "--val_fraction=0", "--warmup_iters=0", "--checkpoint_every=2", "--keep_last=1"]
    run(*flags, "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'one'}")
    run_script("finetune.py", *flags, "--gradient_accumulation_steps=1", f"--out_dir={tmp_path / 'two'}", cwd=tmp_path,
               env={"OMP_NUM_THREADS": "1"}, processes=2)
    logs = [[json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
            for out in ("one", "two")]
    assert [entry["batch"] for entry in logs[1]] == [entry["batch"] for entry in logs[0]] == [4] * 4
    assert [entry["loss"] for entry in logs[1]] == pytest.approx([entry["loss"] for entry in logs[0]], rel=1e-4)
    one, two = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True) for out in ("one", "two"))
    key = "lora" if lora_r else "model"
    assert one[key].keys() == two[key].keys()
    for name, tensor in one[key].items():
        torch.testing.assert_close(two[key][name], tensor, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "model.bin").is_file()
    assert [path.name for path in (tmp_path / "two").glob("phoenix_*.pt")] == ["phoenix_4.pt"]  # rank 0 prunes


def test_ctrl_c_saves_and_stops_then_resume_finishes(tmp_path: Path, base: Path, tokenizer_path: Path) -> None:
    out = tmp_path / "stop"
    cfg = FinetuneConfig(init_from=str(base), out_dir=str(out), lora_r=4, max_iters=5, device="cpu", dtype="float32")
    runtime = training.setup_runtime("cpu", "float32", cfg.seed)
    model, base_checkpoint = tuning.load_policy(cfg, runtime)
    trainer = tuning.FinetuneTrainer(cfg, runtime, model, base_checkpoint, total_steps=5)
    inputs = torch.randint(0, TINY_VOCAB, (2, 9))

    def micro_step(step: int, micro: int):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        _, loss = model(inputs[:, :-1], inputs[:, 1:])
        return loss, inputs.numel(), {}

    assert trainer.run(micro_step) is False
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2
    resumed = tuning.FinetuneTrainer(FinetuneConfig(**{**vars(cfg), "init": "resume"}), runtime, model, base_checkpoint, 5)
    assert resumed.step == 2
    assert resumed.run(micro_step) is True
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 5


def test_qlora_with_pretrain_mix_lowers_the_loss_feeds_pretraining_windows_and_resumes(
        tmp_path: Path, base: Path, tiny_workspace: Path, monkeypatch, capsys) -> None:
    shards = tiny_workspace / "data" / f"tok{TINY_VOCAB}"
    windows = []
    read_window = training.TokenShards.window

    def spy(self, start: int, length: int):  # every pretraining row of a batch is read through here
        window = read_window(self, start, length)
        windows.append(window)
        return window

    monkeypatch.setattr(training.TokenShards, "window", spy)
    flags = [f"--init_from={base}", f"--data={qa_data(tmp_path / 'qa.jsonl')}", "--lora_r=4", "--qlora=true",
             "--lora_targets=wq,wk,wv,wo,w1,w2,w3", "--max_iters=12", "--batch_size=4", "--learning_rate=1e-2",
             "--pretrain_mix=0.25", f"--pretrain_data={shards}", "--log_interval=1"]
    run(*flags, f"--out_dir={tmp_path / 'qlora'}")
    assert "as stored (NF4) vs" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (tmp_path / "qlora" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 12 and (tmp_path / "qlora" / "model.bin").exists()
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses  # a quarter of the rows are pretraining text, not learned fast
    # One row in four of the 12 x 4 rows is a window of the pretraining shards, as long as the batch's examples.
    assert len(windows) == 12 and all(len(window) == len(windows[0]) > 1 for window in windows)
    checkpoint = torch.load(tmp_path / "qlora" / "ckpt.pt", weights_only=True)
    assert checkpoint["lora_config"]["qlora"] is True
    # QLoRA stopped at step 6 and resumed: the adapters of the uninterrupted run.
    monkeypatch.setattr(training, "StopFlag", stop_after(6))
    run(*flags, f"--out_dir={tmp_path / 'resumed'}")
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["iter_num"] == 6
    monkeypatch.undo()
    run(*flags[1:], "--init_from=resume", f"--out_dir={tmp_path / 'resumed'}")
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert resumed["iter_num"] == 12
    for key, tensor in checkpoint["lora"].items():
        torch.testing.assert_close(resumed["lora"][key], tensor, rtol=1e-5, atol=1e-6)


def test_malformed_lines_are_warnings_never_tracebacks(tmp_path: Path, tokenizer: Tokenizer, capsys) -> None:
    good = {"prompt": "2+2?", "completion": "4"}
    path = write_jsonl(tmp_path / "hostile.jsonl", [
        good,
        "[" * 100_000 + "]" * 100_000,                       # deeper than Python's stack
        '{"prompt": "x", "completion": "y", "n": ' + "9" * 5000 + "}",  # over int's 4300-digit limit
        '{"prompt": "\\ud800", "completion": "y"}',          # a lone surrogate
        {"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": {"text": "x"}}, {"role": "assistant", "content": "y"}]},
        {"instruction": "x", "input": 7, "output": "y"},
        {"prompt": None, "completion": "y"},
        '"just a string"',
    ])
    examples = load_sft_examples(path, tokenizer, context=64, truncate=False)
    err = capsys.readouterr().err
    assert len(examples) == 1 and "Traceback" not in err
    assert f"{path}:2: nested too deeply; skipped" in err
    assert f"{path}:3: " in err and "digits" in err
    assert f"{path}:4: holds text that is not valid Unicode" in err
    for line in (5, 6, 7, 8):
        assert f"{path}:{line}: " in err, line
    assert f"{path}:9: a JSON str, not an object; skipped" in err
    assert len([line for line in err.splitlines() if line.endswith("; skipped")]) == 8


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--pretrain_mix needs --pretrain_data"):
        FinetuneConfig(pretrain_mix=0.2)
    with pytest.raises(SystemExit, match="--batch_schedule=trinity needs --trinity_steps"):
        FinetuneConfig(batch_schedule="trinity")
    with pytest.raises(SystemExit, match="--lora_targets=wq,output"):
        FinetuneConfig(lora_targets="wq,output")
    with pytest.raises(SystemExit, match="not found"):
        run(f"--init_from={tmp_path / 'missing.pt'}", "--data=x.jsonl")
    with pytest.raises(SystemExit, match="--init_from=resume: .* not found; start the run with --init_from=BASE"):
        run("--init_from=resume", f"--out_dir={tmp_path / 'never_trained'}", "--data=x.jsonl")


def test_sft_batches_group_similar_lengths_and_still_visit_every_example_once_per_epoch() -> None:
    lengths = [int(n) for n in torch.randint(10, 200, (96,), generator=torch.Generator().manual_seed(0))]
    examples = [finetune.SFTExample(list(range(n)), [1] * n) for n in lengths]
    batch = 4
    grouped = Shuffled(examples, seed=3, length=lambda example: len(example.tokens), batch=batch)
    plain = Shuffled(examples, seed=3)

    def padded_tokens(shuffled: Shuffled, epoch: int) -> int:
        rows = [len(shuffled.item(epoch * len(examples) + i).tokens) for i in range(len(examples))]
        return sum(max(rows[i:i + batch]) * batch for i in range(0, len(rows), batch))

    for epoch in range(2):
        visited = [id(grouped.item(epoch * len(examples) + i)) for i in range(len(examples))]
        assert sorted(visited) == sorted(map(id, examples))  # each example once per epoch
        assert padded_tokens(grouped, epoch) < 0.85 * padded_tokens(plain, epoch)
    first_epoch = [len(grouped.item(i).tokens) for i in range(len(examples))]
    assert first_epoch != sorted(first_epoch)  # the batches' order is still shuffled
    assert [len(Shuffled(examples, 3, lambda e: len(e.tokens), batch).item(i).tokens)
            for i in range(len(examples))] == first_epoch  # a pure function of the seed and position


def test_cpu_fine_tunes_narrow_models_in_float32_and_keeps_bf16_for_wide_ones_or_when_asked() -> None:
    def runtime(device_type: str, dtype: torch.dtype) -> training.Runtime:
        return training.Runtime(torch.device(device_type), device_type, dtype, False, 0, 0, 1)

    narrow, wide = training.CPU_BF16_FINETUNE_MIN_DIM - 1, training.CPU_BF16_FINETUNE_MIN_DIM
    cpu_bf16 = runtime("cpu", torch.bfloat16)
    float32 = training.finetune_runtime(cpu_bf16, "auto", narrow)
    assert float32.dtype == torch.float32
    assert isinstance(float32.autocast(), contextlib.nullcontext) and not float32.scaler.is_enabled()
    assert training.finetune_runtime(cpu_bf16, "auto", wide) is cpu_bf16
    assert training.finetune_runtime(cpu_bf16, "bfloat16", narrow) is cpu_bf16  # asked for: kept
    assert training.finetune_runtime(runtime("cuda", torch.bfloat16), "auto", narrow).dtype == torch.bfloat16
