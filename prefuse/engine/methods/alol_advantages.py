"""A-LoL's rewards and advantages for an offline `prefuse train` run, settled once before the first step.

    train, eval, advantages = prepare_advantages(cfg, models, tokenizer, train, eval, out, pad_id)
    order = priority_order(cfg, advantages)     # PriorityBatches for --sampling_strategy good_priority, else None

Rewards R(x, y), for objectives that read rewards or advantages (wbc, r_lol, r_gold, alol*): the `reward` column
(completions) or `score_chosen` / `score_rejected` (a pair's two sides, each one completion), or the judge that
--reward_funcs / --reward_model_path / --judge name scoring the data's responses (decoded from the tokens trained
on) in place of any column.

Advantages (--advantages):
    auto        the `advantage` column when the data has one, else R minus the training set's mean R (the default)
    column      the `advantage` column of unpaired data
    mean        R minus the training set's mean R
    value_head  R - V_ref(x), V the attention-pooling head of engine/methods/alol_value_head.py on the frozen reference's
                prompt states, fitted on a split of the training prompts (--value_fraction) that training then
                does not see; its validation MSE per epoch is printed and written to value_head.json
V's targets (--value_targets): `data`, the rewards of the value split's responses, or `reference_samples`, as the
authors: the judge's rewards of --value_samples responses the reference samples for each value prompt
(engine/online/rollout.py, seeded, in chunks of per_device_eval_batch_size prompts: value_head.reference_samples).
A judge's scores and the value head's V(x) are cached in `advantages-<hash>.safetensors` in the output directory
(the hash covers the data's tokens and rewards, the models, the judge, the value head's settings and, with
reference samples, the sampling settings; the file also holds the samples' texts and rewards), so a resumed run
reads them instead of sampling, scoring and fitting again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from prefuse.engine.data import DataError, TokenizedData
from prefuse.engine.data.order import PriorityBatches
from prefuse.engine.judges import make_judge
from prefuse.engine.methods.alol_value_head import (
    PromptEncoder,
    fit_value_head,
    predict_values,
    reference_samples,
    value_range,
)

JUDGE_FLAGS = ("reward_funcs", "reward_model_path", "judge")
REWARD_COLUMNS = ("reward", "score_chosen", "score_rejected")
NO_REWARD_HINT = ("or score the responses with a judge: --reward_funcs file.py:name or --reward_model_path DIR")
NO_SAMPLE_JUDGE = ("value_targets: reference_samples needs a judge to score the reference's samples: add "
                   "--reward_funcs file.py:name or --reward_model_path DIR (or use --value_targets data)")


def reads_rewards(needs) -> bool:
    """The objective reads rewards or advantages (A-LoL's family)."""
    return bool({"rewards", "advantages"} & set(needs.inputs))


def judges_of(cfg) -> list[str]:
    return [name for name in JUDGE_FLAGS if getattr(cfg, name)]


def required_columns(cfg, needs, kind: str, source: str, hint: str) -> tuple[tuple[str, ...], str]:
    """(the extra columns a data file of `kind` ("pairs" or "completions") must have, the hint of the error when
    one is missing): the objective's own, less the reward columns a judge replaces, plus `advantage` for
    --advantages column."""
    columns = list(needs.columns(kind))
    if judges_of(cfg) or (cfg.advantages == "column" and "rewards" not in needs.inputs):
        columns = [c for c in columns if c not in REWARD_COLUMNS]
    if cfg.advantages == "column":
        if kind == "pairs":
            raise DataError(f"{source}: --advantages column reads the `advantage` column of unpaired data "
                            f"(prompt, completion, label, advantage); this file holds pairs (use --advantages "
                            f"value_head or mean)")
        columns.append("advantage")
    if any(c in REWARD_COLUMNS for c in columns):
        hint = f"{hint}; {NO_REWARD_HINT}"
    return tuple(columns), hint


# -- the value split ----------------------------------------------------------------------------------------------

def value_split(data: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """(training examples, value examples): round(fraction * P) of the P distinct prompts, drawn by the seed, with
    every response of theirs, fit V; training sees the others (so V(x) of a training prompt is out of sample)."""
    groups: dict[tuple, list[int]] = {}
    for index, example in enumerate(data.examples):
        groups.setdefault(tuple(example["prompt_ids"]), []).append(index)
    prompts = list(groups.values())
    n_value = round(fraction * len(prompts))
    if n_value == 0:
        raise ValueError(f"value_fraction: {fraction} of the {len(prompts)} training prompts leaves the value head no "
                         f"validation rows; raise --value_fraction to at least {1 / len(prompts):.3g}")
    if n_value == len(prompts):
        raise ValueError(f"value_fraction: {fraction} of the {len(prompts)} training prompts leaves no training "
                         f"rows; lower --value_fraction (or add prompts)")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    held = sorted(i for group in order[:n_value] for i in prompts[group])
    held_set = set(held)
    kept = [i for i in range(len(data)) if i not in held_set]
    subset = lambda rows: TokenizedData(data.format, [data.examples[i] for i in rows],  # noqa: E731
                                        max_length=data.max_length, max_prompt_length=data.max_prompt_length)
    train = subset(kept)
    train.skipped = data.skipped
    return train, subset(held)


# -- rewards ------------------------------------------------------------------------------------------------------

def judge_rewards(judge, tokenizer, examples: list[dict], batch_size: int = 64) -> torch.Tensor:
    """The judge's score [N] of each example's response after its prompt (both decoded from their tokens); a
    response the judge leaves unscored (NaN) is an error naming its row."""
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = tokenizer.batch_decode([e["prompt_ids"] for e in chunk], skip_special_tokens=True)
        completions = tokenizer.batch_decode([e["completion_ids"] for e in chunk], skip_special_tokens=True)
        scores.append(judge.score(prompts, completions).float().reshape(-1))
    scores = torch.cat(scores)
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        raise ValueError(f"{examples[int(bad[0])]['where']}: the judge left this response unscored ({scores[bad[0]]}"
                         f"); A-LoL needs a finite reward for every response")
    return scores


def rewards_of(examples: list[dict]) -> torch.Tensor:
    missing = [e for e in examples if "reward" not in e]
    if missing:
        raise DataError(f"{missing[0]['where']}: no reward for this response; give a `reward` column (or "
                        f"score_chosen / score_rejected of pairs), {NO_REWARD_HINT}")
    return torch.tensor([float(e["reward"]) for e in examples], dtype=torch.float64)


# -- the cache ----------------------------------------------------------------------------------------------------

def _files_digest(path) -> list:
    """Names, sizes and modification times of a model directory's files (or a file's), so new weights at the same
    path invalidate the cache."""
    if not path:
        return []
    path = Path(str(path).split(":")[0]).expanduser()
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def cache_path(cfg, splits: dict[str, TokenizedData], judged: bool) -> Path:
    digest = hashlib.sha256()
    parts = [cfg.dataset_name, cfg.model_name_or_path, cfg.ref_model_name_or_path, cfg.use_peft, cfg.torch_dtype,
             cfg.bf16, cfg.seed, cfg.advantages, cfg.value_fraction, cfg.value_head_epochs, cfg.value_head_lr,
             cfg.per_device_eval_batch_size, cfg.reward_funcs, cfg.reward_weights, cfg.reward_model_path, cfg.judge,
             _files_digest(cfg.model_name_or_path), _files_digest(cfg.ref_model_name_or_path),
             _files_digest(cfg.reward_model_path), [_files_digest(f) for f in cfg.reward_funcs or []]]
    if cfg.advantages == "value_head" and cfg.value_targets != "data":  # (the default keeps its earlier hashes)
        parts += [cfg.value_targets, cfg.value_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_p]
    digest.update(repr(parts).encode())
    for name, data in splits.items():
        rows = [[e["prompt_ids"], e["completion_ids"], None if judged else e.get("reward")] for e in data.examples]
        digest.update(name.encode() + json.dumps(rows).encode())
    return Path(cfg.output_dir) / f"advantages-{digest.hexdigest()[:16]}.safetensors"


def _load_cache(path: Path, splits: dict[str, TokenizedData]):
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        table = {k: f.get_tensor(k) for k in f.keys()}
        report = json.loads((f.metadata() or {}).get("report", "{}"))
    if any(table.get(f"{name}_rewards", torch.empty(0)).shape[0] != len(data) for name, data in splits.items()):
        return None
    return table, report


def _save_cache(path: Path, table: dict, report: dict, texts: list[str] | None = None) -> None:
    """The tensors, the report and, with reference samples, their texts (metadata `value_sample_texts`)."""
    from safetensors.torch import save_file

    temp = path.with_suffix(".tmp")
    metadata = {"report": json.dumps(report)}
    if texts is not None:
        metadata["value_sample_texts"] = json.dumps(texts)
    save_file({k: v.contiguous() for k, v in table.items()}, str(temp), metadata=metadata)
    os.replace(temp, path)


# -- the whole preparation ----------------------------------------------------------------------------------------

def prepare_advantages(cfg, models, tokenizer, train_data: TokenizedData, eval_data: TokenizedData | None,
                       pad_id: int, log=print):
    """Rewards from the data or the judge, then the advantages --advantages asks for, written into each training
    and held-out example as `advantage` (the batches read it); returns (train_data, eval_data, advantages [N] of
    the training examples, float64, or None when the objective reads neither rewards nor advantages). With the
    value head, train_data loses the value split's examples; with --value_targets reference_samples, V is fitted on
    the judge's rewards of the reference's samples for the value split's prompts."""
    needs = cfg.needs()
    if not reads_rewards(needs):
        return train_data, eval_data, None
    mode, judged = cfg.advantages, bool(judges_of(cfg))
    splits = {"train": train_data}
    if mode == "value_head":
        train_data, splits["value"] = value_split(train_data, cfg.value_fraction, cfg.seed)
        splits["train"] = train_data
    if eval_data is not None:
        splits["eval"] = eval_data
    cached = None
    if judged or mode == "value_head":
        path = cache_path(cfg, splits, judged)
        cached = _load_cache(path, splits)
    if cached is not None:
        table, report = cached
        log(f"advantages: rewards{' and values' if mode == 'value_head' else ''} of "
            f"{sum(len(d) for d in splits.values())} examples read from {path}")
    else:
        table, report, judge, texts = {}, {}, None, None
        if judged:

            judge = make_judge(reward_funcs=cfg.reward_funcs, reward_weights=cfg.reward_weights,
                               reward_model_path=cfg.reward_model_path, judge=cfg.judge,
                               device=str(next(models.policy.parameters()).device))
            for name, data in splits.items():
                table[f"{name}_rewards"] = judge_rewards(judge, tokenizer, data.examples).double()
        elif mode != "column" or "rewards" in needs.inputs:
            for name, data in splits.items():
                table[f"{name}_rewards"] = rewards_of(data.examples)
        if mode == "value_head" and cfg.value_targets == "reference_samples":
            texts = _sample_value_targets(cfg, models, tokenizer, judge, splits["value"], table, pad_id, log)
        if mode == "value_head":
            table.update(_fit_values(cfg, models, splits, table, pad_id, report, log))
        if judged or mode == "value_head":
            _save_cache(path, table, report, texts)
    for name, data in splits.items():  # the rewards the batches read: the data's, or the judge's
        if f"{name}_rewards" in table:
            for example, reward in zip(data.examples, table[f"{name}_rewards"].tolist()):
                example["reward"] = reward
    advantages = _set_advantages(mode, splits, table)
    if report:
        report["positive_fraction"] = float((advantages > 0).double().mean())
        Path(cfg.output_dir, "value_head.json").write_text(json.dumps(report, indent=1))
        log(f"value head: validation MSE {report['initial_mse']:.6g} before training -> {report['best_mse']:.6g} "
            f"(epoch {report['best_epoch']} kept); MSE of V on the training rows {report['train_mse']:.6g}")
    log(f"advantages ({mode}): {len(advantages)} training examples, mean {advantages.mean().item():+.4g}, "
        f"{(advantages > 0).double().mean().item():.0%} positive")
    return train_data, eval_data, advantages


def _distinct_prompts(data: TokenizedData) -> list[list[int]]:
    """The prompts of data's examples, each once, in order of first appearance."""
    return [list(p) for p in dict.fromkeys(tuple(e["prompt_ids"]) for e in data.examples)]


def _sample_value_targets(cfg, models, tokenizer, judge, value: TokenizedData, table, pad_id, log) -> list[str]:
    """The reference's samples for the value split's prompts, judged, into table (`value_sample_rewards` [M],
    `value_sample_prompts` [M]: each sample's prompt among the split's distinct prompts); returns their texts."""

    if judge is None:
        raise ValueError(NO_SAMPLE_JUDGE)
    prompts = _distinct_prompts(value)
    texts, rewards = reference_samples(cfg, models, tokenizer, judge, prompts, pad_id)
    table["value_sample_rewards"] = rewards
    table["value_sample_prompts"] = torch.arange(len(prompts)).repeat_interleave(cfg.value_samples)
    log(f"value head: {len(texts)} samples of the reference ({cfg.value_samples} per value prompt, "
        f"max_new_tokens {cfg.max_new_tokens}, temperature {cfg.temperature}), judged: mean reward "
        f"{rewards.mean().item():.4g}")
    return texts


def _fit_values(cfg, models, splits, table, pad_id, report, log) -> dict[str, torch.Tensor]:
    """V(x) of every example of every split ({<split>_values: [N]}); fills `report` with the fit's MSEs."""

    prompts, owner = [], {}
    keys = {}
    for name, data in splits.items():
        for example in data.examples:
            key = tuple(example["prompt_ids"])
            if key not in owner:
                owner[key] = len(prompts)
                prompts.append(example["prompt_ids"])
        keys[name] = [owner[tuple(e["prompt_ids"])] for e in data.examples]
    if "value_sample_rewards" in table:  # V's targets: the judge's rewards of the reference's samples
        value_prompts = [owner[tuple(p)] for p in _distinct_prompts(splits["value"])]
        value_rewards = table["value_sample_rewards"].tolist()
        rows = [(value_prompts[j], r) for j, r in zip(table["value_sample_prompts"].tolist(), value_rewards)]
    else:  # the data's rewards of the value split's responses
        value_rewards = table["value_rewards"].tolist()
        rows = list(zip(keys["value"], value_rewards))
    low, high = value_range([r for name in splits for r in table[f"{name}_rewards"].tolist()] + value_rewards)
    encoder = PromptEncoder(models, pad_id=pad_id)
    batch_size = cfg.per_device_eval_batch_size
    fit = fit_value_head(encoder, prompts, rows, epochs=cfg.value_head_epochs, lr=cfg.value_head_lr,
                         batch_size=batch_size, seed=cfg.seed, low=low, high=high, log=log)
    needed = sorted({p for name in splits for p in keys[name]})
    values = torch.zeros(len(prompts), dtype=torch.float64)
    values[needed] = predict_values(fit.head, encoder, [prompts[p] for p in needed], batch_size).double()
    out = {f"{name}_values": values[keys[name]] for name in splits}
    train_mse = float(((table["train_rewards"] - out["train_values"]) ** 2).mean())
    report.update(value_targets=cfg.value_targets, value_rows=len(rows), value_prompts=len(set(keys["value"])),
                  range=[low, high], initial_mse=fit.initial_loss, epoch_mse=fit.losses, best_epoch=fit.best_epoch,
                  best_mse=fit.best_loss, train_mse=train_mse)
    return out


def _set_advantages(mode: str, splits: dict[str, TokenizedData], table: dict) -> torch.Tensor:
    """Each example's `advantage` as the mode says (auto leaves the batches their rule); the training set's [N]."""
    train = splits["train"].examples
    if mode == "column":
        return torch.tensor([float(e["advantage"]) for e in train], dtype=torch.float64)
    rewards = table.get("train_rewards")
    if rewards is None:
        rewards = rewards_of(train)
    baseline = rewards.mean().item()
    if mode == "auto":  # what the batches compute: the column where there is one, else R - mean R
        return torch.tensor([float(e["advantage"]) if "advantage" in e else r - baseline
                             for e, r in zip(train, rewards.tolist())], dtype=torch.float64)
    out = None
    for name, data in splits.items():
        if name == "value":
            continue
        values = table[f"{name}_values"] if mode == "value_head" else torch.full((len(data),), baseline,
                                                                                 dtype=torch.float64)
        rewards = table[f"{name}_rewards"] if f"{name}_rewards" in table else rewards_of(data.examples)
        advantages = rewards - values
        if not torch.isfinite(advantages).all():
            raise ValueError(f"advantages: a {name} advantage is not finite")
        for example, advantage in zip(data.examples, advantages.tolist()):
            example["advantage"] = advantage
        out = advantages if name == "train" else out
    return out


# -- sampling -----------------------------------------------------------------------------------------------------

def priority_order(cfg, advantages: torch.Tensor | None) -> PriorityBatches | None:
    """The good_priority order over the training examples (None: the shuffled epochs of PairBatches)."""
    if cfg.sampling_strategy != "good_priority":
        return None
    order = PriorityBatches(advantages, batch_size=cfg.per_device_train_batch_size, seed=cfg.seed)
    print(f"good_priority: {order.positive} of {order.num_examples} training examples have a positive advantage "
          f"({order.positive_fraction:.0%}); an epoch is {len(order)} batches", flush=True)
    return order


def priority_steps(cfg, source, total_steps: int) -> int:
    """max_steps scaled by the fraction of positive advantages under good_priority, as the authors scale it
    (num_train_epochs already counts epochs of the positive subset)."""
    order = getattr(source, "order", None)
    if not isinstance(order, PriorityBatches) or cfg.max_steps <= 0:
        return total_steps
    scaled = max(1, math.floor(cfg.max_steps * order.positive_fraction))
    print(f"good_priority: max_steps {cfg.max_steps} x {order.positive_fraction:.3g} positive -> {scaled}", flush=True)
    return scaled
