"""`python -m paft_jax.launch ARGS` that SIGKILLs itself at one named point, for the kill-and-rerun tests:

    python tests/fault_run.py POINT ARGS...

POINT: `<branch>-step-N` (after the branch's Nth step, its metrics written: as the next step begins),
`after-training` (both branches trained, before the merge), `export-tensor-N` (after the merge's export
took N tensors: half-written; on the mesh, the merged tensors it fetched; streamed, the base tensors read).
The points are wrappers installed here, so the product code carries no test hooks."""
import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    from paft_jax.pipeline import run
    from paft_jax.train import loop
    if "-step-" in point:
        branch, _, n = point.rpartition("-step-")
        step = loop.Branch.step

        def stepping(self, batch):
            if Path(self.cfg.output_dir).name == branch and int(self.state.step) == int(n):
                die()
            return step(self, batch)
        loop.Branch.step = stepping
    elif point == "after-training":
        run.merge_and_export = lambda *a, **k: die()
    elif point.startswith("export-tensor-"):
        from paft_jax.hf import export
        limit, base_source, to_hf, fetched = int(point.rpartition("-")[2]), run.base_source, export.to_hf, [0]

        def fetching(*a, **k):  # the on-mesh merge's export: each merged tensor, fetched from the devices
            fetched[0] += 1
            if fetched[0] > limit:
                die()
            return to_hf(*a, **k)
        export.to_hf = fetching

        class Counting:  # the streamed merge: each base tensor read
            def __init__(self, src):
                self.src, self.reads = src, 0

            def __getattr__(self, name):
                return getattr(self.src, name)

            def get(self, name):
                self.reads += 1
                if self.reads > limit:
                    die()
                return self.src.get(name)
        run.base_source = lambda *a, **k: Counting(base_source(*a, **k))
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install(sys.argv[1])
    from paft_jax.launch import cli
    sys.exit(cli(sys.argv[2:]))
