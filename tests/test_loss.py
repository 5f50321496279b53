"""Label-smoothed loss and its chunked output-projection form."""

import pytest
import torch
from helpers import TINY

from mdarts.loss import chunked_output_loss, label_smoothed_loss, sequence_loss
from mdarts.model import TransformerBaseline


def test_label_smoothed_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    target = torch.tensor([[0, 2]])
    loss, nll, tokens = label_smoothed_loss(logits, target, pad_id=2, smoothing=0.1)
    log_p = torch.log_softmax(logits[0, 0], 0)
    assert tokens == 1
    torch.testing.assert_close(nll, -log_p[0])
    torch.testing.assert_close(loss, 0.9 * -log_p[0] + 0.1 * -log_p.mean())


@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_equals_the_plain_one(chunk_rows, smoothing):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (3, 7), generator=gen)
    target[1, 4:] = 0  # padding
    plain = label_smoothed_loss(features @ weight.t(), target, 0, smoothing)
    plain_grads = torch.autograd.grad(plain[0] * 0.5, [features, weight])
    chunked = chunked_output_loss(features, weight, target, 0, smoothing, chunk_rows)
    chunked_grads = torch.autograd.grad(chunked[0] * 0.5, [features, weight])
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], plain[1], rtol=1e-5, atol=1e-5)
    assert chunked[2] == plain[2]
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_computes_only_the_gradients_asked_for():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(9, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)  # frozen, as in an architecture step
    target = torch.randint(1, 50, (9,), generator=gen)
    (want,) = torch.autograd.grad(label_smoothed_loss(features @ weight.t(), target, 0)[0], features)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = chunked_output_loss(features, weight, target, 0, chunk_rows=4)[0]
    (got,) = torch.autograd.grad(loss, features)
    torch.testing.assert_close(got, want)
    assert weight.shape not in saved and weight.grad is None  # no gradient of the frozen weight made


def test_chunked_loss_never_saves_logits():
    features = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    target = torch.randint(0, 1000, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_output_loss(features, weight, target, pad_id=0, chunk_rows=16)
    assert max(saved) <= 1000 * 8  # gradients shaped like the inputs, nothing of size 64 x 1000


def test_sequence_loss_chunked_matches_plain_on_a_model():
    torch.manual_seed(0)
    model = TransformerBaseline(TINY.replace(dropout=0.0), 40).double()
    src = torch.randint(4, 40, (2, 5))
    tgt = torch.randint(4, 40, (2, 6))
    tgt[0, -2:] = 0
    plain = sequence_loss(model, src, tgt[:, :-1], tgt[:, 1:], 0.1)
    grads = torch.autograd.grad(plain[0], list(model.parameters()))
    chunked = sequence_loss(model, src, tgt[:, :-1], tgt[:, 1:], 0.1, chunk_rows=3)
    chunked_grads = torch.autograd.grad(chunked[0], list(model.parameters()))
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(chunked_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothed_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0, 1.5)
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked_output_loss(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), 0, 0.1, 0)
    with pytest.raises(ValueError, match=r"weight: expected \(vocab, 3\)"):
        chunked_output_loss(torch.zeros(2, 3), torch.zeros(4, 5), torch.zeros(2, dtype=torch.long), 0)
