"""An output_dir holds one run: its lock while the run is alive, the refusal to start a different run in a used one,
and the comparison of a resumed run's settings with those its checkpoint recorded.

    lock = claim(out, resuming=..., overwrite=...)   # before models and data: a second run, a used directory
    ... every setting and the data are checked ...
    clear_old_run(out) (--overwrite_output_dir), write train_config.json, resume (changed_settings), train
    lock.release()                                    # also at exit; a lock whose process is gone is taken over

The lock is `output_dir/.prefuse.lock` holding the owner's pid, made with O_EXCL so that two runs starting at once
cannot both take it. A run that fails before training leaves the directory as it found it (the lock goes, and a
directory it made for itself goes when it stayed empty).
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from prefuse.engine.checkpoint import list_checkpoints

LOCK = ".prefuse.lock"
RUN_FILES = ("metrics.jsonl", "train_config.json")  # what a run leaves beside its checkpoints
RUN_DIRS = ("runs",)  # TensorBoard's event files (engine/core/metrics.py)

# settings that do not change what a resumed run computes: where it writes, how often it logs, evaluates and saves,
# the device and how the ranks hold the model (FSDP2 or DDP: a sharded checkpoint resumes in one process), memory
# settings (gradient checkpointing, padding-free packing: the padded batch's values, vLLM's share of the GPU), the
# flags that start or resume it, and when it stops (max_steps / num_train_epochs: the schedule is rebuilt for them,
# build.continue_schedule; --early_stopping: the monitor's rule)
NOT_COMPARED = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "resume_with_changed_settings", "logging_steps",
    "save_steps", "save_total_limit", "eval_steps", "report_to", "device", "max_steps", "num_train_epochs",
    "early_stopping", "per_device_eval_batch_size", "list_objectives", "config", "skip_nonfinite_steps", "fsdp",
    "gradient_checkpointing", "vllm_gpu_memory_utilization", "padding_free", "padding_free_row_tokens",
})
SCHEDULE = ("learning_rate", "lr_scheduler_type", "warmup_steps")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class OutputDirLock:
    """`output_dir/.prefuse.lock` held by this process until release() (or exit)."""

    def __init__(self, out: Path, made_dir: bool):
        self.out, self.path, self.made_dir, self.held = out, out / LOCK, made_dir, True
        atexit.register(self.release)

    def release(self, failed: bool = False) -> None:
        """Let the directory go; after a failed start, a directory this run made and left empty goes too."""
        if not self.held:
            return
        self.held = False
        try:
            if int(self.path.read_text().split()[0]) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, IndexError):
            pass
        if failed and self.made_dir:
            try:
                self.out.rmdir()  # only when empty
            except OSError:
                pass


def _take(path: Path) -> bool:
    """Make the lock file with this pid; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    return True


def _owner(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def used(out: Path, files=("metrics.jsonl",)) -> list[str]:
    """What an earlier run that trained left in `out`: its checkpoints and `files` (its log), by name. A run that
    was only built (train_config.json alone) did not use it."""
    found = [p.name for p in list_checkpoints(out)]
    found += [name for name in files if (out / name).is_file()]
    return found


def claim(output_dir, *, resuming: bool, overwrite: bool, main: bool = True) -> OutputDirLock | None:
    """Lock `output_dir` for this run (rank 0 only: `main`), refusing in one line a directory another live run
    holds, or one an earlier run used when this run neither resumes nor overwrites. Nothing else is written."""
    out = Path(output_dir)
    if not main:
        return None
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir: {out} is a file; give a directory")
    made_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while not _take(path):
        pid = _owner(path)
        if pid == os.getpid():  # this process's own earlier run (COFS-DPO's domains, a test): its lock is ours
            break
        if pid is not None and _alive(pid):
            raise ValueError(f"output_dir: {out} is in use by another run (pid {pid}, {path}); wait for it to end "
                             f"or give another --output_dir")
        print(f"output_dir: {out}: took over the stale lock of pid {pid} (that process is gone)", flush=True)
        path.unlink(missing_ok=True)
    lock = _HELD[out.resolve()] = OutputDirLock(out, made_dir)
    old = used(out)
    if old and not resuming and not overwrite:
        lock.release(failed=True)
        raise ValueError(f"output_dir: {out} holds another run ({', '.join(old[:4])}{', ...' if len(old) > 4 else ''})"
                         f"; give --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace "
                         f"it, or another --output_dir")
    return lock


_HELD: dict[Path, OutputDirLock] = {}  # output_dir -> this process's lock of it


def release(output_dir, failed: bool = False) -> None:
    """This process's lock of `output_dir` goes (when it holds one); `failed`: the run did not start, and a
    directory it made and left empty goes too."""
    lock = _HELD.pop(Path(output_dir).resolve(), None)
    if lock is not None:
        lock.release(failed=failed)


def clear_old_run(out: Path) -> list[str]:
    """--overwrite_output_dir: the earlier run's checkpoints, metrics.jsonl, train_config.json and TensorBoard
    events go (a cached reference of the same data stays: its name is a digest of what it holds)."""
    gone = used(out, RUN_FILES)
    for checkpoint in list_checkpoints(out):
        shutil.rmtree(checkpoint)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    return gone


# -- what a checkpoint records of its run, and resume's comparison -------------------------------------------------

def base_identity(model_dir) -> dict:
    """The base model's identity: its resolved path and a digest of its config.json (a LoRA adapter is only
    meaningful on the base it was trained on)."""
    path = Path(str(model_dir))
    config = path / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None
    return {"path": str(path.resolve()), "config_sha256": digest}


def settings_of(cfg) -> dict:
    """A config dataclass's settings as JSON-ready values (TrainConfig, RewardModelConfig)."""
    return _jsonable(cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg))


def run_record(config: dict, world_size: int = 1) -> dict:
    """What a checkpoint keeps of the run that wrote it (run_config.json): its settings, its number of ranks and
    its base's identity."""
    record = {"settings": config, "world_size": world_size}
    if config.get("model_name_or_path"):
        record["base_model"] = base_identity(config["model_name_or_path"])
    return record


def changed_settings(recorded: dict, config: dict, world_size: int = 1) -> list[tuple[str, object, object]]:
    """(setting, checkpoint's value, this run's value) of each setting that changes the run; settings a checkpoint
    of an older prefuse did not record are not compared. The batch is compared over all ranks (a run of 2 ranks
    resumes in one process with twice the per-device batch)."""
    old = dict(recorded.get("settings", {}))
    config = dict(config)
    batch, ranks = "per_device_train_batch_size", recorded.get("world_size", 1)
    if batch in old and batch in config and ranks != world_size:  # compared as the global batch
        old[f"{batch} x ranks"], config[f"{batch} x ranks"] = old.pop(batch) * ranks, config.pop(batch) * world_size
    changes = [(key, old[key], value) for key, value in config.items()
               if key not in NOT_COMPARED and key in old and _jsonable(old[key]) != _jsonable(value)]
    if recorded.get("base_model") and config.get("model_name_or_path"):
        now = base_identity(config["model_name_or_path"])
        if now != recorded["base_model"] and not any(key == "model_name_or_path" for key, _, _ in changes):
            changes.append(("base model", recorded["base_model"], now))
    return changes


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def describe(changes) -> str:
    return "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


__all__ = [
    "LOCK",
    "NOT_COMPARED",
    "SCHEDULE",
    "OutputDirLock",
    "base_identity",
    "changed_settings",
    "claim",
    "clear_old_run",
    "describe",
    "release",
    "run_record",
    "settings_of",
    "used",
]
