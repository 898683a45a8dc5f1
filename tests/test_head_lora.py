"""LoRA on the lm_head inside the fused head: logits = h W^T (+ b) + u B^T with u = scale * dropout(h) A^T, chunk by
chunk (kernels/low_rank.py), and the model side (`prefuse.heads.head_of` reads peft's LoRA Linear around the lm_head).

References: the dense float64 definition, and peft's own forward (`model(...).logits`, its lm_head module) in float64
with autograd through it. The chunk ops work in float32 whatever the compute dtype, so a float64 call differs from
the float64 definition by float32 rounding of the logits' transform: per token |error| <= 8 u (1 + max |z|), u =
2^-24 (a log-softmax of float32-rounded logits), and a gradient by the same relative amount of the largest one.
"""
import warnings

import pytest
import torch

from prefuse.heads import head_of
from prefuse.kernels import group_rows, grouped_logprobs, linear_logprobs, linear_token_stats
from prefuse.kernels.grouped import grouped_log_sum_sq_probs

U32 = 2.0 ** -24

pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(logits: torch.Tensor) -> float:
    return 8 * U32 * (1 + float(logits.detach().abs().max()))


def dense_logp(hidden, weight, labels, bias=None, a=None, b=None, scale=1.0, temperature=1.0, softcap=None):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if a is not None:
        z = z + scale * (hidden @ a.T) @ b.T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels == -100, torch.zeros_like(logp), logp), z


def leaves(*shapes, dtype=torch.float64, scale=1.0):
    return [(torch.randn(*s, dtype=dtype) * scale).requires_grad_() for s in shapes]


# -- the kernel: tensors in, tensors out ------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(),                                                     # vocabulary tiles (small budget), no bias
    dict(bias=True, weight_grad=True),                          # the weight and bias train too
    dict(chunk_size=5, temperature=0.7, softcap=3.0),           # whole-vocabulary rows, transform
    dict(chunk_size=64, bias=True),                             # one chunk
], ids=["tiles", "weight_and_bias_grad", "rows_softcap_temperature", "one_chunk"])
def test_low_rank_logprobs_and_gradients_equal_float64_definition(case):
    S, T, H, V, r, scale = 3, 7, 16, 300, 4, 0.75
    hidden, a, b = leaves((S, T, H), (r, H), (V, r), scale=0.5)
    weight = (torch.randn(V, H, dtype=torch.float64) * 0.5).requires_grad_(case.get("weight_grad", False))
    bias = (torch.randn(V, dtype=torch.float64)).requires_grad_(case.get("weight_grad", False)) if case.get(
        "bias") else None
    labels = torch.randint(0, V, (S, T))
    labels[0, :3] = -100
    labels[2, -1] = -100
    options = dict(temperature=case.get("temperature", 1.0), softcap=case.get("softcap"))
    head = dict(chunk_size=case["chunk_size"]) if "chunk_size" in case else dict(chunk_budget_bytes=64 * 8 * 8)
    u = scale * hidden @ a.T
    got = linear_logprobs(hidden, weight, labels, bias=bias, low_rank=(u, b), backend="torch", **head, **options)
    want, z = dense_logp(hidden, weight, labels, bias, a, b, scale, **options)
    tol = tolerance(z)
    assert (got.double() - want).abs().max() <= tol
    upstream = torch.randn(S, T, dtype=torch.float64)
    params = [hidden, a, b] + ([weight] + ([bias] if bias is not None else []) if case.get("weight_grad") else [])
    grads = torch.autograd.grad((got.double() * upstream).sum(), params)
    wants = torch.autograd.grad((want * upstream).sum(), params)
    for name, g, w in zip(["hidden", "A", "B", "weight", "bias"], grads, wants):
        assert (g - w).abs().max() <= tol * (1 + float(w.abs().max())), name


def test_zero_factor_gives_the_plain_head_bit_for_bit():
    """LoRA's initial B = 0: the low-rank path computes the plain head's chunks and merges (rewards exactly 0)."""
    hidden = torch.randn(4, 9, 32)
    weight = torch.randn(2000, 32)
    labels = torch.randint(0, 2000, (4, 9))
    labels[1, :4] = -100
    u = torch.randn(4, 9, 8)
    with torch.no_grad():
        for head in (dict(), dict(chunk_size=6)):  # vocabulary tiles (the CPU default), whole rows
            plain = linear_logprobs(hidden, weight, labels, backend="torch", **head)
            low = linear_logprobs(hidden, weight, labels, backend="torch", low_rank=(u, torch.zeros(2000, 8)), **head)
            assert torch.equal(plain, low)


