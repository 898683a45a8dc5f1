"""Tokenized data reshaped for another objective: preference pairs as unpaired examples (KTO-style)."""
from __future__ import annotations

from typing import Any

from prefuse.engine.data.formats import PAIRED_FORMATS
from prefuse.engine.data.tokenize import TokenizedData

# the score of each side becomes the reward of the example made from it
_SIDES = (("chosen", True, "score_chosen"), ("rejected", False, "score_rejected"))


def pairs_to_completions(data: TokenizedData) -> TokenizedData:
    """Each pair -> two unpaired examples: (prompt, chosen, label True) and (prompt, rejected, label False), in that
    order, each with the pair's `where`, and `reward` = the pair's `score_chosen` / `score_rejected` where the pair
    has that score. Other pair columns (`preference_prob`, `reference_ids`) describe the pair and are dropped.
    The result's format is "unpaired"; skipped rows and truncation limits are kept."""
    if data.format not in PAIRED_FORMATS:
        raise ValueError(f"pairs_to_completions needs paired data, got the {data.format} format")
    examples = [_completion_example(pair, side, label, score)
                for pair in data.examples for side, label, score in _SIDES]
    return TokenizedData("unpaired", examples, data.skipped, data.max_length, data.max_prompt_length)


def _completion_example(pair: dict[str, Any], side: str, label: bool, score: str) -> dict[str, Any]:
    example = {"prompt_ids": pair["prompt_ids"], "completion_ids": pair[f"{side}_ids"], "label": label}
    if score in pair:
        example["reward"] = pair[score]
    if "images" in pair:  # the prompt's images (vision-language data)
        example["images"] = pair["images"]
    example["where"] = pair["where"]
    return example
