"""Checkpoints of a training run: model (or LoRA adapter) weights, optimizer, scheduler, RNG and trainer state.

Tensors are stored in safetensors files and everything else in JSON, so loading never unpickles anything.

    output_dir/checkpoint-{step}/
        checkpoint.json            manifest: format, step, kind of weights, states, files (written last)
        model.safetensors          a plain model's state dict; tied aliases dropped, listed in the file's metadata
        adapter_model.safetensors  or, for a peft model, the adapter weights only, with adapter_config.json
                                   (further adapters in {adapter_name}/, as peft lays them out)
        optimizer.json             optimizer.state_dict() with each tensor replaced by {"__tensor__": key}
        optimizer.safetensors      those tensors: "state.{param_index}.exp_avg", ...
        scheduler.json             scheduler.state_dict()
        rng.json, rng.safetensors  python `random`, numpy, torch CPU and CUDA generator states
        trainer_state.json         step, epoch, data position, metrics (its tensors, such as a data generator's
                                   state, go to trainer_state.safetensors)
        dcp/                       or, for an FSDP2 run, every rank's shards of the trainable weights and their
                                   optimizer states instead of the weight and optimizer files (distributed.py)

A checkpoint is written into a hidden temporary directory beside its final name, every file and the directory are
fsynced, and only then is it renamed into place: a writer killed at any point leaves either the complete checkpoint
or none under `checkpoint-{step}`. "latest" is the highest step among those names, so there is no marker file that
could disagree with them.
"""
import json
import re
import shutil
from pathlib import Path

from . import files
from .rng import capture_rng_state, restore_rng_state
from .state_codec import decode, encode
from .weights import read_weights, save_weights
from .sharded import DCP_WEIGHTS, is_sharded, read_distributed_weights

__all__ = ["save_checkpoint", "load_checkpoint", "load_weights", "resolve_checkpoint", "list_checkpoints",
           "read_run_config"]

