"""The over-optimisation monitor (docs/methods/monitor.md): the top-k entropy and top-k mass of the policy's
distribution on held-out prompts, an EMA of them, and the turning-point rule that flags over-optimisation.

    monitor = build_monitor(cfg, models, eval_data, out, pad_id)   # None unless --monitor_steps N > 0
    metrics, stop = monitor.after_step(step, save)                  # after every optimizer step (the loop)

Every `monitor_steps` optimizer steps, on a fixed set of `monitor_samples` held-out prompts (the eval split's, or
`--monitor_prompts FILE`'s, the first ones in file order):
1. one response per prompt sampled from the policy at temperature 1 (top_p 1), with the run's seed, through
   `engine/online/rollout.py`: it samples under a forked RNG, so the training's random streams are not touched, and every
   evaluation draws from the same stream (the responses differ only because the weights did);
2. the policy's decoder on prompt + response, and `linear_token_stats` (the fused head: no [T, V] logits) at the
   positions that produced a response token: top-k mass, top-k entropy (renormalized over the top k), the
   unnormalized variant and the full entropy; the mean over a response's positions, then over the prompts; and
   the top-k mass and entropy of each `--monitor_extra_top_k` k (`monitor/topk_entropy@5`, ...), from the same
   chunks of logits (the paper's study asks for k in {5, 20, 50} besides 10; the rule reads `--monitor_top_k`'s);
3. the same under teacher forcing on the prompts' held-out chosen responses, when the data has them
   (`monitor/chosen/...`);
4. an EMA of each indicator, `ema = decay * ema + (1 - decay) * value` (`--monitor_ema` is the decay; the first
   value starts it), and the turning-point rule on the objective's indicator (`TurningPoint`): the entropy for
   DPO / IPO-style objectives, the top-k mass for the hinge (SLiC), or `--monitor_indicator`; a fall is a drop
   of the EMA by more than `--monitor_min_delta` (default 0: any drop).

k, the renormalization, the tokens and the aggregation are the project's choices (unverified against the paper;
docs/methods/monitor.md). With `--early_stopping` the run stops when the rule fires; with it or
`--monitor_keep_best`, a full checkpoint (the loop's writer, so it also resumes) is saved as `output_dir/best/`
whenever the EMA reaches a new peak, so `best/` is the checkpoint at the turning point. It is written complete under
`.best-staging/` and then renamed into place (`checkpoint.files.move_into_place`): a crash leaves the old `best/` or
the new one, never a partial one (between the two renames of a replacement, the new one waits complete in
`.best-staging/`, and the next run's monitor moves it into place). The monitor's state (EMAs, peak, fall count,
history, whether it stopped the run) is part of the trainer state, so a resumed run goes on with it, and resuming a
run the monitor stopped (under `--early_stopping`) trains nothing: the loop says so in one line and returns.
`monitor.png` plots the history.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from prefuse.algorithms import get_objective
from prefuse.engine.checkpoint import files as checkpoint_files
from prefuse.engine.data import collate_sequences, load_prompts, load_records, tokenize_preferences
from prefuse.engine.data.formats import holds_prompts_only
from prefuse.engine.methods.monitor_settings import INDICATORS, MAX_TOP_K, extra_top_ks  # noqa: F401
from prefuse.engine.models.loading import Models, decoder_hidden_states, eval_mode
from prefuse.engine.online.rollout import RolloutConfig, sample_policy
from prefuse.heads import Head, head_of
from prefuse.kernels.stats import linear_token_stats

# what is logged of each evaluation (monitor/<name>, and monitor/chosen/<name> under teacher forcing)
STATISTICS = ("topk_entropy", "topk_mass", "topk_entropy_unnormalized", "entropy")
MASS_OBJECTIVES = ("hinge",)  # SLiC: the paper reads its top-k mass; every other objective its top-k entropy
BEST = "best"
STAGING = ".best-staging"


def indicator_for(loss_types, objective_args: dict | None = None) -> str:
    """"mass" for the hinge (SLiC, also as CPO's loss_type), "entropy" for every other objective (DPO, IPO, ...)."""

    names = {get_objective(name).name for name in loss_types}
    if names & set(MASS_OBJECTIVES) or (objective_args or {}).get("loss_type") in MASS_OBJECTIVES:
        return "mass"
    return "entropy"


@dataclass
class TurningPoint:
    """The EMA of an indicator and the turning-point rule on it.

    Each `update` folds a value into the EMA. A new running peak (the EMA above every earlier one) resets the fall
    count; every other evaluation counts a fall when the EMA is more than `min_delta` below the previous
    evaluation's, and resets the count when it is not (noise that recovers, or a drift too small to matter). The
    rule fires when `patience` falls in a row follow the peak: `turned` then stays set, and the peak (the turning
    point) no longer moves.
    """

    decay: float
    patience: int
    min_delta: float = 0.0
    ema: float | None = None
    peak: float | None = None
    peak_step: int | None = None
    falls: int = 0
    turned: bool = False
    turn_step: int | None = None

    def update(self, value: float, step: int) -> bool:
        """Fold `value` (the indicator at `step`) in; True when the EMA reached a new peak."""
        previous = self.ema
        self.ema = value if previous is None else self.decay * previous + (1 - self.decay) * value
        if self.turned:
            return False
        if self.peak is None or self.ema > self.peak:
            self.peak, self.peak_step, self.falls = self.ema, step, 0
            return True
        self.falls = self.falls + 1 if previous - self.ema > self.min_delta else 0
        if self.falls >= self.patience:
            self.turned, self.turn_step = True, step
        return False


@dataclass
class HeldOut:
    """The monitor's fixed prompts (token ids) and, where the data has them, their chosen responses (None
    otherwise)."""

    prompts: list[list[int]]
    chosen: list[list[int]] | None


def held_out_prompts(examples: list[dict], limit: int) -> HeldOut:
    """The first `limit` distinct prompts of tokenized examples, with a chosen response each when every one has
    one: `chosen_ids` of pairs, or the first desirable completion of unpaired data."""
    prompts, chosen = {}, {}
    for example in examples:
        key = tuple(example["prompt_ids"])
        response = example.get("chosen_ids")
        if response is None and example.get("label"):
            response = example.get("completion_ids")
        if key not in prompts:
            if len(prompts) == limit:
                continue
            prompts[key] = list(key)
        if response is not None and key not in chosen:
            chosen[key] = list(response)
    keys = list(prompts)
    return HeldOut([prompts[k] for k in keys], [chosen[k] for k in keys] if all(k in chosen for k in keys) else None)


def load_monitor_prompts(path: str, tokenizer, cfg) -> HeldOut:
    """--monitor_prompts: prompt-only files give prompts; paired or unpaired ones their chosen responses too."""

    records = load_records(path)
    if holds_prompts_only(records.column_names):
        data = load_prompts(path, tokenizer, max_prompt_length=cfg.max_prompt_length,
                            skip_bad_rows=cfg.skip_bad_rows)
    else:
        data = tokenize_preferences(records, tokenizer, max_length=cfg.max_length,
                                    max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation,
                                    skip_bad_rows=cfg.skip_bad_rows, source=str(path))
    return held_out_prompts(data.examples, cfg.monitor_samples)


@torch.no_grad()
def indicators(model: torch.nn.Module, head: Head, prompts: list[list[int]], responses: list[list[int]], *,
               top_k: int, pad_id: int, batch_size: int, autocast=None,
               extra_top_k: tuple[int, ...] = ()) -> dict[str, float]:
    """The mean over each response's positions, then over the responses, of the head's statistics (STATISTICS, and
    topk_entropy@k, topk_mass@k for each of `extra_top_k`) at the positions that predict the response's tokens,
    from the decoder's hidden states through the fused head (one pass: the extra k read the same chunks of
    logits). Responses without a predicted token (empty) are left out."""
    device = head.weight.device
    names = [*STATISTICS, *(f"{name}@{k}" for k in extra_top_k for name in ("topk_entropy", "topk_mass"))]
    per_response = {name: [] for name in names}
    for start in range(0, len(prompts), batch_size):
        batch = collate_sequences(prompts[start:start + batch_size], responses[start:start + batch_size], pad_id)
        with eval_mode(model), (autocast() if autocast else contextlib.nullcontext()):
            hidden = decoder_hidden_states(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            hidden = hidden.to(head.weight.dtype)
            low_rank = head.low_rank(hidden)  # a LoRA adapter on the lm_head, its dropout in eval mode
        stats = linear_token_stats(hidden, head.weight, batch["labels"].to(device), bias=head.bias,
                                   softcap=head.softcap, top_k=top_k, extra_top_k=extra_top_k, low_rank=low_rank)
        counts = stats.mask.sum(-1)
        kept = counts > 0
        for name in names:
            value = stats.extra_topk[name] if "@" in name else getattr(stats, name)
            means = value.double().sum(-1)[kept] / counts[kept]
            per_response[name] += means.tolist()
    return {name: sum(values) / len(values) if values else math.nan for name, values in per_response.items()}


class Monitor:
    """Evaluates the indicators every `every` steps, keeps their EMAs and the turning point, writes best/ and
    monitor.png. `after_step(step, save)` is all the loop calls; `save(directory)` writes the run's checkpoint of
    this step into `directory` and returns its path."""

    def __init__(self, models: Models, held_out: HeldOut, out: Path, *, every: int, indicator: str, top_k: int = 10,
                 extra_top_k: tuple[int, ...] = (), decay: float = 0.5, patience: int = 3, min_delta: float = 0.0,
                 early_stopping: bool = False, keep_best: bool = False, max_new_tokens: int = 64, seed: int = 0,
                 pad_id: int = 0, eos_id: int | None = None, batch_size: int = 8, autocast=None):
        self.models, self.held_out, self.out = models, held_out, Path(out)
        self.every, self.indicator, self.top_k, self.extra_top_k = every, indicator, top_k, tuple(extra_top_k)
        self.early_stopping, self.keep_best = early_stopping, keep_best or early_stopping
        self.rollout = RolloutConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, num_generations=1)
        self.seed, self.pad_id, self.eos_id = seed, pad_id, eos_id
        self.batch_size, self.autocast = batch_size, autocast
        self.rule = TurningPoint(decay, patience, min_delta)
        self.emas: dict[str, float] = {}
        self.history: list[dict] = []
        self.finish_interrupted_best()

    # -- state (part of the trainer state of every checkpoint) ---------------------------------------------------
    def state_dict(self) -> dict:
        """stopped_early: the rule has fired under --early_stopping, so the run stopped at this state's step (a
        record for readers of trainer_state.json; a resume decides from the rule and its own flags)."""
        return {"rule": asdict(self.rule), "emas": dict(self.emas), "history": [dict(h) for h in self.history],
                "stopped_early": self.stopped}

    def load_state_dict(self, state: dict | None) -> None:
        """The state of a checkpoint; None (one saved without a monitor) starts afresh."""
        if not state:
            return
        rule = dict(state["rule"])  # the EMA, peak and falls of the checkpoint; the settings of this run
        self.rule = TurningPoint(**{**rule, "decay": self.rule.decay, "patience": self.rule.patience,
                                    "min_delta": self.rule.min_delta})
        self.emas, self.history = dict(state["emas"]), [dict(h) for h in state["history"]]

    @property
    def stopped(self) -> bool:
        """True once the rule has fired under --early_stopping: the run stops (and a resumed one trains nothing)."""
        return self.early_stopping and self.rule.turned

    def stopped_message(self, step: int) -> str:
        """The one line a resumed, already stopped run prints instead of training."""
        manifest = self.out / BEST / "checkpoint.json"
        best = (f"{self.out / BEST} holds step {json.loads(manifest.read_text())['step']}" if manifest.is_file()
                else f"{self.out / BEST} is missing (the peak was step {self.rule.peak_step})")
        return (f"monitor: the run stopped early at step {step} (over-optimisation flagged at step "
                f"{self.rule.turn_step}, the {self.indicator} EMA's peak at step {self.rule.peak_step}); {best}; "
                f"nothing to train (drop --early_stopping to train on)")

    # -- one evaluation ------------------------------------------------------------------------------------------
    def generate(self) -> list[list[int]]:
        """One response per held-out prompt from the policy at T = 1, the same seed every evaluation (rollout.py
        forks the RNG: the training's random state is left as it was)."""
        responses = []
        for number, start in enumerate(range(0, len(self.held_out.prompts), self.batch_size)):
            samples = sample_policy(self.models, self.held_out.prompts[start:start + self.batch_size], self.rollout,
                                    seed=self.seed + number, eos_id=self.eos_id, pad_id=self.pad_id)
            responses += samples.completion_ids
        return responses

    def evaluate(self) -> dict[str, float]:
        """The indicators now: monitor/<statistic> of the policy's samples (with monitor/topk_entropy@k and
        monitor/topk_mass@k of each extra k), monitor/chosen/<statistic> under teacher forcing on the chosen
        responses (when known), monitor/response_length."""
        policy = self.models.policy
        head = head_of(policy)
        options = dict(top_k=self.top_k, extra_top_k=self.extra_top_k, pad_id=self.pad_id,
                       batch_size=self.batch_size, autocast=self.autocast)
        responses = self.generate()
        values = {f"monitor/{k}": v for k, v in indicators(policy, head, self.held_out.prompts, responses,
                                                             **options).items()}
        values["monitor/response_length"] = sum(map(len, responses)) / len(responses)
        if self.held_out.chosen is not None:
            values.update({f"monitor/chosen/{k}": v for k, v in indicators(
                policy, head, self.held_out.prompts, self.held_out.chosen, **options).items()})
        return values

    def after_step(self, step: int, save: Callable[[Path], Path]) -> tuple[dict[str, float], bool]:
        """(metrics to log, stop): the indicators, their EMAs and the rule's state at an evaluation step, else
        nothing; stop is True once the rule has fired under early stopping."""
        if step % self.every != 0 or self.stopped:
            return {}, self.stopped
        values = self.evaluate()
        for name in ("topk_entropy", "topk_mass"):
            value = values[f"monitor/{name}"]
            self.emas[name] = value if name not in self.emas else (self.rule.decay * self.emas[name]
                                                                   + (1 - self.rule.decay) * value)
            values[f"monitor/{name}_ema"] = self.emas[name]
        was_turned = self.rule.turned
        new_peak = self.rule.update(values[f"monitor/{INDICATORS[self.indicator]}"], step)
        values.update({"monitor/turned": float(self.rule.turned), "monitor/falls": float(self.rule.falls),
                       "monitor/peak_step": float(self.rule.peak_step)})
        self.history.append({"step": step, **values})
        if new_peak and self.keep_best:
            self.save_best(save)
        self.plot()
        if self.rule.turned and not was_turned:
            _say(f"monitor: over-optimisation at step {step}: the {self.indicator} EMA fell "
                 f"{self.rule.falls} evaluations in a row after its peak at step {self.rule.peak_step}"
                 + (f"; {self.out / BEST} holds that step" if self.keep_best else "")
                 + ("; stopping" if self.early_stopping else ""))
        return values, self.stopped

    def save_best(self, save: Callable[[Path], Path]) -> Path:
        """The run's checkpoint of this step as out/best/: written complete beside it, then renamed into place."""
        staging = self.out / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        written = save(staging)
        checkpoint_files.move_into_place(written, self.out / BEST)
        shutil.rmtree(staging, ignore_errors=True)
        return self.out / BEST

    def finish_interrupted_best(self) -> None:
        """A run killed between the two renames of save_best left no best/ and the complete new one staged (its
        manifest is written last, so one with a manifest is complete): move it into place."""
        staged = list((self.out / STAGING).glob("checkpoint-*/checkpoint.json"))  # one at most (save_best)
        if not (self.out / BEST).exists() and staged:
            checkpoint_files.move_into_place(staged[0].parent, self.out / BEST)
            shutil.rmtree(self.out / STAGING, ignore_errors=True)

    def plot(self) -> None:
        plot_history(self.history, self.out / "monitor.png", indicator=self.indicator, rule=self.rule)


def plot_history(history: list[dict], path: Path, *, indicator: str, rule: TurningPoint) -> None:
    """monitor.png: top-k entropy and top-k mass against the step (samples, their EMA, teacher-forced chosen), the
    peak and the turn marked on the rule's indicator. Written beside and renamed, so a reader never sees half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (name, key) in zip(axes, INDICATORS.items()):
        ax.plot(steps, [h[f"monitor/{key}"] for h in history], "o-", alpha=0.5, label="samples")
        ax.plot(steps, [h[f"monitor/{key}_ema"] for h in history], "-", lw=2, label="samples, EMA")
        if all(f"monitor/chosen/{key}" in h for h in history):
            ax.plot(steps, [h[f"monitor/chosen/{key}"] for h in history], "--", label="chosen (teacher forced)")
        if name == indicator and rule.peak_step is not None:
            ax.axvline(rule.peak_step, color="green", ls=":", label=f"peak (step {rule.peak_step})")
            if rule.turned:
                ax.axvline(rule.turn_step, color="red", ls=":", label=f"turned (step {rule.turn_step})")
        ax.set(title=f"top-k {name}" + (" (the rule's indicator)" if name == indicator else ""), xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    temp = path.with_name(f".{path.name}.{os.getpid()}.png")
    fig.savefig(temp, dpi=100)
    plt.close(fig)
    os.replace(temp, path)


def build_monitor(cfg, models: Models, eval_data, out: Path, pad_id: int) -> Monitor | None:
    """The monitor --monitor_steps asks for (None for 0), on --monitor_prompts or the held-out examples."""
    if cfg.monitor_steps <= 0:
        return None
    if cfg.monitor_prompts:
        held_out = load_monitor_prompts(cfg.monitor_prompts, models.tokenizer, cfg)
    elif eval_data is not None:
        held_out = held_out_prompts(eval_data.examples, cfg.monitor_samples)
    else:
        raise ValueError("monitor_steps: needs held-out prompts: set --monitor_prompts FILE (online runs have no "
                         "eval split)")
    indicator = cfg.monitor_indicator or indicator_for(cfg.loss_type, cfg.objective_args)
    print(f"monitor: every {cfg.monitor_steps} steps, {len(held_out.prompts)} held-out prompts"
          + (" (with chosen responses)" if held_out.chosen is not None else "")
          + f", top-{cfg.monitor_top_k} {indicator}"
          + (f" (also logged: k = {', '.join(map(str, cfg.monitor_extra_top_k))})" if cfg.monitor_extra_top_k else "")
          + f", EMA decay {cfg.monitor_ema}, patience {cfg.monitor_patience}"
          + (f", min delta {cfg.monitor_min_delta}" if cfg.monitor_min_delta else "")
          + (", early stopping" if cfg.early_stopping else ""), flush=True)
    autocast = None
    if cfg.bf16:  # as the training step: bf16 autocast around the decoder only
        def autocast():
            return torch.autocast(next(models.policy.parameters()).device.type, dtype=torch.bfloat16)
    return Monitor(models, held_out, out, every=cfg.monitor_steps, indicator=indicator, top_k=cfg.monitor_top_k,
                   extra_top_k=tuple(extra_top_ks(cfg.monitor_extra_top_k)), decay=cfg.monitor_ema,
                   patience=cfg.monitor_patience, min_delta=cfg.monitor_min_delta, early_stopping=cfg.early_stopping,
                   keep_best=cfg.monitor_keep_best, max_new_tokens=cfg.monitor_max_new_tokens, seed=cfg.seed,
                   pad_id=pad_id, eos_id=models.tokenizer.eos_token_id, batch_size=cfg.per_device_eval_batch_size,
                   autocast=autocast)


def _say(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)
