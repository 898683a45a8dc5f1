"""The online batch source of `prefuse train --online`: prompts -> rollouts -> judge -> a Batch with roles.

    source = OnlineSource(prompts=prompts, loss_types=method, models=models, tokenizer=tokenizer, judge=judge,
                          rollout=rollout, batch_size=8, seed=0)
    batch = source.next_batch()     # the sequences are prompt + sampled response; roles as the objective reads

How each objective's batch is made (`online_method`), the samples' log-probs then going through the fused head
like any other role (their logits are never materialized, neither for the policy nor for the reference):
    judged_pair   the DPO family, SimPO, ...: 2 samples per prompt (the policy's, or the mixture's with
                  --online_sampler mixture: IPO-MD), the judge's preferred one is `chosen` (TRL's OnlineDPOTrainer:
                  the first drawn on a tie); --pair_samples n > 2: the best against the worst (RLHF Workflow), a
                  prompt whose n samples all tie dropped and counted (`online/tied_prompts`)
    soft_pair     online_ipo: 2 samples in drawn order, preference_probs = the judge's P(first > second)
    xpo           one policy sample and one reference sample (LoRA: adapters disabled), judged into chosen and
                  rejected; the reference sample is also the role `sample` (XPO's alpha log pi(y_ref) term)
    selm          SELM's ranking: 2 policy samples and y_ref, the reference's greedy response, ranked together; the
                  best is `chosen` and the worst `rejected` (y_ref may be either) and y_ref is the role `sample`
    nash_md       y from the policy and y' from the geometric mixture; the role `completion` is y and
                  preference_probs = P(y > y')
    groups        grpo, rloo: num_generations samples per prompt, the role `online` [P, k] and their scores as
                  rewards [P, k] (a scoring judge only)
    hybrid        hypo: an offline pair of the (paired) dataset and num_generations policy samples of its prompt for
                  the KL term (role `online` [P, k]); no judge
    samples       hypo_kl: num_generations policy samples per prompt, no judge
    mixed         mixed_dpo (on a paired dataset): per example a ~ Bernoulli(mixed_p) (`mixed_draws`, seeded per
                  batch) picks the offline pair (a = 1) or an online pair judged as in judged_pair (a = 0); only the
                  drawn pair's two rows are in the batch (the other pair's roles point at them, weight 0) and only
                  the examples that drew the online pair are sampled and judged; the input `use_offline` is a
    avg           avg_dpo (on a paired dataset): the offline pair and y~-, one policy sample per prompt, as the role
                  `online_rejected` beside the shared `chosen` (the hook `generated_rejected`: BDHS plugs in there);
                  no judge
Every judge kind serves every judged method (`judge_kinds`): a scoring judge (reward functions, a reward model, a
vision-language or rule judge) ranks by score, after the missing-EOS penalty, and its P(a > b) is sigmoid(score(a)
- score(b)); a pairwise preference model (`--judge DIR`) compares, a round robin where more than two candidates are
ranked (each one's strength the sum of its P(a > b)), and gives no scores, so GRPO and RLOO refuse it.
Each batch carries the rollout metrics under TRL's names: `objective/scores` (mean judge score of the policy's
samples; with a pairwise judge instead `objective/chosen_prob`, the mean P(chosen > rejected), where a pair is
judged), `val/contain_eos_token`, and `rollout/tokens_per_second`; a Mixed-DPO batch also `mixed/online_fraction`
(and the rollout metrics only when some example drew the online pair). Generation and Mixed-DPO's draws are seeded
per batch from (seed, batches served), so a resumed run draws the same samples.

Row r of every batch belongs to example r % B (each role's rows follow the examples' order; `shared` roles point
at rows already there, SELM's own y_ref rows come last): per-example extras (a vision-language model's images)
follow the rows.
"""
from __future__ import annotations

import torch

from prefuse.engine.core.method_defaults import LOSS_TEMPERATURE
from prefuse.engine.core.sources import Batch
from prefuse.engine.data import PairBatches, collate_sequences, vision_inputs
from prefuse.engine.judges.ranking import best_and_worst, is_pairwise, judge_candidates
from prefuse.engine.models.embedders import load_embedder
from prefuse.engine.models.loading import Models
from prefuse.engine.online.methods import AVG_REJECTED, SAMPLERS, check_judge, mixed_draws, online_method, online_needs
from prefuse.engine.online.rollout import RolloutConfig, Samples, sample_mixture, sample_policy, sample_reference

