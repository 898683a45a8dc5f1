"""`TrainConfig`: every setting of `prefuse train`, named as TRL / transformers name them.

    cfg = TrainConfig(model_name_or_path="tiny", dataset_name="pairs.jsonl", output_dir="out", loss_type="sigmoid")
    cfg = TrainConfig.from_dict(yaml.safe_load(open("run.yaml")))   # the same keys as the command-line flags
    cfg.validate()                                                  # ValueError: one line naming the field

Objective hyper-parameters (`simpo_gamma`, `label_smoothing`, `desirable_weight`, ...) go in `objective_args`; the
CLI also takes each as its own flag.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefuse.algorithms import get_objective
from prefuse.algorithms.registry import OBJECTIVES
from prefuse.engine.core.objectives import objective_needs
from prefuse.engine.core.checks import check_field

TORCH_DTYPES = ("float32", "bfloat16", "float16", "auto")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


def objective_hparam_names() -> list[str]:
    """Every hyper-parameter some registered objective accepts (the CLI offers each as a flag)."""
    return sorted(set().union(*(spec.hparams for spec in OBJECTIVES.values())) - {"loss_type"})


@dataclass
class TrainConfig:
    # model
    model_name_or_path: str = ""
    ref_model_name_or_path: str | None = None
    gguf_file: str | None = None  # model_name_or_path is the directory of this GGUF file (engine/models/gguf.py)
    torch_dtype: str = "float32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    train_vision: str = field(default="none", metadata={"help": "a vision-language model: none (the vision tower "
                              "and projector frozen; LoRA on the language model only), projector, or all (projector "
                              "and vision tower train too)"})
    # data
    dataset_name: str = ""
    eval_split: str | None = None       # a split of a saved dataset folder, or a file of its own
    eval_fraction: float = 0.0          # or hold out this fraction of the training examples
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    truncation: bool = True
    skip_bad_rows: bool = False
    # objective
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    beta: float | None = field(default=None, metadata={
        "help": "the objective's KL strength (default: the objective's own, from its paper or TRL 1.16: 0.1 for the "
                "DPO family, grpo 0.0, rloo 0.05, selm 0.01; `prefuse objectives` lists them)"})
    objective_args: dict[str, Any] = field(default_factory=dict)
    precompute_ref_log_probs: bool = False
    revision_template: str | None = None   # SRPO: a file, or a string with {prompt} and {previous} (revision.py)
    # OFS-DPO's two adapters (engine/methods/ofs_adapters.py) and COFS-DPO's domains (commands/cofs.py)
    ofs_slow_lr_ratio: float = 0.1      # the slow adapter's learning rate = learning_rate * this
    ofs_chasing_interval: int = 50      # steps between two checks of the role-swap criterion
    ofs_swap_mode: str = "roles"        # "roles" (the F role moves) or "params" (the adapters' weights swap)
    domains: list[str] | None = None    # COFS-DPO: preference files trained on one after another
    domain_weights: list[float] | None = None   # lambda_k of the combined fast adapters (default: uniform)
    # A-LoL's advantages and sampling (engine/methods/alol_advantages.py, engine/methods/alol_value_head.py)
    advantages: str = field(default="auto", metadata={"help": "A-LoL's advantages: auto (the advantage column, else "
                            "reward minus the mean reward), column, mean, or value_head (reward minus V_ref(x))"})
    value_head_epochs: int = field(default=10, metadata={"help": "--advantages value_head: epochs of its fit"})
    value_head_lr: float = field(default=1e-5, metadata={"help": "--advantages value_head: its AdamW learning rate"})
    value_fraction: float = field(default=0.1, metadata={"help": "--advantages value_head: the fraction of the "
                                  "training prompts held out to fit V (training does not see them)"})
    value_targets: str = field(default="data", metadata={"help": "--advantages value_head: V's targets, the data's "
                               "rewards of the value split's responses (data), or the judge's rewards of "
                               "--value_samples samples of the reference per value prompt (reference_samples)"})
    value_samples: int = field(default=1, metadata={"help": "--value_targets reference_samples: samples of the "
                               "reference per value prompt (--max_new_tokens, --temperature, --top_p)"})
    sampling_strategy: str = field(default="random", metadata={"help": "random (shuffled epochs), or good_priority "
                                   "(draw examples with probability proportional to their positive advantage)"})
    # optimization
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    bf16: bool = False
    seed: int = 42
    fsdp: str = field(default="", metadata={"help": "under torchrun: shard the policy with FSDP2 (full_shard: "
                      "fully_shard per decoder layer and at the root; --fsdp alone means full_shard); empty: DDP"})
    # online: generate -> judge -> update (dataset_name gives the prompts)
    online: bool = False
    reward_funcs: list[str] | None = None        # "file.py:name" reward functions (TRL's signature), summed
    reward_weights: list[float] | None = None
    reward_model_path: str | None = None         # a Bradley-Terry reward model directory (prefuse train-rm)
    judge: str | None = None                     # a pairwise preference model directory: P(y > y')
    max_new_tokens: int = 64
    num_generations: int = 4                     # samples per prompt of grpo / rloo (pair methods draw 2)
    temperature: float | None = field(default=None, metadata={
        "help": "online: sampling temperature, 0: greedy (default: the objective's own, TRL 1.16's or its paper's: "
                "0.9 for online DPO and its family, 1.0 for grpo, rloo, nash_md, online_ipo, hypo); where the "
                "objective's estimator reads it, the loss's log-probs are taken at it too (`prefuse objectives`)"})
    top_p: float = 1.0
    missing_eos_penalty: float | None = None
    mixture_coef: float = 0.5                    # the geometric mixture of policy and reference (Nash-MD, IPO-MD)
    online_sampler: str = "policy"               # "policy" or "mixture" (IPO-MD: both samples from the mixture)
    pair_samples: int = 2                        # judged pairs: 2 (online DPO), n > 2: best vs worst (iterative DPO)
    iterations: int = 1                          # > 1: the reference becomes the previous iterate each iteration
    iteration_slices: bool = False               # each iteration its own slice of the prompts (SELM, RLHF Workflow)
    iteration_reference: str | None = field(default=None, metadata={
        "help": "online iterations: the reference, previous (iterate) or initial (the starting, SFT model "
                "throughout); (default: the objective's, previous for selm, initial otherwise as RLHF Workflow)"})
    iteration_sampling: str = field(default="per_batch", metadata={
        "help": "online iterations: per_batch (fresh samples of the current policy at every batch) or once (the "
                "authors' loop: at each iteration's start, its prompts' samples from pi_t, judged once and trained "
                "on for the iteration; judged pairs and selm)"})
    use_vllm: bool = False                       # the policy's samples from vLLM on the same GPU (CUDA, optional)
    avg_rejected: str = field(default="policy", metadata={"help": "online avg_dpo: where y~- comes from, policy (a "
                              "policy sample per prompt) or bdhs (online BDHS from the current policy, "
                              "prefuse.engine.methods.bdhs; --rho_th, --epsilon_s, --n_bdhs, --embedder as prefuse bdhs)"})
    rho_th: float = field(default=0.99, metadata={"help": "--avg_rejected bdhs: a masked token stays visible iff "
                          "rho ~ U(0,1) >= rho_th"})
    epsilon_s: float = field(default=0.97, metadata={"help": "--avg_rejected bdhs: accept y~- below this cosine "
                             "similarity to y+"})
    n_bdhs: int = field(default=5, metadata={"help": "--avg_rejected bdhs: attempts at most (the last unguided)"})
    embedder: str = field(default="all-MiniLM-L6-v2", metadata={"help": "--avg_rejected bdhs: the sentence "
                          "embedder (packaged all-MiniLM-L6-v2, a local sentence-transformers directory, lexical)"})
    vllm_gpu_memory_utilization: float = 0.3
    # run
    output_dir: str = ""
    logging_steps: int = 10
    save_steps: int = 500               # 0: no periodic checkpoints
    save_total_limit: int | None = None
    eval_steps: int | None = None       # default: logging_steps, when there is an eval set
    resume_from_checkpoint: str | None = None   # "latest" or a checkpoint directory
    init_adapters: str | None = None    # a checkpoint of a LoRA run whose adapters start this one (fresh optimizer)
    report_to: str = "auto"             # "auto": TensorBoard when installed; "none"; "tensorboard"
    device: str = "auto"
    # the over-optimisation monitor (engine/methods/monitor.py, docs/methods/monitor.md)
    monitor_steps: int = field(default=0, metadata={"help": "every N steps: top-k entropy and mass of the policy's "
                                                            "samples on held-out prompts (0: no monitor)"})
    monitor_prompts: str | None = field(default=None, metadata={"help": "the monitor's prompts (default: the eval "
                                                                        "split's); chosen responses too if it has"})
    monitor_samples: int = field(default=16, metadata={"help": "how many held-out prompts the monitor reads"})
    monitor_top_k: int = field(default=10, metadata={"help": "k of the top-k indicators"})
    monitor_extra_top_k: list[int] | None = field(
        default_factory=lambda: [5, 20, 50],
        metadata={"help": "further k whose top-k entropy and mass are logged too (monitor/topk_entropy@k); none: off"})
    monitor_ema: float = field(default=0.5, metadata={"help": "decay of the indicators' EMA (0: none)"})
    monitor_patience: int = field(default=3, metadata={"help": "falls of the EMA in a row after its peak that flag "
                                                               "over-optimisation"})
    monitor_min_delta: float = field(default=0.0, metadata={"help": "a fall counts only when the EMA drops by more "
                                                                    "than this"})
    monitor_indicator: str | None = field(default=None, metadata={"help": "entropy or mass (default: mass for "
                                                                          "hinge, entropy otherwise)"})
    monitor_max_new_tokens: int = field(default=64, metadata={"help": "the monitor's longest sampled response"})
    monitor_keep_best: bool = field(default=False, metadata={"help": "keep the checkpoint at the EMA's peak as "
                                                                     "output_dir/best/ (on with --early_stopping)"})
    early_stopping: bool = field(default=False, metadata={"help": "stop when the monitor flags over-optimisation; "
                                                                  "output_dir/best/ holds the peak"})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """From a YAML/JSON mapping with the flags' names; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        hparams = set(objective_hparam_names())
        values = dict(values)
        objective_args = dict(values.pop("objective_args", None) or {})
        for key in list(values):
            if key not in names and key in hparams:  # `simpo_gamma: 0.5` at the top level of a YAML file
                objective_args[key] = values.pop(key)
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; see `prefuse train --help` for the accepted names")
        cfg = cls(**values, objective_args=objective_args)
        if isinstance(cfg.loss_type, str):
            cfg.loss_type = [cfg.loss_type]
        if isinstance(cfg.lora_target_modules, str):
            cfg.lora_target_modules = [cfg.lora_target_modules]
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: no such file: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config: {path} must hold a mapping of settings, got {type(values).__name__}")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def objective(self) -> str | list[str]:
        """The objective as PreferenceLoss and objective_loss take it: a name, or a list of names."""
        return self.loss_type[0] if len(self.loss_type) == 1 else list(self.loss_type)

    def model_config(self):
        from prefuse.engine.models.loading import ModelConfig

        return ModelConfig(model_name_or_path=self.model_name_or_path,
                           ref_model_name_or_path=self.ref_model_name_or_path, torch_dtype=self.torch_dtype,
                           attn_implementation=self.attn_implementation, use_peft=self.use_peft, lora_r=self.lora_r,
                           lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                           lora_target_modules=None if self.lora_target_modules is None
                           else tuple(self.lora_target_modules),
                           gradient_checkpointing=self.gradient_checkpointing, train_vision=self.train_vision)

    def apply_defaults(self) -> list[str]:
        """Fill the settings left out (None) with the objective's own values (engine/core/method_defaults.py) -> one
        line per setting filled, naming its source."""
        from prefuse.engine.core.method_defaults import method_defaults

        check_field(isinstance(self.loss_type, list) and len(self.loss_type) >= 1, "loss_type",
                    "give at least one objective name")
        for name in self.loss_type:
            try:
                get_objective(name)
            except ValueError as error:
                raise ValueError(f"loss_type: {error}") from None
        filled = []
        for name, (value, source) in method_defaults(self.loss_type).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
                if name == "beta" or self.online and (name == "temperature" or self.iterations > 1):
                    filled.append(f"{name} {value} ({source})")
        return filled

    def plain_model_paths(self) -> None:
        """A GGUF policy or reference (`x.gguf`, or model_name_or_path DIR with gguf_file NAME) becomes its plain
        safetensors copy (engine/models/gguf.py), so everything after loads a model directory; gguf_file is then spent."""
        from prefuse.engine.models.gguf import plain_directory

        self.model_name_or_path = plain_directory(self.model_name_or_path, self.gguf_file)
        if self.ref_model_name_or_path:
            self.ref_model_name_or_path = plain_directory(self.ref_model_name_or_path,
                                                          field="ref_model_name_or_path")
        self.gguf_file = None

    def validate(self) -> "TrainConfig":
        """Fill the defaults left out (apply_defaults), then raise ValueError with one line naming the first bad
        field; return self."""
        self.apply_defaults()
        for name in ("model_name_or_path", "dataset_name", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        self.plain_model_paths()
        for name in ("model_name_or_path", "ref_model_name_or_path"):
            path = getattr(self, name)
            if path and not Path(path).exists() and _looks_local(path):
                raise ValueError(f"{name}: no such model directory: {path}")
        if not Path(self.dataset_name).exists():
            raise ValueError(f"dataset_name: no such file or directory: {self.dataset_name}")
        self._validate_objective()
        check_training_settings(self)
        check_field(self.train_vision in ("none", "projector", "all"), "train_vision",
                    f"{self.train_vision!r} is not none, projector or all")
        check_field(self.beta >= 0, "beta", f"must be non-negative, got {self.beta}")
        check_field(self.max_length is None or self.max_length >= 2, "max_length",
                    f"must be >= 2, got {self.max_length}")
        check_field(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
                    f"must be >= 1, got {self.max_prompt_length}")
        check_held_out_and_resume(self)
        check_field(self.fsdp in ("", "full_shard"), "fsdp", f"{self.fsdp!r} is not full_shard (or empty: DDP)")
        check_field(not self.domains, "domains", "domain after domain is prefuse.commands.cofs.train_domains "
                                                 "(prefuse train --domains), not train()")
        from prefuse.engine.methods.monitor import check_monitor_settings

        check_monitor_settings(self)
        check_field(self.init_adapters is None or self.use_peft, "init_adapters",
                    "starts LoRA adapters: add --use_peft")
        check_field(self.init_adapters is None or (Path(self.init_adapters) / "checkpoint.json").is_file(),
                    "init_adapters", f"{self.init_adapters} is not a prefuse checkpoint directory (checkpoint-<step>)")
        return self

    def needs(self):
        """What the objective needs from the run (engine.objectives / engine.online); ValueError `loss_type: ...`."""
        if self.online:
            from prefuse.engine.online.methods import online_needs

            return online_needs(self.loss_type, self.beta)
        return objective_needs(self.loss_type)

    def bdhs_config(self):
        """Online BDHS's settings (--avg_rejected bdhs) as prefuse.engine.methods.bdhs.BDHSConfig, validated; the rollout
        settings (max_new_tokens, temperature, top_p) are the run's."""
        from prefuse.engine.methods.bdhs import BDHSConfig

        return BDHSConfig(rho_th=self.rho_th, epsilon_s=self.epsilon_s, n_bdhs=self.n_bdhs,
                          max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                          top_p=self.top_p).validate()

    def _validate_online(self) -> None:
        from prefuse.engine.online.methods import JUDGELESS, online_method

        judges = [n for n in ("reward_funcs", "reward_model_path", "judge") if getattr(self, n)]
        method = online_method(self.loss_type)
        if method in JUDGELESS:
            check_field(not judges, judges[0] if judges else "reward_funcs",
                        f"{self.loss_type} use no judge ({JUDGELESS[method]}); drop it")
        else:
            check_field(len(judges) == 1, "reward_funcs",
                        f"--online needs one judge: --reward_funcs file.py:name, --reward_model_path DIR or --judge "
                        f"DIR (got {judges or 'none'})")
        check_field(self.reward_weights is None or bool(self.reward_funcs), "reward_weights", "needs --reward_funcs")
        check_field(not (self.eval_split or self.eval_fraction), "eval_split",
                    "held-out evaluation is not run with --online; drop eval_split / eval_fraction")
        check_field(not self.precompute_ref_log_probs, "precompute_ref_log_probs",
                    "online samples are new every step: their reference log-probs cannot be precomputed")
        check_field(0 < self.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization",
                    f"must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        check_field(self.pair_samples >= 2, "pair_samples", f"must be at least 2, got {self.pair_samples}")
        check_field(self.iterations >= 1, "iterations", f"must be at least 1, got {self.iterations}")
        check_field(self.iterations == 1 or self.needs().reference, "iterations",
                    f"{self.loss_type} read no reference, so there is none to move to the previous iterate")
        check_field(not self.iteration_slices or self.iterations > 1, "iteration_slices", "needs --iterations > 1")
        check_field(self.iteration_reference in ("previous", "initial"), "iteration_reference",
                    f"{self.iteration_reference!r} is not previous or initial")
        check_field(self.iteration_sampling in ("per_batch", "once"), "iteration_sampling",
                    f"{self.iteration_sampling!r} is not per_batch or once")
        check_field(self.iteration_sampling == "per_batch" or method in ("judged_pair", "selm"), "iteration_sampling",
                    f"once samples a fixed set of judged pairs per iteration (online DPO's family, RLHF Workflow, "
                    f"selm); {self.loss_type} sample per batch")
        check_field(self.iterations == 1 or self.max_steps >= self.iterations, "iterations",
                    "needs max_steps >= iterations (the steps are split evenly between the iterations)")
        check_field(self.num_generations >= 2, "num_generations", f"must be at least 2, got {self.num_generations}")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        check_field(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check_field(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check_field(0 <= self.mixture_coef <= 1, "mixture_coef", f"must be in [0, 1], got {self.mixture_coef}")
        check_field(self.online_sampler in ("policy", "mixture"), "online_sampler", "must be policy or mixture")
        from prefuse.engine.judges import RULE_JUDGES

        check_field(self.reward_model_path is None or Path(self.reward_model_path).is_dir(), "reward_model_path",
                    f"no such model directory: {self.reward_model_path}")
        check_field(self.judge is None or self.judge in RULE_JUDGES or Path(self.judge).is_dir(), "judge",
                    f"no such model directory: {self.judge} (nor a rule judge: {', '.join(RULE_JUDGES)})")
        check_field(self.avg_rejected in ("policy", "bdhs"), "avg_rejected",
                    f"{self.avg_rejected!r} is not policy or bdhs")
        check_field(self.avg_rejected == "policy" or method == "avg", "avg_rejected", "is read by avg_dpo only")
        if self.avg_rejected == "bdhs":
            import importlib.util

            found = importlib.util.find_spec("prefuse.engine.methods.bdhs") is not None
            check_field(found and hasattr(importlib.import_module("prefuse.engine.methods.bdhs"), "bdhs_rejected"),
                        "avg_rejected", "'bdhs' needs prefuse.engine.methods.bdhs.bdhs_rejected, which this build does not "
                        "have; use policy")
            self.bdhs_config()  # ValueError "rho_th: ...", "n_bdhs: ..." 

    def _validate_objective(self) -> None:
        check_field(len(self.loss_type) >= 1, "loss_type", "give at least one objective name")
        needs = self.needs()  # ValueError "loss_type: ..." for an objective this kind of run cannot feed
        if self.online:
            self._validate_online()
        else:
            check_field(not self.use_vllm, "use_vllm", "vLLM samples online runs: add --online")
            check_field(self.avg_rejected == "policy", "avg_rejected", "generates y~- during training: add --online "
                        "(offline, avg_dpo reads the generated_rejected column)")
        from prefuse.engine.methods.alol_advantages import check_settings  # offline judges give A-LoL's rewards

        check_settings(self, needs)
        specs = [get_objective(n) for n in self.loss_type]
        check_field(self.loss_weights is None or len(self.loss_weights) == len(specs), "loss_weights",
                    f"{len(self.loss_weights or [])} weight(s) for {len(specs)} objective(s) {self.loss_type}")
        accepted = set().union(*(spec.hparams for spec in specs))
        for name in ("mixed_p", "avg_gamma"):  # Mixed-DPO's P(offline pair), Avg-DPO's weight of the external y-
            value = self.objective_args.get(name, 0.5)
            check_field(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1, name,
                        f"must be a number in [0, 1], got {value!r}")
        unknown = sorted(set(self.objective_args) - accepted)
        check_field(not unknown, "objective_args", f"{unknown} not accepted by {self.loss_type}; they accept "
                                                   f"{sorted(accepted) or 'none'}")
        check_field(not self.objective_args.get("use_weighting"), "use_weighting",
                    "WPO weighting needs log sum_v p(v)^2 per response token, which the fused loss does not compute "
                    "yet")
        check_field(self.per_device_train_batch_size >= 2 or "kl" not in needs.roles, "per_device_train_batch_size",
                    "kto needs at least 2 examples per batch (its KL term pairs each prompt with another example's "
                    "completion)")
        if self.revision_template is not None:  # SRPO's revision prompt: ValueError "revision_template: ..."
            from prefuse.engine.methods.srpo import load_template

            check_field(needs.revision, "revision_template", f"{self.loss_type} read no revision rows (srpo does)")
            load_template(self.revision_template)
        check_field(not (self.precompute_ref_log_probs and "kl" in needs.roles), "precompute_ref_log_probs",
                    "KTO's KL completions depend on the batch, so their reference log-probs cannot be cached")
        check_field(not needs.slow_adapter or self.use_peft, "use_peft",
                    f"{self.loss_type} train two LoRA adapters (fast and slow) on one base model; add --use_peft")
        check_field(not needs.slow_adapter or len(self.loss_type) == 1, "loss_type",
                    "ofs_dpo trains its two adapters alone; do not combine it with other objectives")
        check_field(self.ofs_slow_lr_ratio > 0, "ofs_slow_lr_ratio", f"must be positive, got {self.ofs_slow_lr_ratio}")
        check_field(self.ofs_chasing_interval >= 1, "ofs_chasing_interval",
                    f"must be at least 1, got {self.ofs_chasing_interval}")
        check_field(self.ofs_swap_mode in ("roles", "params"), "ofs_swap_mode",
                    f"{self.ofs_swap_mode!r} is not roles or params")


def check_training_settings(cfg) -> None:
    """The optimization and run settings TrainConfig and RewardModelConfig share: one-line errors naming the
    field."""
    check_field(cfg.torch_dtype in TORCH_DTYPES, "torch_dtype", f"{cfg.torch_dtype!r} is not one of {TORCH_DTYPES}")
    check_field(cfg.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type",
                f"{cfg.lr_scheduler_type!r} is not one of {SCHEDULERS}")
    check_field(cfg.report_to in ("auto", "none", "tensorboard"), "report_to", "must be auto, none or tensorboard")
    check_field(cfg.learning_rate > 0, "learning_rate", f"must be positive, got {cfg.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "lora_r"):
        check_field(int(getattr(cfg, name)) >= 1, name, f"must be at least 1, got {getattr(cfg, name)}")
    check_field(cfg.max_steps > 0 or cfg.num_train_epochs > 0, "max_steps", "set max_steps > 0 or num_train_epochs > 0")
    check_field(cfg.save_steps >= 0, "save_steps", f"must be >= 0 (0: never), got {cfg.save_steps}")
    check_field(cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit",
                f"must be >= 1, got {cfg.save_total_limit}")
    check_field(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    check_field(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    check_field(0 <= cfg.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    check_field(0 <= cfg.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {cfg.eval_fraction}")


def check_held_out_and_resume(cfg) -> None:
    """The held-out set (eval_split / eval_fraction / eval_steps) and resume_from_checkpoint of a training config
    (TrainConfig, RewardModelConfig): one-line errors naming the field."""
    check_field(not (cfg.eval_split and cfg.eval_fraction), "eval_split", "give eval_split or eval_fraction, not both")
    check_field(cfg.eval_steps is None or cfg.eval_steps >= 1, "eval_steps", f"must be >= 1, got {cfg.eval_steps}")
    check_field(cfg.eval_steps is None or bool(cfg.eval_split or cfg.eval_fraction), "eval_steps",
                "needs a held-out set: set eval_split or eval_fraction")
    if cfg.eval_split and not Path(cfg.eval_split).exists():
        check_field(Path(cfg.dataset_name).is_dir(), "eval_split",
                    f"{cfg.eval_split!r} is not a file, and dataset_name is a single file with no other splits")
    if cfg.resume_from_checkpoint not in (None, "latest"):
        check_field(Path(cfg.resume_from_checkpoint).is_dir()
                    or (Path(cfg.output_dir) / cfg.resume_from_checkpoint).is_dir(),
                    "resume_from_checkpoint", f"no such checkpoint directory: {cfg.resume_from_checkpoint}")


def _looks_local(path: str) -> bool:
    """A path that cannot be a Hub id ("org/name"): absolute, relative with ./ or ../, or with more than one /."""
    return path.startswith(("/", "./", "../", "~", ".")) or path.count("/") > 1 or os.sep != "/" and os.sep in path
