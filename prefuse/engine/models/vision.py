"""Vision-language models (LLaVA, the `AutoModelForImageTextToText` family) in the engine: what differs from a
causal LM is here, and `engine/models/loading.py` calls it.

    is_vision_language(config)                                # a config with a vision_config
    processor = load_processor(path)                          # AutoProcessor, local files only; None without one
    targets = lora_targets(model, ("q_proj", "v_proj"))       # a regex: the language model's linear layers only
    hidden = vision_hidden_states(model, input_ids, attention_mask, pixel_values=...)   # [B, T, H]

The model's own multimodal forward (`LlavaModel`, the `base_model` of `LlavaForConditionalGeneration`) runs the
vision tower on pixel_values, projects the image features into the language model's embedding space, writes them
over the image tokens' embeddings and runs the language model up to its final norm; the lm_head is never called,
so the last hidden states go through the fused head exactly as a text model's do. The vision tower and the
projector stay frozen unless `train_vision` says otherwise ("projector", or "all": projector and tower), with LoRA
as peft's `modules_to_save` (the reference, adapters disabled, keeps the original weights).
"""
from __future__ import annotations

import os
import re

import torch

TRAIN_VISION = ("none", "projector", "all")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_vision_language(config) -> bool:
    """Whether a transformers config describes a vision-language model (it has a vision tower's config)."""
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str):
    """The directory's processor (`AutoProcessor`, local files only), or None when it has no processor files."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in PROCESSOR_FILES):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, local_files_only=True)


def language_model_of(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(qualified name, module) of the language model (the text decoder) inside a vision-language model."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name, module
    raise ValueError(f"{type(model).__name__}: its decoder is not one of its modules")


def vision_parts(model: torch.nn.Module) -> dict[str, list[str]]:
    """{"projector": [...], "tower": [...]}: the qualified names of the multimodal model's modules beside the
    language model (LLaVA: `model.multi_modal_projector`, `model.vision_tower`)."""
    base = model.base_model
    prefix = next(name for name, module in model.named_modules() if module is base)
    _, language_model = language_model_of(model)
    parts = {"projector": [], "tower": []}
    for name, child in base.named_children():
        if child is not language_model:
            parts["projector" if "projector" in name else "tower"].append(f"{prefix}.{name}" if prefix else name)
    return parts


def trained_vision_modules(model: torch.nn.Module, train_vision: str) -> list[str]:
    """The vision-side modules `train_vision` trains: none, the projector, or the projector and the tower."""
    if train_vision not in TRAIN_VISION:
        raise ValueError(f"train_vision: {train_vision!r} is not one of {TRAIN_VISION}")
    parts = vision_parts(model)
    if train_vision != "none" and not parts["projector"]:
        raise ValueError(f"train_vision: {type(model).__name__} has no module named like a projector beside its "
                         f"language model (found {parts['tower']})")
    return {"none": [], "projector": parts["projector"], "all": parts["projector"] + parts["tower"]}[train_vision]


def freeze_vision(model: torch.nn.Module, train_vision: str) -> None:
    """Full fine-tuning: the vision tower and the projector stop requiring grad, but those `train_vision` trains."""
    trained = set(trained_vision_modules(model, train_vision))
    parts = vision_parts(model)
    for name in parts["projector"] + parts["tower"]:
        if name not in trained:
            model.get_submodule(name).requires_grad_(False)


def lora_targets(model: torch.nn.Module, requested: tuple[str, ...] | None) -> str:
    """peft's `target_modules` as a regex matching only linear layers inside the language model: `requested` leaf
    names (None: peft's defaults for the language model's architecture, else all its linear layers), and the
    output embedding when `requested` names it (lm_head: its LoRA adapter goes into the fused head as a low-rank
    update, prefuse.heads.head_of; tied to the input embedding, the adapter changes the output side only)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    name, language_model = language_model_of(model)
    linear = {n.rsplit(".", 1)[-1] for n, m in language_model.named_modules() if isinstance(m, torch.nn.Linear)}
    output_name = None
    if requested is None:
        text_type = model.config.get_text_config().model_type
        leaves = list(PEFT_DEFAULTS.get(text_type, sorted(linear)))
    elif list(requested) == ["all-linear"]:
        leaves = sorted(linear)
    else:
        leaves = list(requested)
        output = model.get_output_embeddings()
        output_name = next((n for n, m in model.named_modules() if m is output and n.rsplit(".", 1)[-1] in leaves),
                           None)
        if output_name is not None:
            leaves.remove(output_name.rsplit(".", 1)[-1])
        missing = sorted(set(leaves) - linear)
        if missing:
            raise ValueError(f"lora_target_modules: {missing} are not linear layers of the language model ({name}); "
                             f"it has {sorted(linear)} (and the output embedding)")
    inside = rf"{re.escape(name)}\.(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})" if leaves else None
    return "|".join(part for part in (inside, output_name and re.escape(output_name)) if part)


def image_token_id(model: torch.nn.Module) -> int | None:
    config = model.config
    return getattr(config, "image_token_id", getattr(config, "image_token_index", None))


def vision_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         **vision) -> torch.Tensor:
    """The language model's last hidden states [B, T, H] of a vision-language model (not a wrapper: the
    transformers model itself) for input_ids [B, T] whose image tokens take the features of `vision`'s images
    (pixel_values [n_images, ...] in row order, image_sizes, ... as the processor gives them)."""
    token = image_token_id(model)
    if "pixel_values" not in vision and token is not None and bool((input_ids == token).any()):
        raise ValueError("input_ids hold image tokens but no pixel_values came with them: build the batch with "
                         "its examples' images (prefuse.engine.data.images.vision_inputs)")
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **vision).last_hidden_state
