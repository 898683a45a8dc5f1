"""Packed sequences (padding_free): the batch's sequences laid end to end in rows without padding give the padded
batch's losses and gradients.

- `PreferenceLoss(hidden [R, L, H], ..., hidden_index=...)` against the padded call, in float64, for objectives that
  read sums (sigmoid, ipo), lengths (simpo), token values (LD-DPO's verbose part, GRPO), an extra role (SELM's
  sample), unpaired batch-level ones (KTO with its kl role), on every head path (in-forward, recompute,
  frozen-weight);
- the decoder: packed rows give each token the hidden state it has in the padded batch for every architecture
  `check_packable` lets through (sdpa and eager), and attention that crosses the boundaries does not;
- `Step(padding_free=True)` on a tiny Llama (LoRA and full) against the padded step: loss and every gradient.
"""
import importlib.util

import peft
import pytest
import torch
import transformers

from prefuse.cli import main
from prefuse.engine.core.objectives import objective_needs
from prefuse.engine.core.sources import build_batch
from prefuse.engine.core.step import Step
from prefuse.engine.data.packing import pack_sequences
from prefuse.engine.models.loading import Models, check_packable, decoder_hidden_states, packed_row_tokens
from prefuse.preference import PreferenceLoss
from tests import test_engine_train as engine

F64 = torch.finfo(torch.float64).eps


def padded_batch(lengths, width, vocab, prompt=2, generator=None):
    """input_ids, attention_mask, labels [S, T] (next-token layout: labels from position prompt - 1)."""
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = torch.full_like(ids, -100)
    for s, n in enumerate(lengths):
        labels[s, prompt - 1:n - 1] = ids[s, prompt:n]
    return ids, mask, labels


def test_pack_sequences_layout():
    ids, mask, _ = padded_batch([5, 2, 4, 1, 3], 5, 50)
    one_row, rows = pack_sequences(ids, mask), pack_sequences(ids, mask, row_tokens=5)
    assert one_row.input_ids.shape == (1, 15)  # no padding
    assert rows.input_ids.shape == (3, 5)  # rows within the padded width
    for packed in (one_row, rows):
        check_layout(ids, mask, packed)
    with pytest.raises(ValueError, match="right-padded"):
        pack_sequences(ids, mask.flip(1))
    with pytest.raises(ValueError, match="row_tokens"):
        pack_sequences(ids, mask, row_tokens=4)


def check_layout(ids, mask, packed):
    flat_ids, flat_pos = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1)
    for s, n in enumerate([5, 2, 4, 1, 3]):
        at = packed.hidden_index[s, :n]
        assert torch.equal(flat_ids[at], ids[s, :n]) and torch.equal(flat_pos[at], torch.arange(n))
        assert (packed.hidden_index[s, n:] == -1).all()
        assert (packed.sequence.reshape(-1)[at] == s).all()
    # every token once, and a row's tail is no sequence's
    assert int(mask.sum()) == int((packed.sequence >= 0).sum())
    assert torch.equal(packed.padded(packed.packed(ids)) * mask, ids)


# objective, its roles (name -> number of rows per example), hyper-parameters, extra inputs per example
CASES = {
    "sigmoid_ld": ("sigmoid", {"chosen": 1, "rejected": 1}, {"ld_alpha": 0.5}, {}),
    "ipo": ("ipo", {"chosen": 1, "rejected": 1}, {}, {}),
    "simpo": ("simpo", {"chosen": 1, "rejected": 1}, {}, {}),
    "selm": ("selm", {"chosen": 1, "rejected": 1, "sample": 1}, {"alpha": 0.01}, {}),
    "kto": ("kto", {"completion": 1, "kl": 1}, {}, {"labels": lambda b: torch.arange(b) % 2 == 0}),
    "grpo": ("grpo", {"online": 2}, {}, {"rewards": lambda b: torch.linspace(-1, 1, 2 * b).view(b, 2)}),
}


def _roles(spec: dict, n_examples: int) -> tuple[dict, int]:
    roles, start = {}, 0
    for role, k in spec.items():
        rows = torch.arange(start, start + n_examples * k)
        roles[role] = rows if k == 1 else rows.view(n_examples, k)
        start += n_examples * k
    return roles, start


