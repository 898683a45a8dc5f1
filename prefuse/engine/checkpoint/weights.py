"""Model weights in a checkpoint: a plain model's whole state dict, or a peft model's adapters only."""
import sys
from pathlib import Path

from . import files

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_peft_model(model) -> bool:
    # peft imports transformers (seconds); a model can only be a PeftModel if peft was imported already.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _adapter_subdir(adapter_name: str) -> str:
    return "" if adapter_name == "default" else adapter_name  # peft's own layout for several adapters


def save_weights(model, directory: Path) -> tuple[str, list[str]]:
    """Write the weights into `directory`; return their kind ("full" or "peft_adapter") and the files written.

    A peft model's files are the ones `PeftModel.from_pretrained` reads: adapter_model.safetensors and
    adapter_config.json, the default adapter at the top and any other in a folder of its name.
    """
    if is_peft_model(model):
        from peft.utils import get_peft_model_state_dict

        written = []
        for adapter_name, config in model.peft_config.items():
            subdir = _adapter_subdir(adapter_name)
            (directory / subdir).mkdir(exist_ok=True)
            weights, tied = drop_shared_aliases(get_peft_model_state_dict(model, adapter_name=adapter_name))
            files.write_safetensors(weights, directory / subdir / ADAPTER_FILE, tied)
            config.save_pretrained(str(directory / subdir))
            written += [str(Path(subdir, ADAPTER_FILE)), str(Path(subdir, ADAPTER_CONFIG))]
        return "peft_adapter", written
    weights, tied = drop_shared_aliases(model.state_dict())
    files.write_safetensors(weights, directory / MODEL_FILE, tied)
    return "full", [MODEL_FILE]


def drop_shared_aliases(state: dict) -> tuple[dict, dict]:
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


def read_weights(path: Path, weights_kind: str, model):
    """Read the weights of checkpoint `path` and check them against `model`; return a function that copies them
    in, so that nothing changes until every part of the checkpoint has been read and checked."""
    if weights_kind == "peft_adapter":
        if not is_peft_model(model):
            raise ValueError(f"checkpoint {path} holds LoRA adapter weights only; the model is not a peft model")
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        adapters = {}
        for adapter_name in model.peft_config:
            file = path / _adapter_subdir(adapter_name) / ADAPTER_FILE
            if not file.is_file():
                raise ValueError(f"checkpoint {path} is missing {file.relative_to(path)} (adapter {adapter_name!r})")
            weights, tied = files.read_safetensors(file)
            expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
            _check_names(path, file.name, set(weights), set(expected), tied)
            adapters[adapter_name] = weights

        def copy_adapters_in():
            for adapter_name, weights in adapters.items():
                set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        return copy_adapters_in

    if is_peft_model(model):
        raise ValueError(f"checkpoint {path} holds a full model's weights, not a peft adapter")
    weights, tied = files.read_safetensors(path / MODEL_FILE)
    model_state = model.state_dict()
    _check_names(path, MODEL_FILE, set(weights), set(model_state), tied)
    for alias, kept in tied.items():
        if model_state[alias].data_ptr() != model_state[kept].data_ptr():
            raise ValueError(f"checkpoint {path} stores {alias} tied to {kept}, but the model does not tie them")
    return lambda: model.load_state_dict(weights, strict=False)  # the tied aliases are filled through their twin


def _check_names(path: Path, file_name: str, stored: set, expected: set, tied: dict):
    missing = sorted(expected - stored - set(tied))
    unexpected = sorted(stored - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: {file_name} does not match the model: missing {_few(missing)}, "
                         f"unexpected {_few(unexpected)}")


def _few(names: list) -> str:
    return f"{names[:8]}{' ...' if len(names) > 8 else ''}"
