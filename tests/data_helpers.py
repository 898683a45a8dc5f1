"""Fixtures and helpers shared by the data-layer tests: the fixture tokenizer, a datasets cache, JSON lines."""
import json

import pytest

from tests.tokenizer_fixture import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets_cache"))


def read_rows(path, n=None):
    """The first n rows of a JSON-lines file (all of them when n is None)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for i, line in enumerate(f) if n is None or i < n]


def write_jsonl(path, rows):
    """rows: dicts, or strings written as they are (a blank line, broken JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path
