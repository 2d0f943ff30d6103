"""arianna_data.py: prepare, train_vocab and pretokenize, run as a user would (a subprocess in a scratch folder)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import arianna_data  # noqa: E402  (the repository root is not a package)

LLAMA2_TOKENIZER = REPO.parent / "shared" / "llama2" / "tokenizer.model"
VOCAB_SIZE = 400
SEP = "\x1e\n"

RUSSIAN = """# Введение

Это небольшой текст на русском языке. Мы проверяем, что токенизатор
сохраняет буквы «ё», тире — и кавычки, а также числа 2024 и 3.14.

Съешь же ещё этих мягких французских булок, да выпей чаю.
"""
ENGLISH = "# English\r\n\r\nThe quick brown fox jumps over the lazy dog.\r\nPack my box with five dozen liquor jugs.\r\n"
CODE = """Some code:

```python
def fibonacci(n: int) -> int:
    if n < 2:
        return n
\treturn fibonacci(n - 1) + fibonacci(n - 2)  # 1, 1, 2, 3, 5, 8
```
---
A rule above, not front matter."""  # no final newline: prepare adds one


def many_doc(index: int) -> str:
    return f"# Заметка {index}\n\nNote number {index} says: x = {index * 37} + y_{index}.\nСтрока {index}.\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder with doc/ (Russian, English, code, front matter, nested folders, a non-UTF-8 file,
    an empty folder, a non-markdown file), prepared and with a trained tokenizer."""
    root = tmp_path_factory.mktemp("data")
    doc = root / "doc"
    (doc / "guide").mkdir(parents=True)
    (doc / "empty").mkdir()
    (doc / "many").mkdir()
    (doc / "01-intro.md").write_text("---\ntitle: Введение\ntags: [a, b]\n---\n\n" + RUSSIAN, encoding="utf-8")
    (doc / "broken.md").write_bytes("Привет".encode("cp1251"))
    (doc / "guide" / "english.markdown").write_bytes(ENGLISH.encode("utf-8"))
    (doc / "guide" / "code.md").write_text(CODE, encoding="utf-8")
    (doc / "notes.txt").write_text("not markdown", encoding="utf-8")
    for index in range(16):
        (doc / "many" / f"n{index:02d}.md").write_text(many_doc(index), encoding="utf-8")
    run_ok(root, "prepare")
    run_ok(root, "train_vocab", f"--vocab_size={VOCAB_SIZE}")
    return root


def expected_documents() -> list[str]:
    return ([RUSSIAN, CODE + "\n", ENGLISH.replace("\r\n", "\n")]
            + [many_doc(index) for index in range(16)])


def run_data(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "ARIANNA_LLAMA2_TOKENIZER"}
    environment.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "arianna_data.py"), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


