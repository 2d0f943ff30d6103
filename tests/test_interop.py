"""interop.py against the real tools: transformers (import and export), gguf's reader, llama.cpp (node-llama-cpp's
prebuilt binary, installed by `make test`), ./run; and LoRA/QLoRA fine-tuning of an imported Llama."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from sentencepiece import SentencePieceProcessor
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import finetune
import interop
import tuning
from conftest import REPO, TINY_VOCAB, run_script
from export import export_model
from formats import FormatError
from model import ModelArgs, Transformer

LLAMACPP = REPO / "bench" / "llamacpp.mjs"
TEXTS = ["Модель учится на тексте автора, и говорит его языком.",
         "def train(steps):\n    loss = 0.0\n    for step in range(steps):\n        if step % 2:\n\t\tloss += 1\n    return loss",
         "3.14159 2026-11-30 1000000 007", "emoji 🦙🔥 и 😀 done"]
STEPS = 40


@pytest.fixture(scope="module")
def tokenizer_model(tiny_workspace: Path) -> Path:
    return tiny_workspace / "data" / f"tok{TINY_VOCAB}.model"


@pytest.fixture(scope="module")
def sp(tokenizer_model: Path) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(tokenizer_model))


def make_hf_llama(directory: Path, tokenizer_model: Path, **overrides) -> Path:
    """A random LlamaForCausalLM made by transformers: GQA, untied, rope_theta 500000, bfloat16. Weights of std
    0.25 (not 0.02) so greedy decoding has clear winners, not ties that rounding decides."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   initializer_range=0.25, bos_token_id=1, eos_token_id=2), **overrides})
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, **({"max_shard_size": "100KB"}
                                                                              if "sharded" in directory.name else {}))
    shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_model: Path) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "llama", tokenizer_model)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tokenizer_model: Path) -> Path:
    """The same model in shards listed by model.safetensors.index.json."""
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "sharded", tokenizer_model)


@pytest.fixture(scope="module")
def imported(hf_dir: Path) -> Transformer:
    return interop.load_hf_llama(hf_dir)[0].eval()


@pytest.fixture(scope="module")
def prompt(sp: SentencePieceProcessor) -> list[int]:
    return [sp.bos_id()] + sp.encode("Модель учится")


def greedy(model: Transformer, tokens: list[int], steps: int = STEPS) -> list[int]:
    return model.generate(torch.tensor([tokens]), steps, temperature=0.0)[0, len(tokens):].tolist()


def hf_greedy(model: LlamaForCausalLM, tokens: list[int], steps: int = STEPS) -> list[int]:
    out = model.generate(torch.tensor([tokens]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, len(tokens):].tolist()


def assert_same_logits(ours: Transformer, theirs: LlamaForCausalLM) -> None:
    tokens = torch.randint(0, TINY_VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(tokens).logits
        got, _ = ours(tokens)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_import_gives_transformers_logits_and_greedy_tokens(hf_dir: Path, sharded_dir: Path, imported: Transformer,
                                                            prompt) -> None:
    args = imported.args
    assert (args.rope_theta, args.n_kv_heads, args.tie_embeddings, args.norm_eps, args.max_seq_len) == (
        500000.0, 2, False, 1e-5, 128)
    reference = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert_same_logits(imported, reference)
    assert greedy(imported, prompt) == hf_greedy(reference, prompt)
    assert (sharded_dir / interop.HF_INDEX).is_file()
    again, checkpoint = interop.load_hf_llama(sharded_dir)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), imported.state_dict().values()))
    assert checkpoint["weights_sha256"] == interop.load_hf_llama(hf_dir)[1]["weights_sha256"]


def test_run_c_gives_transformers_greedy_tokens_on_the_import(imported: Transformer, hf_dir: Path, prompt,
                                                             tokenizer_model: Path, tmp_path: Path) -> None:
    """run.c's engine (librun.so, what ./run and chat.py run) on the .bin of an imported Llama (GQA, untied,
    bfloat16, rope_theta 500000): versions 1 and 2 carry rope_theta, version 0 (llama2.c's legacy header) refuses it
    in one line rather than write a file that runs wrongly."""
    from test_run_c import Engine, load_library

    torch.save({"model": imported.state_dict(), "model_args": imported.args.to_dict()}, tmp_path / "theta.pt")
    result = run_script("export.py", "theta_v0.bin", "--version=0", "--checkpoint=theta.pt", cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "rope_theta" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "theta_v0.bin").exists()
    reference = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    want = hf_greedy(reference, prompt)
    want = want[:want.index(2) + 1] if 2 in want else want  # the engine stops at EOS
    shutil.copyfile(tokenizer_model, tmp_path / "tok.model")
    run_script("tokenizer.py", "--tokenizer-model=tok.model", cwd=tmp_path)
    run_script("export.py", "theta_v1.bin", "--version=1", "--checkpoint=theta.pt", cwd=tmp_path)
    engine = Engine(load_library(REPO / "librun.so"), tmp_path / "theta_v1.bin", tmp_path / "tok.bin")
    try:
        assert engine.greedy(prompt, STEPS) == want
    finally:
        engine.close()


