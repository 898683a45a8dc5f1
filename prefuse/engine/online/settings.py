"""The online section of `prefuse train`'s settings (--online: prompts -> rollouts -> judge -> batch,
engine/online/source.py): the judges, the sampling, the iterations, and vLLM's share of the GPU."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefuse.engine.checks import check_field, setting
from prefuse.engine.judges import RULE_JUDGES
from prefuse.engine.online.methods import AVG_REJECTED, SAMPLERS

ITERATION_REFERENCES = ("previous", "initial")
ITERATION_SAMPLING = ("per_batch", "once")


@dataclass
class OnlineSettings:
    online: bool = setting(False, "generate -> judge -> update: dataset_name gives the prompts (see "
                                  "docs/online.md)")
    reward_funcs: list[str] | None = setting(None, "online judge: reward functions file.py:name with TRL's "
                                                   "signature, scores summed")
    reward_weights: list[float] | None = setting(None, "weights of the reward functions (default 1 each)")
    reward_model_path: str | None = setting(None, "online judge: a Bradley-Terry reward model directory (prefuse "
                                                  "train-rm)")
    judge: str | None = setting(None, "online judge: a pairwise preference model directory, or 'copy' (the toy "
                                      "task's rule judge)")
    max_new_tokens: int = setting(64, "online: the longest sampled response")
    num_generations: int = setting(4, "online: samples per prompt of grpo, rloo and hypo")
    temperature: float | None = setting(None, "online: sampling temperature, 0: greedy (default: the objective's own, "
                                              "TRL 1.16's or its paper's: 0.9 for online DPO and its family, 1.0 for "
                                              "grpo, rloo, nash_md, online_ipo, hypo); where the objective's "
                                              "estimator reads it, the loss's log-probs are taken at it too (`prefuse "
                                              "objectives`)")
    top_p: float = setting(1.0, "online: nucleus sampling")
    missing_eos_penalty: float | None = setting(None, "online: subtracted from the score of a sample that did not "
                                                      "end with EOS (TRL's)")
    mixture_coef: float = setting(0.5, "online: m of the geometric mixture softmax((1 - m) log pi + m log pi_ref) "
                                       "(Nash-MD, IPO-MD)")
    online_sampler: str = setting("policy", "online: policy, or mixture (IPO-MD: both samples of a pair from the "
                                            "mixture)")
    pair_samples: int = setting(2, "online: samples per prompt of the judged pairs (n > 2: best vs worst, iterative "
                                   "DPO)")
    iterations: int = setting(1, "online: split the steps into iterations; the reference becomes the previous "
                                 "iterate")
    iteration_slices: bool = setting(False, "online: each iteration draws its prompts from its own slice of the "
                                            "prompts")
    iteration_reference: str | None = setting(None, "online iterations: previous (iterate) or initial (the starting "
                                                    "model throughout)")
    iteration_sampling: str = setting("per_batch", "online iterations: per_batch (fresh samples of the current "
                                                   "policy at every batch) or once (the authors' loop: at each "
                                                   "iteration's start, its prompts' samples from pi_t, judged once "
                                                   "and trained on for the iteration; judged pairs and selm)")
    use_vllm: bool = setting(False, "online: sample the policy with vLLM on the same GPU (CUDA, pip install vllm)")
    avg_rejected: str = setting("policy", "online avg_dpo: where y~- comes from, policy (a policy sample per prompt) "
                                          "or bdhs (online BDHS from the current policy, prefuse.engine.methods.bdhs; "
                                          "--rho_th, --epsilon_s, --n_bdhs, --embedder as prefuse bdhs)")

    def check(self) -> None:
        """One-line ValueErrors naming the field; the sampling, iteration and judge-model settings only with --online
        (offline, the objective's defaults leave temperature and iteration_reference unset)."""
        check_field(self.reward_weights is None or bool(self.reward_funcs), "reward_weights", "needs --reward_funcs")
        check_field(not self.reward_model_path or Path(self.reward_model_path).is_dir(), "reward_model_path",
                    f"no such model directory: {self.reward_model_path}")
        if not self.online:
            return
        check_field(self.pair_samples >= 2, "pair_samples", f"must be at least 2, got {self.pair_samples}")
        check_field(self.iterations >= 1, "iterations", f"must be at least 1, got {self.iterations}")
        check_field(not self.iteration_slices or self.iterations > 1, "iteration_slices", "needs --iterations > 1")
        check_field(self.iteration_reference in ITERATION_REFERENCES, "iteration_reference",
                    f"{self.iteration_reference!r} is not previous or initial")
        check_field(self.iteration_sampling in ITERATION_SAMPLING, "iteration_sampling",
                    f"{self.iteration_sampling!r} is not per_batch or once")
        check_field(self.num_generations >= 2, "num_generations", f"must be at least 2, got {self.num_generations}")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        check_field(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check_field(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check_field(0 <= self.mixture_coef <= 1, "mixture_coef", f"must be in [0, 1], got {self.mixture_coef}")
        check_field(self.online_sampler in SAMPLERS, "online_sampler", "must be policy or mixture")

        check_field(self.judge is None or self.judge in RULE_JUDGES or Path(self.judge).is_dir(), "judge",
                    f"no such model directory: {self.judge} (nor a rule judge: {', '.join(RULE_JUDGES)})")
        check_field(self.avg_rejected in AVG_REJECTED, "avg_rejected", f"{self.avg_rejected!r} is not policy or bdhs")


@dataclass
class VLLMSettings:
    vllm_gpu_memory_utilization: float = setting(0.3, "online, --use_vllm: the share of GPU memory vLLM may take")

    def check(self) -> None:
        check_field(0 < self.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization",
                    f"must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
