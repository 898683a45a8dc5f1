"""The model section of `prefuse train`'s settings: the policy and its reference, precision, LoRA, a vision-language
model's trained parts. engine/models/loading.py loads what it describes (`model_config()`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prefuse.engine.checks import check_field, setting
from prefuse.engine.models.gguf import plain_directory
from prefuse.engine.models.loading import ModelConfig, check_device

TORCH_DTYPES = ("float32", "bfloat16", "float16", "auto")
TRAIN_VISION = ("none", "projector", "all")


@dataclass
class ModelSettings:
    model_name_or_path: str = setting("", "local directory written by save_pretrained (model and tokenizer), or a "
                                          ".gguf file")
    ref_model_name_or_path: str | None = setting(None, "reference model directory (default: the policy's; with "
                                                       "LoRA: adapters disabled)")
    gguf_file: str | None = setting(None, "a GGUF file in --model_name_or_path's directory (dequantized; converted "
                                          "once, engine/models/gguf.py)")
    torch_dtype: str = setting("float32", f"the weights' dtype, one of {', '.join(TORCH_DTYPES)} (auto: the "
                                          f"checkpoint's own)")
    attn_implementation: str | None = setting(None, "sdpa, eager or flash_attention_2 (default: sdpa, or eager where "
                                                    "the architecture has no sdpa)")
    gradient_checkpointing: bool = setting(False, "recompute the decoder's activations in backward (less memory)")
    use_peft: bool = setting(False, "train LoRA adapters instead of the full model (the reference: adapters off)")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA scaling alpha (the update is alpha / r * B A)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA branch's input, in [0, 1)")
    lora_target_modules: list[str] | None = setting(None, "module names for LoRA (default: peft's for the "
                                                          "architecture; lm_head too: its adapter goes into the "
                                                          "fused head)")
    train_vision: str = setting("none", "a vision-language model: none (the vision tower and projector frozen; LoRA "
                                        "on the language model only), projector, or all (projector and vision tower "
                                        "train too)")

    def check(self) -> None:
        """One-line ValueErrors naming the field (after plain_model_paths: a GGUF file is then its plain copy)."""
        for name in ("model_name_or_path", "ref_model_name_or_path"):
            path = getattr(self, name)
            check_field(not path or Path(path).exists() or not looks_local(path), name,
                        f"no such model directory: {path}")
        check_precision_and_lora(self)
        check_field(self.train_vision in TRAIN_VISION, "train_vision",
                    f"{self.train_vision!r} is not none, projector or all")

    def plain_model_paths(self) -> None:
        """A GGUF policy or reference (`x.gguf`, or model_name_or_path DIR with gguf_file NAME) becomes its plain
        safetensors copy (engine/models/gguf.py), so everything after loads a model directory; gguf_file is then
        spent."""

        self.model_name_or_path = plain_directory(self.model_name_or_path, self.gguf_file)
        if self.ref_model_name_or_path:
            self.ref_model_name_or_path = plain_directory(self.ref_model_name_or_path,
                                                          field="ref_model_name_or_path")
        self.gguf_file = None

    def model_config(self):
        """What engine/models/loading.py loads: its ModelConfig."""

        return ModelConfig(model_name_or_path=self.model_name_or_path,
                           ref_model_name_or_path=self.ref_model_name_or_path, torch_dtype=self.torch_dtype,
                           attn_implementation=self.attn_implementation, use_peft=self.use_peft, lora_r=self.lora_r,
                           lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                           lora_target_modules=None if self.lora_target_modules is None
                           else tuple(self.lora_target_modules),
                           gradient_checkpointing=self.gradient_checkpointing, train_vision=self.train_vision)


def check_precision_and_lora(cfg) -> None:
    """torch_dtype, lora_r and lora_dropout of any training config (TrainConfig, RewardModelConfig), and the
    device the models load on (its `device`, before anything is written or read)."""
    if getattr(cfg, "device", "auto") != "auto":
        check_device(cfg.device)
    check_field(cfg.torch_dtype in TORCH_DTYPES, "torch_dtype", f"{cfg.torch_dtype!r} is not one of {TORCH_DTYPES}")
    check_field(int(cfg.lora_r) >= 1, "lora_r", f"must be at least 1, got {cfg.lora_r}")
    check_field(0 <= cfg.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")


def looks_local(path: str) -> bool:
    """A path that cannot be a Hub id ("org/name"): absolute, relative with ./ or ../, or with more than one /."""
    return path.startswith(("/", "./", "../", "~", ".")) or path.count("/") > 1 or os.sep != "/" and os.sep in path
