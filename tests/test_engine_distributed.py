"""Training on 2 ranks (gloo on 127.0.0.1, the environment torchrun sets) against one process on the same global
batches: per-step losses to 1e-6 and every trainable parameter's gradient to 1e-5 relative, for a pair-wise
objective (sigmoid) and batch-coupled ones (KTO's KL point, SFT's mean over the batch's tokens), with and without LoRA, over
accumulated micro-batches of uneven sizes; a real `torchrun --nproc_per_node 2` run; a 2-rank run killed with
SIGKILL after a checkpoint resumed on 2 ranks and on 1 with the same losses; `prefuse export`."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.rendezvous import hosted_store, rank_env  # noqa: E402
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama, save_tiny_llava  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
WORLD = 2
PER_DEVICE = 2  # the single process takes batches of WORLD x PER_DEVICE
# name: (data, flags); every case accumulates 2 micro-batches, and its data's last global batch is short
CASES = {
    "sigmoid_lora": ("pairs", dict(loss_type=["sigmoid"], use_peft=True)),
    "sigmoid_full": ("pairs", dict(loss_type=["sigmoid"], precompute_ref_log_probs=True)),  # rank 0 caches
    "kto_lora": ("unpaired", dict(loss_type=["kto"], use_peft=True)),
    "kto_full": ("unpaired", dict(loss_type=["kto"], eval_fraction=0.25)),  # 6 held out: global batches 4 + 2
    "sft_full": ("pairs", dict(loss_type=["sft"])),  # the NLL's mean over every chosen token of the batch
    # FSDP2: fully_shard per decoder layer (and the untied embedding) and at the root
    "fsdp_sigmoid_lora": ("pairs", dict(loss_type=["sigmoid"], use_peft=True, fsdp="full_shard")),
    "fsdp_sigmoid_tied": ("pairs", dict(loss_type=["sigmoid"], fsdp="full_shard", model_name_or_path="tied")),
    "fsdp_kto_full": ("unpaired", dict(loss_type=["kto"], fsdp="full_shard", eval_fraction=0.25)),
}

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


def free_port() -> int:
    """A port free now, for torchrun's own c10d rendezvous (a command line takes a number); the ranks spawned here
    use `hosted_store` instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama (untied head) with the fixture tokenizer, 11 pairs and their 22 unpaired completions."""
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    save_tiny_llama(root / "model", tokenizer, tie_word_embeddings=False)
    save_tiny_llama(root / "tied", tokenizer, tie_word_embeddings=True)  # the lm_head is the input embedding
    with open(DATA_DIR / "pandalm_testset_v1_human.jsonl", encoding="utf-8") as f:
        pairs = [json.loads(next(f)) for _ in range(11)]  # global batches of 4: 4, 4, 3 (ranks: 2 + 1)
    with open(DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl", encoding="utf-8") as f:
        prompts = [json.loads(next(f))["prompt"][:80] for _ in range(11)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "rewards.py").write_text(BREVITY)
    save_tiny_llava(root / "vlm", tokenizer)
    from PIL import Image

    (root / "images").mkdir()
    for i in range(8):  # 8 prompts with a picture each: global batches of 4, 2 per rank
        pixels = torch.randint(0, 256, (20, 24, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / "images" / f"{i}.png")
    (root / "image_prompts.jsonl").write_text("".join(json.dumps(
        {"images": [f"images/{i}.png"], "prompt": f"<image>What is in picture {i}?"}) + "\n" for i in range(8)))
    paths = {"model": root / "model", "tied": root / "tied", "prompts": root / "prompts.jsonl",
             "rewards": root / "rewards.py", "pairs": root / "pairs.jsonl", "unpaired": root / "unpaired.jsonl",
             "vlm": root / "vlm", "image_prompts": root / "image_prompts.jsonl", "root": root}
    paths["pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    paths["unpaired"].write_text("".join(  # 22 completions: 4 x 5 and a last global batch of 2 (ranks: 1 + 1)
        json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}) + "\n"
        for r in pairs for side in ("chosen", "rejected")))
    return paths


def config(files, out, data, ranks, **flags):
    from prefuse.engine.train.config import TrainConfig

    # a small learning rate: Adam moves a weight whose gradient is near its epsilon (1e-8) by an amount that depends
    # on that gradient's last bits, and a large step would carry such float32 differences into the next losses
    values = dict(model_name_or_path=str(files["model"]), dataset_name=str(files[data]), output_dir=str(out),
                  max_length=96, max_prompt_length=48, report_to="none", learning_rate=5e-4, max_steps=3,
                  logging_steps=1, save_steps=0, lora_r=4, lora_dropout=0.0, gradient_accumulation_steps=2,
                  per_device_train_batch_size=PER_DEVICE * WORLD // ranks, lr_scheduler_type="constant", seed=3,
                  per_device_eval_batch_size=PER_DEVICE * WORLD // ranks)
    values.update(flags)
    for name in ("model_name_or_path", "dataset_name"):  # a name among the files
        if name in flags:
            values[name] = str(files[flags[name]])
    if ranks == 1:
        values.pop("fsdp", None)  # the same model, whole, in one process
    return TrainConfig(**values)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor, or an FSDP2 shard's whole tensor (gathered from the ranks)."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def train_recording(cfg) -> list[list[torch.Tensor]]:
    """train(cfg); every step's gradients of the trainable parameters (before clipping), in optimizer order."""
    from prefuse.engine.train import loop

    grads, clip = [], loop.clip_grad_norms

    def spy(optimizer, max_norm):
        grads.append([whole(p.grad) for g in optimizer.param_groups for p in g["params"]])
        return clip(optimizer, max_norm)

    loop.clip_grad_norms = spy
    try:
        loop.train(cfg)
    finally:
        loop.clip_grad_norms = clip
    return grads


