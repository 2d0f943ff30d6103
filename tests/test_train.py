"""train_arianna.py and export.py end to end on the tiny corpus: training, resume, torchrun, export formats, errors."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sentencepiece import SentencePieceProcessor

import train_arianna
from conftest import REPO, TINY_MODEL_FLAGS, TINY_VOCAB, run_script
from export import dequantize_q80, export_model, quantize_q80, read_model_bin
from formats import MAGIC
from model import LayerKV, ModelArgs, Transformer, apply_rope, rope_tables
from training import (LoopSettings, Schedule, TokenShards, Trainer, load_checkpoint, model_from_checkpoint, oom_guard,
                      setup_runtime)


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_workspace: Path) -> Path:
    """A tiny model trained until it overfits the corpus."""
    run_script("train_arianna.py", *TINY_MODEL_FLAGS, "--max_iters=120", "--eval_interval=40", "--eval_iters=2",
               "--learning_rate=3e-3", "--early_stop_patience=0", "--out_dir=out/overfit", cwd=tiny_workspace)
    return tiny_workspace / "out" / "overfit"


def test_training_loss_falls_and_bits_per_byte_are_logged(trained: Path) -> None:
    log = read_log(trained)
    assert [entry["iter"] for entry in log] == [40, 80, 120]
    meta = json.loads((trained.parent.parent / "data" / f"tok{TINY_VOCAB}" / "meta.json").read_text())
    for entry in log:
        expected = entry["val_loss"] * (meta["val_tokens"] - 1) / (meta["val_bytes"] * math.log(2))  # the first is context
        assert entry["val_bpb"] == pytest.approx(expected)
        assert entry["tokens"] == entry["iter"] * 8 * 64  # batch_size x max_seq_len per step
    # A uniform guess costs ln(512) = 6.24 nats; the tiny repetitive corpus is learned far below that.
    assert log[-1]["train_loss"] < 2.5 < math.log(TINY_VOCAB)
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 1.0


def test_best_checkpoint_is_exported(trained: Path) -> None:
    best = load_checkpoint(trained / "best.pt")
    log = read_log(trained)
    assert best["val_loss"] == pytest.approx(min(entry["val_loss"] for entry in log))
    version, args, state = read_model_bin(trained / "model.bin")
    assert version == 0 and args.to_dict() == ModelArgs(**best["model_args"]).to_dict()
    for name, tensor in best["model"].items():
        assert torch.equal(state[name], tensor), name


def test_generation_from_trained_model_speaks_the_corpus(trained: Path, tiny_workspace: Path) -> None:
    model = model_from_checkpoint(load_checkpoint(trained / "best.pt")).eval()
    sp = SentencePieceProcessor(model_file=str(tiny_workspace / "data" / f"tok{TINY_VOCAB}.model"))
    prompt = torch.tensor([[sp.bos_id()] + sp.encode("Токенизатор режет")])
    text = sp.decode(model.generate(prompt, 12, temperature=0.0)[0].tolist())
    assert "текст" in text  # the corpus always continues this sentence with "текст на части"


def test_resume_after_ctrl_c_continues_the_same_loss_curve(tiny_workspace: Path, monkeypatch, capsys) -> None:
    """A real SIGINT during step 9 (sent by the run itself, so it cannot race the run finishing), then
    --init_from=resume: the same evaluations as an uninterrupted run. In bfloat16, so every CPU runs bf16 training
    (natively or emulated)."""
    flags = (*TINY_MODEL_FLAGS, "--max_iters=24", "--eval_interval=4", "--eval_iters=2", "--dropout=0.1",
             "--early_stop_patience=0", "--dtype=bfloat16")
    monkeypatch.chdir(tiny_workspace)
    train_arianna.main([*flags, "--out_dir=out/straight"])
    straight = read_log(tiny_workspace / "out" / "straight")

    batch = train_arianna.train_batch

    def interrupting_batch(shards, micro, cfg, runtime):
        if micro == 8:  # the first micro-batch of step 9
            os.kill(os.getpid(), signal.SIGINT)
        return batch(shards, micro, cfg, runtime)

    monkeypatch.setattr(train_arianna, "train_batch", interrupting_batch)
    capsys.readouterr()
    train_arianna.main([*flags, "--out_dir=out/interrupted"])
    assert "Continue with --init_from=resume" in capsys.readouterr().err
    assert load_checkpoint(tiny_workspace / "out" / "interrupted" / "ckpt.pt")["iter_num"] == 9
    assert not (tiny_workspace / "out" / "interrupted" / "model.bin").exists()
    monkeypatch.setattr(train_arianna, "train_batch", batch)
    train_arianna.main([*flags, "--out_dir=out/interrupted", "--init_from=resume"])
    resumed = read_log(tiny_workspace / "out" / "interrupted")
    assert [entry["iter"] for entry in resumed] == [entry["iter"] for entry in straight]
    for ours, theirs in zip(resumed, straight):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-5)
    assert load_checkpoint(tiny_workspace / "out" / "straight" / "best.pt")["model"]["tok_embeddings.weight"].dtype \
        == torch.float32  # autocast: the weights stay float32


def test_torchrun_two_processes_train_as_one_with_the_same_total_accumulation(tiny_workspace: Path) -> None:
    """Process r of 2 takes micro-batches r, r + 2, ...: the same batches and averaged gradients as one process
    accumulating both, so the weights and evaluations agree to float rounding."""
    flags = (*TINY_MODEL_FLAGS, "--max_iters=6", "--eval_interval=3", "--eval_iters=1", "--gradient_accumulation_steps=2",
             "--dtype=float32")
    run_script("train_arianna.py", *flags, "--out_dir=out/ddp", cwd=tiny_workspace, env={"OMP_NUM_THREADS": "1"},
               processes=2)
    run_script("train_arianna.py", *flags, "--out_dir=out/one", cwd=tiny_workspace, env={"OMP_NUM_THREADS": "1"})
    out, one = tiny_workspace / "out" / "ddp", tiny_workspace / "out" / "one"
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 6
    assert [entry["iter"] for entry in read_log(out)] == [3, 6]  # only rank 0 writes the log
    assert (out / "model.bin").is_file()
    for ours, theirs in zip(read_log(out), read_log(one), strict=True):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)
        assert ours["tokens"] == theirs["tokens"] == ours["iter"] * 2 * 8 * 64
    for name, tensor in load_checkpoint(one / "ckpt.pt")["model"].items():
        torch.testing.assert_close(load_checkpoint(out / "ckpt.pt")["model"][name], tensor, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_kv_cache_gives_the_logits_and_tokens_of_the_full_forward() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=40)).eval()
    tokens = torch.randint(0, 300, (2, 30))
    kv = [LayerKV(30) for _ in model.layers]
    pieces = [(0, 10), (10, 15)] + [(i, i + 1) for i in range(15, 30)]  # a prompt, a chunk, then one at a time
    incremental = torch.cat([model(tokens[:, a:b], kv=kv, start=a)[0] for a, b in pieces], dim=1)
    torch.testing.assert_close(incremental, model(tokens)[0], rtol=1e-5, atol=1e-5)
    prompt = tokens[:, :7]
    for steps in (10, 50):  # 50 runs past max_seq_len: the window slides
        for temperature in (0.0, 1.0):
            cached, plain = (model.generate(prompt, steps, temperature, generator=torch.Generator().manual_seed(1),
                                            use_cache=use_cache) for use_cache in (True, False))
            assert torch.equal(cached, plain)


def test_rope_rotates_pairs_as_llama2c_eager_and_compiled() -> None:
    """Both forms of apply_rope (complex eager, real under torch.compile) against the rotation written out."""
    x = torch.randn(2, 5, 3, 8)
    cos, sin = rope_tables(8, 5)
    want = torch.empty_like(x)
    for pos in range(5):
        for i in range(4):
            a, b = x[:, pos, :, 2 * i], x[:, pos, :, 2 * i + 1]
            want[:, pos, :, 2 * i] = a * cos[pos, i] - b * sin[pos, i]
            want[:, pos, :, 2 * i + 1] = a * sin[pos, i] + b * cos[pos, i]
    torch.testing.assert_close(apply_rope(x, cos, sin), want)
    torch.testing.assert_close(torch.compile(apply_rope)(x, cos, sin), want)


@pytest.mark.parametrize("tied", [True, False])
def test_export_versions_match_llama2c_layout(tmp_path: Path, tied: bool) -> None:
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=16)
    model = Transformer(args)
    if not tied:
        model.output.weight = torch.nn.Parameter(torch.randn(96, 64) * 0.02)
    state = model.state_dict()
    header_ints = [64, args.hidden_dim, 2, 4, 2, 96, 16]
    n_matrix_floats = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2)
    n_norm_floats = 64 * (2 * 2 + 1)

    v0 = export_model(model, tmp_path / "v0.bin", 0).read_bytes()
    ints = list(struct.unpack_from("<7i", v0))
    assert ints == header_ints[:5] + [96 if tied else -96] + header_ints[6:]
    rope = 2 * 16 * (64 // 4 // 2)
    assert len(v0) == 28 + 4 * (n_matrix_floats + n_norm_floats + rope)

    for version in (1, 2):
        blob = export_model(model, tmp_path / f"v{version}.bin", version).read_bytes()
        magic, stored_version = struct.unpack_from("<Ii", blob)
        assert (magic, stored_version) == (MAGIC, version) and blob[:4] == b"24ka"
        assert list(struct.unpack_from("<7i", blob, 8)) == header_ints
        assert blob[36] == int(tied)
        header_end = 37 + (4 if version == 2 else 0)
        assert blob[header_end:256] == bytes(256 - header_end)
        if version == 1:
            assert len(blob) == 256 + 4 * (n_matrix_floats + n_norm_floats)
        else:
            assert struct.unpack_from("<i", blob, 37)[0] == 64
            assert len(blob) == 256 + 4 * n_norm_floats + n_matrix_floats + 4 * (n_matrix_floats // 64)

    for version in (0, 1, 2):
        stored_version, stored_args, stored = read_model_bin(tmp_path / f"v{version}.bin")
        assert stored_version == version and stored_args.to_dict() == args.to_dict()
        for name, tensor in state.items():
            if version == 2 and tensor.dim() == 2:
                # Q8_0 rounds each value to the nearest step of its group's scale.
                scale = tensor.reshape(-1, 64).abs().amax(1, keepdim=True) / 127
                assert ((stored[name].reshape(-1, 64) - tensor.reshape(-1, 64)).abs() <= scale / 2 + 1e-7).all()
            else:
                assert torch.equal(stored[name], tensor), (version, name)


def test_q80_group_size_shrinks_to_divide_rows_and_round_trips() -> None:
    weight = torch.randn(6, 96)
    values, scale = quantize_q80(weight, 32)
    assert values.dtype == torch.int8 and scale.shape == (18,)
    assert values.abs().max() == 127
    error = (dequantize_q80(values, scale, 32) - weight).abs().reshape(-1, 32)
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    model = Transformer(ModelArgs(dim=48, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=8))
    from export import q80_group_size
    assert q80_group_size(model.args, 64) == 16  # 48 = 3 * 16 and hidden 128 both divide by 16


def test_export_cli_writes_each_version(trained: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(trained / "best.pt")
    for version in (0, 1, 2):
        result = run_script("export.py", str(tmp_path / f"m{version}.bin"), f"--version={version}",
                            f"--checkpoint={trained / 'best.pt'}", cwd=tmp_path)
        assert f"version {version}" in result.stdout
        stored_version, _, stored = read_model_bin(tmp_path / f"m{version}.bin")
        assert stored_version == version
        assert torch.allclose(stored["layers.0.attention.wq.weight"], checkpoint["model"]["layers.0.attention.wq.weight"],
                              atol=0 if version < 2 else 0.05)


def test_tokenizer_bin_holds_every_piece_and_score(tiny_workspace: Path) -> None:
    sp = SentencePieceProcessor(model_file=str(tiny_workspace / "data" / f"tok{TINY_VOCAB}.model"))
    blob = (tiny_workspace / "data" / f"tok{TINY_VOCAB}.bin").read_bytes()
    (max_length,), offset = struct.unpack_from("<i", blob), 4
    pieces = []
    for token_id in range(sp.vocab_size()):
        score, length = struct.unpack_from("<fi", blob, offset)
        offset += 8
        pieces.append(blob[offset:offset + length])
        offset += length
        assert score == pytest.approx(sp.get_score(token_id))
    assert offset == len(blob)
    assert max_length == max(len(piece) for piece in pieces)
    assert pieces[sp.bos_id()] == b"\n<s>\n" and pieces[sp.eos_id()] == b"\n</s>\n"
    for token_id in range(3, sp.vocab_size()):
        assert pieces[token_id] == sp.id_to_piece(token_id).replace("\u2581", " ").encode()


def test_missing_shards_say_to_pretokenize(tmp_path: Path) -> None:
    result = run_script("train_arianna.py", "--device=cpu", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "no .bin shards in data/tok4096/; run `python arianna_data.py pretokenize --vocab_size=4096` first" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script("train_arianna.py", "--vocab_source=llama2", "--vocab_size=32000", cwd=tmp_path, check=False)
    assert "run `python arianna_data.py pretokenize --vocab_size=0` first" in result.stderr


def test_vocab_mismatch_is_refused(tiny_workspace: Path, trained: Path, tmp_path: Path) -> None:
    # Shards made with one tokenizer, a --vocab_size naming another.
    shutil.copytree(tiny_workspace / "data" / f"tok{TINY_VOCAB}", tmp_path / "data" / "tok1024")
    result = run_script("train_arianna.py", "--vocab_size=1024", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"tokenized with a {TINY_VOCAB}-token vocab but --vocab_size=1024" in result.stderr
    # A checkpoint trained with one vocab, resumed on data of another.
    meta_path = tmp_path / "data" / "tok1024" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "vocab_size": 1024}))
    (tmp_path / "out").mkdir()
    shutil.copy(trained / "ckpt.pt", tmp_path / "out" / "ckpt.pt")
    result = run_script("train_arianna.py", "--vocab_size=1024", "--init_from=resume", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"trained with a {TINY_VOCAB}-token vocab, the data has 1024" in result.stderr


def test_damaged_or_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = run_script("export.py", "out/model.bin", "--checkpoint=nowhere.pt", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "checkpoint nowhere.pt not found" in result.stderr
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    result = run_script("export.py", "out/model.bin", "--checkpoint=broken.pt", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "checkpoint broken.pt cannot be read" in result.stderr


def test_out_of_memory_keeps_the_checkpoint_and_names_the_flags() -> None:
    runtime = setup_runtime("cpu", "float32")
    saved = []
    with pytest.raises(SystemExit) as exit_info:
        with oom_guard(runtime, lambda: saved.append(True)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert saved == [True]
    message = str(exit_info.value)
    assert "lower --batch_size" in message and "--max_seq_len" in message and "--init_from=resume" in message


# ----------------------------------------------------------------------------- the shared loop

def tiny_trainer(tmp_path: Path, total_steps: int, **settings) -> tuple[Trainer, Transformer]:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=8))
    schedule = Schedule(1e-3, 1e-4, "cosine", 0, total_steps, accumulation=1)
    runtime = setup_runtime("cpu", "float32")
    return Trainer(runtime, model, schedule, LoopSettings(tmp_path, batch_size=2, **settings), 0.0, (0.9, 0.99)), model


def test_early_stopping_after_patience_evaluations_without_a_better_val_loss(tmp_path: Path) -> None:
    trainer, model = tiny_trainer(tmp_path, 20, eval_interval=2, early_stop_patience=2)
    inputs = torch.randint(0, 32, (2, 9))
    val_losses = iter([3.0, 2.0, 2.5, 2.1, 1.0])  # best at the 2nd evaluation, then two without improvement

    def micro_step(step: int, micro: int):
        _, loss = model(inputs[:, :-1], inputs[:, 1:])
        return loss, inputs.numel(), {}

    assert trainer.run(micro_step, lambda: {"val_loss": next(val_losses)}) is True
    assert trainer.step == 8 and trainer.best_val_loss == 2.0 and trainer.evals_since_best == 2
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 8
    log = read_log(tmp_path)
    assert [entry["step"] for entry in log] == [2, 4, 6, 8]


def test_a_new_max_iters_on_resume_replans_the_schedule_tail() -> None:
    schedule = Schedule(1e-3, 1e-4, "cosine", 2, 10, accumulation=1)
    before = [schedule.lr(step) for step in range(10)]
    schedule.replan(5, 20)
    after = [schedule.lr(step) for step in range(21)]
    assert after[5] == pytest.approx(before[5])  # the rate goes on from where the run is
    assert after[20] == pytest.approx(1e-4) and all(a > b for a, b in zip(after[5:20], after[6:21]))
    assert after[9] > before[9]  # the decay is stretched over the longer run
    during_warmup = Schedule(1e-3, 1e-4, "cosine", 4, 10, accumulation=1)
    during_warmup.replan(1, 20)  # still warming up: the plan simply becomes 20 steps long
    assert during_warmup.lr(4) == pytest.approx(1e-3) and during_warmup.tail_from == 0


def test_resume_trains_to_a_new_max_iters_or_says_how(tiny_workspace: Path, monkeypatch, capsys) -> None:
    flags = (*TINY_MODEL_FLAGS, "--eval_interval=4", "--eval_iters=1", "--early_stop_patience=0", "--out_dir=out/longer")
    monkeypatch.chdir(tiny_workspace)
    train_arianna.main([*flags, "--max_iters=4"])
    train_arianna.main([*flags, "--max_iters=8", "--init_from=resume"])
    assert "re-planned the schedule from step 4: 8 steps instead of 4" in capsys.readouterr().out
    checkpoint = load_checkpoint(tiny_workspace / "out" / "longer" / "ckpt.pt")
    assert checkpoint["iter_num"] == 8 and checkpoint["total_steps"] == 8
    assert [entry["iter"] for entry in read_log(tiny_workspace / "out" / "longer")] == [4, 8]
    with pytest.raises(SystemExit, match="--max_iters=6 but .* is already at step 8; pass a larger --max_iters"):
        train_arianna.main([*flags, "--max_iters=6", "--init_from=resume"])


def test_model_size_and_step_count_follow_the_corpus(tiny_workspace: Path, monkeypatch, capsys) -> None:
    """Without --dim/--n_layers/--max_iters the run takes auto_model_size and auto_max_iters of its corpus."""
    monkeypatch.chdir(tiny_workspace)
    monkeypatch.setattr(train_arianna.Pretrainer, "run", lambda self, *args, **kwargs: False)  # plan only
    train_arianna.main([f"--vocab_size={TINY_VOCAB}", "--device=cpu", "--out_dir=out/auto", "--batch_size=4",
                        "--max_seq_len=32"])
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("model: "))
    tokens = len(TokenShards(tiny_workspace / "data" / f"tok{TINY_VOCAB}", "train"))
    size = train_arianna.auto_model_size(tokens)
    assert f"model: dim {size['dim']}, {size['n_layers']} layers, {size['n_heads']} heads" in line
    assert f"dropout {size['dropout']};" in line
    assert f"; {train_arianna.auto_max_iters(tokens, 4 * 32)} steps of 128 tokens" in line


def test_compiled_training_runs_and_lowers_the_loss(tiny_workspace: Path) -> None:
    run_script("train_arianna.py", f"--vocab_size={TINY_VOCAB}", "--dim=16", "--n_layers=1", "--n_heads=2",
               "--max_seq_len=16", "--batch_size=4", "--device=cpu", "--dtype=float32", "--compile=true",
               "--max_iters=20", "--eval_interval=10", "--eval_iters=1", "--learning_rate=1e-2",
               "--early_stop_patience=0", "--out_dir=out/compiled", cwd=tiny_workspace, timeout=900,
               # its own compile cache: with two test runs compiling into the shared one at once, this one died
               # with "malloc(): unaligned tcache chunk detected"
               env={"TORCHINDUCTOR_CACHE_DIR": str(tiny_workspace / "inductor-cache")})
    log = read_log(tiny_workspace / "out" / "compiled")
    assert [entry["iter"] for entry in log] == [10, 20] and log[-1]["train_loss"] < log[0]["train_loss"] < math.log(TINY_VOCAB)
    assert (tiny_workspace / "out" / "compiled" / "model.bin").is_file()


def sigkill_when(process: subprocess.Popen, marker: str) -> str:
    """Read the process's stderr until a line holds marker, then SIGKILL it; the output so far."""
    output = []
    for line in process.stderr:
        output.append(line)
        if marker in line:
            process.kill()
            break
    process.wait(timeout=120)
    return "".join(output)


