"""evaluate.py: each mode on a tiny model trained here, and its errors on bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import chat  # noqa: E402
import evaluate  # noqa: E402
from conftest import TINY_MODEL_FLAGS, run_script  # noqa: E402
from export import export_model  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import Tokenizer, encode_dialog  # noqa: E402
from training import rolling_windows  # noqa: E402

QA = [
    ("Что такое резонанс?", "Резонанс — это отклик системы на толчки с её собственной частотой."),
    ("Как учится модель?", "Модель учится предсказывать следующий токен текста автора."),
    ("What is a tokenizer?", "A tokenizer cuts text into pieces that the model sees as numbers."),
    ("Why a validation split?", "The validation split tells whether the model learns to generalise."),
]
SYSTEM = "Отвечай кратко."
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer .bin, a 2-layer model that memorised QA through the chat template (half of it with SYSTEM),
    and the same model untrained."""
    folder = tmp_path_factory.mktemp("evaluate")
    text = [q + " " + a for q, a in QA] + [SYSTEM, "<|system|>\n<|user|>\n<|assistant|>\n"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 20), model_prefix=str(folder / "tok400"), model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    tokenizer = Tokenizer(folder / "tok400.model")
    encode = lambda s: tokenizer.encode(s, bos=False, eos=False)  # noqa: E731
    dialogs = [([{"role": "system", "content": SYSTEM}] if i % 2 else [])
               + [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for i, (q, a) in enumerate(QA)]
    rows = [encode_dialog(encode, d, tokenizer.bos_id, tokenizer.eos_id)[0] for d in dialogs]
    width = max(map(len, rows)) + 1
    padded = torch.tensor([row + [-1] * (width - len(row)) for row in rows])
    torch.manual_seed(0)
    untrained = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, max_seq_len=96))
    paths = {"tokenizer": tokenizer.export(folder / "tok400.bin"),
             "untrained": export_model(untrained, folder / "untrained.bin", version=1)}
    model, threads = untrained, torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: two threads only wait on each other, badly on a busy machine
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        _, loss = model(padded[:, :-1].clamp(min=0), padded[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.05, f"the tiny model did not memorise its answers (loss {loss.item():.3f})"
    paths["trained"] = export_model(model, folder / "trained.bin", version=1)
    with open(folder / "dialogs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": d}, ensure_ascii=False) + "\n" for d in dialogs)
    paths["dialogs"] = folder / "dialogs.jsonl"
    chat.library_path()
    return paths


def run_chat(models: dict[str, Path], name: str, data: Path, *flags: str) -> dict:
    out = data.with_name(f"{name}-{data.stem}.json")
    result = run_script("evaluate.py", "chat", str(models[name]), f"--data={data}", "-z", str(models["tokenizer"]),
                        f"--out={out}", "--threads=1", *flags, cwd=data.parent, env=ONE_THREAD)
    assert result.stdout.count("\n") == 1 and "chrF" in result.stdout
    return json.loads(out.read_text(encoding="utf-8"))


def test_chat_scores_a_model_that_recalls_its_dialogs_near_100_and_an_untrained_one_low(models) -> None:
    trained = run_chat(models, "trained", models["dialogs"])
    assert trained["n"] == len(QA) and trained["degenerate"] == trained["degenerate_references"] == 0
    assert [item["answer"] for item in trained["items"]] == [a for _, a in QA]
    assert trained["chrf"] == pytest.approx(100) and trained["bleu"] == pytest.approx(100)
    # The question set format: the two questions asked with the system prompt in training are asked without it.
    questions = models["dialogs"].with_name("questions.jsonl")
    questions.write_text("".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n"
                                 for q, a in QA[::2]), encoding="utf-8")
    assert run_chat(models, "trained", questions, "--n=1", "--seed=3")["chrf"] == pytest.approx(100)
    untrained = run_chat(models, "untrained", models["dialogs"], "--max_new_tokens=40")
    assert untrained["chrf"] < 25 and untrained["bleu"] < 5


def test_chat_takes_the_sampler_controls_with_chat_pys_defaults(models) -> None:
    controls = [name for name in evaluate.SAMPLER_CONTROLS if name not in ("temperature", "top_p", "max_new_tokens")]
    plain = run_chat(models, "trained", models["dialogs"])
    assert {name: plain[name] for name in controls} == {name: getattr(chat.CHAT_SAMPLING, name) for name in controls}
    # A penalty on every token already in the context pushes the model off the answers it recalls word for word.
    penalised = run_chat(models, "trained", models["dialogs"], "--repeat_penalty=100", "--repeat_last_n=-1")
    assert penalised["repeat_penalty"] == 100 and penalised["chrf"] < plain["chrf"] - 10


