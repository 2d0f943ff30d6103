"""Pictures of a run: PNG curves from every log.jsonl under a run folder, and one report.html showing them.

    python evaluate.py report out/      # writes out/report/*.png and out/report/report.html

Each log.jsonl (pretraining's in out/, fine-tuning's in out/chat/, out/dpo/, ...) gives one section: training and
validation loss and bits per byte against step and against tokens seen, learning rate and batch size, and for
preference training the rewards, margins, accuracies and KL terms (TRL's names: rewards/*, objective/kl, env/*).
A resumed run appends the steps it repeats; the later value of a step replaces the earlier one, so every curve
has each step once. The settings shown beside the curves come from the run's ckpt.pt.
"""
from __future__ import annotations

import html
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from formats import atomic_write

STEP_KEYS = ("iter", "step")
GROUPS = (  # (file stem, title, which keys)
    ("loss", "loss", lambda key: key.endswith("loss") and "best" not in key),
    ("bpb", "bits per byte", lambda key: key.endswith("bpb")),
    ("lr", "learning rate", lambda key: key == "lr"),
    ("batch", "batch size (sequences per optimizer step)", lambda key: key == "batch"),
    ("rewards", "rewards and margins", lambda key: key.startswith(("rewards/", "env/"))),
    ("kl", "KL and policy", lambda key: key.startswith(("objective/", "policy/"))),
)


class ReportError(Exception):
    pass


def read_log(path: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value}, the last logged value of each step winning (a resumed run repeats steps)."""
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{path}:{number}: not JSON") from None
        step = next((entry[key] for key in STEP_KEYS if isinstance(entry.get(key), int)), None)
        if step is None:
            continue
        for key, value in entry.items():
            if key not in STEP_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    return series


def run_settings(folder: Path) -> dict[str, Any]:
    """The config saved in folder/ckpt.pt (memory-mapped, weights_only), or nothing."""
    checkpoint = folder / "ckpt.pt"
    if not checkpoint.is_file():
        return {}
    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged checkpoint only costs the report its settings table
        return {}
    config = saved.get("config", {}) if isinstance(saved, dict) else {}
    return {key: value for key, value in config.items() if isinstance(value, (int, float, str, bool, type(None)))}


def plot(path: Path, title: str, curves: dict[str, dict[int, float]], x_of: Optional[dict[int, float]],
         x_label: str) -> dict[str, int]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    points = {}
    for name, values in sorted(curves.items()):
        steps = sorted(step for step in values if x_of is None or step in x_of)
        xs = [x_of[step] if x_of else step for step in steps]
        axes.plot(xs, [values[step] for step in steps], marker="o" if len(steps) < 40 else None, markersize=3,
                  label=name)
        points[name] = len(steps)
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_write(path) as png:
        figure.savefig(png, format="png")
    plt.close(figure)
    return points


def draw(run_dir: Path, out_dir: Optional[Path] = None) -> dict[str, Any]:
    """Draw every log.jsonl under run_dir into out_dir (run_dir/report); returns what was drawn."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder; pass the training --out_dir (out/)")
    logs = sorted(run_dir.rglob("log.jsonl"))
    if not logs:
        raise ReportError(f"no log.jsonl under {run_dir}; train first (train_arianna.py writes {run_dir}/log.jsonl)")
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    from tqdm import tqdm

    for log in tqdm(logs, desc="report", unit="log", file=sys.stderr, leave=False):
        series = read_log(log)
        name = str(log.parent.relative_to(run_dir)).replace(os.sep, "-").strip(".") or "pretrain"
        figures = []
        for stem, title, wanted in GROUPS:
            curves = {key: values for key, values in series.items() if wanted(key)}
            if not curves:
                continue
            axes = [("step", None)] + ([("tokens", series["tokens"])] if "tokens" in series
                                      and stem in ("loss", "bpb") else [])
            for x_label, x_of in axes:
                png = out_dir / f"{name}-{stem}{'' if x_label == 'step' else '-tokens'}.png"
                points = plot(png, f"{name}: {title}", curves, x_of, x_label)
                figures.append({"png": png.name, "title": title, "x": x_label, "points": points})
        sections.append({"log": str(log), "name": name, "settings": run_settings(log.parent), "figures": figures})
    page = out_dir / "report.html"
    with atomic_write(page, "w", encoding="utf-8") as f:
        f.write(render(run_dir, sections))
    return {"report": str(page), "sections": sections}


def render(run_dir: Path, sections: list[dict[str, Any]]) -> str:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(str(run_dir))}</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{max-width:48%;margin:.5%}"
             "table{border-collapse:collapse;font-size:90%}td{border:1px solid #ccc;padding:2px 8px}</style>",
             f"<h1>Run {html.escape(str(run_dir))}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section['name'])}</h2><p>{html.escape(section['log'])}</p>")
        for figure in section["figures"]:
            parts.append(f"<img src='{html.escape(figure['png'])}' alt='{html.escape(figure['title'])}'>")
        if section["settings"]:
            rows = "".join(f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>"
                           for key, value in section["settings"].items())
            parts.append(f"<details><summary>settings</summary><table>{rows}</table></details>")
    return "\n".join(parts) + "\n"
