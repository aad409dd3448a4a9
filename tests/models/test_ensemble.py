"""The ensemble family's maths: the weighted mean of probabilities, weighted votes with their tie rule, its
refusals, and a weights file that rebuilds it from its bundle arguments bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlkit.engine.checkpoint import load_weights, save_weights
from dlkit.errors import ConfigError
from dlkit.models import build, build_from_bundle
from dlkit.models.ensemble import VOTE_MIX, Ensemble


class Fixed(nn.Module):
    """A member that answers the same logits for every input row."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def fixed(rows: list[list[float]], weights: list[float], method: str, task: str = "multiclass") -> Ensemble:
    return Ensemble([Fixed(r) for r in rows], weights, method, task, input_dtype=torch.float32)


X = torch.zeros(2, 3)
MEMBERS = [{"name": "mlp", "args": {"hidden": [8]}}, {"name": "mlp", "args": {"hidden": [4]}},
           {"name": "seed_cnn", "args": {}}]


def test_mean_is_the_weighted_mean_of_the_members_probabilities():
    torch.manual_seed(0)
    model = build("ensemble", num_classes=10, input_shape=(1, 28, 28), members=MEMBERS, member_weights=[1, 2, 5]).eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        probs = torch.stack([m(x).softmax(1) for m in model.members])
        expected = (torch.tensor([1, 2, 5]).view(3, 1, 1) / 8 * probs).sum(0)
        assert torch.allclose(model(x).softmax(1), expected, atol=1e-6)
        assert torch.allclose(model(x).exp().sum(1), torch.ones(6), atol=1e-6)  # log-probabilities already


def test_mean_of_confident_members_neither_underflows_nor_overflows():
    # member 1 puts exp(-2000) on class 0: a naive log of the mean probability would be log(0.5 * 0 + ...)
    model = fixed([[1000.0, -1000.0], [-1000.0, 1000.0]], [1, 1], "mean")
    out = model(X)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.softmax(1), torch.tensor([[0.5, 0.5]] * 2))


def test_binary_mean_averages_the_sigmoids_and_gives_a_logit():
    model = fixed([[2.0], [-1.0], [0.5]], [1, 1, 2], "mean", "binary")
    p = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(-1.0)) + 2 * torch.sigmoid(torch.tensor(0.5))) / 4
    out = model(X)
    assert out.shape == (2, 1)
    assert torch.sigmoid(out[0, 0]).item() == pytest.approx(p.item(), abs=1e-6)


def test_regression_averages_the_values():
    model = fixed([[2.0], [5.0]], [3, 1], "mean", "regression")
    assert model(X).tolist() == [[2.75], [2.75]]


def test_votes_decide_and_give_vote_shares():
    # members 0 and 1 vote class 2 (weight 0.6), member 2 votes class 0 with near-certainty (0.4)
    model = fixed([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [9.0, 0.0, 0.0]], [1, 2, 2], "vote")
    p = model(X).softmax(1)[0]
    assert p.argmax().item() == 2
    assert p[2].item() == pytest.approx(0.6, abs=VOTE_MIX)
    assert p[0].item() == pytest.approx(0.4, abs=VOTE_MIX)
    assert 0 < p[1].item() < VOTE_MIX  # no vote, yet not zero: log loss stays finite
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_a_tied_vote_goes_to_the_higher_mean_probability():
    # two votes each for classes 0 and 1; the members voting 1 are surer, so the mean probability favours 1
    rows = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]
    p = fixed(rows, [1, 1, 1, 1], "vote")(X).softmax(1)[0]
    assert p.argmax().item() == 1
    assert p[1].item() > p[0].item() and p[1].item() == pytest.approx(0.5, abs=VOTE_MIX)
    # the same tie, the other way round
    rows = [[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    assert fixed(rows, [1, 1, 1, 1], "vote")(X).argmax(1).tolist() == [0, 0]


def test_binary_votes_follow_the_logits_sign():
    # votes: 1 (weight 1), 0 (weight 1), 1 (weight 2): class 1 has 3/4 of the votes
    out = fixed([[0.1], [-3.0], [2.0]], [1, 1, 2], "vote", "binary")(X)
    assert torch.sigmoid(out[0, 0]).item() == pytest.approx(0.75, abs=VOTE_MIX)


def test_the_loss_of_a_vote_nobody_got_right_is_finite():
    out = fixed([[5.0, -5.0], [4.0, -4.0]], [1, 1], "vote")(X)
    loss = F.cross_entropy(out, torch.tensor([1, 1]))
    assert torch.isfinite(loss) and loss.item() > -torch.log(torch.tensor(VOTE_MIX)).item()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"members": MEMBERS[:1]}, "an ensemble needs at least two members, got 1"),
    ({"method": "median"}, "model.method must be mean or vote, got 'median'"),
    ({"task": "regression", "method": "vote", "num_classes": 1}, "--method vote needs classes"),
    ({"member_weights": [1, 2]}, r"model.member_weights must be 3 positive numbers, one per member, got \[1, 2\]"),
    ({"member_weights": [1, 0, 2]}, "must be 3 positive numbers"),
    ({"members": [MEMBERS[0], {"name": "mlp", "args": {"num_classes": 3}}]},
     "ensemble member 'mlp' has .*'num_classes': 3.*, the ensemble num_classes 10"),
    ({"members": [MEMBERS[0], {"args": {}}]}, "an ensemble member must be a model spec with a name"),
])
def test_bad_arguments_are_one_config_error(kwargs, message):
    args = {"num_classes": 10, "input_shape": (1, 28, 28), "members": MEMBERS} | kwargs
    with pytest.raises(ConfigError, match=message):
        build("ensemble", **args)


def test_the_weights_file_rebuilds_the_ensemble_from_its_bundle_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    args = {"members": MEMBERS, "member_weights": [1.0, 1.0, 3.0], "method": "vote", "num_classes": 10,
            "input_shape": [1, 28, 28]}
    model = build("ensemble", **args).eval()
    save_weights(model, tmp_path / "model.safetensors")
    again = load_weights(build_from_bundle({"model": {"name": "ensemble", "args": args}, "input_shape": [1, 28, 28]}),
                         tmp_path / "model.safetensors").eval()
    assert {k.split(".")[1] for k in again.state_dict()} == {"0", "1", "2"}  # members.<i>.<the member's own name>
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
