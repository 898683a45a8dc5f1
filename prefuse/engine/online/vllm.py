"""vLLM as the policy's sampler of online runs (`--use_vllm`): optional, CUDA only, behind an import check.

    sampler = VLLMSampler(model_dir, gpu_memory_utilization=0.3, seed=0)   # vllm.LLM on the same GPU
    sampler.sync(policy)                                                   # the policy's current weights
    samples = sampler.sample(prompt_ids, rollout_cfg, seed=step_seed, eos_id=eos)   # -> rollout.Samples

The engine colocates vLLM with training in one process (no server): before each rollout the policy's weights are
pushed into vLLM's model with its `load_weights`, as TRL's colocate mode does (a LoRA policy's weights as base +
update, formed out of place, under the base model's names). Only the policy is sampled here;
the reference and the geometric mixture stay on transformers' `generate` (rollout.py). Not exercised on a GPU in
this repository's tests (they run on the CPU with a stand-in `vllm` module that checks the calls).
"""
from __future__ import annotations

import time

import torch

from prefuse.engine.online.rollout import RolloutConfig, Samples, cut_at_eos


def _vllm():
    try:
        import vllm
    except ImportError:
        raise ValueError("use_vllm: needs the vllm package (pip install vllm) on a CUDA machine; without it the "
                         "rollouts use transformers' generate (drop --use_vllm)") from None
    if not torch.cuda.is_available():
        raise ValueError("use_vllm: vLLM needs a CUDA GPU; on this machine drop --use_vllm (transformers' generate)")
    return vllm


def vllm_named_weights(policy: torch.nn.Module):
    """(name, tensor) of the policy's weights under the base model's names (what vLLM's load_weights reads). For a
    PeftModel each LoRA layer's weight is its base weight plus the adapters' update, formed out of place (no
    merge and unmerge, whose rounding would drift the base weights a little at every push)."""
    if not hasattr(policy, "peft_config"):
        yield from ((name, param.data) for name, param in policy.named_parameters())
        return
    modules = dict(policy.named_modules())
    prefix = getattr(policy, "prefix", "lora_")
    with torch.no_grad():
        for name, param in policy.named_parameters():
            clean = name.removeprefix("base_model.model.")
            if prefix in clean or "original_module" in clean:
                continue
            if ".base_layer." in name and name.endswith(".weight"):
                layer = modules[name.rsplit(".base_layer.", 1)[0]]
                update = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                yield clean.replace(".base_layer", ""), param.data + update
                continue
            yield clean.replace(".base_layer", "").replace("modules_to_save.default.", ""), param.data


class VLLMSampler:
    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 seed: int = 0, dtype: str = "auto"):
        vllm = _vllm()
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(model=str(model_path), gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, dtype=dtype)

    def sync(self, policy: torch.nn.Module) -> None:
        """Push the policy's current weights into vLLM (a LoRA policy's with its update added)."""
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in vllm_named_weights(policy):
            model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()

    def sample(self, prompts: list[list[int]], cfg: RolloutConfig, *, seed: int, eos_id: int | None) -> Samples:
        """cfg.num_generations responses per prompt, grouped by prompt, cut at the first EOS."""
        params = self._sampling_params(n=cfg.num_generations, max_tokens=cfg.max_new_tokens, seed=seed,
                                       temperature=cfg.temperature, top_p=cfg.top_p,
                                       stop_token_ids=None if eos_id is None else [eos_id])
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions, eos = [], []
        for request in outputs:
            for output in request.outputs:
                tokens, has_eos = cut_at_eos(list(output.token_ids), eos_id)
                completions.append(tokens)
                eos.append(has_eos)
        repeated = [p for p in prompts for _ in range(cfg.num_generations)]
        return Samples(repeated, completions, eos, cfg.num_generations, time.perf_counter() - started)