# FSDP2's distributed checkpoints: 6 steps with checkpoint-3, then resumed from checkpoint-3 on 2 ranks
RESUMED = {"fsdp_lora_long": ("pairs", dict(loss_type=["sigmoid"], use_peft=True, fsdp="full_shard")),
           "fsdp_tied_long": ("pairs", dict(loss_type=["sigmoid"], fsdp="full_shard", model_name_or_path="tied"))}
LONG = dict(max_steps=6, save_steps=3)
# --online: each rank samples its own share of every global batch of prompts (11 prompts: 4, 4, 3 -> ranks 2 + 1)
# FSDP2: generation inside the root's forward (World.generation), synced rollouts; the tied model's lm_head is the
# root's embedding; nash_md samples the mixture against the reference (full model: a second sharded model)
ONLINE = {"online_sigmoid_lora": dict(loss_type=["sigmoid"], use_peft=True),
          "online_grpo_full": dict(loss_type=["grpo"], beta=0.0, num_generations=3),
          "fsdp_online_sigmoid_lora": dict(loss_type=["sigmoid"], use_peft=True, fsdp="full_shard"),
          "fsdp_online_nash_md_tied": dict(loss_type=["nash_md"], fsdp="full_shard", model_name_or_path="tied"),
          # the reference's samples: the sharded policy with its adapters disabled
          "fsdp_online_xpo_lora": dict(loss_type=["xpo"], use_peft=True, fsdp="full_shard"),
          # a tiny LLaVA under DDP: each rank samples its prompts with their images, its rows carry their pixels
          "online_vlm_lora": dict(loss_type=["sigmoid"], use_peft=True, model_name_or_path="vlm",
                                  dataset_name="image_prompts")}
BREVITY = "def brevity(prompts, completions, **columns):\n    return [-len(c) / 8 for c in completions]\n"


def online_flags(files, flags: dict) -> dict:
    return {**dict(online=True, dataset_name="prompts", reward_funcs=[f"{files['rewards']}:brevity"],
                   max_new_tokens=6, temperature=1.0, per_device_train_batch_size=PER_DEVICE), **flags}


def jobs(out_root) -> list[tuple[str, str, dict]]:
    """(output directory, data, flags) of every run on 2 ranks, in order."""
    runs = [(name, data, flags) for name, (data, flags) in CASES.items()]
    runs += [(name, data, {**flags, **LONG}) for name, (data, flags) in RESUMED.items()]
    runs += [(f"{name}_resumed", data, {**flags, **LONG, "resume_from_checkpoint": str(
        Path(out_root) / name / "checkpoint-3")}) for name, (data, flags) in RESUMED.items()]
    runs += [(name, "pairs", {"online": flags}) for name, flags in ONLINE.items()]
    return runs


