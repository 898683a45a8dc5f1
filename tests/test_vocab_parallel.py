"""The vocabulary-parallel head on 2 gloo processes (127.0.0.1 only) against the unsharded fused head and a float64
reference: per-token log-probs, cross-entropy and DPO, values and gradients of hidden and of the whole weight
(the shards' gradients put together), at an odd V."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prefuse import linear_cross_entropy, linear_logprobs
from prefuse.kernels.vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_logprobs, vocab_shard
from prefuse.preference import PreferenceLoss
from prefuse.vocab_parallel_preference import vocab_parallel_preference_loss
from tests.rendezvous import client_store, hosted_store

WORLD, V, H, B, T = 2, 37, 16, 3, 9  # 37 ids: shards of 19 and 18
# per-row temperatures: one per sequence, with a softcap, and one per token
SETTINGS = [dict(), dict(temperature=0.7, softcap=5.0),
            dict(temperature=torch.tensor([0.5, 1.0, 2.0, 0.8, 1.3, 0.7]), softcap=5.0),
            dict(temperature=torch.linspace(0.5, 2.0, 2 * B * T).reshape(2 * B, T))]


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    ref_hidden = hidden + 0.1 * torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100  # prompts
    labels[1, -2:] = -100  # padding
    upstream = torch.randn(2 * B, T, generator=g)
    return hidden, ref_hidden, weight, labels, upstream


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", store=client_store(port), rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    hidden, ref_hidden, weight, labels, upstream = inputs()
    start, size = vocab_shard(V, rank, WORLD)
    results = {}
    for k, options in enumerate(SETTINGS):
        for task in ("logprobs", "cross_entropy", "dpo"):
            h = hidden.clone().requires_grad_()
            w = weight[start:start + size].clone().requires_grad_()
            head = dict(vocab_start=start, rows_per_chunk=5, **options)
            if task == "logprobs":
                value = vocab_parallel_logprobs(h, w, labels, **head)
                (value * upstream).sum().backward()
            elif task == "cross_entropy":
                value = vocab_parallel_cross_entropy(h, w, labels, **head)
                value.backward()
            else:
                if options:
                    continue
                value, _ = vocab_parallel_preference_loss("sigmoid", h, w, labels, vocab_start=start,
                                                          ref_hidden=ref_hidden, beta=0.5)
                value.backward()
            results[f"{task}/{k}"] = (value.detach(), h.grad, w.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    store = hosted_store()  # held open until the ranks are done
    mp.spawn(_worker, args=(store.port, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def reference_logprobs(hidden, weight, labels, temperature=1.0, softcap=None):
    """float64 log-probs of the labels from the full [.., V] logits; 0 at ignored positions."""
    logits = hidden.double() @ weight.double().T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if isinstance(temperature, torch.Tensor):  # per sequence [S] or per token [S, T]
        temperature = temperature.double().reshape(temperature.shape + (1,) * (logits.dim() - temperature.dim()))
    logp = (logits / temperature).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels != -100, logp, torch.zeros_like(logp))


@pytest.mark.parametrize("k", range(len(SETTINGS)))
@pytest.mark.parametrize("task", ["logprobs", "cross_entropy", "dpo"])
def test_sharded_head_equals_the_unsharded_one(sharded, task, k):
    if task == "dpo" and SETTINGS[k]:
        pytest.skip("DPO runs with the plain transform")
    hidden, ref_hidden, weight, labels, upstream = inputs()
    options = SETTINGS[k]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    if task == "logprobs":
        want = linear_logprobs(h, w, labels, **options)
        (want * upstream).sum().backward()
        exact = reference_logprobs(h64, w64, labels, **options)
        (exact * upstream.double()).sum().backward()
    elif task == "cross_entropy":
        want = linear_cross_entropy(h, w, labels, **options)
        want.backward()
        exact = -reference_logprobs(h64, w64, labels, **options).sum() / (labels != -100).sum()
        exact.backward()
    else:
        want, _ = PreferenceLoss("sigmoid", beta=0.5)(h, w, labels, ref_hidden=ref_hidden)
        want.backward()
        sums = reference_logprobs(h64, w64, labels).sum(-1)
        ref = reference_logprobs(ref_hidden.double(), weight.double(), labels).sum(-1)
        margin = (sums[:B] - ref[:B]) - (sums[B:] - ref[B:])
        exact = -torch.nn.functional.logsigmoid(0.5 * margin).mean()
        exact.backward()
    for rank in range(WORLD):  # every rank returns the whole result and the whole hidden gradient
        value, grad_hidden, _ = sharded[rank][f"{task}/{k}"]
        torch.testing.assert_close(value.double(), exact.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(value, want.detach().float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_hidden.double(), h64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_hidden, h.grad, rtol=1e-4, atol=1e-5)
    grad_weight = torch.cat([sharded[rank][f"{task}/{k}"][2] for rank in range(WORLD)])
    assert grad_weight.shape == (V, H)
    torch.testing.assert_close(grad_weight.double(), w64.grad, rtol=1e-4, atol=1e-5)
    assert float(grad_weight.abs().sum()) > 0


def test_shards_tile_the_vocabulary():
    assert [vocab_shard(37, r, 2) for r in range(2)] == [(0, 19), (19, 18)]
    assert [vocab_shard(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
