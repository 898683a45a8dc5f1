"""`TrainConfig`: every setting of `prefuse train`, named as TRL / transformers name them.

    cfg = TrainConfig(model_name_or_path="tiny", dataset_name="pairs.jsonl", output_dir="out", loss_type="sigmoid")
    cfg = TrainConfig.from_dict(yaml.safe_load(open("run.yaml")))   # the same keys as the command-line flags
    cfg.validate()                                                  # ValueError: one line naming the field

The settings come in sections, one dataclass per concern, each defined beside the code that reads it and checking
its own fields (`check()`); each field's metadata holds its --help text. TrainConfig inherits them all, so its
fields stay flat (`cfg.max_length`, `--max_length`, a YAML key, a key of train_config.json) and in SECTIONS' order.
TrainConfig's own `check()` holds the rules where a setting of one section constrains another's (CROSS_SECTION),
each a named function below.

Objective hyper-parameters (`simpo_gamma`, `label_smoothing`, `desirable_weight`, ...) go in `objective_args`; the
CLI also takes each as its own flag.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from prefuse.engine.checks import check_field
from prefuse.engine.core.method_defaults import method_defaults
from prefuse.engine.core.objectives import objective_needs
from prefuse.engine.core.settings import ObjectiveSettings, objective_hparam_names
from prefuse.engine.core.typed_settings import number_or_text, settings_file, typed_settings
from prefuse.engine.data.settings import DataSettings, check_held_out
from prefuse.engine.methods.alol_advantages import NO_SAMPLE_JUDGE, judges_of, reads_rewards
from prefuse.engine.methods.alol_settings import ALoLSettings
from prefuse.engine.methods.bdhs import BDHSConfig
from prefuse.engine.methods.bdhs.settings import BDHSSettings
from prefuse.engine.methods.monitor_settings import MonitorSettings
from prefuse.engine.methods.ofs_settings import OFSSettings
from prefuse.engine.methods.srpo_settings import RevisionSettings
from prefuse.engine.models.settings import TORCH_DTYPES, ModelSettings, check_precision_and_lora
from prefuse.engine.online.methods import JUDGELESS, online_method, online_needs
from prefuse.engine.online.settings import OnlineSettings, VLLMSettings
from prefuse.engine.train.settings import (
    SCHEDULERS,
    OptimisationSettings,
    RunSettings,
    check_logging_and_saving,
    check_optimisation,
    check_resume,
)

__all__ = ["CROSS_SECTION", "SCHEDULERS", "SECTIONS", "TORCH_DTYPES", "TrainConfig", "check_held_out_and_resume",
           "check_training_settings", "objective_hparam_names"]

# the sections, in the order of their fields (the flags, --help, train_config.json)
SECTIONS = (ModelSettings, DataSettings, ObjectiveSettings, RevisionSettings, OFSSettings, ALoLSettings,
            OptimisationSettings, OnlineSettings, BDHSSettings, VLLMSettings, RunSettings, MonitorSettings)


@dataclass
class TrainConfig(*reversed(SECTIONS)):  # a dataclass takes its bases' fields from the last base to the first
    """Every setting of `prefuse train`: the fields of SECTIONS, flat, in their order."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "") -> "TrainConfig":
        """From a YAML/JSON mapping with the flags' names, each value typed by its field (typed_settings: the one
        checker of flags and files; `where` names the source in its one-line errors); an objective's
        hyper-parameter at the top level goes into objective_args."""
        hparams = set(objective_hparam_names())
        values = typed_settings(cls, values, where, also=hparams)
        given = values.pop("objective_args", None) or {}
        objective_args = {key: number_or_text(value) for key, value in given.items()}
        for key in [k for k in values if k in hparams and k not in cls.__dataclass_fields__]:
            objective_args[key] = number_or_text(values.pop(key))  # `simpo_gamma: 0.5` at the top level of a YAML
        return cls(**values, objective_args=objective_args)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        """From a YAML file of settings (typed as flags are); a syntax error is one line naming the file and line."""
        return cls.from_dict(settings_file(path), where=f"config {path}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def apply_defaults(self) -> list[str]:
        """Fill the settings left out (None) with the objective's own values (engine/core/method_defaults.py) -> one
        line per setting filled, naming its source."""

        self.check_names()  # loss_type: registered objectives
        filled = []
        for name, (value, source) in method_defaults(self.loss_type).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
                if name == "beta" or self.online and (name == "temperature" or self.iterations > 1):
                    filled.append(f"{name} {value} ({source})")
        return filled

    def validate(self) -> "TrainConfig":
        """Fill the defaults left out (apply_defaults), then raise ValueError with one line naming the first bad
        field: the required ones, each section's own (its check()), then the cross-section rules (check()); return
        self."""
        self.apply_defaults()
        for name in ("model_name_or_path", "dataset_name", "output_dir"):  # before a GGUF file is converted
            check_field(bool(getattr(self, name)), name, "required")
        self.plain_model_paths()
        for section in SECTIONS:
            section.check(self)
        self.check()
        return self

    def check(self) -> None:
        """The cross-section rules (CROSS_SECTION), in order: one-line ValueErrors naming the field."""
        needs = self.needs()  # ValueError "loss_type: ..." for an objective this kind of run cannot feed
        for rule in CROSS_SECTION:
            rule(self, needs)

    def needs(self):
        """What the objective needs from the run (engine.objectives / engine.online); ValueError `loss_type: ...`."""
        if self.online:
            return online_needs(self.loss_type, self.beta)
        return objective_needs(self.loss_type)

    def bdhs_config(self):
        """Online BDHS's settings (--avg_rejected bdhs) as prefuse.engine.methods.bdhs.BDHSConfig, validated; the
        rollout settings (max_new_tokens, temperature, top_p) are the run's."""

        return BDHSConfig(rho_th=self.rho_th, epsilon_s=self.epsilon_s, n_bdhs=self.n_bdhs,
                          max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                          top_p=self.top_p).validate()


# -- the cross-section rules: (cfg, needs) -> None, or ValueError naming the field ---------------------------------

def sampling_needs_online(cfg: TrainConfig, needs) -> None:
    """vLLM and a generated y~- (online section) sample during training: offline runs have neither."""
    if not cfg.online:
        check_field(not cfg.use_vllm, "use_vllm", "vLLM samples online runs: add --online")
        check_field(cfg.avg_rejected == "policy", "avg_rejected", "generates y~- during training: add --online "
                    "(offline, avg_dpo reads the generated_rejected column)")


def online_judges(cfg: TrainConfig, needs) -> None:
    """The objective's online method (objective section) takes one judge (online section), or none."""
    if not cfg.online:
        return
    judges = judges_of(cfg)
    method = online_method(cfg.loss_type)
    if method in JUDGELESS:
        check_field(not judges, judges[0] if judges else "reward_funcs",
                    f"{cfg.loss_type} use no judge ({JUDGELESS[method]}); drop it")
    else:
        check_field(len(judges) == 1, "reward_funcs",
                    f"--online needs one judge: --reward_funcs file.py:name, --reward_model_path DIR or --judge "
                    f"DIR (got {judges or 'none'})")


def online_has_no_held_out_nor_cached_reference(cfg: TrainConfig, needs) -> None:
    """--online (online section) runs no held-out set (data section) and caches no reference (objective section)."""
    if not cfg.online:
        return
    check_field(not (cfg.eval_split or cfg.eval_fraction), "eval_split",
                "held-out evaluation is not run with --online; drop eval_split / eval_fraction")
    check_field(not cfg.precompute_ref_log_probs, "precompute_ref_log_probs",
                "online samples are new every step: their reference log-probs cannot be precomputed")


def online_iterations(cfg: TrainConfig, needs) -> None:
    """Iterations (online section) move a reference the objective reads, sample once only for the judged-pair
    methods, and split max_steps (optimisation section)."""
    if not cfg.online:
        return
    check_field(cfg.iterations == 1 or needs.reference, "iterations",
                f"{cfg.loss_type} read no reference, so there is none to move to the previous iterate")
    check_field(cfg.iteration_sampling == "per_batch" or online_method(cfg.loss_type) in ("judged_pair", "selm"),
                "iteration_sampling", f"once samples a fixed set of judged pairs per iteration (online DPO's "
                f"family, RLHF Workflow, selm); {cfg.loss_type} sample per batch")
    check_field(cfg.iterations == 1 or cfg.max_steps >= cfg.iterations, "iterations",
                "needs max_steps >= iterations (the steps are split evenly between the iterations)")


def avg_rejected_by_bdhs(cfg: TrainConfig, needs) -> None:
    """--avg_rejected (online section) is avg_dpo's (objective section); bdhs needs the BDHS package and its
    settings with the online rollout's (BDHS section)."""
    if not cfg.online:
        return
    check_field(cfg.avg_rejected == "policy" or online_method(cfg.loss_type) == "avg", "avg_rejected",
                "is read by avg_dpo only")
    if cfg.avg_rejected == "bdhs":
        cfg.bdhs_config()  # ValueError "max_new_tokens: ...", "temperature: ..."


def alol_weighting_and_judges(cfg: TrainConfig, needs) -> None:
    """A-LoL's advantages and sampling (A-LoL section) against the judges and rollout settings (online section) and
    the objective: the reference's samples need a judge; online runs weigh no examples; offline, a judge scores the
    data's responses only for objectives that read rewards or advantages, and one judge at most."""
    if cfg.value_targets == "reference_samples":
        if not judges_of(cfg):
            raise ValueError(NO_SAMPLE_JUDGE)
        check_field(cfg.max_new_tokens >= 1, "max_new_tokens", f"must be at least 1, got {cfg.max_new_tokens}")
        check_field(cfg.temperature >= 0, "temperature", f"must be >= 0, got {cfg.temperature}")
        check_field(0 < cfg.top_p <= 1, "top_p", f"must be in (0, 1], got {cfg.top_p}")
    flag = "advantages" if cfg.advantages != "auto" else "sampling_strategy"
    used = cfg.weighs_examples()
    if cfg.online:
        check_field(not used, flag, "A-LoL's advantages and sampling weigh offline examples; drop it with --online")
        return
    judges = judges_of(cfg)
    check_field(not judges or reads_rewards(needs), judges[0] if judges else "judge",
                f"a judge scores the samples of online runs (add --online), or the responses of offline data for "
                f"objectives that read rewards or advantages (wbc, r_lol, r_gold, alol*); {cfg.loss_type} read "
                f"neither")
    check_field(len(judges) <= 1, judges[-1] if judges else "judge",
                f"give one judge of the rewards, got {' and '.join('--' + j for j in judges)}")
    check_field(not used or reads_rewards(needs), flag,
                f"--{flag} {getattr(cfg, flag)} weighs examples by A-LoL's advantages; {cfg.loss_type} read neither "
                f"advantages nor rewards (use wbc, r_lol, r_gold, alol, alol_seq, alol_kl or alol_ref_free)")


def kto_batches_and_cached_reference(cfg: TrainConfig, needs) -> None:
    """KTO's KL completions (objective section) pair examples of one batch (optimisation section), and depend on
    the batch, so their reference log-probs are not cached."""
    check_field(cfg.per_device_train_batch_size >= 2 or "kl" not in needs.roles, "per_device_train_batch_size",
                "kto needs at least 2 examples per batch (its KL term pairs each prompt with another example's "
                "completion)")
    check_field(not (cfg.precompute_ref_log_probs and "kl" in needs.roles), "precompute_ref_log_probs",
                "KTO's KL completions depend on the batch, so their reference log-probs cannot be cached")


def revision_template_for_srpo(cfg: TrainConfig, needs) -> None:
    """A revision template (SRPO section) is read only by objectives with revision rows."""
    check_field(cfg.revision_template is None or needs.revision, "revision_template",
                f"{cfg.loss_type} read no revision rows (srpo does)")


def ofs_two_adapters(cfg: TrainConfig, needs) -> None:
    """ofs_dpo's two adapters (objective section) are LoRA adapters (model section), trained alone."""
    check_field(not needs.slow_adapter or cfg.use_peft, "use_peft",
                f"{cfg.loss_type} train two LoRA adapters (fast and slow) on one base model; add --use_peft")
    check_field(not needs.slow_adapter or len(cfg.loss_type) == 1, "loss_type",
                "ofs_dpo trains its two adapters alone; do not combine it with other objectives")


def padding_free_step(cfg: TrainConfig, needs) -> None:
    """padding_free (data section) packs the step's decoder passes; OFS-DPO's slow adapter runs a pass of its own
    (objective section), and padding_free_row_tokens without max_length (data section) has no bound to check."""
    check_field(not cfg.padding_free or not needs.slow_adapter, "padding_free",
                "ofs_dpo's slow adapter runs a decoder pass of its own, padded; train ofs_dpo without padding_free")
    check_field(cfg.padding_free_row_tokens is None or cfg.max_length is not None, "padding_free_row_tokens",
                "needs max_length (rows must hold the longest sequence)")


def eval_steps_have_held_out(cfg, needs=None) -> None:
    """eval_steps (run section) needs a held-out set (data section); RewardModelConfig's too."""
    check_field(cfg.eval_steps is None or bool(cfg.eval_split or cfg.eval_fraction), "eval_steps",
                "needs a held-out set: set eval_split or eval_fraction")


def monitor_has_held_out_prompts(cfg: TrainConfig, needs) -> None:
    """The monitor (monitor section) reads held-out prompts: its own file, or the held-out set (data section)."""
    check_field(cfg.monitor_steps <= 0 or bool(cfg.monitor_prompts) or bool(cfg.eval_split or cfg.eval_fraction),
                "monitor_steps", "needs held-out prompts: set --monitor_prompts FILE, or --eval_split / "
                "--eval_fraction")


def init_adapters_need_peft(cfg: TrainConfig, needs) -> None:
    """init_adapters (run section) starts LoRA adapters (model section)."""
    check_field(cfg.init_adapters is None or cfg.use_peft, "init_adapters", "starts LoRA adapters: add --use_peft")


CROSS_SECTION = (sampling_needs_online, online_judges, online_has_no_held_out_nor_cached_reference, online_iterations,
                 avg_rejected_by_bdhs, alol_weighting_and_judges, kto_batches_and_cached_reference,
                 revision_template_for_srpo, ofs_two_adapters, padding_free_step, eval_steps_have_held_out,
                 monitor_has_held_out_prompts, init_adapters_need_peft)


# -- the rules TrainConfig's sections share with RewardModelConfig (prefuse train-rm) -------------------------------

def check_training_settings(cfg) -> None:
    """Precision and LoRA, optimisation, logging and saving of a training config (TrainConfig, RewardModelConfig):
    one-line errors naming the field."""
    check_precision_and_lora(cfg)
    check_optimisation(cfg)
    check_logging_and_saving(cfg)


def check_held_out_and_resume(cfg) -> None:
    """The held-out set (eval_split / eval_fraction / eval_steps) and resume_from_checkpoint of a training config
    (TrainConfig, RewardModelConfig): one-line errors naming the field."""
    check_held_out(cfg)
    eval_steps_have_held_out(cfg)
    check_resume(cfg)
