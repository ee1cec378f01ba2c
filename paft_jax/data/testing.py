"""Small local tokenizers for tests (no downloads): a byte-level BPE with Llama 3's chat template and
special tokens, optionally with `{% generation %}` blocks.  Also usable by trainer tests on tiny models
(vocab size `len(tok)`)."""
from __future__ import annotations

from functools import lru_cache

# Meta's Llama 3 Instruct template, verbatim
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# the same rendering, with the assistant content marked for transformers' return_assistant_tokens_mask
LLAMA3_GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|pad|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "How many apples are left? The answer is 42.",
          "Here are a few tips:\n- Start small.\n- Keep going.\nHope this helps!", "user assistant system",
          "Hello there, how are you today? I am fine, thank you.", "0 1 2 3 4 5 6 7 8 9 + - x = ."]


@lru_cache(maxsize=4)
def llama3_style_tokenizer(generation_tags: bool = False, pad: bool = False):
    """A PreTrainedTokenizerFast (byte-level BPE trained on a few strings) with Llama 3 special tokens,
    bos <|begin_of_text|>, eos <|eot_id|>, and Llama 3's chat template.  `pad=False` leaves no pad
    token, as in Llama 3 (the data code then pads with eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|pad|>" if pad else None)
    tok.chat_template = LLAMA3_GENERATION_TEMPLATE if generation_tags else LLAMA3_TEMPLATE
    return tok
