"""The verification's report and its process, importable without JAX (a CLI starts the process first).

The process runs `python -m paft_jax.hf.verify` (its `_serve`): the side that verifies imports this one, never
the reverse."""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class ExportMismatchError(RuntimeError):
    pass


@dataclass
class VerifyReport:
    max_abs_diff: float
    mean_kl: float
    tokens: int
    atol: float

    def __str__(self):
        return (f"verify: max |logits diff| = {self.max_abs_diff:.3g} (atol {self.atol:g}), "
                f"mean KL(flax || transformers) = {self.mean_kl:.3g} over {self.tokens} tokens")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


class Verifier:
    """`hf.verify.verify_dir` in a process of its own, started before the output is written so that its
    imports (torch, transformers, JAX and the Flax model: ~5 s of CPU, most of a verification on 2 cores)
    overlap the work that writes it.  `check(dir)` hands it the directory and returns the report as soon as
    it is printed (the process then exits without tearing down torch and XLA), or raises
    ExportMismatchError."""

    def __init__(self, atol: float = 1e-3, model_type: str | None = None):
        self.atol = atol
        self.err = tempfile.TemporaryFile("w+")  # a file, not a pipe: its warnings can never block it
        self.proc = subprocess.Popen([sys.executable, "-m", "paft_jax.hf.verify", model_type or ""],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    def check(self, model_dir: str | Path) -> VerifyReport:
        line = ""
        try:
            self.proc.stdin.write(json.dumps({"dir": str(model_dir), "atol": self.atol}) + "\n")
            self.proc.stdin.flush()
            line = next((ln for ln in self.proc.stdout if ln.startswith("{")), "")
        except BrokenPipeError:
            pass  # it died first: reported below
        if not line:
            self.proc.wait()
            self.err.seek(0)
            raise RuntimeError(f"verification of {model_dir} failed (rc {self.proc.returncode}):\n"
                               f"{self.err.read()[-3000:]}")
        res = json.loads(line)
        if "mismatch" in res:
            raise ExportMismatchError(res["mismatch"])
        return VerifyReport(**res)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.err):
            f.close()


def start_verifier(atol: float, base: dict | str | Path | None) -> Verifier | None:
    """A Verifier started now (None, with a warning, without torch).  `base`: the base model's config dict
    or directory, whose model type names the transformers modules to import ahead."""
    if not torch_available():
        log.warning("torch is not installed: the merge will not be verified (pip install 'paft_jax[verify]')")
        return None
    config = base if isinstance(base, dict) else {}
    if isinstance(base, (str, Path)) and not str(base).startswith("gs://"):
        try:
            config = json.loads((Path(base) / "config.json").read_text())
        except (OSError, ValueError):
            pass
    return Verifier(atol, config.get("model_type") if isinstance(config, dict) else None)
