"""Checkpoints of a training run: model (or LoRA adapter) weights, optimizer, scheduler, RNG and trainer state.

Tensors are stored in safetensors files and everything else in JSON, so loading never unpickles anything.

    output_dir/checkpoint-{step}/
        checkpoint.json            manifest: format, step, kind of weights, the files below (written last)
        model.safetensors          a plain model's state dict; tied aliases dropped, listed in the file's metadata
        adapter_model.safetensors  or, for a peft model, the adapter weights only, with adapter_config.json
                                   (further adapters in {adapter_name}/, as peft lays them out)
        optimizer.json             optimizer.state_dict() with each tensor replaced by {"__tensor__": key}
        optimizer.safetensors      those tensors: "state.{param_index}.exp_avg", ...
        scheduler.json             scheduler.state_dict()
        rng.json, rng.safetensors  python `random`, numpy, torch CPU and CUDA generator states
        trainer_state.json         step, epoch, data position, metrics (tensors in it go to trainer_state.safetensors)

A checkpoint is written into a hidden temporary directory beside its final name, every file and the directory are
fsynced, and only then is it renamed into place: a writer killed at any point leaves either the complete checkpoint
or none under `checkpoint-{step}`. "latest" is the highest complete step, read from the directory names, so there is
no marker file that could disagree with them.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "prefuse-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
TIED_METADATA_KEY = "prefuse.tied"  # safetensors metadata: {alias: name kept} for weights that share storage
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
TEMP_PREFIX = ".tmp-checkpoint-"


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

def save_checkpoint(output_dir, step: int, *, model, optimizer=None, scheduler=None, trainer_state: dict,
                    rng: bool = True, save_total_limit: int | None = None) -> Path:
    """Write `output_dir/checkpoint-{step}/` atomically and return its path.

    For a peft model only the adapter weights are saved (the base model is rebuilt from its own weights). An
    existing checkpoint of the same step is replaced. With `save_total_limit`, only that many checkpoints (the
    highest steps, this one included) are kept.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temp_dirs(output_dir)

    # Everything but the weights is encoded before the first byte is written: a state that cannot be stored
    # fails here, with nothing on disk.
    components = {"trainer_state": _encode(dict(trainer_state), "trainer_state")}
    if optimizer is not None:
        components["optimizer"] = _encode(optimizer.state_dict(), "optimizer")
    if scheduler is not None:
        components["scheduler"] = _encode(scheduler.state_dict(), "scheduler")
    if rng:
        components["rng"] = _encode(_capture_rng_state(), "rng")

    final_dir = output_dir / f"checkpoint-{step}"
    temp_dir = output_dir / f"{TEMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    temp_dir.mkdir()
    try:
        weights_kind, files = _save_weights(model, temp_dir)
        for name, (tree, tensors) in components.items():
            _write_json(tree, temp_dir / f"{name}.json")
            files.append(f"{name}.json")
            if tensors:
                _write_safetensors(tensors, temp_dir / f"{name}.safetensors")
                files.append(f"{name}.safetensors")
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "weights": weights_kind,
                    "components": sorted(components), "files": sorted(files)}
        _write_json(manifest, temp_dir / MANIFEST)
        _fsync_tree(temp_dir)
        _move_into_place(temp_dir, final_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    if save_total_limit is not None:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            if old != final_dir:
                shutil.rmtree(old)
    return final_dir


def load_checkpoint(path, *, model, optimizer=None, scheduler=None, restore_rng: bool = True,
                    output_dir=None) -> dict:
    """Load a checkpoint in place into `model` (and `optimizer`, `scheduler`, the RNGs) and return its trainer state.

    `path` is a checkpoint directory, or "latest" (or a checkpoint name) resolved against `output_dir`. Every file is
    read and checked against the model and optimizer before anything is changed; a missing or incomplete checkpoint
    raises ValueError naming the path and what is missing.
    """
    path = resolve_checkpoint(output_dir, path)
    manifest = _read_manifest(path)
    wanted = {"trainer_state": True, "optimizer": optimizer is not None, "scheduler": scheduler is not None,
              "rng": restore_rng}
    missing = [name for name, needed in wanted.items() if needed and name not in manifest["components"]]
    if missing:
        raise ValueError(f"checkpoint {path} has no {', '.join(missing)} state (it was saved without it)")

    apply_weights = _read_weights(path, manifest, model)
    states = {name: _read_component(path, name) for name, needed in wanted.items() if needed}
    if optimizer is not None:
        _check_optimizer_shape(path, optimizer, states["optimizer"])

    apply_weights()
    if optimizer is not None:
        optimizer.load_state_dict(states["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(states["scheduler"])
    if restore_rng:
        _restore_rng_state(states["rng"])
    return states["trainer_state"]


def resolve_checkpoint(output_dir, checkpoint) -> Path:
    """The directory of `checkpoint`: "latest" is the highest-step complete checkpoint in `output_dir`; a relative
    path that does not exist as given is looked up in `output_dir`."""
    if checkpoint == "latest":
        if output_dir is None:
            raise ValueError('checkpoint "latest" needs an output_dir to look in')
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(f"no checkpoint-<step> directory in {output_dir}")
        return checkpoints[-1]
    path = Path(checkpoint)
    if not path.is_absolute() and not path.exists() and output_dir is not None:
        path = Path(output_dir) / path
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist or is not a directory")
    return path


def list_checkpoints(output_dir) -> list[Path]:
    """The `checkpoint-{step}` directories in `output_dir`, lowest step first. Temporary directories of unfinished
    writes have other names and are never listed."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


# ---------------------------------------------------------------------------------------------------------------
# Model weights
# ---------------------------------------------------------------------------------------------------------------

def _peft_model_class():
    # peft imports transformers (seconds); a model can only be a PeftModel if peft was imported already.
    peft = sys.modules.get("peft")
    return getattr(peft, "PeftModel", None)


def _is_peft_model(model) -> bool:
    peft_model_class = _peft_model_class()
    return peft_model_class is not None and isinstance(model, peft_model_class)


def _adapter_subdir(adapter_name: str) -> str:
    return "" if adapter_name == "default" else adapter_name  # peft's own layout for several adapters


def _save_weights(model, directory: Path) -> tuple[str, list[str]]:
    if _is_peft_model(model):
        from peft.utils import get_peft_model_state_dict

        files = []
        for adapter_name, config in model.peft_config.items():
            adapter_dir = directory / _adapter_subdir(adapter_name)
            adapter_dir.mkdir(exist_ok=True)
            weights = get_peft_model_state_dict(model, adapter_name=adapter_name)
            weights, tied = _drop_shared_aliases(weights)
            _write_safetensors(weights, adapter_dir / ADAPTER_FILE, tied)
            config.save_pretrained(str(adapter_dir))
            prefix = f"{_adapter_subdir(adapter_name)}/" if _adapter_subdir(adapter_name) else ""
            files += [f"{prefix}{ADAPTER_FILE}", f"{prefix}adapter_config.json"]
        return "peft_adapter", files
    weights, tied = _drop_shared_aliases(model.state_dict())
    _write_safetensors(weights, directory / MODEL_FILE, tied)
    return "full", [MODEL_FILE]


def _drop_shared_aliases(state: dict) -> tuple[dict, dict]:
    """safetensors refuses tensors that share storage. A name that is the very same view as an earlier one (tied
    embeddings) is dropped and returned as {alias: name kept}, so loading can check that the model still ties them;
    other views into a shared storage are stored as copies."""
    kept, tied, first_view, storages = {}, {}, {}, set()
    for name, tensor in state.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and view in first_view:
            tied[name] = first_view[view]
        elif tensor.numel() and storage in storages:
            kept[name] = tensor.clone()
        else:
            first_view[view] = name
            storages.add(storage)
            kept[name] = tensor
    return kept, tied


def _read_weights(path: Path, manifest: dict, model):
    """Read and check the weights against `model`; return a function that copies them in."""
    if manifest["weights"] == "peft_adapter":
        if not _is_peft_model(model):
            raise ValueError(f"checkpoint {path} holds LoRA adapter weights only; the model is not a peft model")
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        adapters = {}
        for adapter_name in model.peft_config:
            file = path / _adapter_subdir(adapter_name) / ADAPTER_FILE
            if not file.is_file():
                raise ValueError(f"checkpoint {path} is missing {file.relative_to(path)} (adapter {adapter_name!r})")
            weights, tied = _read_safetensors(file)
            expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
            _check_names(path, file.name, set(weights), set(expected), tied)
            adapters[adapter_name] = weights

        def apply():
            for adapter_name, weights in adapters.items():
                set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        return apply

    if _is_peft_model(model):
        raise ValueError(f"checkpoint {path} holds a full model's weights, not a peft adapter")
    weights, tied = _read_safetensors(path / MODEL_FILE)
    model_state = model.state_dict()
    _check_names(path, MODEL_FILE, set(weights), set(model_state), tied)
    for alias, kept in tied.items():
        if model_state[alias].data_ptr() != model_state[kept].data_ptr():
            raise ValueError(f"checkpoint {path} stores {alias} tied to {kept}, but the model does not tie them")
    return lambda: model.load_state_dict(weights, strict=False)


def _check_names(path: Path, file_name: str, stored: set, expected: set, tied: dict):
    missing = sorted(expected - stored - set(tied))
    unexpected = sorted(stored - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: {file_name} does not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")


# ---------------------------------------------------------------------------------------------------------------
# States as JSON trees plus tensors
# ---------------------------------------------------------------------------------------------------------------

def _encode(state: dict, name: str) -> tuple[dict, dict]:
    """(JSON tree, tensors) of a state dict: each tensor becomes {"__tensor__": its dotted path}, e.g.
    "state.3.exp_avg" in an optimizer's state; tuples, arrays and int-keyed dicts are tagged so that they come
    back as they were."""
    if not isinstance(state, dict):
        raise TypeError(f"{name}: a state must be a dict, got {type(state).__name__}")
    tensors = {}

    def walk(item, key):
        if isinstance(item, torch.Tensor):
            tensors[key] = item.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(item, np.ndarray):
            return {"__ndarray__": item.tolist(), "dtype": str(item.dtype)}
        if isinstance(item, (np.integer, np.floating)):
            return item.item()
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        if isinstance(item, tuple):
            return {"__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(item)]}
        if isinstance(item, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(item)]
        if isinstance(item, dict):
            if all(isinstance(k, str) for k in item):
                reserved = [k for k in item if k.startswith("__") and k.endswith("__")]
                if reserved:
                    raise TypeError(f"{name}.{key}: key {reserved[0]!r} is reserved by the checkpoint format")
                return {k: walk(v, f"{key}.{k}") for k, v in item.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in item):
                return {"__int_keys__": {str(k): walk(v, f"{key}.{k}") for k, v in item.items()}}
        raise TypeError(f"{name}.{key}: cannot store a {type(item).__name__} in a checkpoint "
                        "(JSON values, numpy arrays and tensors only)")

    return {k: walk(v, k) for k, v in state.items()}, tensors


def _decode(tree, tensors: dict, source: str):
    def walk(item):
        if isinstance(item, list):
            return [walk(v) for v in item]
        if not isinstance(item, dict):
            return item
        if "__tensor__" in item:
            key = item["__tensor__"]
            if key not in tensors:
                raise ValueError(f"{source}: tensor {key!r} is missing")
            return tensors[key]
        if "__ndarray__" in item:
            return np.asarray(item["__ndarray__"], dtype=item["dtype"])
        if "__tuple__" in item:
            return tuple(walk(v) for v in item["__tuple__"])
        if "__int_keys__" in item:
            return {int(k): walk(v) for k, v in item["__int_keys__"].items()}
        return {k: walk(v) for k, v in item.items()}

    return walk(tree)


def _read_component(path: Path, name: str) -> dict:
    json_file, tensor_file = path / f"{name}.json", path / f"{name}.safetensors"
    if not json_file.is_file():
        raise ValueError(f"checkpoint {path} is missing {json_file.name}")
    tree = json.loads(json_file.read_text())
    tensors = _read_safetensors(tensor_file)[0] if tensor_file.is_file() else {}
    return _decode(tree, tensors, f"checkpoint {path}: {name}")


def _check_optimizer_shape(path: Path, optimizer, state: dict):
    stored = [len(group["params"]) for group in state["param_groups"]]
    current = [len(group["params"]) for group in optimizer.param_groups]
    if stored != current:
        raise ValueError(f"checkpoint {path}: optimizer has parameter groups of sizes {stored}, the optimizer being "
                         f"loaded {current}")


# ---------------------------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------------------------

def _capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Each device's generator as it was; devices beyond those saved keep their current state.
        for device, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

def _write_json(tree, file: Path):
    file.write_text(json.dumps(tree, indent=1, allow_nan=True) + "\n")


def _write_safetensors(tensors: dict, file: Path, tied: dict | None = None):
    metadata = {"format": "pt"}
    if tied:
        metadata[TIED_METADATA_KEY] = json.dumps(tied)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(file), metadata=metadata)


def _read_safetensors(file: Path) -> tuple[dict, dict]:
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(file)), json.loads(metadata.get(TIED_METADATA_KEY, "{}"))


def _read_manifest(path: Path) -> dict:
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ValueError(f"checkpoint {path} is incomplete or not a prefuse checkpoint: {MANIFEST} is missing")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path}: unknown format {manifest.get('format')!r} "
                         f"version {manifest.get('version')!r}")
    missing = [name for name in manifest["files"] if not (path / name).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return manifest


def _fsync_tree(directory: Path):
    """Flush every file and directory under `directory` to disk, so the rename cannot land before the data."""
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(directory: Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(temp_dir: Path, final_dir: Path):
    """Rename `temp_dir` to `final_dir`. A directory cannot be renamed over a non-empty one, so an older checkpoint
    of the same step is first moved aside: a crash in between leaves no `final_dir`, never a partial one."""
    replaced = None
    if final_dir.exists():
        replaced = final_dir.with_name(f"{TEMP_PREFIX}{final_dir.name}-replaced-{os.getpid()}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final_dir, replaced)
    os.rename(temp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def _remove_abandoned_temp_dirs(output_dir: Path):
    """Delete the temporary directories of writers that died (killed mid-write); those of live ones stay."""
    for entry in output_dir.glob(f"{TEMP_PREFIX}*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