def test_triton_backend_takes_the_same_route():
    """The low-rank term is a torch matmul into the chunk before the chunk op: the Triton ops (interpreter) give
    the same log-probs and gradients as the torch backend."""
    S, T, H, V, r = 2, 5, 16, 128, 4
    hidden, a, b = leaves((S, T, H), (r, H), (V, r), dtype=torch.float32, scale=0.5)
    weight = torch.randn(V, H) * 0.5
    labels = torch.randint(0, V, (S, T))
    labels[0, 0] = -100
    results = []
    for backend in ("torch", "triton"):
        logp = linear_logprobs(hidden, weight, labels, backend=backend, chunk_size=4, low_rank=(0.5 * hidden @ a.T, b))
        results.append((logp, *torch.autograd.grad(logp.sum(), [hidden, a, b])))
    for got, want in zip(*results):
        assert (got - want).abs().max() <= 1e-5 * (1 + float(want.detach().abs().max()))


def test_grouped_logprobs_statistics_and_wpo_term_take_the_update():
    S, T, H, V, r = 4, 6, 16, 200, 3
    hidden, a, b = leaves((S, T, H), (r, H), (V, r), scale=0.5)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (S, T))
    labels[:, 0] = -100
    u = hidden @ a.T
    want, z = dense_logp(hidden, weight, labels, a=a, b=b)
    rows = group_rows(labels, torch.zeros(S, dtype=torch.long), vocab=V, hidden_size=H, dtype=hidden.dtype,
                      needs_grad=True, grouped=False, chunk_size=5)
    logp = grouped_logprobs(hidden, weight, rows, low_rank=(u, b), backend="torch")
    assert (logp.double() - want.reshape(-1)[rows.index]).abs().max() <= tolerance(z)
    (g,) = torch.autograd.grad(logp.sum(), [b])
    (w,) = torch.autograd.grad(want.sum(), [b])
    assert (g - w).abs().max() <= tolerance(z) * (1 + float(w.abs().max()))
    log_p = torch.log_softmax(z, -1)
    want_sq = torch.logsumexp(2 * log_p, -1).reshape(-1)[rows.index]
    sq = grouped_log_sum_sq_probs(hidden, weight, rows, low_rank=(u, b), backend="torch")
    assert (sq.double() - want_sq).abs().max() <= tolerance(z)
    stats = linear_token_stats(hidden.detach(), weight, labels, low_rank=(u.detach(), b.detach()), backend="torch")
    entropy = -(log_p.exp() * log_p).sum(-1)
    mask = labels != -100
    assert (stats.entropy.double() - entropy)[mask].abs().max() <= tolerance(z) * 10


@pytest.mark.parametrize("plan", ["whole_rows", "vocabulary_tiles", "in_forward"])
def test_wpo_term_comes_from_the_low_rank_log_prob_pass(plan):
    """grouped_logprobs(low_rank=..., log_sum_sq_out=...) fills log sum_v p(v)^2 of the updated logits from its own
    chunks (PreferenceLoss's WPO with LoRA on the lm_head: no pass of its own), against float64."""
    S, T, H, V, r = 4, 6, 16, 700, 3
    hidden, a, b = leaves((S, T, H), (r, H), (V, r), scale=0.5)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (S, T))
    labels[:, 0] = -100
    _, z = dense_logp(hidden, weight, labels, a=a, b=b)
    options = {"whole_rows": dict(grouped=False, chunk_size=5),
               "vocabulary_tiles": dict(grouped=False, mode="recompute", chunk_budget_bytes=20 * 256 * 8),
               "in_forward": dict(grouped=True, mode="in_forward")}[plan]
    rows = group_rows(labels, torch.arange(S) // 2, vocab=V, hidden_size=H, dtype=hidden.dtype, needs_grad=True,
                      **options)
    assert rows.in_forward == (plan == "in_forward")
    assert (rows.plan.vocab_tile is not None) == (plan == "vocabulary_tiles")
    out = torch.zeros(rows.n_rows, dtype=torch.float32)
    coef = (lambda chunk, lp: torch.ones_like(lp)) if plan == "in_forward" else None
    grouped_logprobs(hidden, weight, rows, low_rank=(hidden @ a.T, b), backend="torch", coef_fn=coef,
                     log_sum_sq_out=out)
    want = torch.logsumexp(2 * torch.log_softmax(z, -1), -1).reshape(-1)[rows.index]
    assert (out.double() - want).abs().max() <= tolerance(z)


