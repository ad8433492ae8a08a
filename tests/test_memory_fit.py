"""The train step's device memory and the fit check before training (fake numbers where a GPU would say)."""

import pytest

from tam_jax import hosts, memory_fit
from tests.helpers import tiny_config

GIB = 2**30


def test_fit_message_is_none_when_the_step_fits_or_the_limit_is_unknown():
    assert memory_fit.fit_message(10 * GIB, None, []) is None
    assert memory_fit.fit_message(10 * GIB, 16 * GIB, []) is None
    assert memory_fit.fit_message(int(15.5 * GIB), 16 * GIB, []) is not None  # inside the 5% margin


def test_fit_message_names_the_settings_that_fit_and_only_those():
    alternatives = [({"train.episodes_per_device_step": 1}, 20 * GIB),
                    ({"train.episodes_per_device_step": 1, "model.remat": "block"}, 9 * GIB)]
    message = memory_fit.fit_message(40 * GIB, 16 * GIB, alternatives)
    assert "40.00 GiB" in message and "16.00 GiB" in message
    fits = message.split("Settings that fit:")[1]
    assert "--config.train.episodes_per_device_step=1 --config.model.remat=block" in fits
    assert "(20.00 GiB)" not in fits
    nothing = memory_fit.fit_message(40 * GIB, 16 * GIB, alternatives[:1])
    assert "None of the settings tried fits" in nothing and "mesh.num_devices" in nothing


def test_candidate_settings_skip_what_the_config_already_has():
    config = tiny_config()
    config.train.episodes_per_device_step = 4
    assert memory_fit.candidate_settings(config)[0] == {"train.episodes_per_device_step": 1}
    config.train.episodes_per_device_step = 1
    config.model.dtype = "bfloat16"
    # 15 videos per episode (5-way, 1 shot + 2 queries): chunks of at most 10 and of 5 are both 3 chunks.
    assert memory_fit.candidate_settings(config) == [
        {"model.remat": "block"}, {"model.remat": "block", "train.embed_chunks": 3}]
    config.model.remat, config.fewshot.queries = "block", 5  # 30 videos: chunks of 10, then of 5
    assert memory_fit.candidate_settings(config) == [{"train.embed_chunks": 3}, {"train.embed_chunks": 6}]


def test_check_step_fits_stops_naming_the_first_setting_that_fits():
    config = tiny_config()
    config.train.episodes_per_device_step = 4
    def measure(cfg, mesh):
        measure.calls.append(cfg.train.episodes_per_device_step)
        total = {4: 30, 1: 12}[cfg.train.episodes_per_device_step] * GIB
        return memory_fit.StepMemory(argument=total, output=0, temp=0, alias=0)

    measure.calls = []
    mesh = hosts.make_mesh(1)
    with pytest.raises(memory_fit.StepDoesNotFitError, match="episodes_per_device_step=1"):
        memory_fit.check_step_fits(config, mesh, limit=16 * GIB, measure=measure)
    assert measure.calls == [4, 1]  # stopped at the first alternative that fits
    measure.calls = []
    memory_fit.check_step_fits(config, mesh, limit=64 * GIB, measure=measure)
    assert measure.calls == [4]
    config.train.check_memory_fit = False
    memory_fit.check_step_fits(config, mesh, limit=16 * GIB, measure=measure)
    assert measure.calls == [4]


def test_the_cpu_backend_reports_no_limit_so_nothing_is_compiled():
    assert memory_fit.device_memory_limit() is None
    config = tiny_config()
    memory_fit.check_step_fits(config, hosts.make_mesh(1), measure=lambda *a: pytest.fail("compiled"))


def test_step_memory_of_micro_batches_depends_on_their_size():
    config = tiny_config()
    config.mesh.num_devices = 1
    config.train.episodes_per_step = 4
    mesh = hosts.make_mesh(1)
    config.train.episodes_per_device_step = 4
    whole = memory_fit.step_memory(config, mesh)
    config.train.episodes_per_device_step = 1
    micro = memory_fit.step_memory(config, mesh)
    assert whole.argument == micro.argument > 0
    assert micro.total == micro.argument + micro.output + micro.temp - micro.alias
    assert micro.temp < 0.5 * whole.temp
