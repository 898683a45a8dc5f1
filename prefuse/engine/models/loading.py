"""The models of a run: the policy (plain or with LoRA), its reference, and their decoders' hidden states.

prefuse never calls a model's lm_head: the decoder gives the last hidden states [B, T, H] and the fused head
(`prefuse.linear_logprobs`, `PreferenceLoss`) takes them through the output embedding chunk by chunk.

Labels follow the next-token layout of `prefuse.engine.data.collate_pairs`: `labels[:, t]` is the id of token
t + 1 when that token belongs to the response (the hidden state at t predicts it), `ignore_index` (-100) on the
positions that predict prompt tokens, on padding and at the last position.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from prefuse import heads
from prefuse.engine.models import vision
from prefuse.heads import causal_lm_of, head_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class ModelConfig:
    """What to load. attn_implementation None: "sdpa", or "eager" where the architecture has no sdpa (Gemma-2);
    "flash_attention_2" needs CUDA and flash_attn. lora_target_modules None: peft's defaults for the architecture,
    "all-linear" for one peft does not know; in a vision-language model only the language model's layers.
    train_vision: what of a vision-language model's vision side trains too (engine/models/vision.py)."""
    model_name_or_path: str
    ref_model_name_or_path: str | None = None   # without LoRA: the frozen reference (default: the policy's path)
    torch_dtype: str = "float32"                 # "float32" | "bfloat16" | "float16" | "auto"
    attn_implementation: str | None = None       # None | "sdpa" | "eager" | "flash_attention_2"
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | None = None
    gradient_checkpointing: bool = False
    train_vision: str = "none"                   # "none" | "projector" | "all" (projector and vision tower)


@dataclass
class Models:
    policy: torch.nn.Module            # a transformers causal LM (or vision-language model), or a PeftModel around one
    reference: torch.nn.Module | None  # None when the reference is the policy with its adapters disabled
    tokenizer: Any | None              # AutoTokenizer from the policy's directory when it has one, else None
    processor: Any | None = None       # a vision-language model's AutoProcessor (its tokenizer is `tokenizer`)


# -- loading ------------------------------------------------------------------------------------------------------