def test_low_rank_refusals():
    hidden, weight, labels = torch.randn(2, 3, 8), torch.randn(50, 8), torch.randint(0, 50, (2, 3))
    u, b = torch.randn(2, 3, 2), torch.randn(50, 2)
    with pytest.raises(ValueError, match="factor"):
        linear_logprobs(hidden, weight, labels, low_rank=(u, torch.randn(49, 2)))
    with pytest.raises(ValueError, match="u "):
        linear_logprobs(hidden, weight, labels, low_rank=(torch.randn(2, 4, 2), b))
    with pytest.raises(ValueError, match="cast it"):
        linear_logprobs(hidden, weight, labels, low_rank=(u.double(), b))
    with pytest.raises(ValueError, match="frozen_weight"):
        linear_logprobs(hidden.requires_grad_(), weight, labels, low_rank=(u, b), mode="frozen_weight")
    rows = group_rows(labels, torch.arange(2), vocab=50, hidden_size=8, dtype=torch.float32, needs_grad=True,
                      mode="recompute")
    with pytest.raises(ValueError, match="coef_fn"):
        grouped_logprobs(hidden, weight, rows, low_rank=(u, b), coef_fn=lambda chunk, lp: torch.ones_like(lp))


# -- the model side: peft's LoRA Linear around the lm_head -------------------------------------------------------

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def lora_llama(tied: bool, dropout: float = 0.0, seed: int = 0, **lora):
    """A tiny float64 Llama with LoRA on q_proj, v_proj and lm_head, every factor random (B too: the adapter is not a
    no-op)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    base = transformers.LlamaForCausalLM(config).double()
    options = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "lm_head"],
                   init_lora_weights=False, **lora)
    with warnings.catch_warnings():  # peft on a tied lm_head: its adapter changes the output side only
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**options))


def batch(vocab=300, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 9), generator=generator)
    labels = torch.randint(0, vocab, (4, 9), generator=generator)
    labels[0, :4] = -100
    labels[3, 6:] = -100
    return ids, torch.ones_like(ids), labels


def peft_logp(logits, labels):
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels == -100, torch.zeros_like(logp), logp)


def fused_logp(model, hidden, labels):
    head = head_of(model)
    return linear_logprobs(hidden, head.weight, labels, bias=head.bias, low_rank=head.low_rank(hidden),
                           backend="torch")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_head_equals_peft_forward_and_its_gradients(tied):
    """Log-probs through the fused head with the lm_head's LoRA equal log_softmax of peft's own logits (float64),
    and the gradients of every LoRA factor (the lm_head's A and B, and those inside the decoder) equal autograd's
    through peft's forward; so do the gradients with respect to the hidden states through peft's lm_head module."""
    from prefuse.engine.models.loading import decoder_hidden_states

    model = lora_llama(tied)
    head = head_of(model)
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert head.lora is not None and head.lora.scale == 2.0 and head.lora.b.abs().max() > 0
    ids, mask, labels = batch()
    upstream = torch.randn(labels.shape, dtype=torch.float64)
    trained = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=ids, attention_mask=mask).logits
    want = peft_logp(logits, labels)
    want_grads = torch.autograd.grad((want * upstream).sum(), trained)
    hidden = decoder_hidden_states(model, ids, mask)
    got = fused_logp(model, hidden, labels)
    tol = tolerance(logits)
    assert (got.double() - want).abs().max() <= tol
    got_grads = torch.autograd.grad((got.double() * upstream).sum(), trained)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.lora_A" in n for n in names) and any("lm_head.lora_B" in n for n in names)
    for name, g, w in zip(names, got_grads, want_grads):
        assert (g - w).abs().max() <= tol * (1 + float(w.abs().max())), name

    # the hidden states' gradient against peft's lm_head module itself
    leaf = hidden.detach().requires_grad_()
    lm_head = model.get_output_embeddings()
    assert isinstance(lm_head, peft.tuners.lora.Linear)
    want = peft_logp(lm_head(leaf), labels)
    (want_h,) = torch.autograd.grad((want * upstream).sum(), [leaf])
    (got_h,) = torch.autograd.grad((fused_logp(model, leaf, labels).double() * upstream).sum(), [leaf])
    assert (got_h - want_h).abs().max() <= tol * (1 + float(want_h.abs().max()))


def test_reference_is_the_base_head():
    """With the adapters disabled (LoRA's reference) head_of gives the base lm_head alone, as Head.base() does, and
    the fused head equals peft's logits under disable_adapter()."""
    from prefuse.engine.models.loading import decoder_hidden_states

    model = lora_llama(tied=False)
    ids, mask, labels = batch()
    with torch.no_grad(), model.disable_adapter():
        assert head_of(model).lora is None
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = decoder_hidden_states(model, ids, mask)
        got = fused_logp(model, hidden, labels)
        base = head_of(model)
    assert (got.double() - peft_logp(logits, labels)).abs().max() <= tolerance(logits)
    policy_head = head_of(model)
    assert policy_head.lora is not None and policy_head.base().lora is None
    assert policy_head.base().weight is base.weight


def test_lora_dropout_is_peft_s():
    """lora_dropout > 0 in train mode: the head applies the adapter's own dropout module to its input, as peft's
    forward does, so with the same random state the two draw the same mask."""
    from prefuse.engine.models.loading import decoder_hidden_states

    model = lora_llama(tied=False, dropout=0.5)
    model.train()
    ids, mask, labels = batch()
    with torch.no_grad():
        hidden = decoder_hidden_states(model, ids, mask)
        torch.manual_seed(7)
        logits = model.get_output_embeddings()(hidden)
        want = peft_logp(logits, labels)
        torch.manual_seed(7)
        got = fused_logp(model, hidden, labels)
        torch.manual_seed(8)
        other = fused_logp(model, hidden, labels)
    tol = tolerance(logits)
    assert (got.double() - want).abs().max() <= tol
    assert (other.double() - want).abs().max() > 100 * tol  # the mask matters: another draw differs


@pytest.mark.parametrize("variant, match", [
    (dict(use_dora=True), "LoRA variant"),
    (dict(lora_bias=True), "lora_bias"),
    ("two_adapters", "2 active LoRA adapters"),
    ("merged", "merged"),
], ids=["dora", "lora_bias", "two_active", "merged"])
def test_what_the_fused_head_does_not_compute_is_refused(variant, match):
    model = lora_llama(tied=False, **(variant if isinstance(variant, dict) else {}))
    if variant == "two_adapters":
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
        model.base_model.set_adapter(["default", "second"])
    elif variant == "merged":
        model.merge_adapter()
    with pytest.raises(ValueError, match=match) as error:
        head_of(model)
    assert "\n" not in str(error.value)


# -- prefuse train with lm_head in lora_target_modules ------------------------------------------------------------

from tests import test_engine_train as engine  # noqa: E402

files = engine.files  # the tiny Llama and its pairs (a module-scoped fixture)


def test_prefuse_train_trains_the_lm_head_adapter(files, tmp_path, offline_hf_home):
    """`--lora_target_modules lm_head` alone: step 1 is the reference exactly (B = 0: the low-rank head gives the
    plain head's log-probs bit for bit, so the loss is log 2 and the margins 0); every step then takes the same
    16 pairs and the loss falls step by step, which only the lm_head's adapter can do; the saved adapter's lm_head
    B has moved off zero."""
    import math

    from safetensors.torch import load_file

    from prefuse.cli import main

    out = tmp_path / "run"
    argv = engine.args(files, out, loss_type="sigmoid", per_device_train_batch_size=16, max_steps=3,
                       logging_steps=1, save_steps=0, learning_rate=1e-2, lr_scheduler_type="constant",
                       use_peft="true", lora_r=4, lora_dropout=0.0, lora_target_modules="lm_head")
    assert main(argv) == 0
    metrics = engine.read_metrics(out)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert metrics[0]["rewards/margins"] == 0.0
    losses = [m["loss"] for m in metrics]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    weights = load_file(str(next(out.rglob("adapter_model.safetensors"))))
    lora = {name: value for name, value in weights.items() if "lora_" in name}
    assert lora and all("lm_head" in name for name in lora), sorted(lora)
    lm_head_b = [value for name, value in lora.items() if "lora_B" in name]
    assert len(lm_head_b) == 1 and float(lm_head_b[0].abs().max()) > 0


# -- PrefuseDPOTrainer against TRL's DPOTrainer, lm_head in the LoraConfig's target_modules ------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(use_weighting=True), dict(loss_type="ipo", beta=0.5),
                                       dict(padding_free=True)], ids=["sigmoid", "wpo", "ipo", "padding_free"])
