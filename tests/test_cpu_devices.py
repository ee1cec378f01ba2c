"""Simulated CPU devices: a thread pool of 16 threads per device, so in-flight programs' blocked collective
ranks rarely fill it, and a rendezvous timeout long enough for a late rank (paft_jax/cpu_devices.py)."""
import os
import subprocess
import sys

from paft_jax.cpu_devices import RENDEZVOUS_TIMEOUT_S, THREADS_PER_DEVICE, configure, pool_size

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


TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds"


def test_configure_lengthens_the_rendezvous_timeout_and_keeps_the_users():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    configure(env)
    assert f"{TIMEOUT}={RENDEZVOUS_TIMEOUT_S}" in env["XLA_FLAGS"].split()
    configure(env)  # idempotent
    assert env["XLA_FLAGS"].count(TIMEOUT) == 1
    mine = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {TIMEOUT}=7", "PJRT_NPROC": "12"}
    configure(mine)
    assert mine == {"XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {TIMEOUT}=7", "PJRT_NPROC": "12"}
    one = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    configure(one)
    assert one == {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}  # one device: no collectives to wait for


LATE_RANK = r"""
import sys, time
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
def late(i):  # rank 0 arrives at the all-reduce 4 s after the others
    if int(i) == 0:
        time.sleep(4)
    return np.float32(0)
def body(x):
    z = jax.pure_callback(late, jax.ShapeDtypeStruct((), jnp.float32), jax.lax.axis_index("d"))
    return jax.lax.psum(x + z, "d")
mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
print(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P()))(jnp.ones(4)))
"""


def test_the_timeout_flag_decides_whether_a_late_rank_aborts_the_process():
    """What the timeout is for: XLA:CPU aborts the whole process when a rank is later than the timeout
    (here 1 + 2 s for a rank 4 s late), and lets it arrive when the timeout is longer (10 s)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    runs = {}
    for timeout in (2, 10):
        # XLA waits the warning's time (here 1 s), logs "may be stuck", then waits the timeout, then aborts
        env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count=4 {TIMEOUT}={timeout}"
                            " --xla_cpu_collective_call_warn_stuck_timeout_seconds=1")
        runs[timeout] = subprocess.run([sys.executable, "-c", LATE_RANK], env=env, capture_output=True, text=True,
                                       timeout=120)
    assert runs[2].returncode != 0 and "Termination timeout" in runs[2].stderr
    assert runs[10].returncode == 0, runs[10].stderr[-2000:]
    assert runs[10].stdout.split()[-1] == "[4.]" and "unstuck" in runs[10].stderr
