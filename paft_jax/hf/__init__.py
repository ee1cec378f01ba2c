"""Hugging Face interop: config mapping, import (safetensors, GGUF), export, verification."""
