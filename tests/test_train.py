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

import numpy as np
import pytest
import torch
from sentencepiece import SentencePieceProcessor

from conftest import REPO, TINY_MODEL_FLAGS, TINY_VOCAB, run_script
from export import dequantize_q80, export_model, quantize_q80, read_model_bin
from formats import MAGIC
from model import LayerKV, ModelArgs, Transformer, apply_rope, rope_tables
from training import load_checkpoint, model_from_checkpoint, oom_guard, setup_runtime


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
        expected = entry["val_loss"] * meta["val_tokens"] / (meta["val_bytes"] * math.log(2))
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


def test_resume_after_ctrl_c_continues_the_same_loss_curve(tiny_workspace: Path) -> None:
    flags = (*TINY_MODEL_FLAGS, "--max_iters=24", "--eval_interval=4", "--eval_iters=2", "--dropout=0.1",
             "--early_stop_patience=0")
    run_script("train_arianna.py", *flags, "--out_dir=out/straight", cwd=tiny_workspace)
    straight = read_log(tiny_workspace / "out" / "straight")

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen([sys.executable, str(REPO / "train_arianna.py"), *flags, "--out_dir=out/interrupted"],
                               cwd=tiny_workspace, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    output = []
    for line in process.stderr:
        output.append(line)
        if line.startswith("iter 8 "):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, "".join(output)
    assert "Continue with --init_from=resume" in "".join(output)
    stopped_at = load_checkpoint(tiny_workspace / "out" / "interrupted" / "ckpt.pt")["iter_num"]
    assert 8 <= stopped_at < 24
    run_script("train_arianna.py", *flags, "--out_dir=out/interrupted", "--init_from=resume", cwd=tiny_workspace)
    resumed = read_log(tiny_workspace / "out" / "interrupted")
    assert [entry["iter"] for entry in resumed] == [entry["iter"] for entry in straight]
    for ours, theirs in zip(resumed, straight):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-5)


def test_torchrun_two_processes_train_and_save(tiny_workspace: Path) -> None:
    run_script("train_arianna.py", *TINY_MODEL_FLAGS, "--max_iters=6", "--eval_interval=3", "--eval_iters=1",
               "--gradient_accumulation_steps=2", "--out_dir=out/ddp", cwd=tiny_workspace, env={"OMP_NUM_THREADS": "1"},
               processes=2)
    out = tiny_workspace / "out" / "ddp"
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 6
    assert [entry["iter"] for entry in read_log(out)] == [3, 6]  # only rank 0 writes the log
    assert (out / "model.bin").is_file()


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
