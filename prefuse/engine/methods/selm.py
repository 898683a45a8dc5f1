"""SELM's offline data of one iteration (`prefuse selm-data`): each pair's y_w and y_l and y_ref, the reference's
greedy response, ranked together by a judge; the best becomes `chosen`, the worst `rejected`, and y_ref is kept as
`reference_response` for SELM's optimism term (Zhang et al., 2024, "Self-Exploring Language Models", Algorithm 1
and its code's ranking of the three candidates).

    prefuse selm-data --model_name_or_path iterate-1 --dataset_name slice-2.jsonl --output selm-2.jsonl \\
        --reward_model_path rm        # or --judge DIR (a pairwise model, as SELM's PairRM) or --reward_funcs f.py:g
    prefuse train --loss_type selm --model_name_or_path iterate-1 --dataset_name selm-2.jsonl ...

The written file is in the input's format, explicit (standard: strings; conversational: message lists, y_ref as
one assistant message), with the input's other columns. A pair whose three candidates all tie teaches nothing: it
is left out and counted. Ranking is `judges.ranking` (the same as online SELM's).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefuse.engine.data import BadRow, DataError, detect_format, load_records
from prefuse.engine.data.errors import WHERE_COLUMN
from prefuse.engine.data.formats import PAIRED_FORMATS, RowIssue, content_text, split_row
from prefuse.engine.data.prompts import NOT_CARRIED
from prefuse.engine.judges import make_judge
from prefuse.engine.judges.ranking import best_and_worst, judge_candidates
from prefuse.engine.methods.self_revision import revise
from prefuse.engine.models.loading import load_generator


@dataclass
class SELMDataConfig:
    model_name_or_path: str = field(default="", metadata={"help": "the reference model (SELM: the previous "
                                                                  "iterate), whose greedy response is y_ref"})
    dataset_name: str = field(default="", metadata={"help": "a local preference file (prompt, chosen, rejected)"})
    output: str = field(default="", metadata={"help": "the JSON-lines file written"})
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "judge: reward functions file.py:name"})
    reward_model_path: str | None = field(default=None, metadata={"help": "judge: a reward model directory"})
    judge: str | None = field(default=None, metadata={"help": "judge: a pairwise preference model directory"})
    base: str | None = field(default=None, metadata={"help": "the base model of a LoRA adapter directory"})
    max_new_tokens: int = field(default=64, metadata={"help": "y_ref's longest length"})
    max_prompt_length: int | None = field(default=None, metadata={"help": "cut prompts to their last N tokens"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})

    def validate(self) -> "SELMDataConfig":
        for name in ("model_name_or_path", "dataset_name", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        if not Path(self.dataset_name).exists():
            raise ValueError(f"dataset_name: no such file or directory: {self.dataset_name}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        return self


def response_text(value) -> str:
    """A response as the judge reads it: the text, or a message list's last message's content."""

    return content_text(value[-1]["content"]) if isinstance(value, list) else value


def read_pairs(path: str) -> tuple[str, list[dict]]:
    """(format, rows as {"where", "prompt", "chosen", "rejected", "columns"}) of a paired file; BadRow for a bad
    row, DataError for a file that holds no pairs."""

    records = load_records(path)
    fmt = detect_format(records)
    if fmt not in PAIRED_FORMATS:
        raise DataError(f"{path}: selm-data ranks preference pairs (prompt, chosen, rejected); this file is {fmt}")
    if "images" in records.column_names:
        raise DataError(f"{path}: selm-data ranks text pairs; this file has an images column")
    carried = [c for c in records.column_names if c not in NOT_CARRIED and c not in ("chosen", "rejected")]
    rows = []
    for index, row in enumerate(records):
        where = row.get(WHERE_COLUMN) or f"{path}:{index + 1}"
        try:
            parts = split_row(row, fmt)
        except RowIssue as issue:
            raise BadRow(where, issue.problem) from None
        rows.append({"where": where, "prompt": parts.prompt, **parts.completions,
                     "columns": {c: row[c] for c in carried if c != "prompt"}})
    if not rows:
        raise DataError(f"{path}: no pairs (no rows)")
    return fmt, rows


def build_selm_data(cfg: SELMDataConfig) -> dict:
    """Writes cfg.output; returns {"rows": written, "tied": left out, "reference_chosen": share, ...}."""

    cfg.validate()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    fmt, rows = read_pairs(cfg.dataset_name)
    judge = make_judge(reward_funcs=cfg.reward_funcs, reward_model_path=cfg.reward_model_path, judge=cfg.judge,
                       device=device)
    model, tokenizer = load_generator(cfg.model_name_or_path, cfg.base, device)
    stages = revise(model, tokenizer, [r["prompt"] for r in rows], 0, max_new_tokens=cfg.max_new_tokens,
                    temperature=0.0, batch_size=cfg.batch_size, max_prompt_length=cfg.max_prompt_length)
    y_ref = [s[0].completion for s in stages]
    candidates = [[response_text(r["chosen"]), response_text(r["rejected"]), y] for r, y in zip(rows, y_ref)]
    names = sorted(set().union(*(r["columns"] for r in rows)))
    columns = {n: [r["columns"].get(n) for r in rows] for n in names}
    wins, scores = judge_candidates(judge, [r["prompt"] for r in rows], candidates, columns=columns)
    best, worst = best_and_worst(wins, scores)
    conversational = fmt.startswith("conversational")
    shaped = lambda text: [{"role": "assistant", "content": text}] if conversational else text  # noqa: E731
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp")
    written, reference_chosen, reference_rejected = 0, 0, 0
    with open(temp, "w", encoding="utf-8") as f:
        for row, y, b, w in zip(rows, y_ref, best.tolist(), worst.tolist()):
            if b == w:
                continue
            sides = [row["chosen"], row["rejected"], shaped(y)]
            record = {**row["columns"], "prompt": row["prompt"], "chosen": sides[b], "rejected": sides[w],
                      "reference_response": shaped(y)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
            reference_chosen += b == 2
            reference_rejected += w == 2
    if not written:
        temp.unlink()
        raise ValueError(f"judge: every pair's three candidates tied ({len(rows)} pairs); nothing to write")
    temp.replace(out)
    report = {"rows": written, "tied": len(rows) - written, "reference_chosen": reference_chosen / written,
              "reference_rejected": reference_rejected / written}
    print(f"{written} ranked pairs written to {out} ({report['tied']} left out: their candidates tied); y_ref chosen "
          f"in {report['reference_chosen']:.3f}, rejected in {report['reference_rejected']:.3f} of them")
    return report
