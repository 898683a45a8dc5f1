"""The vLLM sampler's plumbing on the CPU, with a stand-in `vllm` module that records the calls: the weights pushed
are the base model's names and the merged LoRA values, the sampling settings reach SamplingParams, completions are
cut at EOS and grouped by prompt, the online source pushes once per batch; without vllm or CUDA, one line."""
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.engine.models.loading import ModelConfig, load_models  # noqa: E402
from prefuse.engine.online.rollout import RolloutConfig  # noqa: E402
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


class FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs, self.loaded, self.requests, self.resets = kwargs, {}, [], 0
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)))

    def _load(self, weights):
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, params, use_tqdm=True):
        self.requests.append((prompts, params))
        out = []
        for p in prompts:  # sample i of a prompt: i + 3 tokens of the prompt's last id, then EOS for even i
            outputs = [types.SimpleNamespace(token_ids=[p["prompt_token_ids"][-1]] * (i + 3) + ([2] if i % 2 == 0
                                                                                                else []))
                       for i in range(params.kwargs["n"])]
            out.append(types.SimpleNamespace(outputs=outputs))
        return out


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Prompts:
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)
    save_tiny_llama(root / "model", build_tokenizer())
    return root / "model"


def test_sync_pushes_base_names_with_the_lora_update_merged(fake_vllm, model_dir):
    from prefuse.engine.online.vllm import VLLMSampler

    models = load_models(ModelConfig(str(model_dir), use_peft=True, lora_r=4, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sampler = VLLMSampler(str(model_dir), gpu_memory_utilization=0.25, seed=3)
    assert sampler.llm.kwargs["model"] == str(model_dir) and sampler.llm.kwargs["gpu_memory_utilization"] == 0.25
    sampler.sync(models.policy)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert set(sampler.llm.loaded) == set(dict(base.named_parameters()))  # the base model's names, no LoRA
    name = next(n for n in sampler.llm.loaded if n.endswith("self_attn.q_proj.weight"))
    layer = dict(models.policy.named_modules())["base_model.model." + name.removesuffix(".weight")]
    expected = layer.base_layer.weight + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                                          * layer.scaling["default"])
    assert torch.allclose(sampler.llm.loaded[name], expected, atol=1e-6)
    assert not torch.allclose(sampler.llm.loaded[name], base.state_dict()[name])
    # formed out of place: the policy's base weights are untouched, bit for bit
    assert torch.equal(layer.base_layer.weight, base.state_dict()[name])
    assert sampler.llm.resets == 1


def test_sample_maps_the_settings_and_cuts_at_eos(fake_vllm, model_dir):
    from prefuse.engine.online.vllm import VLLMSampler

    sampler = VLLMSampler(str(model_dir))
    cfg = RolloutConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, num_generations=2)
    samples = sampler.sample([[1, 40], [1, 50, 51]], cfg, seed=11, eos_id=2)
    _, params = sampler.llm.requests[-1]
    assert params.kwargs == dict(n=2, max_tokens=5, seed=11, temperature=0.7, top_p=0.9, stop_token_ids=[2])
    assert samples.completion_ids == [[40, 40, 40, 2], [40] * 4, [51, 51, 51, 2], [51] * 4]
    assert samples.contains_eos == [True, False, True, False]
    assert samples.prompt_ids == [[1, 40], [1, 40], [1, 50, 51], [1, 50, 51]]


def test_without_vllm_or_cuda_one_line(monkeypatch, model_dir):
    from prefuse.engine.online.vllm import VLLMSampler

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ValueError, match=r"^use_vllm: needs the vllm package"):
        VLLMSampler(str(model_dir))
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^use_vllm: vLLM needs a CUDA GPU"):
        VLLMSampler(str(model_dir))


def test_the_online_source_samples_the_policy_through_vllm_once_synced_per_batch(fake_vllm, model_dir):
    from prefuse.engine.judges import RuleJudge
    from prefuse.engine.online.source import OnlineSource
    from prefuse.engine.online.vllm import VLLMSampler

    models = load_models(ModelConfig(str(model_dir), use_peft=True, lora_r=4, lora_dropout=0.0))
    sampler = VLLMSampler(str(model_dir))
    prompts = Prompts([{"prompt_ids": [1, 40 + i], "prompt": str(i), "columns": {}} for i in range(4)])
    source = OnlineSource(prompts=prompts, loss_types=["sigmoid"], models=models, tokenizer=build_tokenizer(),
                          judge=RuleJudge(lambda p, c: -len(c)), rollout=RolloutConfig(max_new_tokens=5), batch_size=2,
                          seed=0, vllm=sampler)
    batch = source.next_batch()
    assert sampler.llm.resets == 1 and len(sampler.llm.requests) == 1
    source.next_batch()
    assert sampler.llm.resets == 2  # one push per batch
    assert set(batch.roles) == {"chosen", "rejected"} and batch.metrics["val/contain_eos_token"] == 0.5