def test_degenerate_means_a_phrase_of_up_to_three_words_three_times_in_a_row() -> None:
    assert evaluate.is_degenerate("В InnerArianna — это это это это")
    assert evaluate.is_degenerate("the model is, the model is the model is done")
    assert evaluate.is_degenerate("a b a b a b")
    assert not evaluate.is_degenerate("A model is the model is the model on a few hundred kilobytes.")
    assert not evaluate.is_degenerate("это, это и то")


def test_chat_counts_references_that_repeat_themselves(models) -> None:
    """An answer that recalls a reference which repeats a phrase is degenerate too; the report says how many
    references are, so a corpus of lists is not read as a model that loops."""
    looping = models["dialogs"].with_name("looping.jsonl")
    # The questions trained without the system prompt, so the answers are the recalled ones: asked off the template
    # it learned, the model can answer anything, a loop included (one did on a Zen 3).
    looping.write_text("".join(json.dumps({"question": q, "answer": "да да да"}, ensure_ascii=False) + "\n"
                               for q, _ in QA[::2]), encoding="utf-8")
    report = run_chat(models, "trained", looping)
    assert [item["answer"] for item in report["items"]] == [a for _, a in QA[::2]]
    assert report["degenerate_references"] == 2 and report["degenerate"] == 0
    assert [item["reference_degenerate"] for item in report["items"]] == [True, True]


@pytest.mark.parametrize("content, message", [
    (None, "bad.jsonl not found"),
    ("", "holds no questions"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: no user message followed by an assistant"),
    ('{"question": "q", "answer": "a"}\nnot json\n', ":2: not JSON"),
    ('{"prompt": "q"}\n', ':1: expected {"messages"'),
])
def test_chat_bad_data_is_one_line_naming_the_file(tmp_path: Path, models, content: str | None, message: str) -> None:
    data = tmp_path / "bad.jsonl"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["chat", str(models["trained"]), f"--data={data}"])
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and "\n" not in error and str(data) in error and message in error


@pytest.fixture(scope="module")
def short_run(tiny_workspace: Path) -> Path:
    """A real short training run whose every evaluation scores the whole validation split."""
    run_script("train_arianna.py", *TINY_MODEL_FLAGS, "--max_iters=8", "--eval_interval=4", "--eval_iters=1000",
               "--dtype=float32", "--early_stop_patience=0", "--out_dir=out/evaluate", cwd=tiny_workspace,
               env=ONE_THREAD)
    return tiny_workspace / "out" / "evaluate"


def test_text_equals_the_trainers_val_bpb_on_the_same_split(tiny_workspace: Path, short_run: Path) -> None:
    log = [json.loads(line) for line in (short_run / "log.jsonl").read_text().splitlines()]
    best = min(log, key=lambda entry: entry["val_loss"])
    for model in ("best.pt", "model.bin"):
        out = short_run / f"text-{model}.json"
        run_script("evaluate.py", "text", str(short_run / model), "--data=data/tok512", "--dtype=float32",
                   f"--out={out}", cwd=tiny_workspace, env=ONE_THREAD)
        report = json.loads(out.read_text())
        assert report["bits_per_byte"] == pytest.approx(best["val_bpb"], rel=1e-5)
        assert report["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    meta = json.loads((tiny_workspace / "data" / "tok512" / "meta.json").read_text())
    assert report["tokens"] == meta["val_tokens"] - 1 and report["bytes"] == meta["val_bytes"]
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["loss"])
    assert report["byte_perplexity"] == pytest.approx(2 ** report["bits_per_byte"])
    # With a shorter stride every token but the first is still scored once, now with more context.
    out = short_run / "text-stride.json"
    run_script("evaluate.py", "text", str(short_run / "best.pt"), "--data=data/tok512", "--stride=16",
               "--dtype=float32", f"--out={out}", cwd=tiny_workspace, env=ONE_THREAD)
    strided = json.loads(out.read_text())
    assert strided["tokens"] == report["tokens"] and strided["bits_per_byte"] < report["bits_per_byte"]
    # A text file: each RS-separated document scored on its own, BOS first.
    documents = ["Резонанс возникает, когда частота совпадает.\n", "The model learns from its author's text.\n"]
    text = tiny_workspace / "held-out.txt"
    text.write_text("\x1e\n".join(documents), encoding="utf-8")
    out = short_run / "text-file.json"
    run_script("evaluate.py", "text", str(short_run / "best.pt"), f"--data={text}", "-z", "data/tok512.model",
               f"--out={out}", cwd=tiny_workspace, env=ONE_THREAD)
    scored = json.loads(out.read_text())
    encode = Tokenizer(tiny_workspace / "data" / "tok512.model").encode
    assert scored["documents"] == 2 and scored["tokens"] == sum(len(encode(d, bos=False, eos=False)) for d in documents)
    assert scored["bytes"] == sum(len(d.encode()) for d in documents) and scored["word_perplexity"] > 1