FORMAT = "prefuse-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
RUN_CONFIG = "run_config.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def save_checkpoint(output_dir, step: int, *, model, optimizer=None, scheduler=None, trainer_state: dict,
                    rng: bool = True, save_total_limit: int | None = None, write_weights=None,
                    run_config: dict | None = None) -> Path:
    """Write `output_dir/checkpoint-{step}/` atomically and return its path.

    For a peft model only the adapter weights are saved (the base model is rebuilt from its own weights). An
    existing checkpoint of the same step is replaced. With `save_total_limit`, only that many checkpoints (the
    highest steps, this one included) are kept. write_weights(temp_dir) -> (kind, files): how the weights get
    into the checkpoint instead (an FSDP2 run's distributed weights: checkpoint/distributed.py). run_config: what
    the checkpoint records of its run (run_config.json: settings, base model), read by read_run_config.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit!r}")

    # Every state but the weights is encoded before the first byte is written: one that cannot be stored fails
    # here, with nothing on disk.
    states = {"trainer_state": encode(dict(trainer_state), "trainer_state")}
    if optimizer is not None:
        states["optimizer"] = encode(optimizer.state_dict(), "optimizer")
    if scheduler is not None:
        states["scheduler"] = encode(scheduler.state_dict(), "scheduler")
    if rng:
        states["rng"] = encode(capture_rng_state(), "rng")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files.remove_abandoned_temp_dirs(output_dir)
    final_dir = output_dir / f"checkpoint-{step}"
    temp_dir = files.temp_dir_for(output_dir, step)
    shutil.rmtree(temp_dir, ignore_errors=True)
    temp_dir.mkdir()
    try:
        weights_kind, written = (write_weights or (lambda d: save_weights(model, d)))(temp_dir)
        for name, (tree, tensors) in states.items():
            files.write_json(tree, temp_dir / f"{name}.json")
            written.append(f"{name}.json")
            if tensors:
                files.write_safetensors(tensors, temp_dir / f"{name}.safetensors")
                written.append(f"{name}.safetensors")
        if run_config is not None:
            files.write_json(run_config, temp_dir / RUN_CONFIG)
            written.append(RUN_CONFIG)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "weights": weights_kind,
                    "states": sorted(states), "files": sorted(written)}
        files.write_json(manifest, temp_dir / MANIFEST)
        files.fsync_tree(temp_dir)
        files.move_into_place(temp_dir, final_dir)
    except BaseException as error:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if files.is_disk_full(error):
            raise files.disk_full(final_dir, list_checkpoints(output_dir)) from None
        raise
    if save_total_limit is not None:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            if old != final_dir:
                shutil.rmtree(old)
    return final_dir


def load_checkpoint(path, *, model, optimizer=None, scheduler=None, restore_rng: bool = True,
                    output_dir=None) -> dict:
    """Load a checkpoint in place into `model` (and `optimizer`, `scheduler`, the RNGs); return its trainer state.

    `path` is a checkpoint directory, or "latest" (or a checkpoint's name) resolved against `output_dir`. Every file
    is read and checked before anything is changed; a missing or incomplete checkpoint raises ValueError naming the
    path and what is missing.
    """
    path = resolve_checkpoint(output_dir, path)
    manifest = _read_manifest(path)
    in_dcp = manifest["weights"] == DCP_WEIGHTS  # the optimizer's states are in the distributed checkpoint
    wanted = [name for name, needed in [("trainer_state", True), ("optimizer", optimizer is not None and not in_dcp),
                                        ("scheduler", scheduler is not None), ("rng", restore_rng)] if needed]
    absent = [name for name in wanted if name not in manifest["states"]]
    if absent:
        raise ValueError(f"checkpoint {path} has no {', '.join(absent)} state (it was saved without it)")

    copy_weights_in = _weights_reader(path, manifest, model, optimizer)
    states = {name: _read_state(path, name) for name in wanted}
    if optimizer is not None and not in_dcp:
        stored = [len(group["params"]) for group in states["optimizer"]["param_groups"]]
        current = [len(group["params"]) for group in optimizer.param_groups]
        if stored != current:
            raise ValueError(f"checkpoint {path}: its optimizer has parameter groups of sizes {stored}, the "
                             f"optimizer being loaded {current}")

    copy_weights_in()
    if optimizer is not None and not in_dcp:
        optimizer.load_state_dict(states["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(states["scheduler"])
    if restore_rng:
        restore_rng_state(states["rng"])
    return states["trainer_state"]


def load_weights(path, *, model) -> dict:
    """Only the weights of checkpoint `path` into `model` (a run that starts from another run's weights, with a
    fresh optimizer and schedule); return that checkpoint's trainer state."""
    path = resolve_checkpoint(None, path)
    manifest = _read_manifest(path)
    copy_weights_in = _weights_reader(path, manifest, model)
    state = _read_state(path, "trainer_state")
    copy_weights_in()
    return state


def read_run_config(path) -> dict | None:
    """What checkpoint `path` recorded of its run (save_checkpoint's run_config), or None (an older checkpoint)."""
    record = Path(path) / RUN_CONFIG
    return json.loads(record.read_text()) if record.is_file() else None


def _weights_reader(path: Path, manifest: dict, model, optimizer=None):
    """The function that copies the checkpoint's weights in (and, from a distributed checkpoint, the optimizer's
    states), once they are read and checked."""
    if manifest["weights"] == DCP_WEIGHTS:
        return read_distributed_weights(path, model, optimizer)
    if is_sharded(model):
        raise ValueError(f"checkpoint {path} was written by a run without --fsdp; resume it without --fsdp (or "
                         f"start an --fsdp run from its weights: prefuse export, then --model_name_or_path)")
    return read_weights(path, manifest["weights"], model)


def resolve_checkpoint(output_dir, checkpoint) -> Path:
    """The directory of `checkpoint`: "latest" is the highest-step checkpoint in `output_dir`; a relative path that
    does not exist as given is looked up in `output_dir`."""
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
    """The `checkpoint-{step}` directories in `output_dir`, lowest step first. Unfinished writes live under other
    names and are never listed."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


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


def _read_state(path: Path, name: str) -> dict:
    tree = json.loads((path / f"{name}.json").read_text())
    tensor_file = path / f"{name}.safetensors"
    tensors = files.read_safetensors(tensor_file)[0] if tensor_file.is_file() else {}
    return decode(tree, tensors, f"checkpoint {path}: {name}")