@pytest.mark.parametrize("path", ["auto", "recompute", "frozen_weight"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_preference_loss_packed_equals_padded(case, path):
    objective, role_spec, hparams, extra = CASES[case]
    n_examples, width, hidden_size, vocab = 3, 9, 8, 40
    roles, n_seq = _roles(role_spec, n_examples)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, width + 1, (n_seq,), generator=generator).tolist()
    ids, mask, labels = padded_batch(lengths, width, vocab, generator=generator)
    hidden = torch.randn(n_seq, width, hidden_size, dtype=torch.float64, generator=generator)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, dtype=torch.float64, generator=generator)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, generator=generator)
    inputs = {k: make(n_examples) for k, make in extra.items()}
    loss_fn = PreferenceLoss(objective, beta=0.1, mode="auto" if path == "frozen_weight" else path, **hparams)
    packed = pack_sequences(ids, mask)
    assert packed.n_tokens < ids.numel()

    def run(h, ref, **kw):
        h = h.clone().requires_grad_()
        w = weight.clone().requires_grad_(path != "frozen_weight")
        loss, metrics = loss_fn(h, w, labels, roles=roles, ref_hidden=ref, **inputs, **kw)
        loss.backward()
        return loss, metrics, h.grad, w.grad

    if not loss_fn.reads_reference:
        ref_hidden = None
    loss, metrics, grad_h, grad_w = run(hidden, ref_hidden)
    mode = loss_fn.last_mode
    p_loss, p_metrics, p_grad_h, p_grad_w = run(packed.packed(hidden), None if ref_hidden is None
                                                else packed.packed(ref_hidden), hidden_index=packed.hidden_index)
    assert loss_fn.last_mode == mode  # the same head path, packed or not
    assert mode == {"recompute": "recompute", "frozen_weight": "frozen_weight"}.get(
        path, "in_forward" if loss_fn.separable else "recompute")
    tol = 16 * F64 * width * vocab
    torch.testing.assert_close(p_loss, loss, rtol=tol, atol=tol)
    assert metrics.keys() == p_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(p_metrics[name], metrics[name], rtol=tol, atol=tol, msg=name)
    # the packed gradient, laid back out, is the padded one (zero at padding, which no label reads)
    torch.testing.assert_close(packed.padded(p_grad_h), grad_h, rtol=tol, atol=tol)
    assert (p_grad_h.reshape(-1, hidden_size)[(packed.sequence < 0).reshape(-1)] == 0).all()
    if grad_w is not None:
        torch.testing.assert_close(p_grad_w, grad_w, rtol=tol, atol=tol)


def test_preference_loss_packed_refusals():
    ids, mask, labels = padded_batch([4, 3], 4, 20)
    packed = pack_sequences(ids, mask)
    hidden = torch.randn(*packed.input_ids.shape, 8, dtype=torch.float64)
    weight = torch.randn(20, 8, dtype=torch.float64)
    loss_fn = PreferenceLoss("simpo")
    bad = packed.hidden_index.clone()
    bad[0, 1] = -1  # a labeled position without its hidden state
    with pytest.raises(ValueError, match="hidden_index: a labeled position"):
        loss_fn(hidden, weight, labels, hidden_index=bad)
    bad = packed.hidden_index.clone()
    bad[1, 0] = bad[0, 0]
    with pytest.raises(ValueError, match="hidden_index: two positions"):
        loss_fn(hidden, weight, labels, hidden_index=bad)
    with pytest.raises(ValueError, match="hidden_index: expected"):
        loss_fn(hidden, weight, labels, hidden_index=packed.hidden_index[:, :2])


# -- the decoder ----------------------------------------------------------------------------------------------------

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 60}
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=3),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                                sliding_window=3, final_logit_softcapping=0.5),
    "phi": lambda: transformers.PhiConfig(**SMALL),
}


def tiny_model(family: str, attention: str, dtype=torch.float32):
    config = FAMILIES[family]()
    config._attn_implementation = attention
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("row_tokens", [None, 9])
def test_packed_rows_give_each_token_its_padded_hidden_state(family, attention, row_tokens):
    if family == "gemma2" and attention == "sdpa":
        pytest.skip("Gemma-2 has no sdpa in transformers 5")
    model = tiny_model(family, attention)
    check_packable(model)
    ids, mask, _ = padded_batch([7, 3, 9, 5, 1, 9, 6], 9, 60)
    packed = pack_sequences(ids, mask, row_tokens=row_tokens)
    assert packed.input_ids.shape[0] < ids.shape[0]  # several sequences share rows
    with torch.no_grad():
        padded = decoder_hidden_states(model, ids, mask)
        unpacked = packed.padded(decoder_hidden_states(model, packed.input_ids, None,
                                                       position_ids=packed.position_ids))
        # break it: the same rows with attention across the boundaries (no restarts, one causal row)
        crossing = packed.padded(decoder_hidden_states(model, packed.input_ids, torch.ones_like(packed.input_ids)))
    keep = mask.bool()
    # the same per-token arithmetic, rows laid out differently: float32 rounding of a few length-H dot products
    tol = 64 * torch.finfo(torch.float32).eps * float(padded[keep].abs().max())
    assert float((unpacked - padded)[keep].abs().max()) <= tol
    assert float((crossing - padded)[keep].abs().max()) > 100 * tol


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="needs a CUDA GPU and the flash_attn package")
@pytest.mark.parametrize("row_tokens", [None, 9])
def test_flash_attention_varlen_gives_each_token_its_padded_hidden_state(row_tokens):
    """flash_attention_2 reads the packed rows' position ids as varlen sequence boundaries (bfloat16 on the GPU,
    against the padded batch under the same kernel)."""
    config = FAMILIES["llama"]()
    config._attn_implementation = "flash_attention_2"
    model = transformers.AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    check_packable(model)
    ids, mask, _ = padded_batch([7, 3, 9, 5, 1, 9, 6], 9, 60)
    ids, mask = ids.cuda(), mask.cuda()
    packed = pack_sequences(ids, mask, row_tokens=row_tokens)
    with torch.no_grad():
        padded = decoder_hidden_states(model, ids, mask).float()
        unpacked = packed.padded(decoder_hidden_states(model, packed.input_ids, None,
                                                       position_ids=packed.position_ids)).float()
        crossing = packed.padded(decoder_hidden_states(model, packed.input_ids,
                                                       torch.ones_like(packed.input_ids))).float()
    keep = mask.bool()
    tol = 8 * 2.0 ** -8 * float(padded[keep].abs().max())  # a few bfloat16 ulps of the largest value
    assert float((unpacked - padded)[keep].abs().max()) <= tol
    assert float((crossing - padded)[keep].abs().max()) > tol


