"""The second corpus the default recipe is measured on: the Vim user manual, as Debian's vim-runtime ships it,
turned into one markdown file per chapter (~280 KB). Nobody on this project wrote it.

    python eval/vim_corpus.py --out=data/vim_doc            # needs /usr/share/vim/vim90/doc (apt install vim-runtime)
    ARIANNA_DOC_DIR=data/vim_doc ARIANNA_OUT_DIR=out/vim ./train_arianna.sh
    python evaluate.py chat out/vim/chat/model.bin --data=eval/vim_heldout.jsonl

Chapters usr_01.txt onwards, in order, while the total stays under --max_bytes. Per chapter: the first line (file
tag and date), the "VIM USER MANUAL" line, rule lines of '=' and the help system's navigation (the chapter's
table of contents, "Next chapter:" / "Previous chapter:" / "Table of contents:" lines, the closing copyright and
modeline) are dropped; the first remaining line becomes `# Title` and each `*NN.N*  Title` line `## Title`, so
every section becomes a question of the chat dialogs. Help tags (`*tag*`, targets of links, not text) are removed
and links (`|name|`) keep their name.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the toolkit's modules, from eval/
from formats import atomic_write  # noqa: E402

SECTION = re.compile(r"^\*\d+\.\d+\*\s+(.+)$")
NAVIGATION = re.compile(r"^(\|\d+\.\d+\|\s|\s*(Next|Previous) chapter: |Table of contents: |Copyright: see \|manual-copyright\|)")
TAG = re.compile(r"(?:^|(?<=\s))\*[^*\s|]+\*(?=\s|$)")           # *hjkl*: a place links jump to
LINK = re.compile(r"(?:^|(?<=[\s(]))\|([^|\s]+)\|(?=[\s.,;:)]|$)")  # |:global|: a link, shown as its name


def help_text(line: str) -> str:
    """A line of help text as plain text: tags removed, links as their names."""
    return LINK.sub(r"\1", TAG.sub("", line)).rstrip() if "*" in line or "|" in line else line


def chapter_markdown(text: str) -> str:
    lines, titled = [], False
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("VIM USER MANUAL") or re.fullmatch(r"=+", stripped) or NAVIGATION.match(line):
            continue
        section = SECTION.match(line)
        if section:
            lines.append("## " + help_text(section.group(1)).strip())
        elif not titled and stripped:
            lines.append("# " + stripped)
            titled = True
        else:
            lines.append(help_text(line))
    return re.sub(r"\n\s*\n(\s*\n)+", "\n\n", "\n".join(lines)).strip() + "\n"  # dropped lines leave one blank line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the chapters' .md files")
    parser.add_argument("--manual", default="/usr/share/vim/vim90/doc", help="folder holding usr_NN.txt")
    parser.add_argument("--max_bytes", type=int, default=300_000)
    args = parser.parse_args()
    chapters = sorted(Path(args.manual).glob("usr_[0-9][0-9].txt"))
    if not chapters:
        sys.exit(f"error: no usr_NN.txt in {args.manual}; install Debian's vim-runtime or pass --manual=FOLDER")
    out, total = Path(args.out), 0
    out.mkdir(parents=True, exist_ok=True)
    for path in chapters:
        body = chapter_markdown(path.read_text(encoding="utf-8", errors="replace"))
        if total + len(body.encode()) > args.max_bytes:
            break
        with atomic_write(out / f"{path.stem}.md", "w", encoding="utf-8") as f:
            f.write(body)
        total += len(body.encode())
    print(f"wrote {len(list(out.glob('usr_*.md')))} chapters, {total:,} bytes, into {out}")


if __name__ == "__main__":
    main()
