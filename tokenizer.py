"""SentencePiece tokenizer: encode/decode, the chat template, and export to llama2.c's tokenizer .bin.

    python tokenizer.py --tokenizer-model=data/tok4096.model    # writes data/tok4096.bin

The chat template, the one that dialog fine-tuning, chat.py and run.c's chat mode all use
(one BOS at the start of the conversation, then one segment per message):

    system     encode("<|system|>\\n" + content + "\\n")                 not trained on
    user       encode("<|user|>\\n" + content + "\\n<|assistant|>\\n")     not trained on
    assistant  encode(content) + [EOS]                                  trained on

encode() is SentencePiece's own encoding without BOS/EOS, so each segment starts with its
dummy-prefix space, exactly as llama2.c's C encoder produces it.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

from sentencepiece import SentencePieceProcessor

from formats import atomic_write

LLAMA2_TOKENIZER_ENV = "ARIANNA_LLAMA2_TOKENIZER"
LLAMA2_TOKENIZER_HELP = (
    "the Llama 2 tokenizer.model is Meta's file (Llama 2 Community License): download it from "
    "https://huggingface.co/meta-llama/Llama-2-7b-hf, then pass --tokenizer_model=PATH or set "
    f"{LLAMA2_TOKENIZER_ENV}=PATH"
)

SYSTEM_HEADER = "<|system|>\n"
USER_HEADER = "<|user|>\n"
ASSISTANT_HEADER = "\n<|assistant|>\n"


def llama2_tokenizer_path(explicit: Optional[str] = None) -> Path:
    """The Llama 2 tokenizer.model: the given path, else $ARIANNA_LLAMA2_TOKENIZER; exits with a clear error if absent."""
    path = explicit or os.environ.get(LLAMA2_TOKENIZER_ENV)
    if not path:
        sys.exit(f"error: no Llama 2 tokenizer given; {LLAMA2_TOKENIZER_HELP}")
    if not Path(path).is_file():
        sys.exit(f"error: Llama 2 tokenizer {path} not found; {LLAMA2_TOKENIZER_HELP}")
    return Path(path)


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike):
        model_path = Path(model_path)
        if not model_path.is_file():
            sys.exit(f"error: tokenizer {model_path} not found; train one with "
                     "`python arianna_data.py train_vocab --vocab_size=N`")
        self.model_path = model_path
        self.sp = SentencePieceProcessor(model_file=str(model_path))
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        tokens = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + tokens + ([self.eos_id] if eos else [])

    def decode(self, tokens: Iterable[int]) -> str:
        return self.sp.decode(list(tokens))

    def export(self, bin_path: str | os.PathLike) -> Path:
        """Write llama2.c's tokenizer .bin: int32 max token length, then per token float32 score, int32 length, bytes."""
        pieces: list[bytes] = []
        scores: list[float] = []
        for token_id in range(self.n_words):
            piece = self.sp.id_to_piece(token_id)
            if token_id == self.bos_id:
                piece = "\n<s>\n"
            elif token_id == self.eos_id:
                piece = "\n</s>\n"
            pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
            scores.append(self.sp.get_score(token_id))
        bin_path = Path(bin_path)
        with atomic_write(bin_path) as f:
            f.write(struct.pack("<i", max(len(p) for p in pieces)))
            for piece, score in zip(pieces, scores):
                f.write(struct.pack("<fi", score, len(piece)))
                f.write(piece)
        return bin_path


def encode_dialog(
    encode: Callable[[str], list[int]], messages: list[dict], bos_id: int, eos_id: int
) -> tuple[list[int], list[int]]:
    """Render messages through the chat template: (tokens, loss_mask) with mask 1 on assistant tokens and their EOS.

    encode(text) must return the tokens of text without BOS/EOS (Tokenizer.encode(text, False, False)).
    """
    tokens, mask = [bos_id], [0]
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            segment, trained = encode(SYSTEM_HEADER + content + "\n"), 0
        elif role == "user":
            segment, trained = encode(USER_HEADER + content + ASSISTANT_HEADER), 0
        elif role == "assistant":
            segment, trained = encode(content) + [eos_id], 1
        else:
            raise ValueError(f"unknown role {role!r}: expected system, user or assistant")
        tokens += segment
        mask += [trained] * len(segment)
    return tokens, mask


def main() -> None:
    parser = argparse.ArgumentParser(description="Export a SentencePiece model to llama2.c's tokenizer .bin")
    parser.add_argument("--tokenizer-model", "--tokenizer_model", dest="tokenizer_model", required=True,
                        help="path to the SentencePiece .model; the .bin is written beside it")
    args = parser.parse_args()
    tokenizer = Tokenizer(args.tokenizer_model)
    out = tokenizer.export(Path(args.tokenizer_model).with_suffix(".bin"))
    print(f"wrote {out} ({tokenizer.n_words} tokens)")


if __name__ == "__main__":
    main()
