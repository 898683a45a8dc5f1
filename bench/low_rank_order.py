"""How the fused head adds a LoRA update of the lm_head to one chunk of logits, on the CPU: the orders compared for
kernels/low_rank.py (docs/kernels.md, "LoRA on the lm_head").

    python bench/low_rank_order.py            # one tile, then the whole head's step

1. One [V, m] tile (V=1024, H=576, r=16, m=512: the CPU recompute plan's 2 MiB tile at SmolLM2's hidden size), float32,
one thread, 30 interleaved rounds of 5 calls, medians:
  plain        addmm(b, W, h^T)                        the head without the update
  big_first    addmm(b, W, h^T), then addmm_(B, u^T)   what low_rank.py does
  thin_first   addmm(b, B, u^T), then addmm_(W, h^T)   the big matmul accumulating into the thin one
  concatenated addmm(b, [W | B], [h | u]^T)            the concatenated weight formed per tile (a copy of W)
2. The head's forward + backward of the log-probs' sum (torch backend, float32, one thread, N=2048 rows of which a
   quarter ignored, H=512, V=32000, the lm_head frozen; 5 interleaved rounds, medians):
  frozen            the frozen-weight path without an adapter (2 weight-sized matmuls per chunk)
  frozen_recompute  the recompute path without an adapter (3)
  lora              an r=16 adapter on the lm_head through low_rank (3, plus the thin ones), gradients to h, A, B
3. A DPO step of PreferenceLoss (sigmoid; 8 pairs of 128 tokens, prompts a quarter of each: the same N, H, V; the
   reference's hidden states beside the policy's; 5 interleaved rounds, medians):
  dpo_frozen            no adapter on the lm_head: the frozen-weight path, the reference in the policy's chunks
  dpo_lora_in_forward   an r=16 adapter: the gradients formed in forward (FusedHeadInForwardLowRank)
  dpo_lora_recompute    the same adapter, mode="recompute" (FusedLogprobsLowRank)
"""
import statistics
import time

import torch

import prefuse

V, H, R, M = 1024, 576, 16, 512


def tile_orders() -> None:
    torch.manual_seed(0)
    weight, factor = torch.randn(V, H), torch.randn(V, R)
    hidden, u, bias = torch.randn(M, H), torch.randn(M, R), torch.randn(V)
    buffer = torch.empty(V, M)

    def plain():
        torch.addmm(bias[:, None], weight, hidden.t(), out=buffer)

    def big_first():
        torch.addmm(bias[:, None], weight, hidden.t(), out=buffer)
        buffer.addmm_(factor, u.t())

    def thin_first():
        torch.addmm(bias[:, None], factor, u.t(), out=buffer)
        buffer.addmm_(weight, hidden.t())

    def concatenated():
        torch.addmm(bias[:, None], torch.cat([weight, factor], 1), torch.cat([hidden, u], 1).t(), out=buffer)

    ways = (plain, big_first, thin_first, concatenated)
    for way in ways:  # warm up
        for _ in range(5):
            way()
    times = {way.__name__: [] for way in ways}
    for _ in range(30):
        for way in ways:
            start = time.perf_counter()
            for _ in range(5):
                way()
            times[way.__name__].append((time.perf_counter() - start) / 5 * 1e3)
    for name, values in times.items():
        print(f"{name:13s} median {statistics.median(values):6.2f} ms  min {min(values):6.2f} ms")


def head_steps(n_rows: int = 2048, hidden_size: int = 512, vocab: int = 32000, rounds: int = 5) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(n_rows, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (n_rows,))
    labels[torch.rand(n_rows) < 0.25] = -100
    a = (torch.randn(R, hidden_size) / hidden_size ** 0.5).requires_grad_()
    b = (torch.randn(vocab, R) * 0.01).requires_grad_()

    def frozen():
        return prefuse.linear_logprobs(hidden, weight, labels, backend="torch")

    def frozen_recompute():
        return prefuse.linear_logprobs(hidden, weight, labels, backend="torch", mode="recompute")

    def lora():
        return prefuse.linear_logprobs(hidden, weight, labels, backend="torch", low_rank=(2.0 * hidden @ a.t(), b))

    ways = (frozen, frozen_recompute, lora)
    times = {way.__name__: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            hidden.grad = a.grad = b.grad = None
            start = time.perf_counter()
            way().sum().backward()
            times[way.__name__].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:17s} median {statistics.median(values):6.3f} s  min {min(values):6.3f} s")


def dpo_steps(pairs: int = 8, length: int = 128, hidden_size: int = 512, vocab: int = 32000, rounds: int = 5) -> None:
    from prefuse.preference import PreferenceLoss

    torch.manual_seed(0)
    hidden = torch.randn(2 * pairs, length, hidden_size, requires_grad=True)
    ref_hidden = hidden.detach() + 0.01 * torch.randn_like(hidden)
    weight = torch.randn(vocab, hidden_size) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (2 * pairs, length))
    labels[:, : length // 4] = -100
    a = (torch.randn(R, hidden_size) / hidden_size ** 0.5).requires_grad_()
    b = (torch.randn(vocab, R) * 0.01).requires_grad_()
    losses = {"dpo_frozen": (PreferenceLoss("sigmoid", backend="torch"), False),
              "dpo_lora_in_forward": (PreferenceLoss("sigmoid", backend="torch"), True),
              "dpo_lora_recompute": (PreferenceLoss("sigmoid", backend="torch", mode="recompute"), True)}
    times = {name: [] for name in losses}
    for _ in range(rounds):
        for name, (loss_fn, lora) in losses.items():
            hidden.grad = a.grad = b.grad = None
            start = time.perf_counter()
            low_rank = (2.0 * hidden @ a.t(), b) if lora else None
            loss, _ = loss_fn(hidden, weight, labels, low_rank=low_rank, ref_hidden=ref_hidden)
            loss.backward()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:20s} median {statistics.median(values):6.3f} s  min {min(values):6.3f} s  "
              f"({losses[name][0].last_mode})")


def main() -> None:
    torch.set_num_threads(1)
    tile_orders()
    head_steps()
    dpo_steps()


if __name__ == "__main__":
    main()
