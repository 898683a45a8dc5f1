"""prefuse.engine.models.loading: tiny Llama, Qwen2 and Gemma-2 models saved and loaded back; the fused path against the
models' own logits, the lm_head never called, LoRA's reference, the frozen reference copy, the errors."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from prefuse.engine.data import collate_pairs  # noqa: E402
from prefuse.engine.models.loading import (  # noqa: E402
    ModelConfig,
    decoder_hidden_states,
    head_of,
    load_models,
    reference_hidden_states,
    sequence_logps,
)

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=False),  # q/k/v projections with bias
    # a small cap so that it changes the log-probs of a randomly initialised model
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                                final_logit_softcapping=0.5, tie_word_embeddings=True),
    "phi": lambda: transformers.PhiConfig(**SMALL),  # an lm_head with a bias
}
CAUSAL_LMS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "phi": "PhiForCausalLM"}


pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


def save_tiny(tmp_path, kind: str = "llama", seed: int = 0, **config_overrides) -> str:
    """A randomly initialised tiny causal LM written by save_pretrained (safetensors); returns its directory."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = getattr(transformers, CAUSAL_LMS[kind])(config)
    if model.get_output_embeddings().bias is not None:  # initialised to zeros: make it count
        torch.nn.init.normal_(model.get_output_embeddings().bias, std=1.0)
    path = tmp_path / f"{kind}_{seed}_{len(list(tmp_path.iterdir()))}"
    model.save_pretrained(path)
    return str(path)


def pair_batch() -> dict[str, torch.Tensor]:
    """Two pairs with prompts and responses of different lengths: right padding and prompt masking in the batch."""
    gen = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    examples = [{"prompt_ids": ids(4), "chosen_ids": ids(5), "rejected_ids": ids(2)},
                {"prompt_ids": ids(2), "chosen_ids": ids(3), "rejected_ids": ids(7)}]
    return collate_pairs(examples, pad_token_id=0)


