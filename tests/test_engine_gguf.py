"""engine/models/gguf.py without a model: which paths name a GGUF file, the cache key, and the one-line errors of every
command that takes one (the SmolLM2 conversion itself: tests/test_real_smollm2.py)."""
import os
from pathlib import Path

import pytest

from prefuse.cli import main
from prefuse.engine.models import gguf


def test_a_gguf_file_is_named_by_its_path_or_by_a_directory_and_gguf_file(tmp_path):
    assert gguf.gguf_path(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"
    assert gguf.gguf_path(str(tmp_path), "m.gguf") == tmp_path / "m.gguf"
    assert gguf.gguf_path(str(tmp_path), str(tmp_path / "elsewhere.gguf")) == tmp_path / "elsewhere.gguf"
    assert gguf.gguf_path(str(tmp_path)) is None and gguf.plain_directory(str(tmp_path)) == str(tmp_path)


def test_the_cache_key_follows_the_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 8)
    first = gguf._cache_key(path)
    assert first.startswith("m-") and gguf._cache_key(path) == first
    os.utime(path, ns=(1, 1))  # replaced by another file of the same name: converted again
    assert gguf._cache_key(path) != first


@pytest.mark.parametrize("argv, expected", [
    (["convert", "{d}/missing.gguf", "--output", "{d}/out"], "prefuse convert: error: gguf_file: no such file:"),
    (["convert", "gemma", "--output", "{d}/out"],
     "prefuse convert: error: gguf: 'gemma' is neither a .gguf file nor a bundled model (smollm2)"),
    (["train", "--model_name_or_path", "{d}/missing.gguf", "--dataset_name", "{d}", "--output_dir", "{d}/o"],
     "prefuse train: error: model_name_or_path: no such GGUF file:"),
    (["train", "--model_name_or_path", "{d}", "--gguf_file", "missing.gguf", "--dataset_name", "{d}",
      "--output_dir", "{d}/o"], "prefuse train: error: model_name_or_path: no such GGUF file:"),
    (["generate", "--model", "{d}/missing.gguf", "--prompts", "{d}/p.jsonl", "--output", "{d}/o.jsonl"],
     "prefuse generate: error: model: no such GGUF file:"),
])
def test_a_missing_gguf_file_is_one_line(tmp_path, capsys, argv, expected):
    assert main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "out").exists()
