"""Test-wide setup: 8 virtual CPU devices, so data-parallel code runs on 1 and on 8 devices in one process."""

import os

# Must happen before jax initialises its backends; other XLA flags a user set are kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
