"""Files of a checkpoint: safetensors and JSON writers and readers, fsync, and the rename that publishes it."""
import errno
import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

TEMP_PREFIX = ".tmp-checkpoint-"  # not a checkpoint-{step} name: never listed, never "latest"
TIED_METADATA_KEY = "prefuse.tied"  # safetensors metadata: {alias: name kept} for weights that share storage


def write_json(tree, file: Path):
    file.write_text(json.dumps(tree, indent=1) + "\n")


def write_safetensors(tensors: dict, file: Path, tied: dict | None = None):
    metadata = {"format": "pt"}
    if tied:
        metadata[TIED_METADATA_KEY] = json.dumps(tied)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(file), metadata=metadata)


def read_safetensors(file: Path) -> tuple[dict, dict]:
    """(tensors on the CPU, {alias: name kept} of the tied weights left out). A file cut short (a copy or a disk
    that ran out) or corrupt is a ValueError naming it, not the reader's traceback."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(file)), json.loads(metadata.get(TIED_METADATA_KEY, "{}"))
    except SafetensorError as error:
        raise ValueError(f"checkpoint {file.parent}: {file.name} is truncated or corrupt ({error}); copy the "
                         f"checkpoint again, or use an earlier checkpoint-<step>") from None


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(final_dir: Path, kept: list[Path]) -> OSError:
    """The one-line error of a checkpoint the disk had no room for (its partial files are already removed)."""
    earlier = f"the earlier checkpoints are intact (latest: {kept[-1].name})" if kept else "there is no earlier one"
    error = OSError(f"checkpoint {final_dir}: no space left on the device while writing it; nothing of it is kept "
                    f"and {earlier}; free space (or give --output_dir on a larger disk) and resume with "
                    f"--resume_from_checkpoint latest")
    error.errno = errno.ENOSPC
    return error


def fsync_tree(directory: Path):
    """Flush every file and directory under `directory` to disk, so the rename cannot land before the data."""
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(root))


def fsync_dir(directory: Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(temp_dir: Path, final_dir: Path):
    """Rename `temp_dir` to `final_dir`. A directory cannot be renamed over a non-empty one, so an older checkpoint
    of the same step is first moved aside: a crash in between leaves no `final_dir`, never a partial one."""
    replaced = None
    if final_dir.exists():
        replaced = final_dir.with_name(f"{TEMP_PREFIX}{final_dir.name}-replaced-{os.getpid()}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final_dir, replaced)
    os.rename(temp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def temp_dir_for(output_dir: Path, step: int) -> Path:
    return output_dir / f"{TEMP_PREFIX}{step}-{os.getpid()}"


def remove_abandoned_temp_dirs(output_dir: Path):
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
    except PermissionError:  # alive, owned by someone else
        return True
    return True
