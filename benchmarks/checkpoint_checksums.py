"""What checkpoint checksums cost: a SmolLM2-135M-sized train state (dense delta + AdamW moments, fp32)
saved and restored through paft_jax's checkpointer, with the checksum manifest's write and check timed
beside the save and the restore they follow or precede.  One process, one device, local disk.

    XLA_FLAGS= python benchmarks/checkpoint_checksums.py [--repeats 3] [--dir /tmp/ckpt_bench]

The 8B estimate scales the measured CRC-32 rate to the bytes one host of a v4-32 slice (4 hosts) holds of
configs/paft_llama3_8b.yaml's larger branch state; on gs:// the manifest comes from the object listing (GCS
computes CRC-32C on upload) and nothing is read back, so that row is a listing, not a read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/ckpt_checksum_bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoint_checksums.json"))
    args = ap.parse_args()
    import jax
    import orbax.checkpoint as ocp
    from paft_jax import checksums
    from paft_jax.checkpoint import BranchCheckpointer, CheckpointConfig
    from paft_jax.models.shapes import named_shape

    cfg = named_shape("smollm2-135m")
    rng = np.random.default_rng(0)
    # the delta and both AdamW moments of every parameter, as the branch's TrainState holds them (fp32)
    from paft_jax.models.decoder import Decoder
    shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"])
    leaves = [np.asarray(rng.standard_normal(s.shape, np.float32) * 1e-4) for s in jax.tree_util.tree_leaves(shapes)]
    n_params = sum(x.size for x in leaves)
    state = {"delta": leaves, "mu": [x * 0.1 for x in leaves], "nu": [x * x for x in leaves]}
    total = 3 * n_params * 4
    rows = []
    for r in range(args.repeats):
        shutil.rmtree(args.dir, ignore_errors=True)
        ck = BranchCheckpointer(CheckpointConfig(async_save=False, keep_last=1), args.dir)
        t0 = time.perf_counter()
        ck.manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
        ck.manager.wait_until_finished()
        save_s = time.perf_counter() - t0
        step_dir = f"{args.dir}/1"
        t0 = time.perf_counter()
        stats = checksums.write(step_dir)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ck.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))
        restore_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert checksums.verify(step_dir) is None
        verify_s = time.perf_counter() - t0
        ck.close()
        rows.append({"save_s": save_s, "checksum_write_s": write_s, "restore_s": restore_s, "verify_s": verify_s,
                     "files": stats["files"], "bytes": stats["bytes"]})
        print(f"repeat {r + 1}: save {save_s:.2f}s + checksums {write_s:.2f}s; restore {restore_s:.2f}s + "
              f"verify {verify_s:.2f}s ({stats['files']} files, {stats['bytes'] / 1e9:.2f} GB)", flush=True)
    buf = np.random.default_rng(1).bytes(256 << 20)
    t0 = time.perf_counter()
    zlib.crc32(buf)
    crc_rate = len(buf) / (time.perf_counter() - t0)
    med = {k: statistics.median(r[k] for r in rows) for k in ("save_s", "checksum_write_s", "restore_s", "verify_s")}
    est_params = 8.03e9
    per_host = 3 * 4 * est_params / 4  # delta + two moments, fp32, over the 4 hosts of a v4-32
    print(f"\nSmolLM2-135M-sized state: {n_params / 1e6:.1f}M parameters x (delta + 2 AdamW moments) fp32 = "
          f"{total / 1e9:.2f} GB in memory, {rows[0]['bytes'] / 1e9:.2f} GB in {rows[0]['files']} files on disk; "
          f"median of {args.repeats}; {os.cpu_count()} cores\n")
    print(f"{'operation':28} {'seconds':>8} {'vs save/restore':>16}")
    print(f"{'save (sync, Orbax)':28} {med['save_s']:8.2f}")
    print(f"{'+ checksum manifest':28} {med['checksum_write_s']:8.2f} {med['checksum_write_s'] / med['save_s']:15.0%}")
    print(f"{'restore (Orbax)':28} {med['restore_s']:8.2f}")
    print(f"{'+ checksum verify':28} {med['verify_s']:8.2f} {med['verify_s'] / med['restore_s']:15.0%}")
    print(f"\nzlib CRC-32 on this machine: {crc_rate / 1e9:.2f} GB/s (256 MiB in memory)")
    print(f"8B estimate, local disk: {per_host / 1e9:.1f} GB per host (3 x 4 B x 8.03e9 / 4 hosts) / "
          f"{crc_rate / 1e9:.2f} GB/s = {per_host / crc_rate:.0f} s per save and per restore and host, plus "
          "reading the files back where the page cache no longer holds them; gs://: one object listing")
    Path(args.out).write_text(json.dumps({"args": vars(args), "params": n_params, "repeats": rows, "median": med,
                                          "crc32_bytes_per_s": crc_rate,
                                          "estimate_8b_per_host_s": per_host / crc_rate}, indent=1))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
