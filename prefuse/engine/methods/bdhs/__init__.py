"""BDHS, Bias-Driven Hallucination Sampling (Algorithm 1 of "Understanding Alignment in Multimodal LLMs", Apple,
arXiv 2407.02477; docs/methods/bdhs.md): a rejected response y~- written by the policy itself with the image
hidden from its attention, guided by the ground truth y+ so that it differs from y+ only where the language prior
takes over.

    cfg = BDHSConfig(rho_th=0.99, epsilon_s=0.97, n_bdhs=5)
    results = bdhs_generate(model, tokenizer, examples, cfg, load_embedder(), seed=0)   # one BDHSResult each
    rejected_ids, metrics = bdhs_rejected(models, tokenizer, batch_examples, seed=s)     # the online hook

Per example and attempt (a fresh torch.Generator from (seed, example key, attempt) draws everything below, so the
draws do not depend on the batch; sampling runs under its own forked RNG seeded from (seed, attempt, batch)):
1. The yes/no heuristic: each sentence of y+ that begins with Yes/yes/No/no (`^[\\s]*(Yes|yes|No|no)\\b`) has
   that word swapped (Yes <-> No, yes <-> no) with probability `swap_prob` (0.5). The paper's regex has no `\\b`;
   prefuse adds it so that "Nothing" or "Yesterday" are not swapped.
2. Sentences: a simple regex, a sentence ends with a run of `.`, `!` or `?` followed by whitespace or the end
   (the whitespace after it starts the next sentence). y+ is tokenized once (a fast tokenizer's offsets give each
   token its sentence). Each sentence of n >= 2 tokens is cut at a uniformly random token position c in
   [1, n - 1] (both parts non-empty); a one-token sentence cannot be cut and is kept as it is.
3. The mask: rho_i ~ U(0, 1) for every maskable prompt position (the image tokens of a VLM; the text analogue's
   positions for a text model, see `text_prompt`), the key kept iff rho_i >= rho_th (rho_th = 1 hides them all,
   0 none). One mask per attempt, shared by the example's sentences. It is a 0 in the attention mask at those
   positions, which every layer and head of transformers' models applies to the keys; the position ids stay those
   of the unmasked prompt (computed from the padding alone), so hiding a token does not shift the others.
4. Guided generation: the continuation of sentence k is sampled from pi(. | masked x, y+^{<k}, y+^{k,1}) until
   the first token holding a sentence end or EOS (or max_new_tokens); all sentences of all examples of an attempt
   are batched together (generation_batch_size sequences per generate call). y~- = concat_k (y+^{k,1},
   y~^{k,2}), with EOS appended.
5. The filter: cosine similarity phi of the embeddings of y~- and of y+ (the original y+, before any swap); accept
   if phi < epsilon_s, else retry with a new mask, new swaps and new cuts. The last of n_bdhs attempts (when
   n_bdhs > 1) is unguided, the full response from pi(. | masked x), and accepted whatever phi; n_bdhs = 1 is a
   single guided attempt. A final attempt that comes out empty (EOS at once) is no rejected response: the
   attempt of lowest similarity is kept instead (`kept_attempt` says which).

Modules: sentences.py (steps 1-2), masking.py (3-4: maskable positions, the mask, masked generation), sampler.py
(5: the loop), online.py (the hook online sources call), offline.py (`prefuse bdhs`); the embedders are
engine/models/embedders.py.
"""

from prefuse.engine.methods.bdhs.masking import (
    draw_hidden,
    image_token_positions,
    maskable_ids,
    masked_generate,
    sentence_stop_ids,
    text_prompt,
)
from prefuse.engine.methods.bdhs.regenerated import bdhs_rejected, example_from_ids, model_image_token_id
from prefuse.engine.methods.bdhs.sampler import (
    BDHSConfig,
    BDHSExample,
    BDHSResult,
    attempt_generator,
    bdhs_generate,
    mix_seed,
    summary,
    text_tokenizer,
)
from prefuse.engine.methods.bdhs.sentences import draw_cuts, sentence_spans, sentence_tokens, swap_yes_no

__all__ = [
    "BDHSConfig", "BDHSExample", "BDHSResult", "attempt_generator", "bdhs_generate", "bdhs_rejected",
    "draw_cuts", "draw_hidden", "example_from_ids", "image_token_positions", "maskable_ids", "masked_generate",
    "mix_seed", "model_image_token_id", "sentence_spans", "sentence_stop_ids", "sentence_tokens", "summary",
    "swap_yes_no", "text_prompt", "text_tokenizer",
]
