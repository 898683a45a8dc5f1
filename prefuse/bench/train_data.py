"""The preference pairs of `prefuse bench --task train`'s built shape, generated here: the bench needs no file outside
the package (an installed prefuse runs it as it is), and the same seed gives the same pairs, tokenizer and batch
on every machine.

    pairs = generated_pairs(count=4, max_length=256)       # [{"prompt": "...?\n", "chosen": ..., "rejected": ...}]
    texts = tokenizer_texts(max_length=256)                 # what the bench's byte-level BPE is trained on

The text is sentences over a fixed list of common English words (WORDS, written for prefuse), drawn from a seeded
generator. The lengths follow the shape's max_length as the bench's old sample of chat data did: a prompt of a
quarter to a half of max_length characters (cut at a word, a question ending on a newline, so prompt and response
tokenize apart), responses of two to five times max_length characters, so that with a word-level vocabulary a
sequence mostly fits max_length tokens and sometimes is cut. The pairs carry no preference a model could learn
beyond its batch: the bench measures training steps, not what they teach.
"""
from __future__ import annotations

import random

SEED = 0
TOKENIZER_TEXTS = 512  # extra generated texts the tokenizer is trained on, beside the pairs

WORDS = tuple("""
the a an and or but so if when while because after before then than as of in on at to from with without about
over under between through into onto near far here there this that these those it its they them their we our you
your he she his her one two three four five six seven eight nine ten first second last next every each some many
few more most less other same different new old good bad small large long short high low early late fast slow warm
cold bright dark quiet loud simple hard easy clear true false open closed full empty young whole real common
is are was were be been has have had do does did can could will would should may might must make made take took
give gave find found keep kept show showed tell told ask asked need needed use used try tried start started stop
stopped turn turned move moved hold held bring brought write wrote read learn learned build built grow grew
change changed follow followed carry carried answer explain compare measure count check choose chose help helped
river mountain forest garden village city road bridge house window door table chair kitchen market school library
museum station harbor island desert valley field farm orchard meadow lake ocean shore cloud storm rain snow wind
sun moon star planet light shadow fire stone iron glass paper wood bread apple honey salt water tea coffee milk
cheese soup rice bean seed flower tree leaf root branch bird fish horse dog cat bee owl fox wolf bear deer
morning evening night day week month year season spring summer autumn winter hour minute moment story song
picture map letter book word number question reason idea plan method result problem example detail part piece
group family friend teacher student doctor farmer baker painter sailor traveler neighbor child people person
""".split())


def sentence(rng: random.Random, words: int) -> str:
    """`words` words drawn from WORDS, the first capitalized, a comma now and then, a full stop at the end."""
    drawn = [rng.choice(WORDS) for _ in range(words)]
    text = " ".join(w + ("," if k < words - 1 and rng.random() < 0.08 else "") for k, w in enumerate(drawn))
    return text[0].upper() + text[1:] + "."


def text_of(rng: random.Random, chars: int) -> str:
    """Sentences of 4 to 16 words until the text reaches `chars` characters."""
    parts, size = [], 0
    while size < chars:
        parts.append(sentence(rng, rng.randint(4, 16)))
        size += len(parts[-1]) + 1
    return " ".join(parts)


def question(rng: random.Random, max_chars: int) -> str:
    """A prompt: words up to `max_chars` characters (at least one word), a question mark, a newline."""
    words = text_of(rng, max_chars).rstrip(".").split()
    kept = words[:1]
    for word in words[1:]:
        if len(" ".join(kept + [word])) + 1 > max_chars:
            break
        kept.append(word)
    return " ".join(kept).rstrip(",") + "?\n"


def generated_pairs(count: int, max_length: int, seed: int = SEED) -> list[dict]:
    """`count` pairs in TRL's standard format, the lengths drawn for `max_length` (the module docstring)."""
    rng = random.Random(f"prefuse-bench-pairs-{seed}-{max_length}")
    pairs = []
    while len(pairs) < count:
        prompt = question(rng, rng.randint(max(8, max_length // 4), max(8, max_length // 2)))
        chosen, rejected = (text_of(rng, rng.randint(2 * max_length, 5 * max_length)) for _ in range(2))
        if chosen != rejected:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def tokenizer_texts(max_length: int, seed: int = SEED) -> list[str]:
    """The texts the built tokenizer is trained on: the first TOKENIZER_TEXTS generated pairs' prompts and
    responses (the bench's pairs are among them)."""
    return [text for pair in generated_pairs(TOKENIZER_TEXTS, max_length, seed)
            for text in (pair["prompt"], pair["chosen"], pair["rejected"])]
