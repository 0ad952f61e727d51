"""Learning-rate schedules and λ = λ0·t/T against their formulas and torch's own schedulers."""

import math

import pytest
import torch

from isda_viz.errors import IsdaVizError
from isda_viz.isda.schedules import cosine_lr, isda_strength, learning_rate, linear_lr, step_lr


def _torch_rates(scheduler_class, total, base=0.1, **kwargs):
    """The learning rates torch's scheduler gives at steps 0..total-1."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = scheduler_class(optimizer, **kwargs)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_has_its_endpoints_and_matches_torch():
    assert cosine_lr(0.1, 0.0) == 0.1 and cosine_lr(0.1, 1.0) == 0.0 and cosine_lr(0.1, 0.5) == pytest.approx(0.05)
    total = 37
    ours = [learning_rate("cosine", 0.1, t, total) for t in range(total)]
    # Bit for bit the expressions used inline before the helper: the inverter's (steps) and train's (fraction).
    assert ours == [0.5 * 0.1 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    fractions = [learning_rate("cosine", 0.1, t / total) for t in range(total)]
    assert fractions == [0.5 * 0.1 * (1 + math.cos(math.pi * (t / total))) for t in range(total)]
    theirs = _torch_rates(torch.optim.lr_scheduler.CosineAnnealingLR, total, T_max=total)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_step_decays_at_half_and_three_quarters_like_multistep():
    total = 40
    ours = [learning_rate("step", 0.1, t / total) for t in range(total)]
    assert ours == [learning_rate("step", 0.1, t, total) for t in range(total)]
    # The expression train.py used inline before the helper: the same floats, not just close ones.
    assert ours == [0.1 * (0.1 ** ((t / total >= 0.5) + (t / total >= 0.75))) for t in range(total)]
    theirs = _torch_rates(torch.optim.lr_scheduler.MultiStepLR, total, milestones=[20, 30], gamma=0.1)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert ours[19] == 0.1 and ours[20] == pytest.approx(0.01) and ours[30] == pytest.approx(0.001)


def test_step_every_n_steps_and_constant():
    rates = {t: learning_rate("step", 10.0, t, 10_000, every=2500) for t in (0, 2499, 2500, 4999, 5000, 9999)}
    assert rates == {t: 10.0 * 0.1 ** (t // 2500) for t in rates}
    assert rates[2499] == 10.0 and rates[2500] == pytest.approx(1.0) and rates[9999] == pytest.approx(0.01)
    assert step_lr(2.0, 3) == 2.0 * 0.1 ** 3
    assert learning_rate("constant", 0.3, 7, 10) == 0.3


def test_linear_decays_to_zero_like_the_wgan_loop_did():
    total = 30
    ours = [learning_rate("linear", 1e-3, t, total) for t in range(total + 3)]
    assert ours == [1e-3 * max(0.0, 1.0 - t / total) for t in range(total + 3)]
    assert ours[0] == 1e-3 and ours[total] == 0.0 and ours[total + 2] == 0.0 and linear_lr(2.0, 0.25) == 1.5
    assert cosine_lr(2.0, 3, 4) == pytest.approx(2.0 * (1 - math.sqrt(0.5)) / 2)


def test_isda_strength_grows_linearly_to_lambda0():
    assert isda_strength(0.5, 0.0) == 0.0 and isda_strength(0.5, 1.0) == 0.5
    for t in range(11):
        assert isda_strength(7.5, t / 10) == pytest.approx(7.5 * t / 10, rel=1e-15)


def test_unknown_schedule_is_a_one_line_error():
    with pytest.raises(IsdaVizError, match="unknown schedule 'warm'"):
        learning_rate("warm", 0.1, 0, 10)


def test_sigmoid_rampup_rises_from_exp_minus_5_to_1_and_stays():
    from isda_viz.isda.schedules import sigmoid_rampup

    assert sigmoid_rampup(0.0, 0.3) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0.15, 0.3) == pytest.approx(math.exp(-5 * 0.25))
    values = [sigmoid_rampup(t / 100, 0.3) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:])) and values[30:] == [1.0] * 71
    assert sigmoid_rampup(0.0, 0.0) == 1.0
