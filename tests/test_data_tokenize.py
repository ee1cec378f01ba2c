"""Loss masks checked token by token against the chat template (SmolLM2's tokenizer and a Llama-3-style
one, with and without {% generation %} blocks), for every record format."""
import numpy as np
import pytest

from paft_jax.data import ChatTokenizer, DataConfig, DataError, build_dataset
from paft_jax.data.records import normalize_preference, normalize_sft
from paft_jax.data.sources import ListSource
from paft_jax.data.testing import llama3_style_tokenizer


@pytest.fixture(scope="session")
def smollm2_tok():
    from paft_jax.hf.bundled import smollm2_gguf_path
    from paft_jax.hf.load import load_tokenizer
    p = smollm2_gguf_path()
    tok = load_tokenizer(p.parent, p)
    assert tok is not None
    return tok


TOKENIZERS = ["smollm2", "llama3", "llama3_generation_tags"]


@pytest.fixture(params=TOKENIZERS)
def tok(request, smollm2_tok):
    if request.param == "smollm2":
        return smollm2_tok
    return llama3_style_tokenizer(generation_tags=request.param.endswith("tags"))


def _end_marker(tok) -> str:
    return "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else "<|eot_id|>"


def oracle_mask(tok, messages, train_from):
    """Independent reference: render the text, find each trained assistant content (+ end-of-turn
    marker) by characters, and mark the tokens whose characters fall inside those spans."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    end = _end_marker(tok)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip() if end == "<|eot_id|>" else m["content"]  # Llama 3 trims content
        start = text.index(content + end, cursor)
        cursor = start + len(content) + len(end)
        if m["role"] == "assistant" and i >= train_from:
            spans.append((start, cursor))
    mask = np.array([any(a <= s and e <= b for a, b in spans) and e > s for s, e in enc["offset_mapping"]])
    return np.array(enc["input_ids"]), mask


CONVS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "Fine, thank you."},
     {"role": "assistant", "content": "Here are a few tips:\n- Start small.\n- Keep going.\nHope this helps!"}],
]


@pytest.mark.parametrize("conv", range(len(CONVS)))
def test_messages_mask_matches_template_token_by_token(tok, conv):
    msgs = CONVS[conv]
    enc = ChatTokenizer(tok).encode_chat(msgs, 0, "t")
    ids, mask = oracle_mask(tok, msgs, 0)
    # the ids are exactly what the template tokenizes to
    assert enc.ids.tolist() == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    assert enc.ids.tolist() == ids.tolist()
    assert enc.mask.tolist() == mask.tolist()
    end = _end_marker(tok)
    want = "".join(m["content"].strip() + end for m in msgs if m["role"] == "assistant")
    assert tok.decode(enc.ids[enc.mask]) == want


def test_prompt_completion_trains_only_the_completion(tok):
    msgs = CONVS[1]
    rec = normalize_sft({"prompt": msgs[:3 + 1], "completion": msgs[4:]}, "t")
    enc = ChatTokenizer(tok).encode_sft(rec, "t")
    _, mask = oracle_mask(tok, msgs, 4)
    assert enc.mask.tolist() == mask.tolist()
    assert tok.decode(enc.ids[enc.mask]) == msgs[4]["content"] + _end_marker(tok)


def test_string_prompt_completion_chat_and_raw(tok):
    chat = ChatTokenizer(tok)
    rec = normalize_sft({"prompt": "What is 2 + 3?", "completion": "The answer is 5."}, "t")
    enc = chat.encode_sft(rec, "t")
    assert enc.ids.tolist() == list(tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "The answer is 5."}],
        tokenize=True, return_dict=True)["input_ids"])
    assert tok.decode(enc.ids[enc.mask]) == "The answer is 5." + _end_marker(tok)
    raw = chat.encode_sft(normalize_sft({"prompt": "Q: 2+3=", "completion": " 5"}, "t", string_format="raw"), "t")
    n_prompt = len(tok("Q: 2+3=")["input_ids"])
    assert raw.ids[:n_prompt].tolist() == tok("Q: 2+3=")["input_ids"]
    assert not raw.mask[:n_prompt].any() and raw.mask[n_prompt:].all()
    assert raw.ids[-1] == tok.eos_token_id


def test_text_trains_every_token(tok):
    enc = ChatTokenizer(tok).encode_sft(normalize_sft({"text": "The quick brown fox."}, "t"), "t")
    assert enc.mask.all()
    assert enc.ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("form", ["explicit_messages", "explicit_strings", "implicit"])
def test_pair_masks_and_shared_prompt(tok, form):
    prompt = [{"role": "user", "content": "How can I sleep better?"}]
    ch = [{"role": "assistant", "content": "Here are a few tips:\n- Keep a routine.\nHope this helps!"}]
    rj = [{"role": "assistant", "content": "You should keep a routine."}]
    row = {"explicit_messages": {"prompt": prompt, "chosen": ch, "rejected": rj},
           "explicit_strings": {"prompt": prompt[0]["content"], "chosen": ch[0]["content"],
                                "rejected": rj[0]["content"]},
           "implicit": {"chosen": prompt + ch, "rejected": prompt + rj}}[form]
    p, c, r = ChatTokenizer(tok).encode_pair(normalize_preference(row, "t"), "t")
    for comp, full in ((c, prompt + ch), (r, prompt + rj)):
        ids, mask = oracle_mask(tok, full, 1)
        assert np.concatenate([p, comp.ids]).tolist() == ids.tolist()
        assert np.concatenate([np.zeros(len(p), bool), comp.mask]).tolist() == mask.tolist()
    # the prompt ends with the generation prompt: it is what the model is asked to continue
    gen = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert p.tolist() == list(gen)


def test_batch_targets_and_loss_mask_follow_the_token_mask(tok):
    """Through the whole pipeline: loss_mask[t] == 1 exactly where targets[t] (= ids[t+1]) is trained."""
    rows = [{"messages": c} for c in CONVS] * 3
    cfg = DataConfig(kind="sft", seq_len=256, batch_size=2, shuffle=False)
    ds = build_dataset(cfg, tok, process_index=0, process_count=1, sources=[ListSource(rows, "mem")])
    from paft_jax.data import BatchIterator
    b = next(BatchIterator(ds, cfg))
    for row in range(2):
        seg = b["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            ids = b["input_ids"][row, idx]
            ex = next(e for e in ds.examples if len(e.seqs[0][0]) == len(idx) and
                      e.seqs[0][0].tolist() == ids.tolist())
            assert b["targets"][row, idx[:-1]].tolist() == ids[1:].tolist()
            assert b["targets"][row, idx[-1]] == 0
            assert b["loss_mask"][row, idx[:-1]].tolist() == ex.seqs[0][1][1:].astype(float).tolist()
            assert b["loss_mask"][row, idx[-1]] == 0
            assert b["positions"][row, idx].tolist() == list(range(len(idx)))


def test_template_that_is_not_prefix_stable_is_refused():
    tok = llama3_style_tokenizer()
    import copy
    bad = copy.copy(tok)
    # renders the final message differently, so a prefix render is not a prefix of the full render
    bad.chat_template = ("{% for m in messages %}{% if loop.last %}FINAL {% endif %}{{ m['role'] + ': ' + m['content'] "
                         "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="prefix-stable"):
        ChatTokenizer(bad).encode_chat(CONVS[0], 0, "f.jsonl:3")


def test_empty_mask_is_an_error_naming_the_row():
    tok = llama3_style_tokenizer()
    import copy
    bad = copy.copy(tok)
    bad.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=r"f\.jsonl:7.*empty loss mask"):
        ChatTokenizer(bad).encode_chat(CONVS[0], 0, "f.jsonl:7")


def test_raw_pair_has_no_template(tok):
    rec = normalize_preference({"prompt": "Q: sky?", "chosen": " Blue.", "rejected": " Green."}, "t",
                               string_format="raw")
    p, c, r = ChatTokenizer(tok).encode_pair(rec, "t")
    assert p.tolist() == tok("Q: sky?")["input_ids"]
    assert c.mask.all() and r.mask.all() and c.ids[-1] == r.ids[-1] == tok.eos_token_id
    assert tok.decode(c.ids[:-1]) == " Blue." and tok.decode(r.ids[:-1]) == " Green."


def test_template_errors_name_the_row():
    import copy
    bad = copy.copy(llama3_style_tokenizer())
    bad.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match=r"f\.jsonl:2: chat template error.*no system role"):
        ChatTokenizer(bad).encode_chat([{"role": "system", "content": "x"}] + CONVS[0], 0, "f.jsonl:2")
