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
