"""A state dict as a JSON tree plus a flat dict of tensors, so that it can be stored without pickle.

Each tensor becomes {"__tensor__": its dotted path}, e.g. "state.3.exp_avg" in an optimizer's state dict; tuples,
numpy arrays and int-keyed dicts are tagged so that they come back as they were.
"""
import numpy as np
import torch


def encode(state: dict, name: str) -> tuple[dict, dict]:
    """(JSON tree, tensors) of `state`; `name` only labels errors. Raises TypeError for a value JSON cannot hold."""
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


def decode(tree, tensors: dict, source: str):
    """The state `encode` took apart; `source` labels the error for a tensor missing from `tensors`."""
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
