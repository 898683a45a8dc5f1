"""Online BDHS: y~- regenerated from the current policy during training, for an online batch source (Avg-DPO's
`generated_rejected` in engine/online/source.py calls `bdhs_rejected`)."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from prefuse.engine.methods.bdhs.masking import maskable_ids
from prefuse.engine.methods.bdhs.sampler import BDHSConfig, BDHSExample, bdhs_generate, summary, text_tokenizer
from prefuse.engine.models.embedders import Embedder, load_embedder


def example_from_ids(tokenizer, example: dict, key: int, image_token_id: int | None = None) -> BDHSExample:
    """A BDHSExample from a tokenized example ({"prompt_ids", "chosen_ids", ...}, engine/data): y+ is chosen_ids
    decoded (its EOS dropped). Maskable: `bdhs_maskable` when the example has it; else the image tokens when the
    prompt has `image_token_id`; else (the text analogue on ids, where the template cannot be told apart) every
    non-special prompt token. Extra model inputs: the example's `model_inputs` dict, else the pixel values of its
    `images` (the data.ExampleImages that tokenizing with a processor gives), else its `pixel_values` and
    `image_sizes` tensors."""
    prompt_ids = list(example["prompt_ids"])
    chosen_ids = [t for t in example["chosen_ids"] if t != tokenizer.eos_token_id]
    chosen = tokenizer.decode(chosen_ids, skip_special_tokens=True)
    maskable = example.get("bdhs_maskable")
    maskable = list(maskable) if maskable is not None else maskable_ids(tokenizer, prompt_ids, image_token_id)
    images = example.get("images")  # data.ExampleImages of tokenize_preferences / tokenize_prompts (a VLM's)
    if example.get("model_inputs"):
        inputs = example["model_inputs"]
    elif images is not None and hasattr(images, "model_inputs") and len(images):
        inputs = images.model_inputs()
    else:
        inputs = {k: example[k] for k in ("pixel_values", "image_sizes") if isinstance(example.get(k), torch.Tensor)}
    return BDHSExample(prompt_ids, chosen, maskable, dict(inputs), key)


def model_image_token_id(model) -> int | None:
    """The image token id of a vision-language model's config (LLaVA: `image_token_id`), None for a text model."""
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def bdhs_rejected(models, tokenizer, examples: Sequence[dict], *, seed: int, rollout=None, eos_id: int | None = None,
                  pad_id: int | None = None, cfg: BDHSConfig | None = None, embedder: Embedder | str | None = None,
                  image_token_id: int | None = None) -> tuple[list[list[int]], dict[str, float]]:
    """Online BDHS: y~- of each tokenized example from the current policy -> (completion ids, metrics).

    models: engine.model.Models (its policy generates, LoRA adapters on) or the model itself; examples: dicts with
    prompt_ids and chosen_ids (y+), see `example_from_ids`; rollout: a RolloutConfig whose max_new_tokens,
    temperature and top_p replace cfg's; cfg: rho_th, epsilon_s, n_bdhs (default BDHSConfig()); embedder: an
    Embedder or a --embedder spec (default the packaged all-MiniLM-L6-v2, loaded once per process). Each
    completion ends with EOS unless the unguided attempt ran out of tokens. Metrics: `bdhs/attempts` (mean),
    `bdhs/similarity` (mean phi of the kept y~-), `bdhs/filtered` (the share the filter accepted, not the last
    unguided attempt)."""
    policy = getattr(models, "policy", models)
    tokenizer = text_tokenizer(tokenizer)
    cfg = cfg or BDHSConfig()
    if rollout is not None:
        cfg = replace(cfg, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p)
    if embedder is None or isinstance(embedder, str):
        embedder = load_embedder(embedder)
    image_token_id = model_image_token_id(policy) if image_token_id is None else image_token_id
    items = [example_from_ids(tokenizer, e, key, image_token_id) for key, e in enumerate(examples)]
    results = bdhs_generate(policy, tokenizer, items, cfg, embedder, seed=seed, eos_id=eos_id, pad_id=pad_id)
    return [r.rejected_ids for r in results], summary(results, cfg)
