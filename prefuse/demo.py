"""`prefuse demo`: the embedded default, runnable on a CPU in about a minute with nothing downloaded.

Until the training engine lands this demonstrates the fused head itself:
1. trains a small next-token model on a synthetic Markov-chain language with `linear_cross_entropy` and shows the
   loss approach the chain's true entropy rate, with the token statistics (entropy, top-k mass) of its head;
2. measures, each in a fresh process, the extra peak memory and time of one forward+backward of the fused head
   against the logits-materializing path at a larger shape.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import prefuse


def markov_chain(vocab: int, branching: int, seed: int) -> torch.Tensor:
    """transition [V, V]: each token has `branching` likely successors (a learnable, low-entropy language)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.full((vocab, vocab), -6.0)
    succ = torch.randint(0, vocab, (vocab, branching), generator=gen)
    logits.scatter_(1, succ, torch.randn(vocab, branching, generator=gen) * 0.5 + 2.0)
    return torch.softmax(logits, dim=-1)


def sample(transition: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, transition.shape[0], (batch,), generator=gen)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(transition[tokens[:, t - 1]], 1, generator=gen).squeeze(1)
    return tokens


class TinyLM(torch.nn.Module):
    """Embedding -> MLP -> hidden [B, T, H]; the head weight is the tied embedding [V, H]."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        torch.nn.init.normal_(self.embed.weight, std=0.02)  # small tied head: near-uniform initial predictions
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(4 * hidden, hidden))
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return self.norm(x + self.mlp(x))


def entropy_rate(transition: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean entropy (nats) of the true next-token distribution at the positions of `tokens`."""
    p = transition[tokens[:, :-1]]
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def train(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    transition = markov_chain(args.vocab, 4, args.seed)
    model = TinyLM(args.vocab, args.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    held_out = sample(transition, 16, args.seq_len, gen)
    floor = entropy_rate(transition, held_out)

    def held_out_stats():
        with torch.no_grad():
            hidden = model(held_out)[:, :-1]
            labels = held_out[:, 1:]
            loss = prefuse.linear_cross_entropy(hidden, model.embed.weight, labels)
            stats = prefuse.linear_token_stats(hidden, model.embed.weight, labels, top_k=10).mean()
        return float(loss), stats

    before_loss, before_stats = held_out_stats()
    print(f"training a tied-head model (V={args.vocab}, H={args.hidden}) for {args.steps} steps; "
          f"the language's entropy rate is {floor:.3f} nats/token")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens = sample(transition, args.batch_size, args.seq_len, gen)
        labels = tokens[:, 1:].clone()
        labels[:, : args.seq_len // 4] = -100  # a "prompt" whose tokens carry no loss, dropped before the matmul
        hidden = model(tokens)[:, :-1]
        loss = prefuse.linear_cross_entropy(hidden, model.embed.weight, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}")
    after_loss, after_stats = held_out_stats()
    print(f"done in {time.perf_counter() - start:.1f}s\n")
    print("held-out            before     after   (true entropy rate {:.3f})".format(floor))
    print(f"  cross-entropy   {before_loss:8.3f}  {after_loss:8.3f}")
    for name in ("entropy", "topk_mass", "topk_entropy", "label_is_argmax"):
        print(f"  {name:15s} {before_stats[name]:8.3f}  {after_stats[name]:8.3f}")
    return {"floor": floor, "before": before_loss, "after": after_loss}


def memory_comparison(n: int, h: int, v: int) -> None:
    from prefuse.bench.measure import measure

    print(f"\none forward+backward of the head at N={n}, H={h}, V={v}, fp32, 25% of labels ignored "
          f"(each in a fresh process; CPU, torch backend):")
    rows = [measure(p, n, h, v, repeats=1) for p in ("prefuse_torch", "materialized")]
    for r in rows:
        if r.error:
            print(f"  {r.path:14s} error: {r.error}")
        else:
            print(f"  {r.path:14s} extra peak {r.peak_extra_mib:8.1f} MiB   time {r.time_median_s:6.2f} s")
    print(f"  (the fp32 logits alone would be {n * v * 4 / 2**20:.0f} MiB)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps (scale up for a longer run)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_memory", action="store_true", help="skip the memory comparison")
    parser.add_argument("--memory_shape", type=int, nargs=3, default=[4096, 512, 32000], metavar=("N", "H", "V"))


def run(args) -> int:
    result = train(args)
    if not args.skip_memory:
        memory_comparison(*args.memory_shape)
    improved = result["after"] < result["before"] - 0.5 * (result["before"] - result["floor"])
    print("\nresult: " + ("the held-out loss closed over half the gap to the entropy rate" if improved
                          else "the held-out loss did not improve enough"))
    return 0 if improved else 1
