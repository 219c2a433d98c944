"""The flow-matching schedule against the official scheduler fixture."""

import torch
from conftest import load_fixture, max_relative_error

from matrixgame_env.nn.scheduler import FlowMatchScheduler

TOLERANCE = 1e-4


def _fixture():
    return load_fixture("scheduler")


def test_sigma_and_timestep_tables_match():
    f = _fixture()
    scheduler = FlowMatchScheduler(shift=5.0)
    assert max_relative_error(scheduler.sigmas, f.io("sigmas")) < TOLERANCE
    assert max_relative_error(scheduler.timesteps, f.io("timesteps")) < TOLERANCE
    assert max_relative_error(scheduler.training_weights, f.io("linear_timesteps_weights")) < TOLERANCE


def test_warped_step_lists_and_their_sigmas_match():
    f = _fixture()
    scheduler = FlowMatchScheduler(shift=5.0)
    for key, warped in f.spec["warped_lists"].items():
        steps = [int(s) for s in key.split("[")[1].split("]")[0].split(",")]
        got = scheduler.warp(steps)
        assert max(abs(a - b) for a, b in zip(got, warped)) < TOLERANCE * 1000
        assert scheduler.index(torch.tensor(got)).tolist() == f.spec["warped_list_scheduler_indices"][key]
        sigmas = f.spec["warped_list_sigmas"][key]
        assert max_relative_error(scheduler.sigma(torch.tensor(got)), torch.tensor(sigmas)) < TOLERANCE


def test_add_noise_and_x0_conversion_match():
    f = _fixture()
    scheduler = FlowMatchScheduler(shift=5.0)
    t = f.io("add_noise_timesteps")
    noisy = scheduler.add_noise(f.io("x0"), f.io("noise"), t)
    assert max_relative_error(noisy, f.io("add_noise_out")) < TOLERANCE
    x0 = scheduler.flow_to_x0(f.io("flow"), f.io("add_noise_out"), t)
    assert max_relative_error(x0, f.io("flow_to_x0_out")) < TOLERANCE


def test_timestep_zero_maps_to_the_last_table_entry_not_sigma_zero():
    f = _fixture()
    scheduler = FlowMatchScheduler(shift=5.0)
    x0 = scheduler.flow_to_x0(f.io("flow"), f.io("add_noise_out"), torch.zeros(4))
    assert max_relative_error(x0, f.io("flow_to_x0_at_t0_out")) < TOLERANCE
    assert float(scheduler.sigma(0.0)) == float(scheduler.sigmas[-1]) > 0


def test_warp_rejects_steps_outside_the_schedule():
    scheduler = FlowMatchScheduler()
    try:
        scheduler.warp([1200])
    except ValueError as error:
        assert "1200" in str(error)
    else:
        raise AssertionError("warp accepted a step above 1000")
