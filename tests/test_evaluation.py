"""evaluation.evaluate: batch weights n_b/N, eval mode restored, disjoint per-rank shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.distributed import share
from sharpscope.evaluation import evaluate


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def _split(n: int = 10):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def test_evaluate_loss_weights_each_batch_by_its_size():
    """Batches of 4, 4 and 2: the loss is the one-pass mean over all N examples (n_b/N)."""
    model = _classifier().eval()
    x, y = _split(10)
    out = evaluate(model, x, y, F.cross_entropy, batch_size=4)
    with torch.no_grad():
        logits = model(x)
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert out["nll"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert out["acc"] == pytest.approx((logits.argmax(1) == y).double().mean().item())


def test_evaluate_runs_in_eval_mode_and_restores_training_mode():
    """A training-mode model (BatchNorm, dropout) is evaluated as model.eval() would; mode kept."""
    model = _classifier()
    model.train()
    x, y = _split(10)
    out = evaluate(model, x, y, F.cross_entropy, batch_size=3)
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(x), y).item()
    model.train()
    assert out["loss"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_restores_each_modules_own_mode():
    """A submodule the user froze with .eval() (a BatchNorm backbone) stays in eval mode."""
    model = _classifier()
    model.train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    evaluate(model, *_split(10), F.cross_entropy, batch_size=4)
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("num", [0, 1, 5, 10, 11])
def test_rank_shares_cover_every_example_exactly_once_and_evenly(world, num):
    """The ranks' contiguous shares, in rank order, are exactly range(num): no gap, no
    overlap, and sizes that differ by at most one (evaluation and the Hessian operator)."""
    shares = [list(range(num))[share(num, rank, world)] for rank in range(world)]
    assert sum(shares, []) == list(range(num))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_evaluate_does_not_warn_about_batchnorm_without_running_statistics():
    """Such a layer is the model's own choice in training; only the analyses, whose results
    it changes, warn about it (and record mode 'batch')."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(model, *_split(10), F.cross_entropy, batch_size=4)


def test_eval_mode_can_keep_batchnorm_in_train_mode_and_restores_every_module():
    from sharpscope.modes import eval_mode

    model = _classifier().train()
    model[0].eval()
    before = [m.training for m in model.modules()]
    with eval_mode(model, batchnorm_train=True):
        assert [m.training for m in model] == [False, True, False, False]
    assert [m.training for m in model.modules()] == before


def test_a_single_logit_binary_classifier_is_evaluated_by_its_sigmoid():
    """Review, session 15: softmax over one column is 1, and gathering label 1 from it was
    an index error; the analyses already score a binary logit by its sign."""
    torch.manual_seed(0)
    x = torch.randn(32, 2, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    net = nn.Linear(2, 1).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 0.0]]))
        net.bias.zero_()

    def bce(out, t):
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), t.to(out.dtype))

    metrics = evaluate(net, x, y, bce, batch_size=10)
    p = torch.sigmoid(3.0 * x[:, 0])
    picked = torch.where(y == 1, p, 1 - p)
    assert metrics["acc"] == 1.0
    assert metrics["nll"] == pytest.approx(float(-picked.log().mean()), rel=1e-6)
    assert metrics["loss"] == pytest.approx(metrics["nll"], rel=1e-6)  # BCE is that NLL


def test_nll_equals_the_cross_entropy_of_a_badly_wrong_model():
    """A float32 softmax underflowed to 0 and the 1e-12 clamp capped the NLL at 27.6 nats
    (22.7 reported where the cross-entropy was 229.6 after a first ResNet-20 epoch)."""

    class Logits(nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[0.0, 300.0], [0.0, 50.0], [2.0, 1.0]])
    targets = torch.tensor([0, 0, 0])
    metrics = evaluate(Logits(), logits, targets, F.cross_entropy)
    assert metrics["nll"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert metrics["nll"] == pytest.approx(metrics["loss"], rel=1e-6)


def test_b8_integer_inputs_a_model_cannot_take_are_told_how_to_convert():
    """Bug B8, session 28: uint8 inputs (raw images) failed with PyTorch's dtype message
    alone; integer inputs that a model takes (token indices) still run."""
    from sharpscope.errors import SharpscopeError
    from sharpscope.evaluation import check_model_on_data

    images = torch.randint(0, 256, (6, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(SharpscopeError) as info:
        check_model_on_data(nn.Linear(4, 2), images, labels, F.cross_entropy)
    assert str(info.value).startswith("the model or loss failed on the data: RuntimeError: ")
    assert str(info.value).endswith(
        "(the inputs are uint8: convert them to floating point in the data, e.g. "
        "x.float() / 255 for 8-bit images)"
    )
    tokens = nn.Sequential(nn.Embedding(256, 3), nn.Flatten(), nn.Linear(12, 2))
    assert check_model_on_data(tokens, images.long(), labels, F.cross_entropy) is not None
