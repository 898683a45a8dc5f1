"""`prefuse export`: a checkpoint of `prefuse train` as a plain `save_pretrained` directory.

    prefuse export --checkpoint out/checkpoint-500 --output model/ [--merge_lora]

The model is rebuilt as the run built it (its `train_config.json`, beside the checkpoints: the base model and the
LoRA settings), the checkpoint's weights are loaded into it (any kind: a full model, LoRA adapters, or the
distributed checkpoint of an FSDP2 run), and it is saved with the tokenizer: a full model loads with
`AutoModelForCausalLM.from_pretrained(output)`; LoRA adapters load with `PeftModel.from_pretrained(base, output)`
(or `AutoPeftModelForCausalLM`), or, with `--merge_lora`, are merged into the base weights first.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["export"]


def export(checkpoint: str, output: str, *, merge_lora: bool = False,
           model_name_or_path: str | None = None) -> Path:
    """Write the model of `checkpoint` to `output` (see the module docstring); return `output`."""
    from prefuse.engine.checkpoint import load_weights, resolve_checkpoint
    from prefuse.engine.train.config import TrainConfig
    from prefuse.engine.models.loading import load_models

    path = resolve_checkpoint(None, checkpoint)
    settings = path.parent / "train_config.json"
    if not settings.is_file():
        raise ValueError(f"checkpoint: {path.parent} has no train_config.json (is {path} a checkpoint of prefuse "
                         f"train?)")
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