# the roles whose rows are the policy's (or the mixture's) samples of the batch's rollout
SAMPLE_ROLES = ("online", "completion")


class OnlineSource:
    """Batches of prompts -> rollouts -> judge, in a resumable order of the prompts (epoch after epoch)."""

    def __init__(self, *, prompts, loss_types: list[str], models: Models, tokenizer, judge, rollout: RolloutConfig,
                 batch_size: int, seed: int, sampler: str = "policy", missing_eos_penalty: float | None = None,
                 pair_samples: int = 2, iterations=None, iteration_slices: bool = False, vllm=None,
                 mixed_p: float = 0.5, avg_rejected: str = "policy", bdhs: dict | None = None,
                 iteration_sampling: str = "per_batch"):
        """prompts: PromptData (engine.data.load_prompts); judge: engine.judges.Judge; batch_size: prompts per
        batch; rollout.num_generations: samples per prompt of grpo / rloo; pair_samples: samples per prompt of the
        judged-pair methods (2: TRL's online DPO; n > 2: the best against the worst, RLHF Workflow's iterative
        DPO); iterations: an engine.iterations.Iterations that moves the reference to the previous iterate;
        iteration_slices: iteration k draws its prompts from the k-th of as many disjoint, contiguous slices of the
        prompts as there are iterations (SELM's and RLHF Workflow's fresh prompts per iteration);
        iteration_sampling: "per_batch" (samples of the current policy at every batch) or "once" (the authors' loop:
        at an iteration's first batch, its prompts' samples from pi_t, judged into the batches the iteration then
        serves in turn, written to output_dir/iteration-<k>-batches.pt so that a resumed run reads them); vllm: an
        engine.rollout_vllm.VLLMSampler that samples the policy (its weights pushed once per batch); mixed_p:
        Mixed-DPO's P(offline pair); avg_rejected: where Avg-DPO's y~- comes from (policy: a policy sample; bdhs:
        BDHS, see `generated_rejected`); bdhs: {"regenerate": the BDHS function the run's build hands in (the
        methods room sits above this one), "cfg": a BDHSConfig, "embedder": an Embedder or its spec}. The mixed,
        avg and hybrid methods read paired examples (chosen_ids, rejected_ids), Mixed-DPO's also `prompt` and
        `columns` for the judge (build.paired_prompts)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"online_sampler: {sampler!r} is not one of {SAMPLERS}")
        if not 0 <= mixed_p <= 1:
            raise ValueError(f"mixed_p: P(offline pair) must be in [0, 1], got {mixed_p}")
        if avg_rejected not in AVG_REJECTED:
            raise ValueError(f"avg_rejected: {avg_rejected!r} is not one of {AVG_REJECTED}")
        self.mixed_p, self.avg_rejected, self.bdhs = float(mixed_p), avg_rejected, dict(bdhs or {})
        self.prompts, self.models, self.tokenizer, self.judge = prompts, models, tokenizer, judge
        self.method, self.needs = online_method(loss_types), online_needs(loss_types)
        self.rollout, self.sampler, self.penalty, self.seed = rollout.validate(), sampler, missing_eos_penalty, seed
        if pair_samples < 2:
            raise ValueError(f"pair_samples: a judged pair needs at least 2 samples per prompt, got {pair_samples}")
        self.pair_samples, self.iterations, self.vllm, self._synced = pair_samples, iterations, vllm, None
        if iteration_sampling not in ("per_batch", "once"):
            raise ValueError(f"iteration_sampling: {iteration_sampling!r} is not per_batch or once")
        self.once = iteration_sampling == "once" and iterations is not None
        if self.once and self.method not in ("judged_pair", "selm"):
            raise ValueError(f"iteration_sampling: once serves judged pairs (online DPO's family, selm), not "
                             f"{loss_types}")
        self._pool, self._pool_iteration = [], None
        n_slices = iterations.count if iteration_slices and iterations is not None else 1
        if n_slices > len(prompts):
            raise ValueError(f"iteration_slices: {len(prompts)} prompts cannot make {n_slices} slices")
        bounds = [round(i * len(prompts) / n_slices) for i in range(n_slices + 1)]
        self.slices = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        self.orders = [PairBatches(len(piece), batch_size=batch_size, seed=seed + k)
                       for k, piece in enumerate(self.slices)]
        self.order = self.orders[0]
        self.batches_per_epoch = len(self.order)
        self._iter = iter(self.order)
        self.served = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pairwise = is_pairwise(judge)  # compares two samples; gives no scores
        check_judge(self.method, self.pairwise, missing_eos_penalty)
        if self.method in ("mixed", "avg", "hybrid") and prompts.examples and "chosen_ids" not in prompts.examples[0]:
            raise ValueError(f"dataset_name: {loss_types} with --online read each example's offline pair: give a "
                             f"pairs file (prompt, chosen, rejected), not prompts only")

    # -- the BatchSource interface ----------------------------------------------------------------------------------
    @property
    def epoch(self) -> float:
        return self.order.epoch + self.order.position / max(len(self.order), 1)

    def state_dict(self) -> dict:
        state = {**self.order.state_dict(), "served": self.served}
        if len(self.orders) > 1:
            state["slice"] = self.orders.index(self.order)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.order = self.orders[int(state.get("slice", 0))]
        self.order.load_state_dict({k: v for k, v in state.items() if k not in ("served", "slice")})
        self.served = int(state["served"])
        self._iter = iter(self.order)
        if self.iterations is not None:
            self.iterations.restore(self.served)

    def next_batch(self) -> Batch:
        if self.iterations is not None:
            self.iterations.before_batch(self.served)
            piece = self.orders[min(self.iterations.iteration(self.served), len(self.orders) - 1)]
            if piece is not self.order:  # a new iteration's slice of the prompts
                self.order, self._iter = piece, iter(piece)
        if self.once:
            return self._pooled_batch()
        seed, tied = self.seed * 1_000_003 + self.served, 0
        self.served += 1
        for attempt in range(max(len(self.order), 1)):
            indices = next(self._iter, None)
            if indices is None:
                self._iter = iter(self.order)
                indices = next(self._iter)
            indices = [self.slices[self.orders.index(self.order)][i] for i in indices]
            examples = [self.prompts.examples[i] for i in indices]
            # a retry's samples get a seed of their own, still fixed by (seed, served): a resume draws the same
            batch = getattr(self, f"_{self.method}")(examples, indices, seed if not attempt else
                                                       hash((seed, attempt)) % 2 ** 62)
            if batch is not None:
                self._sampled_at(batch)
                if tied or "online/tied_prompts" in batch.metrics:
                    batch.metrics["online/tied_prompts"] = batch.metrics.get("online/tied_prompts", 0) + tied
                return batch
            tied += len(examples)  # every example's samples tied: the next prompts instead
        raise ValueError(f"judge: every sample of every prompt tied for {tied} prompts in a row (an epoch of them): "
                         f"the judge cannot tell the samples apart; check the judge, or raise --temperature")

    def _pooled_batch(self) -> Batch:
        """--iteration_sampling once: the next of the iteration's batches, made at its first batch."""
        k = self.iterations.iteration(self.served)
        if self._pool_iteration != k:
            self._pool, self._pool_iteration = self._iteration_pool(k), k
        position = self.served - k * self.iterations.every
        self.served += 1
        return self._pool[position % len(self._pool)]

    def _iteration_pool(self, k: int) -> list[Batch]:
        """Iteration k's batches: every prompt of its slice once, in a seeded order, sampled from the policy as it
        is now (pi_k) and judged; read from output_dir/iteration-<k>-batches.pt when a run before the resume made
        them, else made and written there (to a temporary file, then renamed)."""
        import dataclasses
        import os

        path = self.iterations.out / f"iteration-{k}-batches.pt"
        if path.is_file():
            return [Batch(**b) for b in torch.load(path, weights_only=True)]
        piece = self.slices[min(k, len(self.slices) - 1)]
        order = PairBatches(len(piece), batch_size=self.order.batch_size, seed=self.seed + 7919 * (k + 1))
        pool, tied = [], 0
        for j, positions in enumerate(order):
            indices = [piece[i] for i in positions]
            examples = [self.prompts.examples[i] for i in indices]
            batch = getattr(self, f"_{self.method}")(examples, indices, self.seed * 1_000_003 + 10 ** 9 + k * 100_003 + j)
            if batch is None:
                tied += len(examples)
                continue
            self._sampled_at(batch)
            pool.append(batch)
        if not pool:
            raise ValueError(f"judge: every sample of every prompt of iteration {k + 1} tied ({tied} prompts): the "
                             f"judge cannot tell the samples apart; check the judge, or raise --temperature")
        print(f"iteration {k + 1}: {len(pool)} batches of judged samples from the policy"
              + (f" ({tied} prompts dropped: their samples all tied)" if tied else ""), flush=True)
        temp = path.with_name(f".{path.name}.tmp")
        torch.save([dataclasses.asdict(b) for b in pool], temp)
        os.replace(temp, path)
        return pool

    def _sampled_at(self, batch: Batch) -> None:
        """Where the method's loss reads the distribution its samples came from (LOSS_TEMPERATURE "sampled" or
        "online"), each sequence's temperature goes with the batch to the fused head: the samples' rows (roles
        SAMPLE_ROLES) at the temperature they were drawn at, offline rows (HyPO's pairs) at 1."""
        temperature = self.rollout.temperature
        if LOSS_TEMPERATURE[self.method] == "one" or not temperature > 0:
            return
        t = torch.ones(batch.labels.shape[0], dtype=torch.float32)
        for role, rows in batch.roles.items():
            if role in SAMPLE_ROLES:
                t[rows.reshape(-1)] = temperature
        batch.temperature = t

    # -- rollouts and the judge -------------------------------------------------------------------------------------
    @staticmethod
    def _images(examples) -> list | None:
        """The examples' images (a vision-language model's data: one data.ExampleImages or None each), else None."""
        return [e.get("images") for e in examples] if examples and "images" in examples[0] else None

    def _vision(self, examples, repeat: int = 1, per_example: int = 1) -> dict:
        """Batch.vision of rows laid out as `repeat` blocks of the examples, each example `per_example` rows in a
        row: every row with its example's images; {} for text."""
        images = self._images(examples)
        if images is None:
            return {}
        return vision_inputs([im for im in images for _ in range(per_example)] * repeat)

    def _sample(self, kind: str, examples, seed: int, k: int, greedy: bool = False) -> Samples:
        """k samples per example's prompt from `kind` (policy, reference, mixture), with its images when it has
        them."""
        prompt_ids, images = [e["prompt_ids"] for e in examples], self._images(examples)
        cfg = RolloutConfig(**{**self.rollout.__dict__, "num_generations": k,
                               **({"temperature": 0.0} if greedy else {})})
        if images is not None and kind == "policy" and self.vllm is not None:
            raise ValueError("use_vllm: the vLLM rollout does not take images yet; sample a vision-language model "
                             "from the policy (without --use_vllm)")
        if kind == "policy" and self.vllm is not None:
            if self._synced != self.served:  # the policy's weights as they are for this batch
                self.vllm.sync(self.models.policy)
                self._synced = self.served
            return self.vllm.sample(prompt_ids, cfg, seed=seed, eos_id=self.eos_id)
        if kind == "mixture":
            return sample_mixture(self.models, prompt_ids, cfg, seed=seed, eos_id=self.eos_id, pad_id=self.pad_id,
                                  **({"images": images} if images is not None else {}))
        sampler = {"policy": sample_policy, "reference": sample_reference}[kind]
        return sampler(self.models, prompt_ids, cfg, seed=seed, eos_id=self.eos_id, pad_id=self.pad_id,
                       **({"images": images} if images is not None else {}))

    def _texts(self, samples: Samples) -> list[str]:
        return self.tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)

    def _columns(self, examples, repeat: int) -> dict:
        """The judge's columns, each a list of one value per sample; `images`: each example's image sources as
        read (absolute paths, datasets dicts, PIL images), not the file's relative paths."""
        names = sorted(set().union(*(e.get("columns", {}).keys() for e in examples)))
        columns = {n: [e.get("columns", {}).get(n) for e in examples for _ in range(repeat)] for n in names}
        if self._images(examples) is not None:
            columns["images"] = [list(e["images"].sources) if e.get("images") is not None else []
                                 for e in examples for _ in range(repeat)]
        return columns

    def _scores(self, examples, completions: list[list[int]], contains_eos: list[bool], repeat: int) -> torch.Tensor:
        """The judge's scores [N] of completions (N = len(examples) * repeat, grouped by prompt), minus the
        missing-EOS penalty for those that did not end."""
        candidates = [completions[i:i + repeat] for i in range(0, len(completions), repeat)]
        eos = [contains_eos[i:i + repeat] for i in range(0, len(contains_eos), repeat)]
        return self._wins(examples, candidates, eos)[1].flatten()

    def _wins(self, examples, candidates: list[list[list[int]]], contains_eos: list[list[bool]]):
        """Each example's n candidates (completion ids) judged against each other -> (wins [N, n, n] = P(a > b),
        scores [N, n] or None): judges.ranking.judge_candidates on their texts."""
        texts = [self.tokenizer.batch_decode(cs, skip_special_tokens=True) for cs in candidates]
        return judge_candidates(self.judge, [e["prompt"] for e in examples], texts,
                                columns=self._columns(examples, 1), contains_eos=contains_eos,
                                missing_eos_penalty=self.penalty, pairwise=self.pairwise)

    def _judged(self, examples, candidates, contains_eos, policy_count: int):
        """The ranked pair of each example -> (kept example positions, chosen, rejected, best, worst, metrics).
        With 2 candidates a tie keeps (first, second) (TRL's online DPO); with more, an example whose candidates
        all tie teaches nothing and is dropped (RLHF Workflow's and SELM's ranking), counted as
        `online/tied_prompts`. Metrics: the mean score of the first `policy_count` candidates (the policy's
        samples) with a scoring judge, else the mean P(chosen > rejected)."""
        wins, scores = self._wins(examples, candidates, contains_eos)
        best, worst = best_and_worst(wins, scores)
        n = len(candidates[0])
        if n == 2:
            worst = torch.where(best == worst, 1 - best, worst)
        kept = [i for i in range(len(examples)) if int(best[i]) != int(worst[i])]
        chosen = [candidates[i][int(best[i])] for i in kept]
        rejected = [candidates[i][int(worst[i])] for i in kept]
        rows = torch.tensor(kept, dtype=torch.long)
        prob = wins[rows, best[rows], worst[rows]] if kept else torch.zeros(0)
        metrics = {"objective/scores": float(scores[:, :policy_count].mean())} if scores is not None else {}
        if scores is None and kept:
            metrics["objective/chosen_prob"] = float(prob.mean())
        if n > 2:
            metrics["online/tied_prompts"] = len(examples) - len(kept)
        return kept, chosen, rejected, best, worst, metrics

    def _candidates(self, samples: Samples, n: int):
        """Samples grouped by prompt (n each) -> per example the lists of completion ids and EOS flags."""
        ids, eos = samples.completion_ids, samples.contains_eos
        return ([ids[i:i + n] for i in range(0, len(ids), n)], [eos[i:i + n] for i in range(0, len(eos), n)])

    def _batch(self, examples, indices, responses: dict[str, list[list[int]]], inputs: dict, metrics: dict,
               shared: dict[str, torch.Tensor] | None = None, extra: list | None = None) -> Batch:
        """Sequences prompt + response for each role in order (role r's rows [r * B, (r + 1) * B)); `shared` maps
        a role onto rows of the others (a sample that is also a side of its pair) or onto `extra` rows, (prompt
        ids, completion ids, example) appended after them."""
        prompts, sequences, roles = [e["prompt_ids"] for e in examples], [], {}
        for role, completions in responses.items():
            roles[role] = torch.arange(len(sequences), len(sequences) + len(examples))
            sequences += list(zip(prompts, completions))
        extra = extra or []
        sequences += [(p, c) for p, c, _ in extra]
        roles.update(shared or {})
        padded = collate_sequences([p for p, _ in sequences], [c for _, c in sequences], self.pad_id)
        images = self._images(examples)
        vision = {} if images is None else vision_inputs(images * len(responses) + [e.get("images") for *_, e in extra])
        return Batch(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"],
                     roles=roles, inputs=inputs, index=torch.tensor(indices, dtype=torch.long), metrics=metrics,
                     vision=vision)

    def _rollout_metrics(self, samples: Samples, scores: torch.Tensor | None = None) -> dict:
        """TRL's rollout metrics; objective/scores only with a scoring judge's scores."""
        return {**({"objective/scores": float(scores.mean())} if scores is not None else {}),
                **self._sample_metrics(samples)}

    def _preference(self, examples, first: Samples, second: Samples):
        """P(first > second) [N] of one sample each per example -> (probs, the first's scores or None)."""
        candidates = [[a, b] for a, b in zip(first.completion_ids, second.completion_ids)]
        eos = [[a, b] for a, b in zip(first.contains_eos, second.contains_eos)]
        wins, scores = self._wins(examples, candidates, eos)
        return wins[:, 0, 1].contiguous(), None if scores is None else scores[:, 0]

    def _judge_pair(self, examples, seed):
        """pair_samples samples per prompt ranked by the judge (`_judged`) -> (kept example positions, chosen,
        rejected, metrics)."""
        n = self.pair_samples
        samples = self._sample(self.sampler, examples, seed, n)
        candidates, eos = self._candidates(samples, n)
        kept, chosen, rejected, _, _, metrics = self._judged(examples, candidates, eos, n)
        return kept, chosen, rejected, {**metrics, **self._sample_metrics(samples)}

    def _judged_pair(self, examples, indices, seed):
        kept, chosen, rejected, metrics = self._judge_pair(examples, seed)
        if not kept:
            return None
        return self._batch([examples[i] for i in kept], [indices[i] for i in kept],
                           {"chosen": chosen, "rejected": rejected}, {}, metrics)

    def _soft_pair(self, examples, indices, seed):
        samples = self._sample(self.sampler, examples, seed, 2)
        first = Samples(samples.prompt_ids[0::2], samples.completion_ids[0::2], samples.contains_eos[0::2], 1)
        second = Samples(samples.prompt_ids[1::2], samples.completion_ids[1::2], samples.contains_eos[1::2], 1)
        probs, _ = self._preference(examples, first, second)
        scores = None if self.pairwise else self._scores(examples, samples.completion_ids, samples.contains_eos, 2)
        return self._batch(examples, indices, {"chosen": first.completion_ids, "rejected": second.completion_ids},
                           {"preference_probs": probs}, self._rollout_metrics(samples, scores))

    def _xpo(self, examples, indices, seed):
        """The policy's sample against the reference's, judged into chosen and rejected (the policy's wins a
        tie); the reference sample is also the role `sample`."""
        policy = self._sample("policy", examples, seed, 1)
        reference = self._sample("reference", examples, seed + 1, 1)
        probs, policy_scores = self._preference(examples, policy, reference)
        policy_wins = (probs >= 0.5).tolist()
        chosen = [p if w else r for p, r, w in zip(policy.completion_ids, reference.completion_ids, policy_wins)]
        rejected = [r if w else p for p, r, w in zip(policy.completion_ids, reference.completion_ids, policy_wins)]
        n = len(examples)
        # the reference sample is the rejected row where the policy won, else the chosen row
        sample_rows = torch.tensor([n + i if w else i for i, w in enumerate(policy_wins)])
        metrics = self._rollout_metrics(policy, policy_scores)
        if policy_scores is None:
            metrics["objective/chosen_prob"] = float(torch.where(probs >= 0.5, probs, 1 - probs).mean())
        return self._batch(examples, indices, {"chosen": chosen, "rejected": rejected}, {}, metrics,
                           shared={"sample": sample_rows})

    def _selm(self, examples, indices, seed):
        """SELM's ranking: the candidates {y_1, y_2, y_ref} (two policy samples and the reference's greedy
        response) ranked by the judge, the best `chosen` and the worst `rejected`, so y_ref may be either; y_ref
        is also the role `sample` (its row shared with the pair's where it was picked). Examples whose three
        candidates tie are dropped and counted."""
        samples = self._sample(self.sampler, examples, seed, 2)
        greedy = self._sample("reference", examples, seed + 1, 1, greedy=True)
        candidates, eos = self._candidates(samples, 2)
        candidates = [c + [g] for c, g in zip(candidates, greedy.completion_ids)]
        eos = [e + [g] for e, g in zip(eos, greedy.contains_eos)]
        kept, chosen, rejected, best, worst, metrics = self._judged(examples, candidates, eos, 2)
        if not kept:
            return None
        n, sample_rows, own = len(kept), [], []
        for j, i in enumerate(kept):  # y_ref's row: the chosen's, the rejected's, or one of its own after them
            place = {int(best[i]): j, int(worst[i]): n + j}.get(2)
            sample_rows.append(2 * n + len(own) if place is None else place)
            own += [] if place is not None else [i]
        metrics.update(self._sample_metrics(samples))
        metrics["selm/reference_chosen"] = sum(int(best[i]) == 2 for i in kept) / n
        metrics["selm/reference_rejected"] = sum(int(worst[i]) == 2 for i in kept) / n
        return self._batch([examples[i] for i in kept], [indices[i] for i in kept],
                           {"chosen": chosen, "rejected": rejected}, {}, metrics,
                           shared={"sample": torch.tensor(sample_rows)},
                           extra=[(examples[i]["prompt_ids"], candidates[i][2], examples[i]) for i in own])

    def _nash_md(self, examples, indices, seed):
        """y from the policy against y' from the geometric mixture: preference_probs = P(y > y'), from the scores
        after the missing-EOS penalty (a scoring judge, as TRL's Nash-MD) or the pairwise judge's compare()."""
        policy = self._sample("policy", examples, seed, 1)
        mixture = self._sample("mixture", examples, seed + 1, 1)
        probs, scores = self._preference(examples, policy, mixture)
        return self._batch(examples, indices, {"completion": policy.completion_ids}, {"preference_probs": probs},
                           self._rollout_metrics(policy, scores))

    def _groups(self, examples, indices, seed):
        k = self.rollout.num_generations
        if k < 2:
            raise ValueError(f"num_generations: grpo and rloo compare the samples of a prompt; need >= 2, got {k}")
        samples = self._sample(self.sampler, examples, seed, k)
        scores = self._scores(examples, samples.completion_ids, samples.contains_eos, k)
        prompts, sequences = [p for p in samples.prompt_ids], samples.completion_ids
        padded = collate_sequences(prompts, sequences, self.pad_id)
        roles = {"online": torch.arange(len(sequences)).view(len(examples), k)}
        return Batch(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"],
                     roles=roles, inputs={"rewards": scores.view(len(examples), k)},
                     index=torch.tensor(indices, dtype=torch.long), metrics=self._rollout_metrics(samples, scores),
                     vision=self._vision(examples, per_example=k))

    def _generated(self, examples, seed) -> Samples:
        k = self.rollout.num_generations
        return self._sample(self.sampler, examples, seed, k)

    def _sample_metrics(self, samples: Samples) -> dict:
        return {"val/contain_eos_token": sum(samples.contains_eos) / len(samples.contains_eos),
                "rollout/tokens_per_second": samples.tokens_per_second}

    def _hybrid(self, examples, indices, seed):
        samples = self._generated(examples, seed)
        n, k = len(examples), self.rollout.num_generations
        prompts = [e["prompt_ids"] for e in examples]
        padded = collate_sequences(prompts * 2 + samples.prompt_ids,
                                   [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
                                   + samples.completion_ids, self.pad_id)
        roles = {"chosen": torch.arange(n), "rejected": torch.arange(n, 2 * n),
                 "online": torch.arange(2 * n, 2 * n + n * k).view(n, k)}
        vision = {}
        if self._images(examples) is not None:  # the pairs' rows, then k sample rows per example
            images = self._images(examples)
            vision = vision_inputs(images * 2 + [im for im in images for _ in range(k)])
        return Batch(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"],
                     roles=roles, index=torch.tensor(indices, dtype=torch.long),
                     metrics=self._sample_metrics(samples), vision=vision)

    def _samples(self, examples, indices, seed):
        samples = self._generated(examples, seed)
        n, k = len(examples), self.rollout.num_generations
        padded = collate_sequences(samples.prompt_ids, samples.completion_ids, self.pad_id)
        return Batch(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"],
                     roles={"online": torch.arange(n * k).view(n, k)}, index=torch.tensor(indices, dtype=torch.long),
                     metrics=self._sample_metrics(samples), vision=self._vision(examples, per_example=k))

    # -- Mixed-DPO and Avg-DPO (arXiv 2407.02477, eqs. 4-5; docs/methods/mixed-avg-dpo.md) ------------------------
    def _mixed(self, examples, indices, seed):
        """Each example's drawn pair, two rows: the offline (y+, y-) where a = 1, else the judged pair of its
        policy samples (sampled, with the batch's seed, only for those examples: at p = 0 exactly the samples of
        online DPO's batch). mixed_dpo reads both pairs; the pair not drawn weighs 0, so its roles point at the
        drawn pair's rows instead of costing two more sequences: the loss is each example's drawn DPO term."""
        n = len(examples)
        use_offline = mixed_draws(seed, n, self.mixed_p)
        chosen, rejected = [e["chosen_ids"] for e in examples], [e["rejected_ids"] for e in examples]
        online = [i for i, offline in enumerate(use_offline) if not offline]
        metrics = {"mixed/online_fraction": len(online) / n}
        if online:
            kept, online_chosen, online_rejected, judged = self._judge_pair([examples[i] for i in online], seed)
            tied = [online[i] for i in range(len(online)) if i not in kept]
            for i, c, r in zip([online[i] for i in kept], online_chosen, online_rejected):
                chosen[i], rejected[i] = c, r
            if tied:  # best of n > 2 samples all tied: the example keeps no pair
                keep = [i for i in range(n) if i not in tied]
                if not keep:
                    return None
                examples, indices = [examples[i] for i in keep], [indices[i] for i in keep]
                chosen, rejected = [chosen[i] for i in keep], [rejected[i] for i in keep]
                use_offline, n = [use_offline[i] for i in keep], len(keep)
            metrics.update(judged)
        return self._batch(examples, indices, {"chosen": chosen, "rejected": rejected},
                           {"use_offline": torch.tensor(use_offline)}, metrics,
                           shared={"online_chosen": torch.arange(n), "online_rejected": torch.arange(n, 2 * n)})

    def _avg(self, examples, indices, seed):
        """The offline pair and the generated y~- (role online_rejected); `chosen` is one row read by both terms."""
        generated, metrics = self.generated_rejected(examples, seed)
        return self._batch(examples, indices, {"chosen": [e["chosen_ids"] for e in examples],
                                               "rejected": [e["rejected_ids"] for e in examples],
                                               "online_rejected": generated}, {}, metrics)

    def generated_rejected(self, examples, seed) -> tuple[list[list[int]], dict]:
        """Avg-DPO's y~- of each example from the current policy -> (completion ids, metrics). `policy`: one sample
        per prompt. `bdhs` (online BDHS, Algorithm 1): the regenerate function of the `bdhs` settings
        (prefuse.engine.methods.bdhs.bdhs_rejected), the one place it plugs in."""
        if self.avg_rejected == "bdhs":
            # a vision-language example's pixels as the model inputs BDHS generates with (its image tokens masked)
            examples = [{**e, "model_inputs": e["images"].model_inputs()} if e.get("images") is not None else e
                        for e in examples]
            if isinstance(self.bdhs.get("embedder"), str):  # loaded once, at the first batch
                self.bdhs["embedder"] = load_embedder(self.bdhs["embedder"])
            settings = {k: v for k, v in self.bdhs.items() if k != "regenerate"}
            return self.bdhs["regenerate"](self.models, self.tokenizer, examples, seed=seed, rollout=self.rollout,
                                           eos_id=self.eos_id, pad_id=self.pad_id, **settings)
        samples = self._sample(self.sampler, examples, seed, 1)
        return samples.completion_ids, self._sample_metrics(samples)