@pytest.mark.parametrize("script", ["train_arianna.py", "finetune.py"])
def test_sigkill_loses_at_most_one_checkpoint_interval_and_resume_finishes(tiny_workspace: Path, tmp_path: Path,
                                                                            script: str) -> None:
    """kill -9 right after an evaluation line, while ckpt.pt is being written: ckpt.pt is whole and at most one
    interval old, and --init_from=resume finishes the run."""
    out = tmp_path / "killed"
    if script == "train_arianna.py":
        flags = [*TINY_MODEL_FLAGS, "--max_iters=60", "--eval_interval=4", "--eval_iters=1", "--early_stop_patience=0"]
        marker, key = "iter 8 ", "iter"
    else:
        base = tmp_path / "base.pt"
        torch.manual_seed(0)
        args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=TINY_VOCAB, max_seq_len=64)
        torch.save({"model": Transformer(args).state_dict(), "model_args": args.to_dict(),
                    "config": {"tokenizer_model": str(tiny_workspace / "data" / f"tok{TINY_VOCAB}.model")}}, base)
        data = tmp_path / "qa.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"вопрос {i}", "completion": f"ответ {i}"}) + "\n" for i in range(8)))
        flags = [f"--init_from={base}", f"--data={data}", "--device=cpu", "--dtype=float32", "--batch_size=4",
                 "--max_iters=60", "--eval_interval=4", "--log_interval=4", "--val_fraction=0.25"]
        marker, key = "step 8 val_loss", "step"
    process = subprocess.Popen([sys.executable, str(REPO / script), *flags, f"--out_dir={out}"], cwd=tiny_workspace,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = sigkill_when(process, marker)
    assert process.returncode == -signal.SIGKILL, output
    saved = load_checkpoint(out / "ckpt.pt")  # whole: it loads
    logged = max(entry[key] for entry in read_log(out) if "val_loss" in entry)
    assert logged - 4 <= saved["iter_num"] <= 60
    run_script(script, *flags, f"--out_dir={out}", "--init_from=resume", cwd=tiny_workspace)
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 60 and (out / "model.bin").is_file()