def test_packed_row_width_follows_the_attention():
    model = tiny_model("llama", "sdpa")
    assert packed_row_tokens(model, 9) == 9 and packed_row_tokens(model, 9, 100) == 100
    model.config._attn_implementation = "eager"
    assert packed_row_tokens(model, 9) == 9
    model.config._attn_implementation = "flash_attention_2"  # varlen: one row
    assert packed_row_tokens(model, 9) is None and packed_row_tokens(model, 9, 100) == 100


def test_models_that_cannot_take_packed_rows_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30))
    with pytest.raises(ValueError, match="padding_free: model type 'gpt2'"):
        check_packable(gpt2)
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="padding_free: attn_implementation 'flex_attention'"):
        check_packable(model)


# -- the step -------------------------------------------------------------------------------------------------------


def tiny_models(lora: bool, lm_head: bool = False) -> Models:
    """A float64 tiny Llama: with LoRA (random B: a policy apart from its reference, the adapters disabled) or
    fully trained beside a frozen copy, perturbed, as its reference."""
    torch.manual_seed(0)
    policy = tiny_model("llama", "sdpa", torch.float64).train()
    if lora:
        targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if lm_head else [])
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
        return Models(policy=peft.get_peft_model(policy, config), reference=None, tokenizer=None)
    reference = tiny_model("llama", "sdpa", torch.float64)
    reference.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))
            param.requires_grad_(False)
    return Models(policy=policy, reference=reference, tokenizer=None)