@pytest.mark.parametrize("n, window, stride", [(10, 4, 4), (10, 4, 1), (3, 8, 8), (9, 4, 3), (1, 4, 4)])
def test_rolling_windows_score_every_token_but_the_first_once_with_at_most_window_context(n, window, stride) -> None:
    scored = []
    for start, end, count in rolling_windows(n, window, stride):
        assert 0 <= start < end <= n - 1 and end - start <= window and 0 < count <= end - start
        scored += range(end + 1 - count, end + 1)
    assert scored == list(range(1, n))


def test_report_draws_a_real_run_and_a_resumed_log_without_duplicate_steps(tiny_workspace: Path, short_run: Path,
                                                                         tmp_path: Path) -> None:
    from PIL import Image

    log = [json.loads(line) for line in (short_run / "log.jsonl").read_text().splitlines()]
    run = tmp_path / "out"
    (run / "chat").mkdir(parents=True)
    # The pretraining log as a run interrupted after its first evaluation and resumed would leave it.
    resumed = log[:1] + [dict(log[0], val_loss=99.0)] + log[:1] + log[1:]
    (run / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in resumed))
    dpo = [{"step": s, "loss": 0.7 - s / 100, "rewards/margins": s / 10, "rewards/chosen": 0.1 * s} for s in (1, 2, 3)]
    (run / "chat" / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in dpo))
    out = tmp_path / "report.json"
    result = run_script("evaluate.py", "report", str(run), f"--out={out}", cwd=tmp_path)
    drawn = json.loads(out.read_text())
    assert result.stdout.startswith("report of") and (run / "report" / "report.html").is_file()
    pretrain, chat_section = drawn["sections"][1], drawn["sections"][0]
    assert pretrain["name"] == "pretrain" and chat_section["name"] == "chat"
    figures = {(f["png"]): f["points"] for f in pretrain["figures"]}
    steps = len({entry["iter"] for entry in log})
    assert figures["pretrain-loss.png"] == {"train_loss": steps, "val_loss": steps}
    assert figures["pretrain-bpb-tokens.png"] == {"train_bpb": steps, "val_bpb": steps}
    assert {"pretrain-lr.png", "pretrain-batch.png", "pretrain-loss-tokens.png"} <= set(figures)
    assert {f["png"]: f["points"] for f in chat_section["figures"]}["chat-rewards.png"] == {
        "rewards/chosen": 3, "rewards/margins": 3}
    for name in list(figures) + ["chat-rewards.png"]:
        with Image.open(run / "report" / name) as image:
            assert image.format == "PNG" and image.size == (700, 400)
    page = (run / "report" / "report.html").read_text()
    assert "pretrain-loss.png" in page and "chat-rewards.png" in page
    import report
    assert 99.0 not in report.read_log(run / "log.jsonl")["val_loss"].values()


def test_code_generates_n_completions_per_task_through_the_engine_repeatably_by_seed(models, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task_id": "q", "prompt": QA[2][0], "tests": "assert True\n"}) + "\n")

    def completions(seed: int) -> list[str]:
        out = tmp_path / f"code-{seed}.json"
        run_script("evaluate.py", "code", str(models["trained"]), f"--tasks={tasks}", "--n=3", "--k=1,2",
                   "--temperature=2.0", "--top_p=1.0", f"--seed={seed}", "--max_new_tokens=12",
                   "-z", str(models["tokenizer"]), "--threads=1", f"--out={out}", cwd=tmp_path, env=ONE_THREAD)
        report = json.loads(out.read_text())
        assert report["results"][0]["n"] == 3 and "pass@2" in report and "pass@1" in report
        return [sample["completion"] for sample in report["results"][0]["samples"]]

    first = completions(1)
    assert first == completions(1) and first != completions(2) and len(set(first)) > 1


def test_code_prompt_longer_than_the_context_keeps_bos_and_its_end_and_is_counted(models) -> None:
    completer = evaluate.Completer(models["trained"], str(models["tokenizer"]), threads=1)
    fed: list[list[int]] = []
    feed = completer.engine.feed
    completer.engine.feed = lambda tokens, pos: (fed.append(list(tokens)) if pos == 0 else None, feed(tokens, pos))
    try:
        short, long = QA[2][0], " ".join(q for q, _ in QA * 3) + " " + QA[2][0]
        for prompt in (short, long):
            completer.complete(prompt, 0.0, 1.0, 40, 1, (), chat=True)
        whole = completer.engine.chat_turn("", long, True)
        assert fed[0] == completer.engine.chat_turn("", short, True)
        # 96 positions, 40 of them kept for the answer: BOS and the prompt's last 55 tokens.
        assert len(whole) > 56 and fed[1] == [completer.engine.bos] + whole[-55:]
        assert completer.cut == {long}
    finally:
        completer.close()
