"""Local language models standing in for the rule-based parties (quality is the models'; the toy's rules are the
defaults). Each reads a local directory and never downloads.

    LMCustomer(path)          a causal LM: the decision A/B/C/D of highest log-probability after CUSTOMER_PROMPT (the
                              paper's next-token choice restricted to the allowed answers), scored through the fused
                              head (`engine.model.sequence_logps`)
    LMWorldModel(path)        a causal LM: greedily continues WORLD_MODEL_PROMPT, which holds the option table, the
                              requirement and the choice, never the dialogue; its outcome is the prompt's last
                              sentence ("You bought option X for P and received it") plus the continuation
    JudgeEvaluator(judge)     any judge of `engine/judges` (a reward model: `make_judge(reward_model_path=DIR)`, a
                              pairwise model: `make_judge(judge=DIR)`): rate = judge.score(EVALUATOR_QUESTION, view),
                              prefer = judge.compare(EVALUATOR_QUESTION, first view, second view)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from prefuse.engine.judges import JudgeError
from prefuse.engine.methods.rlhs.environment import NOTHING, OPTION_NAMES, Scenario, customer_request, table_text
from prefuse.engine.methods.rlhs.rollouts import generate_texts
from prefuse.engine.models.loading import check_model_dir, load_generator, load_tokenizer, sequence_logps

CUSTOMER_PROMPT = ("{request}\nconsultant : {response}\nYou are the customer. Which option do you buy? Answer A, B or "
                   "C, or D to buy nothing.\nAnswer :")
WORLD_MODEL_PROMPT = ("{table}\nThe customer needed {required} and chose option {name} . Describe what they "
                      "received.\n")
OUTCOME_PREFIX = "You bought option {name} for {price} and received it"
EVALUATOR_QUESTION = "Rate the customer's satisfaction with this consultation."
DECISIONS = (*OPTION_NAMES, NOTHING)


def load_causal_lm(path: str, field: str, device="cpu"):
    """(model in eval mode, tokenizer) of a local causal LM directory (or a LoRA adapter directory on its base);
    ValueError naming `field` when the directory or its tokenizer is missing."""

    if not (Path(path) / "adapter_config.json").is_file():
        check_model_dir(path, field)
        if load_tokenizer(path) is None:
            raise ValueError(f"{field}: {path} has no tokenizer files (save the tokenizer beside the model: "
                             f"tokenizer.save_pretrained({path!r}))")
    try:
        model, tokenizer = load_generator(path, device=device)
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from error
    return model.requires_grad_(False), tokenizer


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: it has neither a pad nor an EOS token (set pad_token)")
    return pad


class LMCustomer:
    """The decision of highest summed log-probability of " A", " B", " C", " D" after CUSTOMER_PROMPT."""

    def __init__(self, path: str, device="cpu", batch_size: int = 32):
        self.model, self.tokenizer = load_causal_lm(path, "customer", device)
        self.batch_size = batch_size

    @torch.no_grad()
    def choice_logps(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), 4] log-probabilities of each decision's tokens after each prompt (fused head)."""

        tok, pad = self.tokenizer, _pad_id(self.tokenizer)
        answers = [tok(" " + d, add_special_tokens=False)["input_ids"] for d in DECISIONS]
        rows, starts = [], []
        for ids in tok(prompts)["input_ids"]:
            for answer in answers:
                rows.append(list(ids) + answer)
                starts.append(len(ids))
        device = next(self.model.parameters()).device
        out = []
        for b in range(0, len(rows), self.batch_size * len(DECISIONS)):
            chunk, first = rows[b:b + self.batch_size * len(DECISIONS)], starts[b:b + self.batch_size * len(DECISIONS)]
            width = max(len(r) for r in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
            for i, (row, start) in enumerate(zip(chunk, first)):
                input_ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
                labels[i, start - 1:len(row) - 1] = torch.tensor(row[start:])  # next-token layout
            sums, _ = sequence_logps(self.model, input_ids.to(device), mask.to(device), labels.to(device))
            out.append(sums.float().cpu())
        return torch.cat(out).view(len(prompts), len(DECISIONS))

    def decide(self, scenarios: list[Scenario], responses: list[str]) -> list[str]:
        prompts = [CUSTOMER_PROMPT.format(request=customer_request(s), response=" ".join(r.split()))
                   for s, r in zip(scenarios, responses, strict=True)]
        if not prompts:
            return []
        return [DECISIONS[i] for i in self.choice_logps(prompts).argmax(dim=1).tolist()]


class LMWorldModel:
    """The outcome of a purchase from the table and the choice: OUTCOME_PREFIX continued greedily by the model."""

    def __init__(self, path: str, device="cpu", max_new_tokens: int = 24, batch_size: int = 32):
        self.model, self.tokenizer = load_causal_lm(path, "world_model", device)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def outcomes(self, scenarios: list[Scenario], decisions: list[str]) -> list[str]:
        texts = ["You decided not to buy anything ."] * len(scenarios)
        bought = [i for i, (s, d) in enumerate(zip(scenarios, decisions, strict=True)) if s.option(d) is not None]
        prefixes = {i: OUTCOME_PREFIX.format(name=decisions[i], price=scenarios[i].option(decisions[i]).price)
                    for i in bought}
        prompts = [WORLD_MODEL_PROMPT.format(table=table_text(scenarios[i]), required=scenarios[i].required,
                                             name=decisions[i]) + prefixes[i] for i in bought]
        if prompts:
            continued = generate_texts(self.model, self.tokenizer, prompts, temperature=0.0,
                                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
            for i, (text,) in zip(bought, continued):
                texts[i] = f"{prefixes[i]} {' '.join(text.split())}".strip()
        return texts


class JudgeEvaluator:
    """An `engine.judges.Judge` as the evaluator. A judge that only compares (a pairwise model) rates NaN."""

    def __init__(self, judge):
        self.judge = judge

    def rate(self, views: list[str]) -> list[float]:
        try:
            return self.judge.score([EVALUATOR_QUESTION] * len(views), list(views)).tolist()
        except JudgeError:
            return [math.nan] * len(views)

    def prefer(self, first: list[str], second: list[str]) -> list[float]:
        return self.judge.compare([EVALUATOR_QUESTION] * len(first), list(first), list(second)).tolist()