def spy_on_the_head(seen: list):
    """Record, at every fused-head call, the type and shape of the weights it gets and how many decoder-layer
    parameters are unsharded at that moment (FSDP2 registers a resharded parameter as a DTensor shard)."""
    from torch.distributed.tensor import DTensor

    from prefuse.engine.train import distributed
    from prefuse.heads import causal_lm_of
    from prefuse.preference import PreferenceLoss

    layers, shard, forward = [], distributed.fully_shard_step, PreferenceLoss.forward

    def capture(step, models, world, **options):
        layers[:] = [layer for m in (models.policy, models.reference) if m is not None
                     for layer in causal_lm_of(m).get_decoder().layers]
        return shard(step, models, world, **options)

    def spy(self, hidden, weight, *args, **kwargs):
        ref = kwargs.get("ref_weight")
        seen.append({"weight": [type(weight).__name__, list(weight.shape)],
                     "ref_weight": None if ref is None else [type(ref).__name__, list(ref.shape)],
                     "unsharded_layer_params": sum(not isinstance(p, DTensor) for layer in layers
                                                   for p in layer.parameters())})
        return forward(self, hidden, weight, *args, **kwargs)

    distributed.fully_shard_step, PreferenceLoss.forward = capture, spy


def _rank_worker(rank, ports, files, out_root):
    from prefuse.engine.online.source import OnlineSource

    torch.set_num_threads(1)
    batches, next_batch = [], OnlineSource.next_batch
    OnlineSource.next_batch = lambda self: batches.append(next_batch(self)) or batches[-1]  # what each rank sampled
    heads = []
    spy_on_the_head(heads)
    for (name, data, flags), port in zip(jobs(out_root), ports):  # a torchrun launch each: its own port
        os.environ.update(rank_env(rank, WORLD, port))
        if "online" in flags:
            flags = online_flags(files, flags["online"])
        batches.clear(), heads.clear()
        grads = train_recording(config(files, Path(out_root) / name, data, WORLD, **flags))
        (Path(out_root) / name / f"heads-rank{rank}.json").write_text(json.dumps(heads))
        torch.save(grads, Path(out_root) / name / f"grads-rank{rank}.pt")
        torch.save(list(batches), Path(out_root) / name / f"batches-rank{rank}.pt")


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_ranks(files, tmp_path_factory):
    """Every case on 2 spawned ranks (one process group per train() call, from the torchrun environment)."""
    out = tmp_path_factory.mktemp("ranks")
    stores = [hosted_store() for _ in jobs(out)]  # held open until the ranks are done
    mp.spawn(_rank_worker, args=([store.port for store in stores], files, str(out)), nprocs=WORLD, join=True)
    return out


# After step 1 (the same weights, the exact check), a tied embedding carries a few gradients near Adam's epsilon
# whose last bits move their update by a visible fraction of the learning rate: the later steps drift by ~1e-6.
# The same holds after a resume (fsdp_tied_long): its first step starts from the checkpoint's weights and
# optimizer state (the exact check), the next ones from updates computed from differently reduced gradients.
DRIFT = {"fsdp_sigmoid_tied": 30, "fsdp_online_nash_md_tied": 30, "fsdp_tied_long": 30}


def close(got: list, expected: list, rel: float, abs_: float, drift: float) -> bool:
    return got[:1] == pytest.approx(expected[:1], rel=rel, abs=abs_) and got[1:] == pytest.approx(
        expected[1:], rel=rel * drift, abs=abs_ * drift)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_the_global_batch(files, two_ranks, tmp_path, name):
    data, flags = CASES[name]
    drift = DRIFT.get(name, 1)
    single = train_recording(config(files, tmp_path, data, 1, **flags))
    ranks = [torch.load(two_ranks / name / f"grads-rank{r}.pt") for r in range(WORLD)]
    expected, got = read_metrics(tmp_path), read_metrics(two_ranks / name)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert ("eval_loss" in got[-1]) == ("eval_fraction" in flags)
    for key in ["loss", "grad_norm", "logps/chosen"] + [k for k in ("eval_loss", "eval_kl") if k in expected[-1]]:
        assert close([r[key] for r in got], [r[key] for r in expected], 1e-6, 1e-7, drift), key
    # rewards: beta x a difference of two sums of ~-300, whose float32 rounding (1e-5 there) they inherit
    for key in [k for k in ("rewards/chosen", "rewards/margins", "kl") if k in expected[0]]:
        assert close([r[key] for r in got], [r[key] for r in expected], 1e-5, 1e-5, drift), key
    assert len({r["loss"] for r in expected}) == 3  # the steps do differ
    assert len(single) == 3 and all(len(step) == len(single[0]) for step in single)
    for rank_grads in ranks:  # every rank holds the same (reduced) gradients: DDP's, or FSDP2's gathered shards
        for step, (mine, theirs) in enumerate(zip(rank_grads, single)):
            tolerance = 1e-5 * (1 if step == 0 else 3 * drift)
            for g, ref in zip(mine, theirs):
                assert (g - ref).norm() <= tolerance * ref.norm() + 1e-9, (name, step, (g - ref).norm(), ref.norm())
    # the fused head always got the whole lm_head weight (and the reference's), with every layer resharded
    policy = transformers.AutoConfig.from_pretrained(files[flags.get("model_name_or_path", "model")])
    shape = [policy.vocab_size, policy.hidden_size]
    for rank in range(WORLD):
        heads = json.loads((two_ranks / name / f"heads-rank{rank}.json").read_text())
        assert len(heads) >= 3 * 2  # 3 steps of 2 micro-batches (and the evaluations)
        for call in heads:
            assert call["weight"][1] == shape and call["weight"][0] != "DTensor", (name, call)
            assert call["ref_weight"] in (None, ["Tensor", shape]), (name, call)
            if "fsdp" in flags:
                assert call["unsharded_layer_params"] == 0, (name, call)
    checkpoint = two_ranks / name / "checkpoint-3"
    assert (checkpoint / "checkpoint.json").is_file()
    assert (checkpoint / "dcp" / ".metadata").is_file() == ("fsdp" in flags)  # FSDP2: a distributed checkpoint