def test_prefuse_dpo_trainer_equals_trl_with_lm_head_lora(tmp_path, monkeypatch, overrides):
    """PrefuseDPOTrainer with LoRA on q_proj, v_proj and lm_head (B moved off zero) against TRL 1.16's own
    DPOTrainer, which refuses an adapter on the lm_head (its fused head reads lm_head.weight): TRL runs the same
    model with the lm_head adapter merged into a plain, trainable lm_head W' = W + s B A and the base model as a
    separate reference (= the adapters disabled). Loss, the decoder's LoRA gradients and TRL's metrics are equal;
    the lm_head factors' gradients equal the chain rule through W': dA = s B^T dW', dB = s dW' A^T
    (tolerances: tests/test_integration_trl.py)."""
    trl = pytest.importorskip("trl")
    trl_tests = pytest.importorskip("tests.test_integration_trl")
    from prefuse.compat.trl import PrefuseDPOTrainer

    example = trl_tests.load_example()
    if not example.DATA.exists():
        pytest.skip("the shared preference data is not next to the repository")
    cfg = example.Config(output_dir=str(tmp_path))
    pairs = example.load_pairs(cfg)
    tokenizer = example.train_tokenizer(pairs, cfg.vocab_size)
    options = dict(tokenizer=tokenizer, pairs=pairs, bf16=False, **overrides)
    theirs = example.make_trainer(cfg, trl.DPOTrainer, model=example.build_model(tokenizer, cfg),
                                  ref_model=example.build_model(tokenizer, cfg), **options)
    lora_config = example.LoraConfig
    monkeypatch.setattr(example, "LoraConfig", lambda **kw: lora_config(
        **{**kw, "target_modules": [*kw["target_modules"], "lm_head"]}))
    ours = example.make_trainer(cfg, PrefuseDPOTrainer, model=example.build_model(tokenizer, cfg), **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ours.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=generator)
        theirs.model.load_state_dict({name.replace("lm_head.base_layer.", "lm_head."): value
                                      for name, value in ours.model.state_dict().items()
                                      if "lm_head.lora_" not in name})
    head = head_of(ours.model)
    assert head.lora is not None and head.weight is not head.lora.b
    lm_head = theirs.model.get_output_embeddings()
    assert isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None
    with torch.no_grad():
        lm_head.weight.copy_(head.weight + head.lora.scale * head.lora.b @ head.lora.a)
    lm_head.weight.requires_grad_(True)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))

    ours_loss, theirs_loss = ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch)
    assert trl_tests.close(ours_loss.item(), theirs_loss.item()), (ours_loss.item(), theirs_loss.item())
    ours_loss.backward()
    theirs_loss.backward()
    theirs_params = dict(theirs.model.named_parameters())
    merged = lm_head.weight.grad.double()
    want_lm_head = {"lora_A": head.lora.scale * head.lora.b.double().T @ merged,
                    "lora_B": head.lora.scale * merged @ head.lora.a.double().T}
    checked = 0
    for name, param in ours.model.named_parameters():
        if not param.requires_grad:
            continue
        kind = next((k for k in want_lm_head if f"lm_head.{k}" in name), None)
        want = want_lm_head[kind] if kind else theirs_params[name].grad.double()
        assert (param.grad.double() - want).abs().max() <= trl_tests.GRAD_TOLERANCE * want.abs().max(), name
        checked += kind is not None
    assert checked == 2
    ours_metrics, theirs_metrics = ours._metrics["train"], theirs._metrics["train"]
    reward_scale = theirs.beta * abs(theirs_metrics["logps/chosen"][-1])
    for name, values in theirs_metrics.items():
        scale = reward_scale if name.startswith("rewards/") else 1.0
        assert trl_tests.close(ours_metrics[name][-1], values[-1], scale), (name, ours_metrics[name][-1], values[-1])


