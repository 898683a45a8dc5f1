"""Bad input raises a ValueError that names the argument."""
import pytest
import torch

import prefuse
from tests.reference import make_inputs


@pytest.fixture
def inputs():
    hidden, weight, labels, b = make_inputs(6, 8, 20, bias=True)
    return hidden, weight, labels, b


@pytest.mark.parametrize("fn", [prefuse.linear_logprobs, prefuse.linear_cross_entropy, prefuse.linear_token_stats])
def test_shape_and_dtype_errors_name_the_argument(fn, inputs):
    hidden, weight, labels, b = inputs
    cases = [
        (dict(hidden=hidden[:, :5]), "hidden"),
        (dict(weight=weight.t()), "hidden"),
        (dict(weight=weight[0]), "weight"),
        (dict(weight=weight.double()), "weight"),
        (dict(labels=labels[:3]), "labels"),
        (dict(labels=labels.float()), "labels"),
        (dict(labels=torch.full_like(labels, 20)), "labels"),
        (dict(labels=torch.full_like(labels, -1)), "labels"),
        (dict(bias=b[:5]), "bias"),
        (dict(bias=b.double()), "bias"),
        (dict(hidden=hidden.long()), "hidden"),
    ]
    for override, name in cases:
        args = dict(hidden=hidden, weight=weight, labels=labels, bias=b) | override
        with pytest.raises(ValueError, match=name):
            fn(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_nonfinite_hidden_is_caught_when_asked(inputs):
    hidden, weight, labels, b = inputs
    bad = hidden.detach().clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="hidden.*NaN"):
        prefuse.linear_logprobs(bad, weight, labels, check_finite=True)
    with pytest.raises(ValueError, match="hidden"):
        prefuse.linear_cross_entropy(bad, weight, labels, check_finite=True)


def test_option_errors(inputs, monkeypatch):
    hidden, weight, labels, b = inputs
    for kwargs, name in [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(softcap=-1.0), "softcap"),
        (dict(backend="cuda"), "backend"),
        (dict(reduction="avg"), "reduction"),
        (dict(mode="fast"), "mode"),
        (dict(label_smoothing=1.5), "label_smoothing"),
    ]:
        with pytest.raises(ValueError, match=name):
            prefuse.linear_cross_entropy(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="top_k"):
        prefuse.linear_token_stats(hidden, weight, labels, top_k=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend.*TRITON_INTERPRET"):
        prefuse.linear_logprobs(hidden, weight, labels, backend="triton")


def test_ignore_index_other_than_default(inputs):
    hidden, weight, labels, b = inputs
    labels = labels.clone()
    labels[labels == -100] = 19  # a valid id used as the ignore marker
    out = prefuse.linear_logprobs(hidden, weight, labels, ignore_index=19)
    assert torch.all(out[labels == 19] == 0) and torch.all(out[labels != 19] < 0)