def examples(n: int, seed: int) -> list[dict]:
    """n examples of random tokens with every response key a role reads, of varied lengths."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        return torch.randint(3, 60, (int(torch.randint(low, high, (1,), generator=generator)),),
                             generator=generator).tolist()

    return [{"prompt_ids": tokens(2, 5), "chosen_ids": tokens(1, 12), "rejected_ids": tokens(1, 12),
             "reference_ids": tokens(1, 12), "completion_ids": tokens(1, 12), "label": i % 3 != 0}
            for i in range(n)]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("objective, lora, hparams, row_tokens", [
    ("sigmoid", True, {}, None), ("sigmoid", True, {}, 10**6), ("ipo", False, {}, None),
    ("selm", True, {"alpha": 0.01}, None), ("kto", False, {}, 10**6), ("sigmoid", "lm_head", {}, 10**6),
])
def test_padding_free_step_equals_the_padded_step(objective, lora, hparams, row_tokens):
    models = tiny_models(bool(lora), lm_head=lora == "lm_head")  # "lm_head": LoRA on the lm_head too
    needs = objective_needs([objective])
    batch = build_batch(examples(5, seed=3), list(range(5)), needs, pad_id=0)
    trained = [(name, p) for name, p in models.policy.named_parameters() if p.requires_grad]
    results, packings = [], []
    for padding_free in (False, True):
        step = Step(models, PreferenceLoss(objective, beta=0.1, **hparams), needs, padding_free=padding_free,
                    padding_free_row_tokens=row_tokens)
        models.policy.zero_grad()
        loss, metrics = step(batch)
        loss.backward()
        results.append((loss.detach(), metrics, {name: p.grad.clone() for name, p in trained}))
        packings.append(step.packed(batch))
    (loss, metrics, grads), (p_loss, p_metrics, p_grads) = results
    packed = packings[1]  # default (sdpa): rows no wider than the padded batch; 10**6: one row
    assert packed.input_ids.shape[0] < batch.input_ids.shape[0]  # sequences share rows
    if row_tokens is None:
        assert packed.input_ids.shape[1] <= batch.input_ids.shape[1]
    else:
        assert packed.input_ids.shape[0] == 1
    # float64 through the decoder and the head; rows laid out differently, every sum over at most S * T terms
    tol = 64 * F64 * batch.input_ids.numel()
    torch.testing.assert_close(p_loss, loss, rtol=tol, atol=tol)
    for name in metrics:
        torch.testing.assert_close(p_metrics[name], metrics[name], rtol=tol, atol=tol, msg=name)
    assert abs(float(loss)) > 0 and any(float(g.abs().max()) > 0 for g in grads.values())
    assert (lora == "lm_head") == any("lm_head.lora" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(p_grads[name], grad, rtol=tol, atol=tol * float(grad.abs().max()), msg=name)


# -- prefuse train --padding_free -----------------------------------------------------------------------------------

files = engine.files  # the tiny Llama and its pairs (a module-scoped fixture)


@pytest.mark.usefixtures("one_thread", "offline_hf_home")
@pytest.mark.parametrize("loss_type, peft, rows", [("simpo", "true", {}), ("sigmoid", "false", {}),
                                                   ("simpo", "true", {"padding_free_row_tokens": 10**6})])
def test_prefuse_train_padding_free_equals_padded(files, tmp_path, loss_type, peft, rows):
    """The first step of `prefuse train` on 8 conversational pairs, padded and --padding_free: the loss, rewards,
    log-probs and gradient norm equal. (Later steps are not compared: Adam's first update is about lr * sign(g),
    so a gradient component near 0 may move by a whole lr either way.)"""
    records = {}
    for name, flags in (("padded", {}), ("packed", {"padding_free": "true", **rows})):
        # no LoRA dropout: its random masks are drawn over the decoder's [rows, width] shapes, which packing changes
        argv = engine.args(files, tmp_path / name, "conversational", loss_type=loss_type, use_peft=peft, lora_r=4,
                           lora_dropout=0.0,
                           per_device_train_batch_size=8, max_steps=1, logging_steps=1, save_steps=0,
                           learning_rate=1e-2, lr_scheduler_type="constant", **flags)
        assert main(argv) == 0
        records[name] = engine.read_metrics(tmp_path / name)
    # float32: the same per-token arithmetic with rows laid out differently, each value a sum over at most the
    # batch's 16 x 128 positions
    rel = 2.0 ** -24 * 16 * 128
    compared = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "grad_norm")
    (padded,), (packed,) = records["padded"], records["packed"]
    for key in compared:
        if key in padded:
            assert packed[key] == pytest.approx(padded[key], rel=rel, abs=rel), key
    assert padded["grad_norm"] > 0 and padded["logps/chosen"] != padded["logps/rejected"]


@pytest.mark.usefixtures("offline_hf_home")
@pytest.mark.parametrize("flags, field", [
    ({"padding_free_row_tokens": 200}, "padding_free_row_tokens"),
    ({"padding_free": "true", "padding_free_row_tokens": 64}, "padding_free_row_tokens"),
    ({"padding_free": "true", "loss_type": "ofs_dpo", "use_peft": "true"}, "padding_free"),
])
def test_padding_free_settings_are_one_line(files, tmp_path, capsys, flags, field):
    assert main(engine.args(files, tmp_path, max_steps=1, save_steps=0, **flags)) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and field in errors[0], errors


# -- prefuse bench --task train --paths prefuse prefuse_padding_free ... -------------------------------------------

@pytest.mark.heavy  # three worker processes, about a minute on the shared 2 cores
def test_bench_train_padding_free_paths_equal_the_padded_losses(tmp_path):
    """The bench's packed paths (rows no wider than the padded batch; one row) take the same steps as prefuse's
    padded one: the bench's own loss and log-prob checks pass, on the same batch; they run only when named."""
    from prefuse.bench import train

    assert "prefuse_padding_free" not in train.DEFAULT_TRAIN_PATHS
    paths = ("prefuse", "prefuse_padding_free", "prefuse_padding_free_one_row")
    records = train.run(train.QUICK_SHAPE, ("lora",), paths, rounds=1, warmup=1, work_dir=str(tmp_path),
                        log=lambda *_: None)
    assert [r["path"] for r in records] == list(paths)
    for rec in records:
        assert not rec["errors"] and len(rec["losses"]) == 2 and rec["peak_mib"] > 0, rec
    assert len({r["batch_digest"] for r in records}) == 1
    assert all(r["loss_max_diff"] <= train.LOSS_TOLERANCE for r in records[1:])
