"""A small byte-level BPE tokenizer trained here on the shared preference data (no download), with BOS/EOS/PAD and a
strict chat template (roles must alternate, as many real templates demand)."""
from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('conversation roles must alternate') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _training_texts(lines_per_file: int = 100):
    for name in ("ultrafeedback_binarized_sample_train.jsonl", "hh_rlhf_harmless_base_test.jsonl",
                 "llamafactory_dpo_en_demo.jsonl"):
        with open(DATA_DIR / name, encoding="utf-8") as f:
            for line in itertools.islice(f, lines_per_file):
                yield from json.loads(line).values()


@functools.lru_cache(maxsize=1)
def build_tokenizer(vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """BPE (vocab ~500) with `<pad>`=0, `<s>`=1 (prepended to plain text), `</s>`=2 and CHAT_TEMPLATE."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_training_texts(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE, padding_side="right")


def save_tiny_llama(path, tokenizer, **config):
    """A randomly initialized 2-layer Llama (hidden 32) for `tokenizer`, saved with it under `path`; returns it."""
    import transformers

    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config}))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def save_tiny_llava(path, tokenizer, *, chat_template=None):
    """A randomly initialized tiny LLaVA (a 1-layer CLIP tower on 16x16 images in 8x8 patches: 4 image tokens per
    image, and the 2-layer Llama of save_tiny_llama) with its LlavaProcessor, saved under `path`. `<image>` is
    added to a copy of `tokenizer` (the fixture's own is cached); returns that copy."""
    import copy

    import torch
    import transformers

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                                      image_seq_length=4)
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
    transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 16},
                                                        crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template).save_pretrained(path)
    return tokenizer


def save_tiny_classifier(path, tokenizer, **config):
    """A tiny Llama sequence classifier with one logit (a reward model or, read over the pairwise template, a
    pairwise judge), initialized wide (initializer_range 0.2, score head std 1) so that its scores depend clearly
    on the whole text; saved with the tokenizer under `path`, which it returns."""
    import torch
    import transformers

    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, num_labels=1, initializer_range=0.2)
    torch.manual_seed(1)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**{**settings, **config}))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
