"""The batch builder and the training step against independent computations: the rows of every role hold the
right tokens, and the step's loss equals the objective on sums from the model's own logits (policy with LoRA,
reference with the adapters disabled)."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import prefuse  # noqa: E402
from prefuse.engine.data import IGNORE_INDEX, load_preference_data  # noqa: E402
from prefuse.engine.models.loading import ModelConfig, decoder_hidden_states, load_models  # noqa: E402
from prefuse.engine.core.objectives import objective_needs  # noqa: E402
from prefuse.engine.core.sources import OfflineSource, build_batch  # noqa: E402
from prefuse.engine.core.step import Step  # noqa: E402
from prefuse.heads import head_of  # noqa: E402
from prefuse.preference import PreferenceLoss  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    save_tiny_llama(root / "model", tokenizer)
    with open(DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(4)]
    for i, row in enumerate(rows):
        row["reference_response"] = rows[(i + 1) % 4]["chosen"][:60]
        row["preference_prob"] = 0.2 + 0.2 * i
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_preference_data(root / "pairs.jsonl", tokenizer, max_length=40, max_prompt_length=16)
    return root, tokenizer, data


def response_of(batch, row):
    """The tokens the labels of one row name, in order."""
    labels = batch.labels[row]
    return labels[labels != IGNORE_INDEX].tolist()


def test_every_role_row_holds_its_response(setup):
    _, _, data = setup
    needs = objective_needs(["selm"])
    batch = build_batch(data.examples[:3], [0, 1, 2], needs, pad_id=0)
    assert set(batch.roles) == {"chosen", "rejected", "sample"}
    for i, example in enumerate(data.examples[:3]):
        for role, key in (("chosen", "chosen_ids"), ("rejected", "rejected_ids"), ("sample", "reference_ids")):
            row = int(batch.roles[role][i])
            assert batch.input_ids[row, :len(example["prompt_ids"])].tolist() == example["prompt_ids"]
            assert response_of(batch, row) == example[key], (role, i)
    kto = objective_needs(["kto"])
    completions = [{"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids"], "label": i % 2 == 0}
                   for i, e in enumerate(data.examples[:3])]
    batch = build_batch(completions, [0, 1, 2], kto, pad_id=0)
    for i in range(3):  # KTO's mismatched pairs: each prompt with the previous example's completion
        assert response_of(batch, int(batch.roles["kl"][i])) == completions[i - 1]["completion_ids"]
        assert response_of(batch, int(batch.roles["completion"][i])) == completions[i]["completion_ids"]
    assert batch.inputs["labels"].tolist() == [True, False, True]


def test_pass_through_inputs_follow_the_examples(setup):
    _, _, data = setup
    source = OfflineSource(data, objective_needs(["online_ipo"]), batch_size=4, seed=3, pad_id=0)
    batch = source.next_batch()
    assert batch.index.tolist() != [0, 1, 2, 3]  # shuffled: the values must follow their examples
    assert batch.inputs["preference_probs"].tolist() == pytest.approx([0.2 + 0.2 * i for i in batch.index.tolist()])


U32 = 2.0 ** -24  # float32's unit roundoff


def logits_sums(model, batch):
    """Per-row log-prob sums of the labels, from the model's own logits (the lm_head is called here), and per row a
    bound on the float32 error of such a sum, whatever the evaluation order (this one, or the fused head's chunks).

    Against the exact log-probs of the same float32 hidden states h and weight W, a token's float32 log-prob
    z_y - lse(z) is off by at most: 2 H u A (z_y and lse each move with the logits, every logit a length-H dot
    product: |dz_v| <= H u sum_j |h_j W_vj| <= H u A, A the largest such sum over the vocabulary), plus
    u (ceil(log2 V) + 1) (the exponentials and their tree-summed total, relatively; an absolute error on the log),
    u log V (rounding log of a total in [1, V]), u |lse| (adding the max back) and u |logp| (the subtraction).
    Summing the row's n tokens adds (n - 1) u sum |logp|. All in float64 from the model's own h and W."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits, -1)
    keep = batch.labels != IGNORE_INDEX
    labels = torch.where(keep, batch.labels, 0).unsqueeze(-1)
    picked = logp.gather(-1, labels).squeeze(-1)
    sums = torch.where(keep, picked, torch.zeros_like(picked)).sum(-1)
    with torch.no_grad():
        h = decoder_hidden_states(model, batch.input_ids, batch.attention_mask).double()
        weight = head_of(model).weight.double()
        vocab, width = weight.shape
        z = h @ weight.T
        lse = torch.logsumexp(z, -1)
        exact = z.gather(-1, labels).squeeze(-1) - lse
        dots = (h.abs() @ weight.abs().T).amax(-1)
        token = U32 * (2 * width * dots + math.ceil(math.log2(vocab)) + 1 + math.log(vocab) + lse.abs() + exact.abs())
        zero = torch.zeros_like(token)
        n = keep.sum(-1)
        bound = torch.where(keep, token, zero).sum(-1) + (n - 1).clamp(min=0) * U32 * torch.where(
            keep, exact.abs(), zero).sum(-1)
    return sums, bound


def roles_inputs(spec, roles, policy, ref) -> dict:
    inputs = {}
    for role, rows in roles.items():
        inputs[f"policy_{role}_logps"], inputs[f"ref_{role}_logps"] = policy[rows], ref[rows]
    return {k: v for k, v in inputs.items() if k in spec.inputs}


@pytest.mark.parametrize("loss_type", ["selm", "online_ipo", "sigmoid"])
def test_step_equals_the_objective_on_the_models_own_logits(setup, loss_type):
    """The step's loss, rewards/margins and LoRA gradients against the objective on sums from the model's own
    logits, each within the float32 error that the two computations' sums allow (logits_sums' bound e_i per row,
    twice: both are off the exact sums), propagated through the objective in float64: |dL| <= sum_i |dL/ds_i| 2e_i;
    for the gradient sum_i c_i J_i (c = dL/ds, J_i = ds_i/dtheta), |dc_i| <= sum_j |d2L/ds_i ds_j| 2e_j times |J_i|,
    plus the backward's own rounding, gamma_k sum_i |c_i| |J_i| over its k = V + S T + 2 (H + I) accumulations."""
    root, _, data = setup
    models = load_models(ModelConfig(str(root / "model"), use_peft=True, lora_r=4, lora_dropout=0.0))
    with torch.no_grad():  # move the adapters away from zero so that policy and reference differ
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    needs = objective_needs([loss_type])
    step = Step(models, PreferenceLoss(loss_type, beta=0.3), needs)
    batch = build_batch(data.examples, list(range(len(data))), needs, pad_id=0)
    models.policy.eval()  # no dropout: the two computations see the same network
    loss, metrics = step(batch)
    policy, policy_error = logits_sums(models.policy, batch)
    with torch.no_grad(), models.policy.disable_adapter():
        ref, ref_error = logits_sums(models.policy, batch)
    spec = prefuse.get_objective(loss_type)
    expected, expected_metrics = prefuse.objective_loss(loss_type, beta=0.3, **roles_inputs(spec, batch.roles, policy,
                                                                                              ref), **batch.inputs)
    loss_value, expected_value = float(loss.detach()), float(expected.detach())

    # the objective in float64 around the reference's sums: its derivatives in the sums
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.inputs.items()}
    sums64 = torch.cat([policy.detach(), ref.detach()]).double()
    rows = len(policy)

    def objective64(sums, key=None):
        value, values = prefuse.objective_loss(loss_type, beta=0.3, **roles_inputs(
            spec, batch.roles, sums[:rows], sums[rows:]), **inputs64)
        return value if key is None else values[key]

    error = 2 * torch.cat([policy_error, ref_error])  # |fused sum - this sum| per row
    slope = torch.autograd.functional.jacobian(objective64, sums64)
    bound = float(slope.abs() @ error) + 8 * U32 * abs(expected_value)  # + the objective's own few roundings
    assert abs(loss_value - expected_value) <= bound, (loss_value, expected_value, bound)
    assert bound < 1e-2 * abs(expected_value)  # a bound that still tells a wrong loss from a right one
    # rewards/margins is linear in the sums (beta times their differences): its slopes by central differences
    unit = torch.eye(len(sums64), dtype=torch.float64)
    margin_slope = torch.stack([(objective64(sums64 + u, "rewards/margins").double()
                                 - objective64(sums64 - u, "rewards/margins").double()) / 2 for u in unit])
    margin_bound = float(margin_slope.abs() @ error) + 8 * U32 * abs(float(expected_metrics["rewards/margins"]))
    assert abs(float(metrics["rewards/margins"]) - float(expected_metrics["rewards/margins"])) <= margin_bound

    lora = [p for n, p in models.policy.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, lora)
    want = torch.autograd.grad(expected, lora, retain_graph=True)
    hessian = torch.autograd.functional.hessian(objective64, sums64)
    dc = (hessian.abs() @ error)[:rows]  # only the policy's rows carry gradient
    c = slope[:rows]
    per_row = [[g.abs().double() for g in torch.autograd.grad(policy[i], lora, retain_graph=True)]
               for i in range(rows)]
    config = models.policy.get_base_model().config
    k = config.vocab_size + batch.input_ids.numel() + 2 * (config.hidden_size + config.intermediate_size)
    gamma = k * U32 / (1 - k * U32)
    for j, (g, w) in enumerate(zip(got, want)):
        allowed = sum((dc[i] + gamma * c[i].abs()) * per_row[i][j] for i in range(rows))
        assert ((g - w).abs().double() <= allowed).all() and w.abs().max() > 0, j
        assert allowed.max() < 0.05 * w.abs().max()  # a bound that still tells a wrong gradient


def test_a_batch_source_plugs_into_the_loop(setup, tmp_path):
    """The loop takes batches from any BatchSource: one that serves the same batch each step trains on it."""
    from prefuse.engine.train.config import TrainConfig
    from prefuse.engine.train.loop import train

    root, _, data = setup
    needs = objective_needs(["sigmoid"])

    class SameBatch:
        batches_per_epoch, epoch, served = 1, 0.0, 0

        def next_batch(self):
            self.served += 1
            return build_batch(data.examples[:2], [0, 1], needs, pad_id=0)

        def state_dict(self):
            return {"served": self.served}

        def load_state_dict(self, state):
            self.served = state["served"]

    source = SameBatch()
    cfg = TrainConfig(model_name_or_path=str(root / "model"), dataset_name=str(root / "pairs.jsonl"),
                      output_dir=str(tmp_path), loss_type=["sigmoid"], max_steps=4, logging_steps=1, save_steps=0,
                      learning_rate=5e-2, use_peft=True, lora_r=4, lora_dropout=0.0, report_to="none",
                      max_length=40)
    last = train(cfg, source=source)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert source.served == 4 and last["step"] == 4
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
