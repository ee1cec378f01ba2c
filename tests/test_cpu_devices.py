"""The thread pool of simulated CPU devices: 16 threads per device, so in-flight programs' blocked collective
ranks rarely fill it (paft_jax/cpu_devices.py)."""
import os
import subprocess
import sys

from paft_jax.cpu_devices import THREADS_PER_DEVICE, configure, pool_size

COUNT_THREADS = r"""
import glob, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
x = jax.device_put(jnp.ones((8, 4)), NamedSharding(Mesh(jax.devices(), ("d",)), P("d")))
jax.block_until_ready(jax.jit(lambda a: a.sum())(x))  # a program with a collective on every device
print(sum(open(f).read().startswith("tf_XLAEigen") for f in glob.glob("/proc/self/task/*/comm")))
"""


def test_pool_size_for_simulated_devices():
    flags = "--xla_force_host_platform_device_count=8"
    assert pool_size({"XLA_FLAGS": flags}) == 8 * THREADS_PER_DEVICE
    assert pool_size({"XLA_FLAGS": f"--xla_cpu_enable_fast_math=false {flags}"}) == 8 * THREADS_PER_DEVICE
    assert pool_size({"XLA_FLAGS": flags, "PJRT_NPROC": "12"}) is None  # the user's setting is kept
    assert pool_size({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) is None
    assert pool_size({}) is None


def test_the_cpu_client_runs_its_devices_on_that_pool():
    """A fresh JAX process given the configured environment has that many pool threads (the CPU client's
    default is max(cores, devices) = 8 here)."""
    env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    configure(env)
    assert env["PJRT_NPROC"] == str(8 * THREADS_PER_DEVICE)
    out = subprocess.run([sys.executable, "-c", COUNT_THREADS], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert int(out.strip().splitlines()[-1]) >= 8 * THREADS_PER_DEVICE
