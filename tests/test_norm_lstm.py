"""normlab.nn.NormLSTMCell / NormLSTM: torch equivalence without norm, modes, statistics rule, errors."""

import pytest
import torch

from normlab.nn import NormLSTM, NormLSTMCell


def test_without_norm_it_is_torchs_lstm_cell():
    torch.manual_seed(0)
    cell = NormLSTMCell(5, 7, "none").double()
    ref = torch.nn.LSTMCell(5, 7).double()
    with torch.no_grad():
        ref.weight_ih.copy_(cell.weight_ih)
        ref.weight_hh.copy_(cell.weight_hh)
        ref.bias_ih.copy_(cell.bias)
        ref.bias_hh.zero_()
    x = torch.randn(3, 5, dtype=torch.float64)
    state = (torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64))
    for got, exp in zip(cell(x, state), ref(x, state)):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_shapes_and_gradients(norm):
    torch.manual_seed(0)
    lstm = NormLSTM(4, 6, norm, max_steps=5)
    x = torch.randn(3, 5, 4, requires_grad=True)
    out, (h, c) = lstm(x)
    assert out.shape == (3, 5, 6) and h.shape == (3, 6) and c.shape == (3, 6)
    torch.testing.assert_close(out[:, -1], h)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_layer_norm_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    lstm = NormLSTM(4, 6, "layer").double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    full, _ = lstm(x)
    one, _ = lstm(x[2:3])
    torch.testing.assert_close(one, full[2:3], rtol=0, atol=1e-12)


def test_layer_norm_gates_are_normalized_per_example():
    torch.manual_seed(0)
    cell = NormLSTMCell(4, 6, "layer").double()
    x = torch.randn(3, 4, dtype=torch.float64) * 10 + 3
    z = cell._norm("ih", x @ cell.weight_ih.T, cell.gain_ih, None, 0)
    torch.testing.assert_close(z.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)


def test_batch_norm_keeps_statistics_per_step_and_reuses_the_last_beyond_max_steps():
    torch.manual_seed(0)
    lstm = NormLSTM(4, 6, "batch", max_steps=3).double()
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    x[:, 1] += 5.0  # step 1 has another input distribution
    lstm(x)
    rm = lstm.cell.running_mean_ih
    assert not torch.allclose(rm[0], rm[1])  # separate statistics per step
    lstm.eval()
    long_x = torch.randn(2, 6, 4, dtype=torch.float64)
    out_long, _ = lstm(long_x)  # steps 3..5 use step 2's statistics
    cell = lstm.cell
    state = None
    for t in range(6):
        state = cell(long_x[:, t], state, min(t, 2))
    torch.testing.assert_close(out_long[:, -1], state[0], rtol=0, atol=1e-12)


def test_batch_norm_eval_is_batch_independent_and_train_is_not():
    torch.manual_seed(0)
    lstm = NormLSTM(4, 6, "batch", max_steps=3).double()
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    a, _ = lstm(x)
    b, _ = lstm(x[:4])
    assert not torch.allclose(a[:4], b)  # train mode: other examples change the output
    lstm.eval()
    a, _ = lstm(x)
    b, _ = lstm(x[:1])
    torch.testing.assert_close(a[:1], b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "make,call,message",
    [
        (lambda: NormLSTMCell(4, 6, "group"), None, "norm must be one of"),
        (lambda: NormLSTMCell(0, 6), None, "input_size"),
        (lambda: NormLSTMCell(4, 6, max_steps=0), None, "max_steps"),
        (lambda: NormLSTMCell(4, 6, eps=0), None, "eps"),
        (lambda: NormLSTMCell(4, 6), lambda m: m(torch.randn(3, 5)), "expected"),
        (lambda: NormLSTMCell(4, 6), lambda m: m(torch.randn(3, 4), (torch.zeros(3, 5), torch.zeros(3, 6))),
         "h has shape"),
        (lambda: NormLSTMCell(4, 6), lambda m: m(torch.randn(3, 4), None, -1), "t must be"),
        (lambda: NormLSTMCell(4, 6, "batch", max_steps=2), lambda m: m(torch.randn(3, 4), None, 2), "max_steps=2"),
        (lambda: NormLSTMCell(4, 6, "batch"), lambda m: m(torch.randn(1, 4)), "more than 1 example"),
        (lambda: NormLSTM(4, 6), lambda m: m(torch.randn(3, 4)), "expected"),
        (lambda: NormLSTM(4, 6), lambda m: m(torch.randn(3, 0, 4)), "no time steps"),
    ],
)
def test_bad_input_raises_a_value_error(make, call, message):
    with pytest.raises(ValueError, match=message):
        m = make()
        call(m)
