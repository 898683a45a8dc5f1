"""`prefuse merge-adapters`: the combined adapter's update is sum_k w_k B_k A_k exactly (peft's "linear" is not)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny Llama and three LoRA adapters (ranks 4, 2, 4; different alphas) with random (nonzero) factors."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    save_tiny_llama(root / "base", build_tokenizer())
    paths = []
    for k, (r, alpha) in enumerate([(4, 8), (2, 16), (4, 4)]):
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        lora = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        lora.save_pretrained(root / f"adapter_{k}")
        paths.append(root / f"adapter_{k}")
    return root, paths


def updates(model):
    """Each LoRA layer's weight update [out, in] of the active adapter."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            out[name] = module.get_delta_weight("default")
    return out


def loaded(root, path):
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    return peft.PeftModel.from_pretrained(base, path)


def test_the_combination_is_exact(adapters, tmp_path):
    root, (first, second, third) = adapters
    assert main(["merge-adapters", "--adapters", str(first), str(second), "--weights", "0.3", "0.7",
                 "--output", str(tmp_path / "combined")]) == 0
    combined = updates(loaded(root, tmp_path / "combined"))
    one, two = updates(loaded(root, first)), updates(loaded(root, second))
    assert combined.keys() == one.keys() == two.keys() and combined
    for name in combined:
        assert torch.allclose(combined[name], 0.3 * one[name] + 0.7 * two[name], atol=1e-6), name
    # peft's "linear" (A and B combined separately, equal ranks only) is not the combination of the updates
    assert main(["merge-adapters", "--adapters", str(first), str(third), "--weights", "0.3", "0.7",
                 "--output", str(tmp_path / "exact")]) == 0
    exact, three = updates(loaded(root, tmp_path / "exact")), updates(loaded(root, third))
    model = loaded(root, first)
    model.load_adapter(third, adapter_name="third")
    model.add_weighted_adapter(["default", "third"], [0.3, 0.7], adapter_name="linear", combination_type="linear")
    name = next(iter(exact))
    assert torch.allclose(exact[name], 0.3 * one[name] + 0.7 * three[name], atol=1e-6)
    linear = dict(model.named_modules())[name].get_delta_weight("linear")
    assert not torch.allclose(linear, exact[name], atol=1e-3)


def test_bad_input_one_line(adapters, tmp_path, capsys):
    root, (first, second, _) = adapters
    assert main(["merge-adapters", "--adapters", str(first), str(second), "--weights", "1",
                 "--output", str(tmp_path / "x")]) == 2
    assert "error: weights: 1 weight(s) for 2 adapter(s)" in capsys.readouterr().err
    assert main(["merge-adapters", "--adapters", str(root / "base"), "--weights", "1",
                 "--output", str(tmp_path / "x")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