def test_in_forward_gradient_with_the_update_equals_recompute():
    """grouped_logprobs(coef_fn=...) with low_rank forms the gradients in forward (FusedHeadInForwardLowRank): the
    surrogate's gradients with respect to hidden, A and B equal autograd through the recompute path's
    sum coef * logp (float64), and PreferenceLoss takes that path for a separable objective."""
    from prefuse.preference import PreferenceLoss

    S, T, H, V, r = 4, 6, 16, 200, 3
    hidden, a, b = leaves((S, T, H), (r, H), (V, r), scale=0.5)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (S, T))
    labels[:, :2] = -100
    coefs = torch.randn(S * T, dtype=torch.float64)
    rows = group_rows(labels, torch.tensor([0, 0, 1, 1]), vocab=V, hidden_size=H, dtype=hidden.dtype,
                      needs_grad=True, mode="in_forward")
    assert rows.in_forward
    u = 0.5 * hidden @ a.T
    surrogate, logp = grouped_logprobs(hidden, weight, rows, low_rank=(u, b), backend="torch",
                                       coef_fn=lambda chunk, lp: coefs[chunk].float())
    got = torch.autograd.grad(surrogate, [hidden, a, b])
    want_logp, z = dense_logp(hidden, weight, labels, a=a, b=b, scale=0.5)
    want = torch.autograd.grad((want_logp.reshape(-1)[rows.index] * coefs[:rows.n_rows]).sum(), [hidden, a, b])
    tol = tolerance(z)
    assert (logp.double() - want_logp.reshape(-1)[rows.index]).abs().max() <= tol
    for name, g, w in zip(["hidden", "A", "B"], got, want):
        assert (g - w).abs().max() <= tol * (1 + float(w.abs().max())), name

    loss_fn = PreferenceLoss("sigmoid", beta=0.1, backend="torch")
    loss, _ = loss_fn(hidden, weight, labels, low_rank=(0.5 * hidden @ a.T, b), ref_hidden=hidden.detach())
    assert loss_fn.last_mode == "in_forward"
    grads = torch.autograd.grad(loss, [hidden, a, b])
    recompute = PreferenceLoss("sigmoid", beta=0.1, backend="torch", mode="recompute")
    want_loss, _ = recompute(hidden, weight, labels, low_rank=(0.5 * hidden @ a.T, b), ref_hidden=hidden.detach())
    assert recompute.last_mode == "recompute"
    assert abs(float(loss) - float(want_loss)) <= 1e-6
    for name, g, w in zip(["hidden", "A", "B"], grads, torch.autograd.grad(want_loss, [hidden, a, b])):
        assert (g - w).abs().max() <= 1e-6 * (1 + float(w.abs().max())), name


def test_prefuse_train_resumes_an_lm_head_adapter_exactly(files, tmp_path, offline_hf_home):
    """Checkpoints hold the lm_head's adapter (peft also saves its base weight there): 2 steps, then a resume to 4,
    give the per-step losses of 4 uninterrupted steps exactly (lora_dropout 0.1 on the head's input: the RNG too)."""
    from prefuse.cli import main

    flags = dict(loss_type="sigmoid", per_device_train_batch_size=4, logging_steps=1, save_steps=2,
                 learning_rate=1e-2, lr_scheduler_type="constant", use_peft="true", lora_r=4, lora_dropout=0.1,
                 lora_target_modules="q_proj lm_head")
    assert main(engine.args(files, tmp_path / "full", max_steps=4, **flags)) == 0
    assert main(engine.args(files, tmp_path / "cut", max_steps=2, **flags)) == 0
    assert main(engine.args(files, tmp_path / "cut", max_steps=4, resume_from_checkpoint="latest", **flags)) == 0
    full, cut = engine.read_metrics(tmp_path / "full"), engine.read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]
    assert len({r["loss"] for r in full}) > 2