def run_ok(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = run_data(cwd, *args, env=env)
    assert result.returncode == 0, result.stderr
    return result


def run_fails(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """The error line of a run that must fail cleanly."""
    result = run_data(cwd, *args, env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def read_split(out_dir: Path, split: str) -> np.ndarray:
    shards = sorted(out_dir.glob(f"{split}_*.bin"))
    assert shards, f"no {split} shards in {out_dir}"
    return np.concatenate([np.fromfile(shard, dtype="<u2") for shard in shards])


def decode_documents(tokens: np.ndarray, sp: spm.SentencePieceProcessor) -> list[str]:
    """The texts of a token stream cut at BOS; the stream must start with BOS."""
    assert tokens[0] == sp.bos_id()
    starts = list(np.flatnonzero(tokens == sp.bos_id())) + [len(tokens)]
    return [sp.decode(tokens[start + 1:end].tolist()) for start, end in zip(starts, starts[1:])]


def shard_files(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.iterdir())}


# ----------------------------------------------------------------------------- prepare

def test_prepare_gathers_sorted_documents_without_front_matter(workdir: Path):
    result = run_ok(workdir, "prepare")
    documents = expected_documents()
    corpus = (workdir / "data" / "arianna_corpus.txt").read_text(encoding="utf-8")
    assert corpus == "".join(document + SEP for document in documents)
    assert "title:" not in corpus and "```python\ndef fibonacci" in corpus
    n_chars = sum(len(document) for document in documents)
    n_bytes = sum(len(document.encode("utf-8")) for document in documents)
    assert result.stdout.strip() == (f"gathered {len(documents)} files, {n_chars} characters, {n_bytes} bytes "
                                     "from doc into data/arianna_corpus.txt (1 skipped)")
    assert result.stderr.strip() == ("warning: skipping doc/broken.md: not UTF-8 (byte 0xcf at offset 0); "
                                     "re-save it as UTF-8")
    assert list(arianna_data.iter_corpus_documents(workdir / "data" / "arianna_corpus.txt")) == documents


def test_prepare_errors(tmp_path: Path):
    assert run_fails(tmp_path, "prepare") == ("error: document folder doc does not exist; create it and put your "
                                              ".md files in it, or point to yours with --doc_dir=PATH")
    (tmp_path / "doc" / "empty").mkdir(parents=True)
    assert run_fails(tmp_path, "prepare") == ("error: no markdown files (.md, .markdown) in doc; put your documents "
                                              "there, or point to yours with --doc_dir=PATH")
    (tmp_path / "doc" / "latin1.md").write_bytes(b"caf\xe9\n")
    (tmp_path / "doc" / "blank.md").write_text("---\na: 1\n---\n\n", encoding="utf-8")
    (tmp_path / "doc" / "dangling.md").symlink_to(tmp_path / "nowhere.md")
    (tmp_path / "doc" / "sep.md").write_text("a\x1eb\n", encoding="utf-8")
    result = run_data(tmp_path, "prepare")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "warning: skipping doc/blank.md: no text (empty, or front matter only)",
        "warning: skipping doc/dangling.md: cannot read it (No such file or directory); "
        "check that it exists and is readable",
        "warning: skipping doc/latin1.md: not UTF-8 (byte 0xe9 at offset 3); re-save it as UTF-8",
        "warning: skipping doc/sep.md: contains the control character U+001E (at byte 1), which arianna_corpus.txt "
        "uses to separate documents; remove it",
        "error: none of the 4 markdown files in doc could be used (see the warnings above); fix them and run "
        "prepare again",
    ]
    assert not (tmp_path / "data" / "arianna_corpus.txt").exists()


def test_prepare_cleans_control_characters_and_refuses_non_files(tmp_path: Path):
    """NUL and other control characters are removed with a warning naming the file; a FIFO is skipped at once (not
    waited on); TOML front matter goes like YAML's; a --data_dir that is a file is a one-line error."""
    doc = tmp_path / "doc"
    doc.mkdir()
    (doc / "a.md").write_bytes(b"+++\ntitle = 'x'\n+++\n\n# A\x00\n\nBell\x07 and form\x0cfeed, tab\tkept.\r\n")
    os.mkfifo(doc / "b.md")
    result = run_ok(tmp_path, "prepare")
    assert (tmp_path / "data" / "arianna_corpus.txt").read_text(encoding="utf-8") == (
        "# A\n\nBell and formfeed, tab\tkept.\n" + SEP)
    assert result.stderr.strip().splitlines() == [
        "warning: doc/a.md: removed 3 control characters (the first U+0000 at byte 24); they are not text",
        "warning: skipping doc/b.md: cannot read it (not a regular file but a FIFO, socket or device); "
        "check that it exists and is readable"]
    (tmp_path / "taken").write_text("a file", encoding="utf-8")
    assert run_fails(tmp_path, "prepare", "--data_dir=taken") == (
        "error: --data_dir=taken is a file, not a folder; pass a folder (it is created if missing)")
    assert run_fails(tmp_path, "prepare", "--data_dir=taken/data").startswith(
        "error: cannot create the folder --data_dir=taken/data (Not a directory)")
    assert (tmp_path / "taken").read_text(encoding="utf-8") == "a file"


def test_train_arianna_sh_has_no_default_llama2_tokenizer(tmp_path: Path):
    """VOCAB=0 without ARIANNA_LLAMA2_TOKENIZER is a one-line error saying where Meta's file comes from, even where
    the development set-up's ../shared/llama2/tokenizer.model exists."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "train_arianna.sh", repo)
    (tmp_path / "shared" / "llama2").mkdir(parents=True)
    shutil.copy(REPO / "fuzz" / "seeds" / "tokenizer", tmp_path / "shared" / "llama2" / "tokenizer.model")
    environment = {key: value for key, value in os.environ.items() if key != "ARIANNA_LLAMA2_TOKENIZER"}
    for extra, why in (({}, "ARIANNA_LLAMA2_TOKENIZER is not set"), ({"ARIANNA_LLAMA2_TOKENIZER": "x.model"},
                                                                     "x.model not found")):
        result = subprocess.run(["bash", str(repo / "train_arianna.sh"), "0"], cwd=repo, env={**environment, **extra},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stdout == "" and not (repo / ".venv").exists()
        assert result.stderr == (f"error: VOCAB=0 needs the Llama 2 tokenizer.model ({why}), Meta's file (Llama 2 "
                                 "Community License): download it from https://huggingface.co/meta-llama/Llama-2-7b-hf "
                                 "and set ARIANNA_LLAMA2_TOKENIZER=PATH\n")


# ----------------------------------------------------------------------------- train_vocab

def test_tokenizer_round_trips_text_exactly(workdir: Path):
    sp = spm.SentencePieceProcessor(model_file=str(workdir / "data" / f"tok{VOCAB_SIZE}.model"))
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (VOCAB_SIZE, 0, 1, 2, -1)
    samples = [
        "Съешь же ещё этих мягких французских булок 🙂🚀 — «ёлка»",
        "def f(x):\n\tif x:\n        return {'a': [1, 2]}  # 中文 ∑\n",
        "   three leading spaces, two  inside,\ttab\t\tand trailing   \n\n\n",
        "year 2024, pi 3.14159, id 0x1F",
        *expected_documents(),
    ]
    for text in samples:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids, text
        assert sp.decode(ids) == text
    digit_pieces = [piece for piece in sp.encode("2024 and 1234567890", out_type=str) if re.search(r"\d", piece)]
    assert digit_pieces and all(len(re.findall(r"\d", piece)) == 1 for piece in digit_pieces)


def test_train_vocab_is_deterministic(workdir: Path, tmp_path: Path):
    shutil.copytree(workdir / "data", tmp_path / "data", ignore=shutil.ignore_patterns("tok*"))
    run_ok(tmp_path, "train_vocab", f"--vocab_size={VOCAB_SIZE}")
    for suffix in (".model", ".vocab"):
        name = f"tok{VOCAB_SIZE}{suffix}"
        assert (tmp_path / "data" / name).read_bytes() == (workdir / "data" / name).read_bytes()


def test_train_vocab_size_limits(workdir: Path, tmp_path: Path):
    shutil.copytree(workdir / "data", tmp_path / "data", ignore=shutil.ignore_patterns("tok*"))
    message = run_fails(tmp_path, "train_vocab", "--vocab_size=5000")
    largest = int(re.search(r"the largest size that works is (\d+)", message).group(1))
    assert message == (f"error: --vocab_size=5000 is too large for data/arianna_corpus.txt: the largest size that "
                       f"works is {largest}; use --vocab_size={largest} or less, or add more text")
    run_ok(tmp_path, "train_vocab", f"--vocab_size={largest}")
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "data" / f"tok{largest}.model")).vocab_size() == largest
    assert not list((tmp_path / "data").glob("*.tmp*")), "temporary model files left behind"

    message = run_fails(tmp_path, "train_vocab", "--vocab_size=100")
    smallest = int(re.search(r"need (\d+); use --vocab_size=\1 or more$", message).group(1))
    assert 259 < smallest < VOCAB_SIZE
    assert run_fails(tmp_path, "train_vocab", "--vocab_size=70000") == (
        "error: --vocab_size=70000 is too large: shards store token ids as uint16, so at most 65536 tokens "
        "(ids 0..65535); choose a smaller --vocab_size")


def test_train_vocab_needs_corpus(tmp_path: Path):
    assert run_fails(tmp_path, "train_vocab", "--vocab_size=512") == (
        "error: corpus data/arianna_corpus.txt not found; run `python arianna_data.py prepare` first")


# ----------------------------------------------------------------------------- pretokenize

def test_pretokenize_writes_bos_documents_and_held_out_split(workdir: Path):
    result = run_ok(workdir, "pretokenize", f"--vocab_size={VOCAB_SIZE}")
    out_dir = workdir / "data" / f"tok{VOCAB_SIZE}"
    sp = spm.SentencePieceProcessor(model_file=str(workdir / "data" / f"tok{VOCAB_SIZE}.model"))
    train, val = read_split(out_dir, "train"), read_split(out_dir, "val")
    train_docs, val_docs = decode_documents(train, sp), decode_documents(val, sp)
    documents = expected_documents()
    assert sorted(train_docs + val_docs) == sorted(documents)
    assert len(val_docs) == round(0.1 * len(documents)) and not set(val_docs) & set(train_docs)
    # Corpus order is kept inside each split.
    assert train_docs == [document for document in documents if document in train_docs]
    meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    assert meta == {
        "vocab_size": VOCAB_SIZE, "tokenizer_model": f"data/tok{VOCAB_SIZE}.model",
        "train_tokens": len(train), "val_tokens": len(val),
        "train_bytes": sum(len(text.encode("utf-8")) for text in train_docs),
        "val_bytes": sum(len(text.encode("utf-8")) for text in val_docs),
        "bos_id": 1, "eos_id": 2, "train_documents": len(train_docs), "val_documents": len(val_docs),
        "train_shards": ["train_000.bin"], "val_shards": ["val_000.bin"],
    }
    assert f"train {len(train)} tokens" in result.stdout


def test_pretokenize_is_deterministic_across_runs_workers_and_shard_sizes(workdir: Path, tmp_path: Path):
    out_dir = workdir / "data" / f"tok{VOCAB_SIZE}"
    run_ok(workdir, "pretokenize", f"--vocab_size={VOCAB_SIZE}")
    first = shard_files(out_dir)
    run_ok(workdir, "pretokenize", f"--vocab_size={VOCAB_SIZE}")
    assert shard_files(out_dir) == first
    # Two worker processes, many small tasks: the same bytes.
    run_ok(workdir, "pretokenize", f"--vocab_size={VOCAB_SIZE}", "--num_workers=2", "--chunk_chars=100")
    assert shard_files(out_dir) == first
    # Small shards hold the same token stream, cut into files of at most shard_tokens tokens.
    run_ok(workdir, "pretokenize", f"--vocab_size={VOCAB_SIZE}", "--shard_tokens=60", "--data_dir=data")
    for split in ("train", "val"):
        shards = sorted(out_dir.glob(f"{split}_*.bin"))
        assert all(path.stat().st_size <= 120 for path in shards)
        assert b"".join(path.read_bytes() for path in shards) == first[f"{split}_000.bin"]
    assert len(list(out_dir.glob("train_*.bin"))) > 1
    leftovers = [path.name for path in out_dir.parent.iterdir() if path.suffix in (".tmp", ".old")]
    assert not leftovers, "temporary shard folders left behind"


def test_validation_split_rules():
    hashes = [5, 3, 9, 3, 7, 1, 8, 2, 6, 4, 10, 11]
    assert arianna_data.choose_validation_documents(hashes, 0.1) == {5}
    assert arianna_data.choose_validation_documents(hashes, 0.2) == {5, 7}
    # Identical documents (same hash) stay on one side.
    assert arianna_data.choose_validation_documents(hashes, 0.3) == {5, 7, 1, 3}
    assert arianna_data.choose_validation_documents([4, 4], 0.5) == {0}
    assert len(arianna_data.choose_validation_documents([1, 2], 0.9)) == 1


def test_single_document_is_split_at_a_paragraph(tmp_path: Path):
    text = "".join(f"Paragraph {index} has some words in it.\nAnd a second line.\n\n" for index in range(10))
    train, val = arianna_data.split_single_document(text, 0.1)
    assert train + val == text and train.endswith("\n\n") and val.startswith("Paragraph 9 ")
    train, val = arianna_data.split_single_document("one line only\n", 0.1)
    assert train and val and train + val == "one line only\n"

    (tmp_path / "doc").mkdir()
    (tmp_path / "doc" / "only.md").write_text(text, encoding="utf-8")
    run_ok(tmp_path, "prepare")
    run_ok(tmp_path, "train_vocab", "--vocab_size=300")
    run_ok(tmp_path, "pretokenize", "--vocab_size=300")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "data" / "tok300.model"))
    out_dir = tmp_path / "data" / "tok300"
    assert decode_documents(read_split(out_dir, "train"), sp) == [text[:text.index("Paragraph 9 ")]]
    assert decode_documents(read_split(out_dir, "val"), sp) == [text[text.index("Paragraph 9 "):]]


def test_pretokenize_errors(workdir: Path, tmp_path: Path):
    assert run_fails(tmp_path, "pretokenize", "--vocab_size=512") == (
        "error: corpus data/arianna_corpus.txt not found; run `python arianna_data.py prepare` first")
    assert run_fails(workdir, "pretokenize", "--vocab_size=512") == (
        "error: tokenizer data/tok512.model not found; run `python arianna_data.py train_vocab --vocab_size=512` first")
    assert run_fails(workdir, "pretokenize", "--vocab_size=512", f"--tokenizer_model=data/tok{VOCAB_SIZE}.model") == (
        f"error: data/tok{VOCAB_SIZE}.model has {VOCAB_SIZE} tokens, not --vocab_size=512; "
        "run `python arianna_data.py train_vocab --vocab_size=512` again")
    assert run_fails(workdir, "pretokenize", "--vocab_size=70000") == (
        "error: --vocab_size=70000 is too large: shards store token ids as uint16, so at most 65536 tokens "
        "(ids 0..65535); choose a smaller --vocab_size")
    assert run_fails(workdir, "pretokenize", f"--vocab_size={VOCAB_SIZE}", "--val_fraction=0") == (
        "error: --val_fraction must be between 0 and 1 (exclusive), got 0.0")


def test_pretokenize_llama2_tokenizer_missing(workdir: Path):
    no_tokenizer = run_fails(workdir, "pretokenize", "--vocab_size=0")
    assert no_tokenizer.startswith("error: no Llama 2 tokenizer given;")
    assert "--tokenizer_model=PATH" in no_tokenizer and "ARIANNA_LLAMA2_TOKENIZER=PATH" in no_tokenizer
    bad_path = run_fails(workdir, "pretokenize", "--vocab_size=0", env={"ARIANNA_LLAMA2_TOKENIZER": "nope.model"})
    assert bad_path.startswith("error: Llama 2 tokenizer nope.model not found;") and "huggingface.co" in bad_path


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason=f"Llama 2 tokenizer not at {LLAMA2_TOKENIZER}")
def test_pretokenize_llama2_tokenizer(workdir: Path):
    run_ok(workdir, "pretokenize", "--vocab_size=0", env={"ARIANNA_LLAMA2_TOKENIZER": str(LLAMA2_TOKENIZER)})
    out_dir = workdir / "data" / "arianna_data"
    from_env = shard_files(out_dir)
    run_ok(workdir, "pretokenize", "--vocab_size=0", f"--tokenizer_model={LLAMA2_TOKENIZER}")
    assert shard_files(out_dir) == from_env
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    train_docs = decode_documents(read_split(out_dir, "train"), sp)
    val_docs = decode_documents(read_split(out_dir, "val"), sp)
    assert sorted(train_docs + val_docs) == sorted(expected_documents())
    meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == (32000, 1, 2)
    assert meta["val_documents"] == len(val_docs) >= 1
