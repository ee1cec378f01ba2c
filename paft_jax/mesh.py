"""Device meshes: build from config, split into disjoint branch sub-meshes, map logical axes to shardings."""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from paft_jax.config import MESH_AXES, DistributedConfig, MeshConfig

log = logging.getLogger(__name__)


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill in the single -1 axis so the product equals num_devices; refuse anything else."""
    sizes = dict(sizes)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    for k, v in sizes.items():
        if v != -1 and v <= 0:
            raise ValueError(f"mesh: axis {k}={v} must be positive or -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: axis sizes {sizes} use {math.prod(sizes.values())} devices, "
                         f"but {num_devices} are available")
    return sizes


def build_mesh(cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(cfg.axis_sizes(), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        try:  # topology-aware placement (ICI rings on TPU); falls back to plain order elsewhere
            from jax.experimental import mesh_utils
            arr = mesh_utils.create_device_mesh(shape, devices=devices)
            return Mesh(arr, MESH_AXES)
        except Exception:  # noqa: BLE001 - any topology failure means "use the given order"
            pass
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def select_devices(count: int = 0) -> list[Any]:
    """The first `count` devices (0: all) in process order, so a process's devices stay together."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if count > len(devices):
        raise ValueError(f"devices={count} but only {len(devices)} are available")
    return devices[:count] if count else devices


def split_devices(devices: Sequence[Any], parts: Sequence[int | float]) -> list[list[Any]]:
    """Split devices into disjoint consecutive groups.

    `parts` are device counts (ints summing to len(devices)) or fractions (floats summing to 1).
    Devices are grouped by process first so that, on multi-host, a branch owns whole hosts when it can.
    """
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    n = len(devices)
    if all(isinstance(p, float) for p in parts):
        if not math.isclose(sum(parts), 1.0):
            raise ValueError(f"split fractions {list(parts)} do not sum to 1")
        counts = [int(round(p * n)) for p in parts]
        counts[-1] = n - sum(counts[:-1])
    else:
        counts = [int(p) for p in parts]
    if any(c <= 0 for c in counts) or sum(counts) != n:
        raise ValueError(f"cannot split {n} devices into parts {list(parts)} (counts {counts})")
    out, start = [], 0
    for c in counts:
        out.append(devices[start:start + c])
        start += c
    return out


def split_mesh(mesh_or_devices: Mesh | Sequence[Any], parts: Sequence[int | float],
               cfgs: Sequence[MeshConfig] | None = None) -> list[Mesh]:
    """Disjoint sub-meshes, one per part, each with the (data, fsdp, tensor) axes of its own config."""
    devices = list(mesh_or_devices.devices.flat) if isinstance(mesh_or_devices, Mesh) else list(mesh_or_devices)
    groups = split_devices(devices, parts)
    cfgs = list(cfgs) if cfgs is not None else [MeshConfig()] * len(groups)
    if len(cfgs) != len(groups):
        raise ValueError(f"split_mesh: {len(groups)} parts but {len(cfgs)} mesh configs")
    return [build_mesh(c, g) for c, g in zip(cfgs, groups)]


def init_distributed(cfg: DistributedConfig) -> None:
    """Initialize multi-host JAX once, before any device is touched."""
    if not cfg.enabled:
        return
    if cfg.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    if cfg.auto:
        jax.distributed.initialize()
    else:
        missing = [k for k in ("coordinator_address", "num_processes", "process_id") if getattr(cfg, k) is None]
        if missing:
            raise ValueError(f"distributed.enabled without auto needs {missing}")
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, local_device_ids=cfg.local_device_ids)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


# ---------------------------------------------------------------------------------------------------
# logical axis names -> shardings


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, Any]]) -> P:
    """Translate logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = target if isinstance(target, tuple) else ((target,) if target is not None else ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return P(*out)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str = "array") -> P:
    """Drop mesh axes that do not divide a dimension (e.g. 3 KV heads on tensor=2): replicate that
    dimension instead, and say so once in the log."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = entry if isinstance(entry, tuple) else ((entry,) if entry is not None else ())
        kept = []
        for a in axes:
            size = mesh.shape[a] * math.prod(mesh.shape[k] for k in kept)
            if dim % size == 0:
                kept.append(a)
            else:
                log.info("%s: dim %d not divisible by mesh axis %s (%d); replicating it", what, dim, a,
                         mesh.shape[a])
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]], what: str = "array") -> NamedSharding:
    return NamedSharding(mesh, fit_spec(logical_to_spec(names, rules), shape, mesh, what))


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Shardings for a pytree, given matching pytrees of logical names (tuples) and shapes."""
    flat_axes, treedef = jax.tree_util.tree_flatten(axes_tree, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = treedef.flatten_up_to(shapes_tree)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))[0]]
    out = [named_sharding(a, getattr(s, "shape", s), mesh, rules, what=p)
           for a, s, p in zip(flat_axes, flat_shapes, paths)]
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------------
# a mesh's processes: a PAFT branch's sub-mesh may span only some processes of a multi-host job, and
# everything a branch agrees on (epoch lengths, stop requests, checkpoint barriers) is scoped to them.


def mesh_processes(mesh: Mesh) -> list[int]:
    """The sorted process indices owning the mesh's devices."""
    return sorted({d.process_index for d in mesh.devices.flat})


def process_rank(mesh: Mesh) -> tuple[int, int]:
    """(this process's rank among the mesh's processes, their count); refuses a process outside it."""
    procs = mesh_processes(mesh)
    if jax.process_index() not in procs:
        raise ValueError(f"process {jax.process_index()} owns no device of this mesh (processes {procs})")
    return procs.index(jax.process_index()), len(procs)


def is_mesh_primary(mesh: Mesh) -> bool:
    """True on the lowest-index process of the mesh: the one that writes files for it."""
    return jax.process_index() == mesh_processes(mesh)[0]


def mesh_max(value: float, mesh: Mesh) -> float:
    """The largest `value` over the mesh's processes: a collective over this mesh's devices only, so a
    branch agrees with itself while the other branch's processes run something else."""
    if len(mesh_processes(mesh)) == 1:
        return value
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    shards = [jax.device_put(np.asarray([value], np.float32), d) for d in sharding.addressable_devices]
    arr = jax.make_array_from_single_device_arrays((mesh.size,), sharding, shards)
    out = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))(arr)
    return float(np.asarray(out.addressable_data(0)))


def barrier(name: str, timeout_s: float = 7 * 24 * 3600) -> None:
    """Wait until every process reaches `name`.  A key-value barrier of the JAX distributed service, not a
    device collective: processes may arrive hours apart (one PAFT branch finishing before the other, process
    0 merging a 7B model), while a CPU (gloo) collective gives up after 30 s."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client's own barrier; Orbax waits on the same one
    client = distributed.global_state.client
    if client is None or not hasattr(client, "wait_at_barrier"):
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))
