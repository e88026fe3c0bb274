"""The step plan of an SG-MCMC chain: phases, temperature ramp, cyclical step sizes and sample steps."""

import math

import pytest

from mlip_uq.inference.sgmcmc import SGMCMCSettings


def plan(settings, **kwargs):
    schedule = settings.schedule(**kwargs)
    steps = range(schedule.start, schedule.end)
    return schedule, [s for s in steps if schedule.sample_index(s) is not None]


def test_constant_schedule_phases_and_samples():
    settings = SGMCMCSettings(burnin_steps=10, preheat_steps=4, n_samples=3, thinning=5)
    schedule, sample_steps = plan(settings)
    assert sample_steps == [18, 23, 28] and schedule.end == 29
    assert [schedule.sample_index(s) for s in sample_steps] == [0, 1, 2]
    assert [schedule.phase(s) for s in (0, 9, 10, 13, 14)] == ["burnin", "burnin", "preheat", "preheat", "sampling"]
    assert [schedule.temperature_at(s) for s in (9, 10, 11, 13, 14)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert all(schedule.lr_factor(s) == 1.0 for s in range(schedule.end))


def test_cyclical_schedule_restarts_explores_then_samples():
    settings = SGMCMCSettings(burnin_steps=10, preheat_steps=0, n_samples=5, thinning=2, cycle_steps=8,
                              exploration_fraction=0.5)
    schedule, sample_steps = plan(settings)
    assert schedule.per_cycle == 2
    # cycles start at 10, 18, 26: 4 exploration steps, then samples after every 2nd step of the last 4
    assert sample_steps == [15, 17, 23, 25, 31] and schedule.end == 32
    assert [schedule.phase(s) for s in (10, 13, 14, 17, 18)] == [
        "exploration", "exploration", "sampling", "sampling", "exploration"]
    assert schedule.temperature_at(12) == 0.0 and schedule.temperature_at(15) == 1.0
    factors = [schedule.lr_factor(s) for s in range(10, 18)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors, factors[1:]))
    assert factors[4] == pytest.approx(0.5) and schedule.lr_factor(18) == 1.0  # restart
    assert schedule.lr_factor(17) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_warm_start_schedule_settles_then_samples_without_burnin():
    settings = SGMCMCSettings(burnin_steps=10, preheat_steps=4, n_samples=2, thinning=3)
    schedule, sample_steps = plan(settings, start=40, settle_steps=5, n_samples=2)
    assert schedule.start == 40 and sample_steps == [47, 50] and schedule.end == 51
    assert {schedule.phase(s) for s in range(40, 45)} == {"settle"}
    assert all(schedule.temperature_at(s) == 1.0 for s in range(40, 51))


@pytest.mark.parametrize("options, message", [
    ({"cycle_steps": 4, "thinning": 3}, "leaves no room for a sample"),
    ({"cycle_steps": 8, "exploration_fraction": 1.0}, "exploration_fraction"),
    ({"accelerator": "tpu"}, "accelerator"),
    ({"n_processes": 0}, "n_processes"),
])
def test_bad_schedules_are_reported(options, message):
    with pytest.raises(ValueError, match=message):
        SGMCMCSettings(**options)