def check_model_dir(path: str, field: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        what = "does not exist" if not os.path.exists(path) else "has no config.json"
        raise ValueError(f"{field}: {path!r} {what}; pass a local directory written by save_pretrained "
                         f"(for a Hub model, download it first: `hf download <id> --local-dir <dir>`)")


def _attn_implementation(requested: str | None) -> str | None:
    """None lets transformers choose: "sdpa" where the architecture supports it, else "eager" (Gemma-2)."""
    if requested is None:
        return None
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation: {requested!r} is not one of {ATTN_IMPLEMENTATIONS}")
    if requested == "flash_attention_2" and not (importlib.util.find_spec("flash_attn") and torch.cuda.is_available()):
        raise ValueError("attn_implementation: 'flash_attention_2' needs CUDA and the flash_attn package; "
                         "install flash-attn on a GPU machine or use 'sdpa'")
    return requested


def check_device(device) -> None:
    """A ValueError naming `device` when this torch cannot train on it: CUDA asked of a build without CUDA, or of a
    machine without a visible GPU, or a GPU index past the last."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: {device!r} is not a torch device; pass auto, cpu, cuda or cuda:<index>") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device: {str(device)!r} but {why}; pass --device cpu (or auto: CUDA when there is one)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {str(device)!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"pass cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_weight_files(path: str, field: str) -> None:
    """A ValueError naming the file when a safetensors file of model directory `path` does not open (cut short by
    an interrupted copy or download, or corrupt): transformers would stop with the reader's traceback."""
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            safe_open(str(file), framework="pt").__exit__(None, None, None)
        except SafetensorError as error:
            raise ValueError(f"{field}: {file} is truncated or corrupt ({error}); copy or download the model "
                             f"again, or re-save it with save_pretrained") from None


def _shape_mismatch(path: str, auto, config) -> str:
    """The first weight whose shape in the directory's safetensors files differs from the one config.json gives
    it, as `name: [..] in <file>, [..] by config.json`, or "" when none is found."""
    with torch.device("meta"):
        expected = {name: list(t.shape) for name, t in auto.from_config(config).state_dict().items()}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                stored = list(handle.get_slice(name).get_shape())
                if name in expected and expected[name] != stored:
                    return f"{name}: {stored} in {file.name}, {expected[name]} by config.json"
    return ""


def _load_causal_lm(path: str, cfg: ModelConfig, device, field: str = "model_name_or_path") -> torch.nn.Module:
    """A causal LM, or a vision-language model (`AutoModelForImageTextToText`) when the config has a vision part.
    Weight files that are cut short or whose shapes differ from config.json are ValueErrors naming the file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if cfg.torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype: {cfg.torch_dtype!r} is not one of {tuple(DTYPES)}")
    attn = _attn_implementation(cfg.attn_implementation)
    check_weight_files(path, field)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    multimodal = vision.is_vision_language(config)
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=DTYPES[cfg.torch_dtype], local_files_only=True,
                                     **({"attn_implementation": attn} if attn else {}))
    except RuntimeError as error:
        if "mismatched" not in str(error) and "size mismatch" not in str(error):
            raise
        mismatch = _shape_mismatch(path, auto, config) or "a weight's shape differs"
        raise ValueError(f"{field}: {path}/config.json does not match its weights ({mismatch}); use the config.json "
                         f"saved with these weights") from None
    return model.to(device)


def check_vocabulary(model: torch.nn.Module, tokenizer, path: str, field: str = "model_name_or_path") -> None:
    """A ValueError when the tokenizer has more tokens than the model's input embeddings have rows: a token id past
    the last row would stop training at its first batch (IndexError) after the data is read."""
    if tokenizer is None or model.get_input_embeddings() is None:
        return
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"{field}: the tokenizer has {len(tokenizer)} tokens but the model in {path} embeds only "
                         f"{rows} (vocab_size); resize the model's embeddings to the tokenizer "
                         f"(model.resize_token_embeddings({len(tokenizer)}), then save_pretrained) or use the "
                         f"model's own tokenizer")


def lora_targets(model: torch.nn.Module, requested: tuple[str, ...] | None) -> list[str] | str:
    if vision.is_vision_language(model.config):  # the language model's layers only, never the vision tower's
        return vision.lora_targets(model, requested)
    if requested is not None:
        return list(requested)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    # "all-linear" leaves the output embedding out, as the fused head needs
    return PEFT_DEFAULTS.get(model.config.model_type, "all-linear")


def _add_lora(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    trained_vision = (vision.trained_vision_modules(model, cfg.train_vision)
                      if vision.is_vision_language(model.config) else [])
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=lora_targets(model, cfg.lora_target_modules),
                      modules_to_save=trained_vision or None)
    return get_peft_model(model, lora)


def load_tokenizer(path: str):
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_models(cfg: ModelConfig, *, device="cpu", need_reference: bool = True) -> Models:
    """The policy (train mode; LoRA adapters when `cfg.use_peft`, then only they require grad), the reference
    (eval mode, frozen) and the policy directory's tokenizer.

    The reference: with LoRA, None (the policy with its adapters disabled, which is the base model exactly) unless
    `ref_model_name_or_path` names another directory; without LoRA, a separate copy loaded from
    `ref_model_name_or_path or model_name_or_path`. None when `need_reference` is False.
    Local directories only (nothing is downloaded): a missing one, or one without config.json, is a ValueError.
    """
    check_model_dir(cfg.model_name_or_path, "model_name_or_path")
    check_device(device)
    ref_path = cfg.ref_model_name_or_path or cfg.model_name_or_path
    separate_reference = need_reference and not (cfg.use_peft and ref_path == cfg.model_name_or_path)
    if separate_reference:
        check_model_dir(ref_path, "ref_model_name_or_path")  # fail before the policy's weights are read

    policy = _load_causal_lm(cfg.model_name_or_path, cfg, device)
    multimodal = vision.is_vision_language(policy.config)
    processor = vision.load_processor(cfg.model_name_or_path) if multimodal else None
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(cfg.model_name_or_path)
    check_vocabulary(policy, tokenizer, cfg.model_name_or_path)  # before the reference and the data are read
    if cfg.train_vision != "none" and not multimodal:
        raise ValueError(f"train_vision: {cfg.model_name_or_path} is a text model, it has no vision part to train")
    if multimodal and not cfg.use_peft:
        vision.freeze_vision(policy, cfg.train_vision)
    if cfg.gradient_checkpointing:
        # non-reentrant: gradients reach LoRA weights even though the embeddings' outputs do not require grad
        non_reentrant = {"use_reentrant": False}
        if hasattr(policy, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        policy.config.use_cache = False
    if cfg.use_peft:
        policy = _add_lora(policy, cfg)
        head_of(policy)  # an lm_head the fused head cannot compute (a LoRA variant on it) is refused here
    policy.train()

    reference = None
    if separate_reference:
        reference = _load_causal_lm(ref_path, cfg, device, "ref_model_name_or_path")
        check_vocabulary(reference, tokenizer, ref_path, "ref_model_name_or_path")
        reference.requires_grad_(False)
        reference.eval()
    return Models(policy=policy, reference=reference, tokenizer=tokenizer, processor=processor)


# -- hidden states and the head -----------------------------------------------------------------------------------

# the architectures whose attention masks follow packed position ids (transformers' create_causal_mask and
# create_sliding_window_causal_mask: a restart of the position ids starts a new sequence), each checked against its
# padded batch in tests/test_packing.py, under these attention implementations
PACKED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma2", "phi")
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2")


def check_packable(model: torch.nn.Module) -> None:
    """ValueError in one line unless `model` takes packed sequences (padding_free): a text decoder of
    PACKED_MODEL_TYPES under one of PACKED_ATTENTION."""
    causal_lm = causal_lm_of(model)
    config = causal_lm.config
    if vision.is_vision_language(config):
        raise ValueError(f"padding_free: {type(causal_lm).__name__} is a vision-language model, whose image tokens "
                         f"are placed by the padded rows; train it without padding_free")
    if config.model_type not in PACKED_MODEL_TYPES:
        raise ValueError(f"padding_free: model type {config.model_type!r} is not one whose packed-sequence masks "
                         f"are checked ({', '.join(PACKED_MODEL_TYPES)}); train it without padding_free")
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKED_ATTENTION:
        raise ValueError(f"padding_free: attn_implementation {attention!r} does not mask packed sequences here; use "
                         f"one of {', '.join(PACKED_ATTENTION)}")


def packed_row_tokens(model: torch.nn.Module, width: int, requested: int | None = None) -> int | None:
    """How wide packed rows may be (engine/data/packing.py's row_tokens): `requested` when given; else one row
    (None) under flash-attention, whose varlen kernel does no work across sequences, and under sdpa and eager,
    which compute a row's whole score matrix under the mask, rows no wider than the padded batch's `width` (never
    more positions nor attention work than the padded batch)."""
    if requested is not None:
        return requested
    attention = getattr(causal_lm_of(model).config, "_attn_implementation", None)
    return None if attention == "flash_attention_2" else width


def decoder_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None, *, position_ids: torch.Tensor | None = None,
                          **vision_inputs) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H] (after its final norm) for input_ids, attention_mask [B, T].

    Runs only the decoder (`get_decoder()`): the lm_head is never called, so no [B, T, V] logits exist. Works for a
    causal LM and a PeftModel with LoRA (its layers are inside the decoder), with gradient checkpointing too. A
    vision-language model runs its multimodal forward up to the language model's final norm, with the batch's
    `vision_inputs` (pixel_values [n_images, ...] of the rows' images in row order, image_sizes, ...:
    `Batch.vision`); see engine/models/vision.py. Packed sequences (engine/data/packing.py): input_ids and
    position_ids [R, L] of packed rows, attention_mask None; the model's mask follows the position ids
    (check_packable).
    """
    causal_lm = causal_lm_of(model)
    if position_ids is not None:
        if attention_mask is not None:
            raise ValueError("position_ids: packed rows take no attention_mask (their position ids say where each "
                             "sequence starts)")
        if vision_inputs:
            raise ValueError(f"{sorted(vision_inputs)}: packed rows take no vision inputs")
        return causal_lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
    if vision.is_vision_language(causal_lm.config):
        return vision.vision_hidden_states(causal_lm, input_ids, attention_mask, **vision_inputs)
    if vision_inputs:
        raise ValueError(f"{sorted(vision_inputs)} given to a text model ({type(causal_lm).__name__})")
    decoder = causal_lm.get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode for the duration (no dropout in the reference), then every module's own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def reference_hidden_states(models: Models, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            **inputs) -> torch.Tensor:
    """The reference's last hidden states [B, T, H], without gradient and in eval mode: the separate reference
    model, or the policy with its LoRA adapters disabled (the base model exactly). inputs: decoder_hidden_states'
    (position_ids of packed rows, vision inputs)."""
    with torch.no_grad():
        if models.reference is not None:
            return decoder_hidden_states(models.reference, input_ids, attention_mask, **inputs)
        if not hasattr(models.policy, "disable_adapter"):
            raise ValueError("no reference: load_models(need_reference=True) without LoRA loads one")
        with models.policy.disable_adapter(), eval_mode(models.policy):
            return decoder_hidden_states(models.policy, input_ids, attention_mask, **inputs)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, *, ignore_index: int = -100,
                   **vision_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob sums [B] (float32, differentiable) and label counts [B] of `labels` [B, T] in the
    next-token layout (module docstring), through the fused head: no [B, T, V] logits. vision_inputs: a
    vision-language model's (decoder_hidden_states)."""
    hidden = decoder_hidden_states(model, input_ids, attention_mask, **vision_inputs)
    return heads.sequence_logps(hidden, head_of(model), labels, ignore_index=ignore_index)


def load_generator(path: str, base: str | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a model directory, or a LoRA adapter directory on its base model (the
    tokenizer from the adapter directory when it has one, else the base's)."""
    from transformers import AutoModelForCausalLM

    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        base = base or json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"base: {path} is a LoRA adapter without base_model_name_or_path; pass --base DIR")
        check_model_dir(base, "base")
        check_weight_files(base, "base")
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, local_files_only=True), path)
        tokenizer = load_tokenizer(path) or load_tokenizer(base)
    else:
        check_model_dir(path, "model")
        check_weight_files(path, "model")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"model: {path} has no tokenizer files (nor has its base)")
    check_vocabulary(model, tokenizer, base if adapter.is_file() else path, "model")
    return model.to(device).eval(), tokenizer
