"""Per-sample temperature through the training step: a batch carries each sequence's temperature
(Batch.temperature, [S]; an online source's samples at the temperature they were drawn at) to the fused head, for
the policy's and the reference's log-probs alike. One process's batch that mixes two temperatures equals the two
single-temperature batches it is made of (loss: the mean over examples; LoRA gradients likewise)."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.engine.core.objectives import objective_needs  # noqa: E402
from prefuse.engine.core.sources import build_batch  # noqa: E402
from prefuse.engine.core.step import Step  # noqa: E402
from prefuse.engine.data import load_preference_data  # noqa: E402
from prefuse.engine.models.loading import ModelConfig, load_models  # noqa: E402
from prefuse.preference import PreferenceLoss  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")
# float32 model: the batches differ in padding and in the head's chunks only
REL = 2e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("temperature")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    save_tiny_llama(root / "model", tokenizer)
    with open(DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(4)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_preference_data(root / "pairs.jsonl", tokenizer, max_length=40, max_prompt_length=16)
    models = load_models(ModelConfig(str(root / "model"), use_peft=True, lora_r=4, lora_dropout=0.0))
    with torch.no_grad():  # the adapters away from zero: policy and reference (adapters disabled) differ
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    models.policy.eval()
    return data, models


def run(step, batch):
    loss, metrics = step(batch)
    lora = [p for n, p in step.models.policy.named_parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, lora), metrics


def close(a, b):
    scale = 1 + max(float(a.abs().max()), float(b.abs().max()))
    assert float((a - b).abs().max()) <= REL * scale, (a, b)


def test_a_batch_with_two_temperatures_equals_two_batches(setup):
    data, models = setup
    needs = objective_needs(["sigmoid"])  # policy and reference log-probs
    step = Step(models, PreferenceLoss("sigmoid", beta=0.3), needs)
    first = build_batch(data.examples[:2], [0, 1], needs, pad_id=0)
    second = build_batch(data.examples[2:4], [2, 3], needs, pad_id=0)
    first.temperature = torch.full((first.labels.shape[0],), 0.7)
    second.temperature = torch.full((second.labels.shape[0],), 1.3)
    both = build_batch(data.examples[:4], [0, 1, 2, 3], needs, pad_id=0)
    t = torch.empty(both.labels.shape[0])
    for rows in both.roles.values():  # each role's rows, example by example
        t[rows[:2]], t[rows[2:]] = 0.7, 1.3
    both.temperature = t
    loss_1, grads_1, _ = run(step, first)
    loss_2, grads_2, _ = run(step, second)
    loss, grads, _ = run(step, both)
    close(loss, (loss_1 + loss_2) / 2)
    for g, g1, g2 in zip(grads, grads_1, grads_2):
        close(g, (g1 + g2) / 2)
    # the temperatures are read: at 1 everywhere the loss differs
    both.temperature = None
    plain, _, _ = run(step, both)
    assert abs(float(plain) - float(loss)) > 1e3 * REL * (1 + abs(float(loss)))


def test_one_temperature_per_row_equals_the_heads_own(setup):
    """Every row at 0.7 through the batch equals the loss built with temperature=0.7 (the float path)."""
    data, models = setup
    needs = objective_needs(["sigmoid"])
    batch = build_batch(data.examples[:3], [0, 1, 2], needs, pad_id=0)
    scalar_loss, scalar_grads, _ = run(Step(models, PreferenceLoss("sigmoid", beta=0.3, temperature=0.7), needs),
                                       batch)
    batch.temperature = torch.full((batch.labels.shape[0],), 0.7)
    loss, grads, _ = run(Step(models, PreferenceLoss("sigmoid", beta=0.3), needs), batch)
    close(loss, scalar_loss)
    for g, s in zip(grads, scalar_grads):
        close(g, s)


def test_row_temperature_roles_without_batch_temperatures(setup):
    """A step's row_temperature ({role: T}; HyPO's online rows) gives the same per-row tensor as the batch's."""
    data, models = setup
    needs = objective_needs(["sigmoid"])
    batch = build_batch(data.examples[:2], [0, 1], needs, pad_id=0)
    by_role, _, _ = run(Step(models, PreferenceLoss("sigmoid", beta=0.3), needs, row_temperature={"chosen": 0.6}),
                        batch)
    t = torch.ones(batch.labels.shape[0])
    t[batch.roles["chosen"]] = 0.6
    batch.temperature = t
    by_batch, _, _ = run(Step(models, PreferenceLoss("sigmoid", beta=0.3), needs), batch)
    assert torch.equal(by_role, by_batch)


def test_packed_batch_reads_each_sequence_at_its_temperature(setup):
    """padding_free: the sequences packed into rows, each still at its own temperature (the head's temperatures
    are keyed by sequence, not by packed row): equal to the padded batch."""
    data, models = setup
    needs = objective_needs(["sigmoid"])
    batch = build_batch(data.examples[:3], [0, 1, 2], needs, pad_id=0)
    batch.temperature = torch.tensor([0.6, 1.4, 0.9, 1.2, 0.8, 1.1])[:batch.labels.shape[0]]
    padded, padded_grads, _ = run(Step(models, PreferenceLoss("sigmoid", beta=0.3), needs), batch)
    packed, packed_grads, _ = run(Step(models, PreferenceLoss("sigmoid", beta=0.3), needs, padding_free=True), batch)
    close(packed, padded)
    for g, p in zip(packed_grads, padded_grads):
        close(g, p)
