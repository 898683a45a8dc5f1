"""The judges of online training, behind one interface (`Judge`):

    judge.score(prompts, completions, **columns)     -> [N] float32 scores
    judge.compare(prompts, first, second, **columns) -> [N] float32 P(first > second)

    RewardFunctions   Python reward functions with TRL's signature, weighted and summed   --reward_funcs f.py:name
    RewardModelJudge  a Bradley-Terry reward model (a one-logit sequence classifier)        --reward_model_path DIR
    PairwiseJudge     a pairwise preference model over PAIRWISE_TEMPLATE (compare only)      --judge DIR
    VisionLanguageJudge  a vision-language model asked yes/no about a response with its images  --judge DIR
    RuleJudge         fn(prompt, completion) -> float; RULE_JUDGES["copy"]: the copy task     --judge copy

`make_judge` builds the one the flags ask for. Scores and probabilities come back on the CPU; every error is a
one-line `JudgeError` (a ValueError) that names the flag and the fix.
"""
from __future__ import annotations

from pathlib import Path

from prefuse.engine.judges.base import Judge, JudgeError
from prefuse.engine.judges.functions import RewardFunctions, load_reward_function
from prefuse.engine.judges.models import (
    PAIRWISE_TEMPLATE,
    PairwiseJudge,
    RewardModelJudge,
    pairwise_ids,
    reward_model_ids,
)
from prefuse.engine.judges.rules import RULE_JUDGES, RuleJudge, copy_prompts, copy_reward
from prefuse.engine.judges.vision_language import VLM_JUDGE_TEMPLATE, VisionLanguageJudge
from prefuse.engine.models.vision import is_vision_language

__all__ = ["Judge", "JudgeError", "RewardFunctions", "load_reward_function", "RewardModelJudge", "PairwiseJudge",
           "PAIRWISE_TEMPLATE", "VisionLanguageJudge", "VLM_JUDGE_TEMPLATE", "reward_model_ids", "pairwise_ids",
           "RuleJudge", "RULE_JUDGES", "copy_reward", "copy_prompts", "make_judge"]


def make_judge(reward_funcs=None, reward_weights=None, reward_model_path=None, judge=None, device="cpu",
               batch_size: int = 16) -> Judge:
    """The judge the flags ask for: exactly one of reward_funcs (`file.py:name` specs or callables, with
    reward_weights), reward_model_path (a reward model directory), judge (a pairwise model directory, or the name
    of a rule judge: one of RULE_JUDGES, or a vision-language model's directory)."""
    given = [flag for flag, value in (("reward_funcs", reward_funcs), ("reward_model_path", reward_model_path),
                                      ("judge", judge)) if value not in (None, [], "")]
    if not given:
        raise JudgeError(f"judge: no judge given (pass --reward_funcs file.py:name, --reward_model_path DIR, or "
                         f"--judge DIR|{'|'.join(RULE_JUDGES)})")
    if len(given) > 1:
        raise JudgeError(f"judge: {' and '.join('--' + g for g in given)} given together (pass exactly one judge)")
    if reward_weights is not None and reward_funcs in (None, [], ""):
        raise JudgeError("reward_funcs: reward_weights given without reward_funcs (weights weigh reward functions)")
    if reward_funcs not in (None, [], ""):
        return RewardFunctions.from_specs(reward_funcs, reward_weights)
    if reward_model_path is not None:
        return RewardModelJudge(reward_model_path, device=device, batch_size=batch_size)
    if isinstance(judge, str) and judge in RULE_JUDGES:
        return RULE_JUDGES[judge]()
    if not Path(judge).expanduser().is_dir():
        raise JudgeError(f"judge: {judge!r} is neither a rule judge ({', '.join(RULE_JUDGES)}) nor a directory "
                         f"(give a pairwise model's directory)")
    if _is_vision_language(Path(judge).expanduser()):
        return VisionLanguageJudge(judge, device=device, batch_size=batch_size)
    return PairwiseJudge(judge, device=device, batch_size=batch_size)


def _is_vision_language(where: Path) -> bool:
    """Whether a model directory's config describes a vision-language model (engine.vision's test)."""
    import transformers


    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError):
        return False  # the pairwise judge's loader says what is wrong with the directory
    return is_vision_language(config)