def logits_logps(model, batch) -> torch.Tensor:
    """The reference computation: per-sequence sums [B] from the model's own logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["labels"] != -100
    token_logps = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "phi"])
def test_sequence_logps_equal_the_logits_path(tmp_path, kind):
    models = load_models(ModelConfig(save_tiny(tmp_path, kind)), need_reference=False)
    batch = pair_batch()
    with torch.no_grad():
        sums, counts = sequence_logps(models.policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
        expected = logits_logps(models.policy, batch)
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [5, 3, 2, 7]  # the response lengths: prompt and padding positions carry no label
    if kind == "gemma2":
        head = head_of(models.policy)
        assert head.softcap == 0.5 and head.weight is models.policy.get_input_embeddings().weight  # tied
        from prefuse.kernels import linear_logprobs  # the cap matters here, so the check above saw it applied
        with torch.no_grad():
            hidden = decoder_hidden_states(models.policy, batch["input_ids"], batch["attention_mask"])
            uncapped = linear_logprobs(hidden, head.weight, batch["labels"]).sum(-1)
        assert (uncapped - expected).abs().max() > 1e-2


def test_sequence_logps_gradients_equal_the_logits_path(tmp_path):
    models = load_models(ModelConfig(save_tiny(tmp_path, "llama")), need_reference=False)
    policy, batch = models.policy, pair_batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # distinct upstream gradients per sequence
    params = [p for p in policy.parameters() if p.requires_grad]

    sums, _ = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    fused = torch.autograd.grad((sums * weights).sum(), params)
    plain = torch.autograd.grad((logits_logps(policy, batch) * weights).sum(), params)
    assert len(params) > 10 and all(g.abs().sum() > 0 for g in plain[-3:])  # lm_head and the last layers get some
    for name_grad, (g_fused, g_plain) in enumerate(zip(fused, plain)):
        torch.testing.assert_close(g_fused, g_plain, atol=1e-5, rtol=1e-4, msg=f"parameter #{name_grad}")


@pytest.mark.parametrize("use_peft", [False, True])
def test_decoder_hidden_states_never_call_lm_head(tmp_path, use_peft):
    models = load_models(ModelConfig(save_tiny(tmp_path, "qwen2"), use_peft=use_peft), need_reference=False)
    batch = pair_batch()

    def refuse(module, args):
        raise AssertionError("lm_head called")

    models.policy.get_output_embeddings().register_forward_pre_hook(refuse)
    with pytest.raises(AssertionError, match="lm_head called"):  # the hook is live: the full forward trips it
        models.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = decoder_hidden_states(models.policy, batch["input_ids"], batch["attention_mask"])
    assert hidden.shape == (4, batch["input_ids"].shape[1], 32)
    sums, _ = sequence_logps(models.policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    sums.sum().backward()


def test_lora_reference_is_the_base_model_exactly(tmp_path):
    path = save_tiny(tmp_path, "llama", attention_dropout=0.5)  # a reference pass in train mode would differ
    models = load_models(ModelConfig(path, use_peft=True, lora_r=4))
    policy, batch = models.policy, pair_batch()
    assert isinstance(policy, peft.PeftModel) and models.reference is None
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all("lora_" not in name for name, p in policy.named_parameters() if not p.requires_grad)

    with torch.no_grad():  # move the adapters away from their (identity) init
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        base_hidden = decoder_hidden_states(base, batch["input_ids"], batch["attention_mask"])
    policy_hidden = decoder_hidden_states(policy, batch["input_ids"], batch["attention_mask"])
    ref_hidden = reference_hidden_states(models, batch["input_ids"], batch["attention_mask"])

    assert (policy_hidden - base_hidden).abs().max() > 1e-3  # the adapters are on for the policy
    assert torch.equal(ref_hidden, base_hidden) and not ref_hidden.requires_grad
    assert policy.training and all(m.training for m in policy.modules())  # the policy's mode is back


def test_separate_reference_is_a_frozen_copy(tmp_path):
    path = save_tiny(tmp_path, "llama")
    models = load_models(ModelConfig(path))
    policy, reference, batch = models.policy, models.reference, pair_batch()
    assert reference is not None and reference is not policy and not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters()) and policy.training
    for (name, p), r in zip(policy.named_parameters(), reference.parameters()):
        assert torch.equal(p, r) and p.data_ptr() != r.data_ptr(), name  # same weights, separate storage
    ref_hidden = reference_hidden_states(models, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(ref_hidden, decoder_hidden_states(policy, batch["input_ids"], batch["attention_mask"]))
    assert not ref_hidden.requires_grad

    other = save_tiny(tmp_path, "llama", seed=1)  # ref_model_name_or_path names another model
    reference = load_models(ModelConfig(path, ref_model_name_or_path=other)).reference
    assert not torch.equal(reference.get_output_embeddings().weight, policy.get_output_embeddings().weight)
    assert load_models(ModelConfig(path), need_reference=False).reference is None


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(tmp_path):
    path = save_tiny(tmp_path, "gemma2")
    batch = pair_batch()
    grads, layer_calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same random lora_A in both
        policy = load_models(ModelConfig(path, use_peft=True, lora_r=4, lora_dropout=0.0,
                                         gradient_checkpointing=checkpointing), need_reference=False).policy
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.1)
        calls = []
        policy.get_base_model().get_decoder().layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
        sums, _ = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
        sums.sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2]  # checkpointing recomputed the layer in backward
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_dtype_and_tokenizer(tmp_path):
    from tests.tokenizer_fixture import build_tokenizer

    path = save_tiny(tmp_path, "llama")
    models = load_models(ModelConfig(path, torch_dtype="bfloat16"), need_reference=False)
    assert models.tokenizer is None  # the directory has no tokenizer files
    assert {p.dtype for p in models.policy.parameters()} == {torch.bfloat16}
    batch = pair_batch()
    sums, _ = sequence_logps(models.policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert sums.dtype == torch.float32 and torch.isfinite(sums).all()

    build_tokenizer().save_pretrained(path)  # 500 tokens for the model's 96 embedding rows: refused at load
    with pytest.raises(ValueError, match=r"^model_name_or_path: the tokenizer has 500 tokens but the model in .* "
                                         r"embeds only 96 \(vocab_size\); resize"):
        load_models(ModelConfig(path), need_reference=False)
    path = save_tiny(tmp_path, "llama", vocab_size=len(build_tokenizer()))
    build_tokenizer().save_pretrained(path)
    tokenizer = load_models(ModelConfig(path), need_reference=False).tokenizer
    assert tokenizer is not None and tokenizer("hello world").input_ids == build_tokenizer()("hello world").input_ids


def test_missing_or_unusable_directories_are_one_line_errors(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ValueError, match="model_name_or_path: .*no_such_model.* does not exist") as error:
        load_models(ModelConfig(missing))
    assert "\n" not in str(error.value) and "save_pretrained" in str(error.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.* has no config.json"):
        load_models(ModelConfig(str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="ref_model_name_or_path: .*no_such_model"):
        load_models(ModelConfig(save_tiny(tmp_path, "llama"), ref_model_name_or_path=missing))
    with pytest.raises(ValueError, match="flash_attention_2"):
        load_models(ModelConfig(save_tiny(tmp_path, "llama"), attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="torch_dtype"):
        load_models(ModelConfig(save_tiny(tmp_path, "llama"), torch_dtype="float64"))
    # lm_head in lora_target_modules: a LoRA adapter on it, which the fused head computes (tests/test_head_lora.py)
    policy = load_models(ModelConfig(save_tiny(tmp_path, "llama"), use_peft=True,
                                     lora_target_modules=("q_proj", "lm_head")), need_reference=False).policy
    assert isinstance(policy.get_output_embeddings(), peft.tuners.lora.Linear)
