"""OFS-DPO's two adapters and COFS-DPO's domains: the step against each adapter's own logits, the role swap, the CLI
run with its resume after SIGKILL, the exact combination and the forgetting report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from prefuse.engine.train.config import TrainConfig  # noqa: E402
from prefuse.engine.methods.ofs_adapters import FAST, SLOW, FastSlowStep, adapter_parameters  # noqa: E402
from prefuse.engine.train.build import build_run  # noqa: E402
from tests.test_engine_train import KILL_AT_STEP_5  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama and two domains of 16 real pairs each (two of the shared sources)."""
    root = tmp_path_factory.mktemp("ofs")
    torch.manual_seed(0)
    save_tiny_llama(root / "model", build_tokenizer())
    paths = {"model": root / "model"}
    for name, source in (("helpful", "ultrafeedback_binarized_sample_train.jsonl"),
                         ("harmless", "hh_rlhf_harmless_base_test.jsonl")):
        with open(DATA_DIR / source, encoding="utf-8") as f:
            rows = [json.loads(next(f)) for _ in range(16)]
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def flags(files, out, **extra):
    values = dict(model_name_or_path=files["model"], dataset_name=files["helpful"], output_dir=out,
                  loss_type="ofs_dpo", use_peft="true", lora_r=4, lora_dropout=0.0, learning_rate=1e-2,
                  per_device_train_batch_size=4, max_length=192, max_prompt_length=96, logging_steps=1,
                  save_steps=0, max_steps=1)
    values.update(extra)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def logps_from_logits(model, batch) -> torch.Tensor:
    """Per-row sums [S] of the labels' log-probs, float64, from the model's own full logits."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    mask = batch.labels != -100
    token = torch.gather(logits.log_softmax(-1), -1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token, torch.zeros_like(token)).sum(-1)


def ofs_option_a(fast, slow, ref, beta, alpha):
    """ALGORITHMS.md section 1, option A, written from its text: L_DPO(F) + L_DPO(S) + alpha * L_gap, with
    L_gap = -logsigmoid(beta (m_S - sg m_F)) and m = log pi(y_w) - log pi(y_l); each (chosen, rejected) [B]."""
    margin = {k: v[0] - v[1] for k, v in dict(fast=fast, slow=slow, ref=ref).items()}
    dpo_fast = -F.logsigmoid(beta * (margin["fast"] - margin["ref"]))
    dpo_slow = -F.logsigmoid(beta * (margin["slow"] - margin["ref"]))
    gap = -F.logsigmoid(beta * (margin["slow"] - margin["fast"].detach()))
    return (dpo_fast + dpo_slow + alpha * gap).mean(), dpo_fast.mean(), dpo_slow.mean()


def test_the_step_equals_option_a_on_each_adapters_own_logits(files, tmp_path):
    """Both adapters perturbed apart; the fused step's loss, its two DPO metrics and the gradients of BOTH adapters
    equal option A computed from full float64 logits, before and after a role swap (then F is the slow adapter)."""
    cfg = TrainConfig.from_dict(dict(model_name_or_path=str(files["model"]), dataset_name=str(files["helpful"]),
                                     output_dir=str(tmp_path), loss_type=["ofs_dpo"], use_peft=True, lora_r=4,
                                     lora_dropout=0.0, max_length=192, max_prompt_length=96, beta=0.5,
                                     per_device_train_batch_size=4, max_steps=1, report_to="none",
                                     objective_args={"ofs_alpha": 0.7}))
    run = build_run(cfg)
    step, policy = run.step, run.policy
    assert isinstance(step, FastSlowStep)
    torch.manual_seed(3)
    with torch.no_grad():
        for adapter in (FAST, SLOW):
            for _, p in adapter_parameters(policy, adapter):
                p.normal_(0, 0.2)
    batch = run.source.next_batch()
    chosen, rejected = batch.roles["chosen"], batch.roles["rejected"]
    params = {a: [p for _, p in adapter_parameters(policy, a)] for a in (FAST, SLOW)}

    def expected(fast_adapter):
        sums = {}
        for adapter in (FAST, SLOW):
            policy.set_adapter(adapter)
            sums[adapter] = logps_from_logits(policy, batch)
        policy.set_adapter(FAST)
        with torch.no_grad(), policy.disable_adapter():
            ref = logps_from_logits(policy, batch)
        other = SLOW if fast_adapter == FAST else FAST
        pick = lambda s: (s[chosen], s[rejected])  # noqa: E731
        loss, dpo_fast, dpo_slow = ofs_option_a(pick(sums[fast_adapter]), pick(sums[other]), pick(ref), 0.5, 0.7)
        for adapter in (FAST, SLOW):
            for p in params[adapter]:
                p.requires_grad_(True)
        grads = torch.autograd.grad(loss, params[FAST] + params[SLOW])
        return loss.item(), dpo_fast.item(), dpo_slow.item(), grads

    for fast_adapter in (FAST, SLOW):
        if fast_adapter == SLOW:
            step.swap(run.optimizer)
            assert step.fast_role == SLOW
        want_loss, want_fast, want_slow, want_grads = expected(fast_adapter)
        loss, metrics = step(batch)
        got_grads = torch.autograd.grad(loss, params[FAST] + params[SLOW])
        assert float(loss) == pytest.approx(want_loss, rel=1e-4)
        assert float(metrics["ofs/fast_dpo_loss"]) == pytest.approx(want_fast, rel=1e-4)
        assert float(metrics["ofs/slow_dpo_loss"]) == pytest.approx(want_slow, rel=1e-4)
        assert want_fast != pytest.approx(want_slow, rel=1e-3)  # the two metrics can tell each other apart
        for got, want in zip(got_grads, want_grads):  # float32 model against float64 logits: norm-relative
            assert float((got.double() - want).norm() / want.norm()) < 1e-3
        assert all(float(g.abs().sum()) > 0 for g in got_grads)  # every factor of both adapters learns


class _Optimizer:
    def __init__(self, params):
        self.state = {p: {"exp_avg": torch.full_like(p, float(k))} for k, p in enumerate(params)}
        self.param_groups = [{"lr": 1.0}, {"lr": 0.1}]


def test_the_swap_criterion_and_both_modes(files, tmp_path):
    """Every `interval` steps the window's mean losses decide: S lower -> swap, else not. roles: the F role moves;
    params: the adapters exchange weights and optimizer state, the F role stays on the fast adapter."""
    cfg = TrainConfig.from_dict(dict(model_name_or_path=str(files["model"]), dataset_name=str(files["helpful"]),
                                     output_dir=str(tmp_path), loss_type=["ofs_dpo"], use_peft=True, lora_r=4,
                                     max_length=192, max_prompt_length=96, max_steps=1, report_to="none",
                                     ofs_chasing_interval=2))
    run = build_run(cfg)
    step, policy = run.step, run.policy
    with torch.no_grad():
        for adapter, value in ((FAST, 1.0), (SLOW, 2.0)):
            for _, p in adapter_parameters(policy, adapter):
                p.fill_(value)
    fast_params = [p for _, p in adapter_parameters(policy, FAST)]
    slow_params = [p for _, p in adapter_parameters(policy, SLOW)]
    optimizer = _Optimizer(fast_params + slow_params)
    # steps 1-2: S higher on average (0.5 + 0.9 vs 0.6 + 0.6) -> no swap; steps 3-4: S lower -> swap at step 4
    for k, (fast, slow) in enumerate([(0.6, 0.5), (0.6, 0.9), (0.7, 0.2), (0.3, 0.7)], start=1):
        events = step.after_update(k, {"ofs/fast_dpo_loss": fast, "ofs/slow_dpo_loss": slow}, optimizer)
        assert events["ofs/swapped"] == (1.0 if k == 4 else 0.0), k
    assert step.fast_role == SLOW and step.swaps == 1
    assert all(float(p.mean()) == 1.0 for p in fast_params)  # roles mode: the weights stay

    step.swap_mode, step.fast_role = "params", FAST
    first_fast_state = optimizer.state[fast_params[0]]["exp_avg"].clone()
    step.swap(optimizer)
    assert step.fast_role == FAST
    assert all(float(p.mean()) == 2.0 for p in fast_params) and all(float(p.mean()) == 1.0 for p in slow_params)
    assert torch.equal(optimizer.state[slow_params[0]]["exp_avg"], first_fast_state)
    assert step.state_dict() == {"fast_role": FAST, "swaps": 2, "window": {"fast": 0.0, "slow": 0.0, "steps": 0}}


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_both_adapters_logs_swaps_and_resumes_exactly_after_sigkill(files, tmp_path):
    """8 steps, the slow adapter at 3x the rate (so it overtakes and the roles swap), checkpoint-3 of a run killed
    at step 5: the resumed run's losses, both adapters' losses and the swap events equal the uninterrupted run's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    extra = dict(max_steps=8, save_steps=3, ofs_chasing_interval=2, ofs_slow_lr_ratio=3, warmup_steps=1,
                 lora_dropout=0.1)

    def run(out, *more, script=None):
        start = [sys.executable, "-c", script] if script else [sys.executable, "-m", "prefuse"]
        return subprocess.run([*start, "train", *flags(files, out, **extra), *more], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run(tmp_path / "killed", script=KILL_AT_STEP_5)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(tmp_path / "killed", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in got] == list(range(1, 9))
    keys = ("loss", "ofs/fast_dpo_loss", "ofs/slow_dpo_loss", "ofs/swapped", "ofs/swaps", "learning_rate",
            "learning_rate/slow", "grad_norm")
    for key in keys:
        assert [r[key] for r in got] == [r[key] for r in expected], key
    assert expected[-1]["ofs/swaps"] >= 1 and sum(r["ofs/swapped"] for r in expected) == expected[-1]["ofs/swaps"]
    assert expected[0]["learning_rate/slow"] == pytest.approx(3 * expected[0]["learning_rate"])
    # both adapters moved from their shared start, apart from each other
    from safetensors.torch import load_file

    last = tmp_path / "full" / "checkpoint-8"
    fast, slow = load_file(last / "adapter_model.safetensors"), load_file(last / "slow" / "adapter_model.safetensors")
    assert fast.keys() == slow.keys()
    lora_b = [k for k in fast if "lora_B" in k]
    assert all(float(fast[k].abs().max()) > 0 and float(slow[k].abs().max()) > 0 for k in lora_b)
    assert any(not torch.equal(fast[k], slow[k]) for k in fast)


def delta_weights(model, adapter="default") -> dict:
    return {name: module.get_delta_weight(adapter) for name, module in model.named_modules()
            if hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {})}


