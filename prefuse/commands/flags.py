"""Flags from config dataclasses: a --flag per field (typed from its annotation, its help from the field's metadata
or a help dict), and the parsers of flag values that the commands share."""
from __future__ import annotations

import argparse

TRAIN_HELP = {
    "model_name_or_path": "local directory written by save_pretrained (model and tokenizer), or a .gguf file",
    "gguf_file": "a GGUF file in --model_name_or_path's directory (dequantized; converted once, engine/models/gguf.py)",
    "ref_model_name_or_path": "reference model directory (default: the policy's; with LoRA: adapters disabled)",
    "dataset_name": "local .jsonl/.json/.parquet file or save_to_disk folder in a TRL format",
    "output_dir": "where metrics.jsonl, checkpoints and cached reference log-probs go",
    "loss_type": "objective name(s); several are summed with --loss_weights (see prefuse.list_objectives())",
    "eval_split": "held-out data: a file, or a split of a saved dataset folder",
    "eval_fraction": "held-out data: this fraction of the training examples",
    "resume_from_checkpoint": "'latest' (in --output_dir) or a checkpoint directory",
    "objective_args": "objective hyper-parameters as key=value (each also has its own flag below)",
    "save_steps": "checkpoint every N steps (0: only at the end)",
    "report_to": "auto: TensorBoard when installed; none; tensorboard",
    "precompute_ref_log_probs": "compute the reference's sums once and cache them in --output_dir",
    "lora_target_modules": "module names for LoRA (default: peft's for the architecture)",
    "online": "generate -> judge -> update: dataset_name gives the prompts (see docs/online.md)",
    "reward_funcs": "online judge: reward functions file.py:name with TRL's signature, scores summed",
    "reward_weights": "weights of the reward functions (default 1 each)",
    "reward_model_path": "online judge: a Bradley-Terry reward model directory (prefuse train-rm)",
    "judge": "online judge: a pairwise preference model directory, or 'copy' (the toy task's rule judge)",
    "max_new_tokens": "online: the longest sampled response",
    "num_generations": "online: samples per prompt of grpo, rloo and hypo",
    "top_p": "online: nucleus sampling",
    "missing_eos_penalty": "online: subtracted from the score of a sample that did not end with EOS (TRL's)",
    "mixture_coef": "online: m of the geometric mixture softmax((1 - m) log pi + m log pi_ref) (Nash-MD, IPO-MD)",
    "online_sampler": "online: policy, or mixture (IPO-MD: both samples of a pair from the mixture)",
    "pair_samples": "online: samples per prompt of the judged pairs (n > 2: best vs worst, iterative DPO)",
    "iterations": "online: split the steps into iterations; the reference becomes the previous iterate",
    "iteration_slices": "online: each iteration draws its prompts from its own slice of the prompts",
    "iteration_reference": "online iterations: previous (iterate) or initial (the starting model throughout)",
    "revision_template": "srpo: the revision prompt, a file or a string with {prompt} and {previous} "
                         "(docs/methods/srpo.md)",
    "use_vllm": "online: sample the policy with vLLM on the same GPU (CUDA, pip install vllm)",
    "vllm_gpu_memory_utilization": "online, --use_vllm: the share of GPU memory vLLM may take",
}


def flag_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_value(text: str):
    """An objective hyper-parameter: a number (1e-4 included, which YAML 1.1 reads as a string), a bool or a
    string, as YAML reads it."""
    import yaml

    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def config_flags(p: argparse.ArgumentParser, config_class, helps: dict | None = None,
                  special: dict | None = None) -> None:
    """A --flag per field of the dataclass `config_class`, typed from its annotation, its help from `helps` or the
    field's metadata; `special`: argparse options for named fields; an absent flag leaves the field's default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        hint = str(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = (helps or {}).get(f.name, f.metadata.get("help", ""))
        # a None default that the objective fills says so in its help text
        shown = "" if default is None and "(default:" in text else f" (default: {default!r})"
        kwargs = dict(default=argparse.SUPPRESS, help=f"{text}{shown}".strip())
        if f.name in (special or {}):
            kwargs.update(special[f.name])
        elif "bool" in hint:
            kwargs.update(type=flag_bool, nargs="?", const=True, metavar="BOOL")
        elif "list[float]" in hint:
            kwargs.update(type=float, nargs="+")
        elif "list[str]" in hint:
            kwargs.update(nargs="+")
        elif "int" in hint and "float" not in hint:
            kwargs.update(type=int)
        elif "float" in hint:
            kwargs.update(type=float)
        p.add_argument(f"--{f.name}", **kwargs)
