"""PrefuseDPOTrainer with TRL's padding_free=True (TRL 1.16 accepts it and pads anyway) against trl.DPOTrainer's
padded run on the same batch: loss, LoRA gradients and every logged metric equal within the float32 tolerances of
tests/test_integration_trl.py, the decoders having run the batch packed: by default under sdpa in rows no wider than
the padded batch (this batch's sequences are too long to share one), and all in one row."""
import pytest

import prefuse.compat.trl as compat_trl
from tests import test_integration_trl as trl_tests
from tests.test_integration_trl import GRAD_TOLERANCE, close, twin_trainers

example, data = trl_tests.example, trl_tests.data  # module-scoped fixtures: the example and its pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("overrides", [
    {},
    {"separate_reference": True},
    {"loss_type": "ipo", "beta": 0.5},
    {"use_weighting": True, "ld_alpha": 0.5},
], ids=["sigmoid", "separate_reference_model", "ipo", "wpo_ld_dpo"])
@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one_row"])
def test_padding_free_equals_trl_padded(example, data, tmp_path, monkeypatch, overrides, one_row):
    packings, pack = [], compat_trl.pack_sequences

    def spy(input_ids, attention_mask, **kwargs):
        packed = pack(input_ids, attention_mask, **kwargs)
        packings.append((tuple(input_ids.shape), tuple(packed.input_ids.shape)))
        return packed

    ours, theirs, batch = twin_trainers(example, data, tmp_path, padding_free=True, **overrides)
    assert ours.padding_free and ours.args.padding_free and not theirs.padding_free  # TRL pads
    monkeypatch.setattr(compat_trl, "pack_sequences", spy)
    if one_row:
        monkeypatch.setattr(compat_trl, "packed_row_tokens", lambda model, width, requested=None: None)
    ours_loss = ours.compute_loss(ours.model, batch)
    theirs_loss = theirs.compute_loss(theirs.model, batch)
    monkeypatch.undo()
    (padded_shape, packed_shape), = packings
    tokens = int(batch["attention_mask"].sum())
    if one_row:
        assert packed_shape == (1, tokens) and tokens < padded_shape[0] * padded_shape[1]
    else:
        assert packed_shape[1] <= padded_shape[1] and packed_shape[0] <= padded_shape[0]
    assert close(ours_loss.item(), theirs_loss.item()), (ours_loss.item(), theirs_loss.item())
    ours_loss.backward()
    theirs_loss.backward()
    theirs_params = dict(theirs.model.named_parameters())
    trained = [(name, p) for name, p in ours.model.named_parameters() if p.requires_grad]
    assert trained
    for name, param in trained:
        want = theirs_params[name].grad
        assert (param.grad - want).abs().max() <= GRAD_TOLERANCE * want.abs().max(), name
    ours_metrics, theirs_metrics = ours._metrics["train"], theirs._metrics["train"]
    assert set(theirs_metrics) <= set(ours_metrics)
    reward_scale = theirs.beta * abs(theirs_metrics["logps/chosen"][-1])
    for name, values in theirs_metrics.items():
        scale = reward_scale if name.startswith("rewards/") else 1.0
        assert close(ours_metrics[name][-1], values[-1], scale), (name, ours_metrics[name][-1], values[-1])


def test_padding_free_refuses_a_model_without_packed_masks(example, data, tmp_path, monkeypatch):
    monkeypatch.setattr(compat_trl, "check_packable", lambda model: (_ for _ in ()).throw(
        ValueError("padding_free: model type 'x' is not one whose packed-sequence masks are checked")))
    with pytest.raises(ValueError, match="padding_free: model type"):
        twin_trainers(example, data, tmp_path, padding_free=True)