def test_linear_rope_scaling_goes_in_and_out(tmp_path: Path, tokenizer_model: Path) -> None:
    source = make_hf_llama(tmp_path / "linear", tokenizer_model, rope_scaling={"rope_type": "linear", "factor": 4.0})
    model = interop.load_hf_llama(source)[0].eval()
    assert model.args.rope_scaling == 4.0
    assert_same_logits(model, LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval())
    exported = AutoModelForCausalLM.from_pretrained(interop.export_hf(model, tokenizer_model, tmp_path / "out")).eval()
    assert exported.config.rope_parameters["factor"] == 4.0
    assert_same_logits(model, exported)
    with pytest.raises(FormatError, match="linear RoPE scaling 4"):  # the .bin formats do not carry it
        export_model(model, tmp_path / "linear.bin", version=1)
    assert not (tmp_path / "linear.bin").exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "config.json").write_text(json.dumps({**read(d), "model_type": "gpt2"})),
     "config.json: model_type=\"gpt2\""),
    (lambda d: (d / "config.json").write_text(json.dumps({**read(d), "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}})), "config.json: rope_parameters="),
    (lambda d: (d / "config.json").write_text(json.dumps({**read(d), "attention_bias": True})),
     "config.json: attention_bias=true"),
    (lambda d: (d / "config.json").write_text(json.dumps({**read(d), "head_dim": 32})), "config.json: head_dim=32"),
    (lambda d: (d / "config.json").unlink(), "config.json not found"),
    (lambda d: (d / "model-00002-of-00004.safetensors").unlink(),
     "model.safetensors.index.json: weight_map names shard model-00002-of-00004.safetensors, which is missing"),
    (lambda d: (d / "config.json").write_text(json.dumps({**read(d), "vocab_size": 1000})),
     f"tokenizer.model has {TINY_VOCAB} pieces but"),
    (lambda d: (d / "tokenizer.model").unlink(), "tokenizer.model not found: only SentencePiece"),
    (lambda d: (d / "tokenizer.model").write_bytes(b"not a model"), "tokenizer.model is not a SentencePiece model"),
])
def test_bad_directories_are_refused_in_one_line_naming_file_and_field(sharded_dir: Path, tmp_path: Path, change,
                                                                        message: str) -> None:
    directory = shutil.copytree(sharded_dir, tmp_path / "llama")
    change(directory)
    with pytest.raises(SystemExit) as exc:
        interop.load_hf_llama(directory)
    assert str(exc.value).startswith("error: ") and "\n" not in str(exc.value)
    assert message in str(exc.value)


def read(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_finetune_cli_refuses_a_bad_base_in_one_line(hf_dir: Path, tmp_path: Path) -> None:
    directory = shutil.copytree(hf_dir, tmp_path / "llama")
    (directory / "config.json").write_text(json.dumps({**read(directory), "mlp_bias": True}))
    result = run_script("finetune.py", f"--base_model={directory}", "--data=x.jsonl", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {directory / 'config.json'}: mlp_bias=true is not supported: " \
                                    "the projections here have no biases"


def test_export_hf_loads_in_transformers_with_our_logits_tokens_and_tokenizer(
        imported: Transformer, tokenizer_model: Path, sp, prompt, tmp_path: Path) -> None:
    tied = Transformer(ModelArgs(**{**imported.args.to_dict(), "tie_embeddings": True})).eval()
    tied.load_state_dict({**imported.state_dict(), "output.weight": imported.tok_embeddings.weight})
    for name, model in [("untied", imported), ("tied", tied)]:
        out = interop.export_hf(model, tokenizer_model, tmp_path / name)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                         "tokenizer.model", "tokenizer_config.json"]
        with safe_open(out / "model.safetensors", framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert ("lm_head.weight" in f.keys()) == (name == "untied")
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert loaded.config.tie_word_embeddings == (name == "tied") and loaded.config.rope_parameters["rope_theta"] == 500000.0
        assert_same_logits(model, loaded)
        assert hf_greedy(loaded, prompt) == greedy(model, prompt)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tied")
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == [sp.bos_id()] + sp.encode(text), text
        assert tokenizer.decode(sp.encode(text)) == text
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<s><|system|>\nS\n<|user|>\nQ\n<|assistant|>\nA</s>"


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def gguf_files(imported: Transformer, tokenizer_model: Path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {kind: interop.export_gguf(imported, tokenizer_model, folder / f"model-{kind}.gguf", kind)
            for kind in interop.GGUF_TYPES}


def test_gguf_reads_back_field_by_field_and_tensor_by_tensor(imported: Transformer, gguf_files, sp) -> None:
    state = imported.state_dict()
    for kind, path in gguf_files.items():
        reader = gguf.GGUFReader(path)
        expected = {
            "general.architecture": "llama", "llama.context_length": 128, "llama.embedding_length": 64,
            "llama.block_count": 2, "llama.feed_forward_length": 160, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": TINY_VOCAB,
            "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5), "llama.rope.freq_base": 500000.0,
            "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[kind], "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": interop.CHAT_TEMPLATE,
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(TINY_VOCAB)],
        }
        for key, value in expected.items():
            assert field(reader, key) == value, (kind, key)
        assert field(reader, "tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(TINY_VOCAB)])
        types = field(reader, "tokenizer.ggml.token_type")
        assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256 and set(types[259:]) == {1}  # unk, <s> </s>, bytes
        tensors = {t.name: t for t in reader.tensors}
        names = [(ours, name) for ours, _, name, _ in interop.weight_names(imported.args)]
        assert sorted(tensors) == sorted(name for _, name in names) and "output.weight" in tensors
        for ours, name in names:
            tensor, want = tensors[name], state[ours].numpy()
            got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
            if want.ndim == 1 or kind == "f32":
                assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), name
            elif kind == "f16":
                assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
            else:
                assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
                blocks = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
                assert (np.abs(got - want).reshape(-1, 32) <= 0.6 * blocks).all(), name  # half a step, and the scale in float16


def llamacpp(models: list[dict], tmp_path: Path) -> list[dict]:
    """Each model's results from one run of bench/llamacpp.mjs (llama.cpp through node-llama-cpp)."""
    if not (REPO / "bench" / "node_modules" / "node-llama-cpp").is_dir():
        pytest.fail("node-llama-cpp is not installed: `make test` installs it (npm) into bench/node_modules")
    request_path = tmp_path / "request.json"
    request_path.write_text(json.dumps({"models": models}))
    result = subprocess.run(["node", LLAMACPP, request_path], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["models"]


def test_llamacpp_runs_the_gguf_with_our_greedy_tokens(imported: Transformer, gguf_files, prompt, sp,
                                                       tmp_path: Path) -> None:
    ours = greedy(imported, prompt)
    half = Transformer(imported.args).eval()  # the f16 file's weights: matrices rounded to float16
    half.load_state_dict({k: v.half().float() if v.dim() == 2 else v for k, v in imported.state_dict().items()})
    results = llamacpp([{"path": str(path), "generate": [{"prompt": prompt, "steps": STEPS}], "tokenize": TEXTS}
                        for path in gguf_files.values()], tmp_path)
    for kind, result in zip(gguf_files, results):
        got = result["generate"][0]["tokens"]
        assert result["tokenize"] == [sp.encode(text) for text in TEXTS], kind
        if kind == "f32":
            assert got == ours
        elif kind == "f16":
            assert got == greedy(half, prompt)
        else:  # q8_0: our model's choice at each of llama.cpp's steps (its own tokens fed back)
            with torch.no_grad():
                logits, _ = imported(torch.tensor([prompt + got]))
            agree = int((logits[0, len(prompt) - 1:-1].argmax(-1) == torch.tensor(got)).sum())
            print(f"q8_0: llama.cpp's greedy token is ours at {agree} of {STEPS} steps")
            assert agree >= 0.9 * STEPS


@pytest.mark.parametrize("adapter", ["--lora_r=4", "--qlora"])
def test_lora_and_qlora_from_an_imported_base_merge_and_export_everywhere(
        hf_dir: Path, imported: Transformer, tmp_path: Path, adapter: str, tokenizer_model: Path, prompt) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Кто ты?"}, {
        "role": "assistant", "content": "Я модель, обученная на заметках."}]}, ensure_ascii=False) + "\n"
                            for _ in range(8)), encoding="utf-8")
    out = tmp_path / "sft"
    flag = "--base_model" if adapter == "--lora_r=4" else "--init_from"
    finetune.main(["--device=cpu", "--dtype=float32", "--val_fraction=0", "--warmup_iters=0", f"{flag}={hf_dir}",
                   f"--data={data}", f"--out_dir={out}", "--max_iters=4", "--batch_size=4", "--learning_rate=1e-2", "--log_interval=1",
                   "--lora_r=4", "--lora_targets=wq,wk,wv,wo,w1,w2,w3", "--merge", *([adapter] if adapter == "--qlora" else [])])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert log[-1]["loss"] < log[0]["loss"]
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["base"]["sha256"] == interop.load_hf_llama(hf_dir)[1]["weights_sha256"]
    merged, _ = tuning.load_base_model(out / "ckpt.pt")  # the recorded Hugging Face base, adapters merged
    merged.eval()
    assert not torch.equal(merged.layers[0].attention.wq.weight, imported.layers[0].attention.wq.weight)
    run_script("export.py", str(out / "hf"), "--format=hf", f"--checkpoint={out / 'merged.pt'}", cwd=tmp_path)
    assert_same_logits(merged, AutoModelForCausalLM.from_pretrained(out / "hf").eval())
    run_script("export.py", str(out / "model.gguf"), "--format=gguf", "--type=f32", f"--checkpoint={out / 'merged.pt'}",
               cwd=tmp_path)
    result = llamacpp([{"path": str(out / "model.gguf"), "generate": [{"prompt": prompt, "steps": 16}]}], tmp_path)
    assert result[0]["generate"][0]["tokens"] == greedy(merged, prompt, 16)
