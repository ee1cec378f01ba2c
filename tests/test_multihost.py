"""Two JAX processes on localhost (gloo CPU collectives) form one 4-device cluster: a global mesh
computes the same forward as one process, and each process can drive a sub-mesh of its own devices."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from paft_jax.config import DistributedConfig, MeshConfig
    from paft_jax.mesh import build_mesh, init_distributed, split_mesh
    from paft_jax.models import Decoder, ModelConfig, init_params
    pid, port = int(sys.argv[1]), sys.argv[2]
    init_distributed(DistributedConfig(enabled=True, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                       process_id=pid, cpu_collectives="gloo"))
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    mc = MeshConfig(data=2, fsdp=2, tensor=1)
    mesh, rules = build_mesh(mc), mc.logical_rules()
    params = init_params(cfg, jax.random.key(0), mesh, rules)
    ids = np.arange(4 * 8).reshape(4, 8) % cfg.vocab_size
    from jax.experimental import multihost_utils
    gids = multihost_utils.host_local_array_to_global_array(ids[pid * 2:(pid + 1) * 2], mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    model = Decoder(cfg, mesh=mesh, rules=rules)
    total = jax.jit(lambda p, i: model.apply({"params": p}, i)[0].sum())(params, gids)
    # each process drives a sub-mesh of only its own devices (a PAFT branch), then all meet again
    mine = [m for m in split_mesh(jax.devices(), [2, 2]) if m.devices.flat[0].process_index == pid][0]
    local = init_params(cfg, jax.random.key(pid + 1), mine, rules)
    branch = float(jax.jit(lambda p: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(p)))(local))
    multihost_utils.sync_global_devices("branches done")
    print("RESULT " + json.dumps({"total": float(total), "branch": branch,
                                  "branch_processes": sorted({d.process_index for d in mine.devices.flat})}), flush=True)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_form_one_cluster(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]) for out, _ in outs]
    assert results[0]["total"] == pytest.approx(results[1]["total"])

    # the same forward in one process
    import jax
    from paft_jax.models import Decoder, ModelConfig, init_params
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    params = init_params(cfg, jax.random.key(0))
    ids = np.arange(4 * 8).reshape(4, 8) % cfg.vocab_size
    single = float(Decoder(cfg).apply({"params": params}, ids)[0].sum())
    assert results[0]["total"] == pytest.approx(single, rel=1e-5)
    # each process drove its own branch on a sub-mesh of its own devices only, and computed what one
    # process computes for that branch alone
    assert [r["branch_processes"] for r in results] == [[0], [1]]
    for pid, r in enumerate(results):
        alone = float(sum(np.asarray(x, np.float64).sum()
                          for x in jax.tree_util.tree_leaves(init_params(cfg, jax.random.key(pid + 1)))))
        assert r["branch"] == pytest.approx(alone, rel=1e-5)
