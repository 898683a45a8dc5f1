"""Judges that are models: a Bradley-Terry reward model, and a pairwise preference model.

    RewardModelJudge(path)   AutoModelForSequenceClassification, num_labels=1: score = the logit of prompt +
                             completion; compare = sigmoid(score(first) - score(second))
    PairwiseJudge(path)      AutoModelForSequenceClassification, num_labels=1, reading PAIRWISE_TEMPLATE:
                             compare = P(first > second), symmetrized; it does not score

Both load a local directory (a model saved with its tokenizer, e.g. by `prefuse train-rm`) and run batched, without
gradient, in eval mode, right-padded with an attention mask. The texts they read are built by `reward_model_ids` and
`pairwise_ids`: a trainer that writes models for these judges tokenizes its training pairs with the same functions.
Padding: the tokenizer's pad token, else its EOS (TRL's RewardTrainer); the model's `config.pad_token_id` is set to
it, since a sequence-classification head pools the last token that is not padding.
"""
from __future__ import annotations

from pathlib import Path

import torch

from prefuse.engine.judges.base import JudgeError, bradley_terry, check_rows, is_conversation, plain_prompt

# A pairwise model reads one text per (prompt, first, second) and its logit is log-odds of P(first > second).
PAIRWISE_TEMPLATE = "{prompt} [A] {first} [B] {second}"


def _with_eos(tokenizer, text: str) -> str:
    eos = tokenizer.eos_token
    return text + eos if eos and not text.endswith(eos) else text


def reward_model_ids(tokenizer, prompt, completion: str) -> list[int]:
    """The token ids a reward model scores for (prompt, completion), as TRL's RewardTrainer lays out its training
    pairs: a message-list prompt with a tokenizer that has a chat template -> the template applied to prompt +
    [{"role": "assistant", "content": completion}]; else the plain text prompt + completion + EOS, tokenized with
    the tokenizer's special tokens (BOS). A message list without a chat template reads as `plain_prompt`."""
    if is_conversation(prompt) and getattr(tokenizer, "chat_template", None):
        messages = list(prompt) + [{"role": "assistant", "content": completion}]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(_with_eos(tokenizer, plain_prompt(prompt) + completion))["input_ids"]


def pairwise_ids(tokenizer, prompt, first: str, second: str) -> list[int]:
    """The token ids a pairwise judge reads: PAIRWISE_TEMPLATE filled with the plain prompt (`plain_prompt`: a
    message list as "role: content" lines) and the two completions, + EOS, with the tokenizer's special tokens."""
    text = PAIRWISE_TEMPLATE.format(prompt=plain_prompt(prompt), first=first, second=second)
    return tokenizer(_with_eos(tokenizer, text))["input_ids"]


def load_classifier(path, device="cpu", dtype=None, flag: str = "reward_model_path"):
    """(model, tokenizer, pad_id) from a local directory holding a one-logit sequence classifier and its tokenizer;
    JudgeError (`{flag}: ...`) for a directory that is not one."""
    import transformers

    where = Path(path).expanduser()
    if not where.is_dir():
        raise JudgeError(f"{flag}: {path} is not a directory (give the local directory of a model saved with "
                         f"save_pretrained, e.g. by `prefuse train-rm`)")
    if not (where / "config.json").is_file():
        raise JudgeError(f"{flag}: {path} has no config.json (give the directory that save_pretrained wrote, "
                         f"e.g. the output_dir of `prefuse train-rm`)")
    config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
    if config.num_labels != 1 and any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise JudgeError(f"{flag}: {path} is a classifier with num_labels={config.num_labels}; a judge reads "
                         f"one logit (train it with num_labels=1)")
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=1, local_files_only=True, output_loading_info=True,
            **({"dtype": dtype} if dtype is not None else {}))
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as e:
        raise JudgeError(f"{flag}: loading {path} raised {type(e).__name__}: {' '.join(str(e).split())}") from e
    missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
    if missing:  # e.g. a causal LM checkpoint: its score head would be random, its scores noise
        raise JudgeError(f"{flag}: {path} is not a trained one-logit classifier: its checkpoint lacks "
                         f"{', '.join(missing)} (architectures {config.architectures}); train one with "
                         f"`prefuse train-rm`")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise JudgeError(f"{flag}: {path}'s tokenizer has neither a pad nor an EOS token (set pad_token)")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval().requires_grad_(False), tokenizer, tokenizer.pad_token_id


class _Classifier:
    """A one-logit sequence classifier run over token id lists, batched and right-padded."""

    flag = "reward_model_path"  # the flag that names the directory, in errors

    def __init__(self, path, device="cpu", batch_size: int = 16, dtype=None):
        if batch_size < 1:
            raise JudgeError(f"judge: batch_size {batch_size} must be at least 1")
        self.path, self.device, self.batch_size = str(path), torch.device(device), batch_size
        self.model, self.tokenizer, self.pad_id = load_classifier(path, device, dtype, self.flag)

    @torch.inference_mode()
    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """[len(rows)] float32 logits on the CPU. Each distinct row runs once (a text judged against itself gets
        exactly equal logits on both sides, not ones that differ by the batch's padding), longest first so that a
        batch pads little."""
        unique = list(dict.fromkeys(tuple(r) for r in rows))
        order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
        logits = torch.zeros(len(unique), dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(unique[batch[0]])
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, u in enumerate(batch):
                input_ids[i, :len(unique[u])] = torch.tensor(unique[u], dtype=torch.long)
                attention_mask[i, :len(unique[u])] = 1
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
            logits[batch] = out.logits[:, 0].float().cpu()
        position = {row: i for i, row in enumerate(unique)}
        return logits[[position[tuple(r)] for r in rows]] if rows else logits


class RewardModelJudge(_Classifier):
    """A Bradley-Terry reward model: score = its logit of `reward_model_ids(prompt, completion)`."""

    def score(self, prompts: list, completions: list[str], **columns) -> torch.Tensor:
        check_rows(prompts, completions, columns)
        return self.logits([reward_model_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)])

    def compare(self, prompts: list, first: list[str], second: list[str], **columns) -> torch.Tensor:
        check_rows(prompts, first, columns)
        check_rows(prompts, second, {})
        scores = self.score(list(prompts) * 2, list(first) + list(second))
        return bradley_terry(scores[: len(prompts)], scores[len(prompts):])


class PairwiseJudge(_Classifier):
    """A pairwise preference model: its logit of `pairwise_ids(prompt, first, second)` is the log-odds that first
    beats second. compare averages both orders, (P(a > b) + 1 - P(b > a)) / 2, so compare(a, b) = 1 - compare(b, a)
    and a completion against itself gets exactly 1/2 whatever the model's position bias."""

    flag = "judge"

    def compare(self, prompts: list, first: list[str], second: list[str], **columns) -> torch.Tensor:
        check_rows(prompts, first, columns)
        check_rows(prompts, second, {})
        rows = ([pairwise_ids(self.tokenizer, p, a, b) for p, a, b in zip(prompts, first, second)]
                + [pairwise_ids(self.tokenizer, p, b, a) for p, a, b in zip(prompts, first, second)])
        probs = torch.sigmoid(self.logits(rows))
        forward, backward = probs[: len(prompts)], probs[len(prompts):]
        return 0.5 + (forward - backward) / 2  # = (forward + 1 - backward) / 2; exactly 1/2 when they agree

    def score(self, prompts: list, completions: list[str], **columns) -> torch.Tensor:
        raise JudgeError("judge: pairwise judges compare; they do not score (use --reward_model_path or "
                         "--reward_funcs for an objective that needs scores)")