@pytest.mark.parametrize("name", list(RESUMED))
def test_fsdp_checkpoint_resumes_on_two_ranks_and_in_one_process(files, two_ranks, tmp_path, name):
    """A DCP checkpoint of 2 FSDP2 ranks (LoRA adapters only; a tied full model), resumed on 2 ranks and in one
    plain process: the same following steps."""
    data, flags = RESUMED[name]
    uninterrupted = read_metrics(two_ranks / name)
    assert [r["step"] for r in uninterrupted] == list(range(1, 7))
    on_two = read_metrics(two_ranks / f"{name}_resumed")
    assert [r["step"] for r in on_two] == [4, 5, 6]
    train_recording(config(files, tmp_path, data, 1, **flags, **LONG,
                           resume_from_checkpoint=str(two_ranks / name / "checkpoint-3")))
    on_one = read_metrics(tmp_path)
    assert [r["step"] for r in on_one] == [4, 5, 6]
    drift = DRIFT.get(name, 1)
    for key in ("loss", "grad_norm", "epoch", "learning_rate"):
        assert [r[key] for r in on_two] == [r[key] for r in uninterrupted[3:]], key  # the same ranks: exactly
        # one process reduces the gradients in another order: step 4 (the checkpoint's weights) to 1e-6, the
        # next steps as DRIFT allows
        assert close([r[key] for r in on_one], [r[key] for r in uninterrupted[3:]], 1e-6, 0, drift), key
    assert len({r["loss"] for r in on_one}) == 3


def merge(shares: list) -> "Batch":
    """The global batch whose ranks' shares these are: rows after rows (right-padded to the longest), every
    role's examples in rank order, the judges' numbers weighted by examples."""
    from prefuse.engine.core.sources import Batch

    length = max(b.input_ids.shape[1] for b in shares)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    offsets = [0]
    for b in shares:
        offsets.append(offsets[-1] + b.input_ids.shape[0])
    n = sum(b.n_examples for b in shares)
    return Batch(input_ids=torch.cat([pad(b.input_ids, 0) for b in shares]),
                 attention_mask=torch.cat([pad(b.attention_mask, 0) for b in shares]),
                 labels=torch.cat([pad(b.labels, -100) for b in shares]),
                 roles={role: torch.cat([b.roles[role] + o for b, o in zip(shares, offsets)])
                        for role in shares[0].roles},
                 inputs={k: torch.cat([b.inputs[k] for b in shares]) for k in shares[0].inputs},
                 index=torch.cat([b.index for b in shares]),
                 metrics={k: sum(b.metrics[k] * b.n_examples for b in shares) / n for k in shares[0].metrics},
                 vision={k: torch.cat([b.vision[k] for b in shares]) for k in shares[0].vision})  # in row order


class Replay:
    """A batch source of the given batches, in order."""

    batches_per_epoch, epoch = 1, 0.0

    def __init__(self, batches):
        self.batches = iter(batches)

    def next_batch(self):
        return next(self.batches)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("name", list(ONLINE))
