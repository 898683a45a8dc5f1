"""`prefuse export`: a checkpoint of `prefuse train` as a plain `save_pretrained` directory.

    prefuse export --checkpoint out/checkpoint-500 --output model/ [--merge_lora]

The model is rebuilt as the run that wrote the checkpoint built it (the settings the checkpoint itself records in
its run_config.json: the base model and the LoRA settings; a checkpoint of an older prefuse without that record: the
`train_config.json` beside it, said in one line), the checkpoint's weights are loaded into it (any kind: a full
model, LoRA adapters, or the distributed checkpoint of an FSDP2 run), and it is saved with the tokenizer: a full model loads with
`AutoModelForCausalLM.from_pretrained(output)`; LoRA adapters load with `PeftModel.from_pretrained(base, output)`
(or `AutoPeftModelForCausalLM`), or, with `--merge_lora`, are merged into the base weights first.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["export", "add_arguments", "run"]


def export(checkpoint: str, output: str, *, merge_lora: bool = False,
           model_name_or_path: str | None = None) -> Path:
    """Write the model of `checkpoint` to `output` (see the module docstring); return `output`."""
    from prefuse.engine.checkpoint import load_weights, read_run_config, resolve_checkpoint
    from prefuse.engine.train.config import TrainConfig
    from prefuse.engine.models.loading import load_models

    path = resolve_checkpoint(None, checkpoint)
    record = read_run_config(path)  # what the checkpoint recorded of its own run
    if record is not None:
        cfg = run_settings(record["settings"])
    else:
        settings = path.parent / "train_config.json"
        if not settings.is_file():
            raise ValueError(f"checkpoint: {path} records no settings and {path.parent} has no train_config.json "
                             f"(is {path} a checkpoint of prefuse train?)")
        print(f"checkpoint: {path} records no settings (an older checkpoint); rebuilding its model from "
              f"{settings}", flush=True)
        cfg = TrainConfig.from_dict(json.loads(settings.read_text()))
    if model_name_or_path:
        cfg.model_name_or_path = model_name_or_path
    model_cfg = cfg.model_config()
    model_cfg.lora_dropout = 0.0
    models = load_models(model_cfg, device="cpu", need_reference=False)
    load_weights(path, model=models.policy)
    model = models.policy
    if merge_lora:
        if not cfg.use_peft:
            raise ValueError(f"merge_lora: {path} holds a full model's weights (the run had no --use_peft); drop "
                             f"--merge_lora")
        model = model.merge_and_unload()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if models.tokenizer is not None:
        models.tokenizer.save_pretrained(str(out))
    return out


def run_settings(settings: dict):
    """The config of the run that recorded `settings`: `prefuse sft`'s (its data section has SFT-only keys) or
    `prefuse train`'s. Both share the model section (base model, LoRA settings), which is all a rebuild reads."""
    from prefuse.engine.sft import SFTConfig
    from prefuse.engine.train.config import TrainConfig

    return (SFTConfig if "completion_only_loss" in settings else TrainConfig).from_dict(settings)


NAME = "export"
HELP = "a checkpoint as a plain save_pretrained directory (LoRA merged optionally)"
DESCRIPTION = ("Rebuilds the run's model (the settings the checkpoint records; an older checkpoint: the "
               "train_config.json beside it), loads the checkpoint's "
               "weights (full, LoRA adapters, or an FSDP2 run's distributed checkpoint) and saves it with its "
               "tokenizer for from_pretrained.")


def add_arguments(parser) -> None:
    from prefuse.commands.models import add_gguf_file

    parser.add_argument("--checkpoint", required=True, help="a checkpoint-<step> directory of prefuse train")
    parser.add_argument("--output", required=True, help="where the model directory goes")
    parser.add_argument("--merge_lora", action="store_true", help="merge LoRA adapters into the base weights")
    parser.add_argument("--model_name_or_path", default=None, help="the base model (default: the run's)")
    add_gguf_file(parser)


def run(args) -> int:
    """`prefuse export`: the command's flags -> export()."""
    from prefuse.commands.models import plain_models

    plain_models(args)
    path = export(args.checkpoint, args.output, merge_lora=args.merge_lora, model_name_or_path=args.model_name_or_path)
    print(f"model written to {path}")
    return 0
