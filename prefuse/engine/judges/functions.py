"""Python reward functions with TRL's signature, summed with weights.

    judge = RewardFunctions.from_specs(["rewards.py:accuracy", "rewards.py:length"], weights=[1.0, 0.1])
    judge.score(prompts, completions, answer=answers)      # [N] weighted sum
    judge.per_function(prompts, completions, answer=...)   # {"accuracy": [N], "length": [N]} for logging

The call convention is TRL's (GRPOTrainer / OnlineDPOTrainer, trl 1.16), so reward functions written for TRL run
unchanged:

    fn(prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=trainer_state,
       **columns) -> list[float | None]

- conversational prompts (message lists) get their completions as messages too:
  `[{"role": "assistant", "content": text}]`, as TRL decodes them; string prompts get strings.
- `completion_ids` and `trainer_state` are None unless the caller passes them as columns.
- None is "no reward for this completion" (TRL): it becomes NaN in `per_function`, the weighted sum skips it
  (`nansum`), and a completion that every function left unscored is NaN in `score` (GRPOTrainer's rule: it is not
  silently 0). A NaN or infinite number that a function returns itself is an error.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import math
import numbers
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from prefuse.engine.judges.base import JudgeError, as_scores, bradley_terry, check_rows, doubled, is_conversation


def _callable_name(fn: Callable) -> str:
    """TRL's `get_callable_name`: partials unwrapped, instances by their class name."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


@functools.lru_cache(maxsize=None)
def _import_file(path: Path):
    """The module at `path`, imported once per file (a unique module name, registered in sys.modules so that
    dataclasses and pickling inside it work)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"prefuse_reward_funcs_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_reward_function(spec: str) -> Callable:
    """`path/file.py:name` -> the function; JudgeError (`reward_funcs: ...`) naming what is wrong and the fix."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file.endswith(".py") or not name.isidentifier():
        raise JudgeError(f"reward_funcs: {spec!r} is not file.py:name (write the Python file and the function's name "
                         f"separated by a colon, e.g. rewards.py:accuracy)")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise JudgeError(f"reward_funcs: {file} does not exist (give the path of the Python file that defines "
                         f"{name}, relative to {Path.cwd()} or absolute)")
    try:
        module = _import_file(path)
    except Exception as e:
        raise JudgeError(f"reward_funcs: importing {file} raised {type(e).__name__}: {_one_line(e)} "
                         f"(fix the file; it is imported once as a module)") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items()
                         if inspect.isfunction(v) and v.__module__ == module.__name__ and not k.startswith("_"))
        what = "has no function" if fn is None else f"has a {type(fn).__name__}, not a function, named"
        raise JudgeError(f"reward_funcs: {file} {what} {name!r} (functions defined there: "
                         f"{', '.join(defined) or 'none'})")
    return fn


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class RewardFunctions:
    """Reward functions [F] with weights [F] (default 1 each): score = the weighted sum of their rewards; compare =
    Bradley-Terry, sigmoid(score(first) - score(second))."""

    def __init__(self, functions: Sequence[Callable], weights: Sequence[float] | None = None,
                 labels: Sequence[str] | None = None):
        self.functions = list(functions)
        if not self.functions or not all(callable(f) for f in self.functions):
            raise JudgeError("reward_funcs: give at least one reward function, each a callable "
                             "fn(prompts, completions, **columns) -> list[float]")
        # labels name a function in errors (its spec when it came from one); names key the per-function scores
        self.labels = list(labels) if labels is not None else [_callable_name(f) for f in self.functions]
        self.names = _unique([_callable_name(f) for f in self.functions])
        if weights is None:
            weights = [1.0] * len(self.functions)
        weights = list(weights)
        if len(weights) != len(self.functions):
            raise JudgeError(f"reward_funcs: {len(weights)} reward_weights for {len(self.functions)} reward functions "
                             f"(give one weight per function, in the order of reward_funcs)")
        if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
            raise JudgeError(f"reward_funcs: reward_weights {weights} must be finite numbers")
        self.weights = torch.tensor(weights, dtype=torch.float32)

    @classmethod
    def from_specs(cls, specs: Sequence[str | Callable], weights: Sequence[float] | None = None) -> "RewardFunctions":
        """Specs `path/file.py:name` (or callables) -> RewardFunctions; each file is imported once."""
        if isinstance(specs, str):
            specs = [specs]
        functions = [s if callable(s) else load_reward_function(s) for s in specs]
        labels = [_callable_name(s) if callable(s) else s for s in specs]
        return cls(functions, weights, labels)

    def per_function(self, prompts: list, completions: list[str], **columns) -> dict[str, torch.Tensor]:
        """{function name: [N] float32 rewards}, NaN where a function returned None."""
        check_rows(prompts, completions, columns)
        if any(is_conversation(p) for p in prompts):  # TRL decodes conversational completions into messages
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        kwargs = {"completion_ids": None, "trainer_state": None, **columns}
        out = {}
        for fn, label, name in zip(self.functions, self.labels, self.names):
            try:
                rewards = fn(prompts=prompts, completions=completions, **kwargs)
            except Exception as e:
                raise JudgeError(f"reward_funcs: {label} raised {type(e).__name__}: {_one_line(e)} (fix the function; "
                                 f"it is called as fn(prompts=..., completions=..., completion_ids=..., "
                                 f"trainer_state=..., **columns))") from e
            out[name] = as_scores(rewards, len(prompts), f"reward_funcs: {label}", abstain=True)
        return out

    def weighted_sum(self, per_function: dict[str, torch.Tensor]) -> torch.Tensor:
        """The score [N] from `per_function`'s output (a caller that logs both calls the functions once)."""
        rewards = torch.stack([per_function[n] for n in self.names], dim=1)  # [N, F]
        total = (rewards * self.weights.unsqueeze(0)).nansum(dim=1)
        total[rewards.isnan().all(dim=1)] = math.nan  # every function abstained: unscored, not 0
        return total

    def score(self, prompts: list, completions: list[str], **columns) -> torch.Tensor:
        return self.weighted_sum(self.per_function(prompts, completions, **columns))

    def compare(self, prompts: list, first: list[str], second: list[str], **columns) -> torch.Tensor:
        """sigmoid(score(first) - score(second)), the functions called once over first + second (2N rows), as
        OnlineDPOTrainer does."""
        check_rows(prompts, first, columns)
        check_rows(prompts, second, {})
        if "completion_ids" in columns:
            raise JudgeError("judge: compare takes no completion_ids column (its rows hold two completions each); "
                             "call score on first and second")
        scores = self.score(list(prompts) * 2, list(first) + list(second), **doubled(columns))
        return bradley_terry(scores[: len(prompts)], scores[len(prompts):])


def _unique(names: list[str]) -> list[str]:
    """Names made unique by a suffix (`length`, `length_2`), so per-function scores never overwrite each other."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