def test_online_ranks_sample_their_own_prompts_and_train_as_one_process(files, two_ranks, tmp_path, name):
    """--online on 2 ranks: each rank samples its own share of every global batch of prompts; one process on the
    global batches they make (their shares put together) gives the same losses and gradients."""
    from prefuse.engine.train import loop
    from prefuse.engine.data import PairBatches

    shares = [torch.load(two_ranks / name / f"batches-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert len(shares[0]) == len(shares[1]) == 6  # 3 steps of 2 micro-batches
    n_prompts = len(Path(files[ONLINE[name].get("dataset_name", "prompts")]).read_text().splitlines())
    prompts = PairBatches(n_prompts, batch_size=WORLD * PER_DEVICE, seed=3)  # the single process's order
    order = [indices for _ in range(3) for indices in prompts]  # epochs enough for 6 batches
    for (mine, theirs), expected in zip(zip(*shares), order):
        assert mine.index.tolist() + theirs.index.tolist() == expected
        assert len(mine.index) == (len(expected) + 1) // 2
    if "vlm" in name:  # every row of a rank's batch with its example's picture
        assert all(b.vision["pixel_values"].shape[0] == b.input_ids.shape[0] for share in shares for b in share)
    global_batches = [merge(list(pair)) for pair in zip(*shares)]
    cfg = config(files, tmp_path, "pairs", 1, **online_flags(files, ONLINE[name]))
    grads, clip = [], loop.clip_grad_norms
    loop.clip_grad_norms = lambda o, m: grads.append([whole(p.grad) for g in o.param_groups for p in g["params"]]) \
        or clip(o, m)
    try:
        loop.train(cfg, source=Replay(global_batches))
    finally:
        loop.clip_grad_norms = clip
    if name.startswith("fsdp") and "xpo" not in name:  # xpo's second sample is the reference's
        for rank, share in enumerate(shares):
            assert_sampled_as_one_whole_model(files, name, share[0], seed=(3 + 7919 * rank) * 1_000_003)
    expected, got = read_metrics(tmp_path), read_metrics(two_ranks / name)
    drift = DRIFT.get(name, 1)
    for key in ("loss", "grad_norm", "objective/scores"):
        assert close([r[key] for r in got], [r[key] for r in expected], 1e-6, 1e-7, drift), key
    assert len({r["loss"] for r in expected}) == 3
    for step, (mine, theirs) in enumerate(zip(torch.load(two_ranks / name / "grads-rank0.pt"), grads)):
        for g, ref in zip(mine, theirs):
            assert (g - ref).norm() <= 1e-5 * (1 if step == 0 else 3 * drift) * ref.norm() + 1e-9, (name, step)


def assert_sampled_as_one_whole_model(files, name, batch, seed):
    """A rank's first batch (the initial weights; LoRA's B = 0) was sampled under FSDP2 as the whole model samples
    its prompts in one process: the same completions from the same seed (rank r's: (seed + 7919 r) * 1_000_003)."""
    from prefuse.engine.models.loading import Models
    from prefuse.engine.online.rollout import RolloutConfig, sample_policy

    tokenizer = transformers.AutoTokenizer.from_pretrained(files["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(files["tied" if "tied" in name else "model"])
    rows = []  # (prompt, completion) of each row; labels [rows, T] hold each position's next token
    for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
        completion = labels[labels != -100].tolist()
        rows.append((ids[mask == 1][:int(mask.sum()) - len(completion)].tolist(), completion))
    k = 1 if "nash_md" in name else 2
    role = batch.roles["completion"] if k == 1 else torch.stack([batch.roles["chosen"], batch.roles["rejected"]], 1)
    per_example = [[rows[int(i)] for i in row.view(-1)] for row in role.view(batch.n_examples, k)]
    prompts = [example[0][0] for example in per_example]
    cfg = RolloutConfig(max_new_tokens=6, temperature=1.0, num_generations=k)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # nash_md: y from the policy (its seed); y' (from the mixture, seed + 1) is judged, never trained on
    samples = sample_policy(Models(policy=model, reference=None, tokenizer=tokenizer), prompts, cfg, seed=seed,
                            eos_id=tokenizer.eos_token_id, pad_id=pad_id)
    for p, example in enumerate(per_example):
        assert all(prompt == prompts[p] for prompt, _ in example)
        want = sorted(samples.completion_ids[p * k:(p + 1) * k])
        assert sorted(completion for _, completion in example) == want, (name, p)


def _early_finish_worker(rank, port, model_dir, prompts, eos_id, out):
    """Rank r greedily decodes prompts[r] from the FSDP2-sharded tied model (and its sharded reference, for the
    mixture); rank 0's first token is its EOS, so it finishes at once while rank 1 decodes on."""
    import datetime

    import torch.distributed as dist

    from prefuse.engine.train.distributed import current, fully_shard_step
    from prefuse.engine.models.loading import Models
    from prefuse.engine.online.rollout import RolloutConfig, sample_mixture, sample_policy

    torch.set_num_threads(1)
    os.environ.update(rank_env(rank, WORLD, port))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # an unsynced rank fails, not hangs
    try:
        load = transformers.AutoModelForCausalLM.from_pretrained
        models = Models(policy=load(model_dir), reference=load(model_dir), tokenizer=None)
        world = current()
        world.module, world.sharded = fully_shard_step(None, models, world), True
        cfg = RolloutConfig(max_new_tokens=8, temperature=0.0, num_generations=1, synced_gpus=True)
        ids = dict(seed=0, eos_id=eos_id, pad_id=0)
        policy = world.generation(lambda: sample_policy(models, [prompts[rank]], cfg, **ids))
        mixture = world.generation(lambda: sample_mixture(models, [prompts[rank]], cfg, **ids))
        torch.save({"policy": policy.completion_ids, "mixture": mixture.completion_ids}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_generation_keeps_the_ranks_in_step_when_one_finishes_first(files, tmp_path):
    """Under FSDP2 every forward all-gathers, so a rank whose samples are done keeps decoding with the others
    (synced rollouts): rank 0 stops after one token and rank 1 after eight, and both get what the whole model
    decodes in one process, from the policy and from the mixture."""
    from prefuse.engine.models.loading import Models
    from prefuse.engine.online.rollout import RolloutConfig, sample_mixture, sample_policy

    model = transformers.AutoModelForCausalLM.from_pretrained(files["tied"])
    models = Models(policy=model, reference=model, tokenizer=None)
    prompts = [[5, 17, 33, 41], [9, 12, 60, 7, 88]]
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.0, num_generations=1)
    eos_id = sample_policy(models, prompts[:1], cfg, seed=0, eos_id=None, pad_id=0).completion_ids[0][0]
    want = {kind: [sampler(models, [p], cfg, seed=0, eos_id=eos_id, pad_id=0).completion_ids for p in prompts]
            for kind, sampler in (("policy", sample_policy), ("mixture", sample_mixture))}
    assert [len(c[0]) for c in want["policy"]] == [1, 8] and [len(c[0]) for c in want["mixture"]] == [1, 8]
    store = hosted_store()
    mp.spawn(_early_finish_worker, args=(store.port, str(files["tied"]), prompts, eos_id, str(tmp_path)),
             nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["policy"] == want["policy"][rank] and got["mixture"] == want["mixture"][rank], rank


# -- torchrun, checkpoints, resume, export -------------------------------------------------------------------------

KILL_AT_STEP_5 = """
import os, signal, sys
import prefuse.engine.core.metrics as metrics
flush = metrics.MetricsLog.flush
def flush_then_die(self, step, **kw):
    record = flush(self, step, **kw)
    if step == 5 and os.environ["RANK"] == "0":  # after checkpoint-3, with steps 4 and 5 in metrics.jsonl
        os.kill(os.getpid(), signal.SIGKILL)
    return record
metrics.MetricsLog.flush = flush_then_die
from prefuse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_argv(files, out, ranks, **flags) -> list[str]:
    values = dict(model_name_or_path=files["model"], dataset_name=files["pairs"], output_dir=out, max_length=96,
                  max_prompt_length=48, report_to="none", learning_rate=5e-4, max_steps=6, logging_steps=1,
                  save_steps=3, use_peft="true", lora_r=4, lora_dropout=0.0, gradient_accumulation_steps=2,
                  per_device_train_batch_size=PER_DEVICE * WORLD // ranks, lr_scheduler_type="constant", seed=3,
                  loss_type="sigmoid")
    values.update(flags)
    return ["train"] + [item for key, value in values.items() for item in (f"--{key}", str(value))]


def torchrun(*command, nnodes=None) -> subprocess.CompletedProcess:
    """torchrun on this machine, every rank bound to 127.0.0.1."""
    launcher = Path(sys.executable).with_name("torchrun")
    start = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    argv = [*start, "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            *command]
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def launched(files, tmp_path_factory):
    """LoRA, 6 steps, checkpoints every 3: one process, and `torchrun --nproc_per_node 2 -m prefuse train`."""
    from prefuse.cli import main

    root = tmp_path_factory.mktemp("launched")
    assert main(train_argv(files, root / "single", 1)) == 0
    ranks = torchrun("-m", "prefuse", *train_argv(files, root / "ranks", WORLD))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("training 6 steps") == 1  # rank 0 alone prints
    return root


def test_torchrun_two_ranks_equal_one_process(launched):
    single, ranks = read_metrics(launched / "single"), read_metrics(launched / "ranks")
    assert [r["step"] for r in ranks] == list(range(1, 7))  # rank 0 alone writes metrics.jsonl
    for key in ("loss", "grad_norm", "logps/chosen", "epoch", "learning_rate"):
        assert [r[key] for r in ranks] == pytest.approx([r[key] for r in single], rel=1e-6, abs=1e-7), key
    assert len({r["loss"] for r in single}) == 6
    assert sorted(p.name for p in (launched / "ranks").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not list((launched / "ranks").glob(".tmp-checkpoint-*"))


def test_sigkilled_two_rank_run_resumes_on_two_ranks_and_on_one(files, launched, tmp_path):
    """The torchrun run killed with SIGKILL at step 5 (rank 0; torchrun then stops rank 1), after checkpoint-3:
    resumed on 2 ranks (torchrun) and in one process, the following steps are the uninterrupted run's."""
    import shutil

    from prefuse.cli import main

    script = tmp_path / "kill_at_step_5.py"
    script.write_text(KILL_AT_STEP_5)
    killed = torchrun(str(script), *train_argv(files, tmp_path / "killed", WORLD))
    assert killed.returncode != 0
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-3"]
    shutil.copytree(tmp_path / "killed", tmp_path / "killed_one")
    resumed = torchrun("-m", "prefuse", *train_argv(files, tmp_path / "killed", WORLD), "--resume_from_checkpoint",
                       "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1  # rank 0 prints
    assert main(train_argv(files, tmp_path / "killed_one", 1) + ["--resume_from_checkpoint", "latest"]) == 0
    uninterrupted, single = read_metrics(launched / "ranks"), read_metrics(launched / "single")
    on_two, on_one = read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "killed_one")
    assert [r["step"] for r in on_two] == [r["step"] for r in on_one] == list(range(1, 7))
    for key in ("loss", "grad_norm", "epoch", "learning_rate"):
        assert [r[key] for r in on_two] == [r[key] for r in uninterrupted], key  # the same ranks: exactly
        assert [r[key] for r in on_one] == pytest.approx([r[key] for r in uninterrupted], rel=1e-6), key
        assert [r[key] for r in on_one][3:] == pytest.approx([r[key] for r in single][3:], rel=1e-6), key


def test_two_torchrun_nodes_on_this_machine_train_as_one_process(files, launched, tmp_path):
    """Two torchrun invocations, --nnodes 2 --node_rank 0/1 with one rank each, meeting at a c10d rendezvous on
    127.0.0.1 (the multi-node command line of the README): the job equals one process on the same global batches."""
    launcher = Path(sys.executable).with_name("torchrun")
    start = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([*start, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "prefuse-test",
                               "--local_addr", "127.0.0.1", "-m", "prefuse",
                               *train_argv(files, tmp_path, WORLD, save_steps=0)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    single, job = read_metrics(launched / "single"), read_metrics(tmp_path)
    assert [r["step"] for r in job] == list(range(1, 7))
    for key in ("loss", "grad_norm", "logps/chosen"):
        assert [r[key] for r in job] == pytest.approx([r[key] for r in single], rel=1e-6, abs=1e-7), key
    assert sum("training 6 steps" in out for out, _ in outputs) == 1  # global rank 0 alone prints


def test_export_writes_what_from_pretrained_loads(files, two_ranks, tmp_path):
    """prefuse export of every kind of checkpoint a 2-rank run writes: DDP's full model and LoRA adapters, FSDP2's
    distributed checkpoints (LoRA, a tied full model); the directories load with from_pretrained."""
    from peft import PeftModel

    from prefuse.cli import main
    from prefuse.engine.checkpoint import load_weights
    from prefuse.engine.models.loading import ModelConfig, load_models

    ids = torch.tensor([[1, 5, 9, 13, 2]])

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    for name, checkpoint, model in (("full", "sigmoid_full/checkpoint-3", "model"),
                                    ("tied", "fsdp_sigmoid_tied/checkpoint-3", "tied")):
        assert main(["export", "--checkpoint", str(two_ranks / checkpoint), "--output", str(tmp_path / name)]) == 0
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)
        trained = load_models(ModelConfig(str(files[model])), need_reference=False).policy
        load_weights(two_ranks / checkpoint, model=trained)
        base = transformers.AutoModelForCausalLM.from_pretrained(files[model])
        assert torch.equal(logits(exported), logits(trained)), name
        assert not torch.allclose(logits(exported), logits(base)), name
        assert (tmp_path / name / "tokenizer.json").is_file()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight  # still tied
    base = transformers.AutoModelForCausalLM.from_pretrained(files["model"])
    for name, checkpoint in (("ddp", "sigmoid_lora/checkpoint-3"), ("fsdp", "fsdp_lora_long/checkpoint-6")):
        # LoRA: the adapters (PeftModel.from_pretrained), or merged into a plain model
        path = str(two_ranks / checkpoint)
        assert main(["export", "--checkpoint", path, "--output", str(tmp_path / f"{name}_adapter")]) == 0
        assert main(["export", "--checkpoint", path, "--output", str(tmp_path / f"{name}_merged"), "--merge_lora"]) == 0
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_merged")
        adapter = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(files["model"]),
                                            tmp_path / f"{name}_adapter")
        assert torch.allclose(logits(merged), logits(adapter), atol=1e-5), name
        assert not torch.allclose(logits(merged), logits(base), atol=1e-4), name
        assert not any("lora" in key for key in merged.state_dict())
    assert main(["export", "--checkpoint", str(two_ranks / "sigmoid_full" / "checkpoint-3"), "--output",
                 str(tmp_path / "x"), "--merge_lora"]) == 2


def test_what_one_process_or_several_ranks_refuse_in_one_line(files, tmp_path, capsys):
    from prefuse.cli import build_parser, main
    from prefuse.engine.core.shards import check_last_batch, shard_batch, shard_bounds
    from prefuse.engine.train.distributed import World, check_supported

    argv = train_argv(files, tmp_path, 1, max_steps=1)
    assert build_parser().parse_args(argv + ["--fsdp"]).fsdp == "full_shard"  # transformers' spelling, or bare
    assert main(argv + ["--fsdp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("prefuse train: error: fsdp: shards the model over the ranks of torchrun")
    assert main(argv + ["--fsdp", "hybrid_shard"]) == 2
    assert "fsdp: 'hybrid_shard' is not full_shard" in capsys.readouterr().err
    two = World(rank=1, size=2)
    bdhs = dict(online=True, fsdp="full_shard", loss_type=["avg_dpo"], avg_rejected="bdhs")
    for flags, field in ((bdhs, "avg_rejected"), (dict(monitor_steps=5), "monitor_steps"),
                         (dict(sampling_strategy="good_priority"), "sampling_strategy")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            check_supported(config(files, tmp_path, "pairs", 2, **flags), two)
    with pytest.raises(ValueError, match="holds 1 example"):
        check_last_batch(9, 4, two, "per_device_train_batch_size")
    check_last_batch(10, 4, two, "per_device_train_batch_size")
    assert [shard_bounds(5, r, 2) for r in (0, 1)] == [(0, 3), (3, 5)]
    from prefuse.engine.core.sources import Batch

    ids = torch.ones(4, 3, dtype=torch.long)
    pictures = Batch(input_ids=ids, attention_mask=ids, labels=ids,
                     roles={"chosen": torch.tensor([0, 1]), "rejected": torch.tensor([2, 3])},
                     vision={"pixel_values": torch.zeros(4, 3, 8, 8)})
    with pytest.raises(ValueError, match=r"^images: offline batches with images are not split over ranks yet"):
        shard_batch(pictures, 0, 2)
    # what DDP wraps: head_of finds the policy's lm_head through DDP's and the StepModule's `module`
    from prefuse.engine.train.distributed import StepModule
    from prefuse.heads import head_of

    policy = transformers.AutoModelForCausalLM.from_pretrained(files["model"])
    wrapper = torch.nn.Module()
    wrapper.module = StepModule(None, policy)  # the attribute DistributedDataParallel holds its module in
    assert head_of(wrapper).weight is policy.lm_head.weight