def test_cofs_on_two_domains_combines_exactly_and_reports_forgetting(files, tmp_path):
    out = tmp_path / "cofs"
    argv = ["train", *flags(files, out, max_steps=4, save_steps=2, eval_fraction=0.25, ofs_chasing_interval=2),
            "--domains", str(files["helpful"]), str(files["harmless"]), "--domain_weights", "0.3", "0.7"]
    assert main(argv) == 0
    report = json.loads((out / "forgetting.json").read_text())
    table = torch.tensor(report["held_out_accuracy"])
    assert table.shape == (3, 2) and report["weights"] == [0.3, 0.7]
    assert ((table >= 0) & (table <= 1)).all()
    assert (out / "forgetting.png").stat().st_size > 1000
    assert "| combined 0.3*helpful + 0.7*harmless |" in (out / "forgetting.md").read_text()

    base = lambda: transformers.AutoModelForCausalLM.from_pretrained(files["model"])  # noqa: E731
    best = [delta_weights(peft.PeftModel.from_pretrained(base(), out / f"stage-{k}" / "best_fast")) for k in (0, 1)]
    combined_model = peft.PeftModel.from_pretrained(base(), out / "combined")
    combined = delta_weights(combined_model)
    assert combined.keys() == best[0].keys() and combined
    assert any(float(d.abs().max()) > 0 for d in best[1].values())
    for name in combined:
        torch.testing.assert_close(combined[name], 0.3 * best[0][name] + 0.7 * best[1][name], rtol=1e-5,
                                   atol=1e-7)

    # one cell from the model's own logits: the combination's accuracy on the second domain's held-out pairs
    from prefuse.engine.data import held_out_split, load_preference_data

    tokenizer = transformers.AutoTokenizer.from_pretrained(files["model"])
    data = load_preference_data(str(files["harmless"]), tokenizer, max_length=192, max_prompt_length=96)
    held_out, _ = held_out_split(len(data), 0.25, 42)
    right = 0
    for i in held_out:
        example = data.examples[i]
        margins = []
        for side in ("chosen", "rejected"):
            ids = torch.tensor([example["prompt_ids"] + example[f"{side}_ids"]])
            n_prompt = len(example["prompt_ids"])
            total = []
            for adapter_on in (True, False):
                with torch.no_grad():
                    if adapter_on:
                        logits = combined_model(input_ids=ids).logits.double()
                    else:
                        with combined_model.disable_adapter():
                            logits = combined_model(input_ids=ids).logits.double()
                logp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                total.append(float(logp[n_prompt - 1:].sum()))
            margins.append(total[0] - total[1])
        right += margins[0] - margins[1] > 0
    assert table[2, 1] == pytest.approx(right / len(held_out))


@pytest.mark.parametrize("change, expected", [
    (dict(use_peft="false"), "use_peft: ['ofs_dpo'] train two LoRA adapters"),
    (dict(ofs_swap_mode="both"), "ofs_swap_mode: 'both' is not roles or params"),
    (dict(ofs_slow_lr_ratio=0), "ofs_slow_lr_ratio: must be positive"),
])
def test_bad_settings_one_line(files, tmp_path, capsys, change, expected):
    assert main(["train", *flags(files, tmp_path, **change)]) == 2
    assert expected in capsys.readouterr().err


def test_domains_need_held_out_pairs(files, tmp_path, capsys):
    assert main(["train", *flags(files, tmp_path), "--domains", str(files["helpful"])]) == 2
    assert "eval_fraction: COFS-DPO measures forgetting" in capsys.readouterr().err
