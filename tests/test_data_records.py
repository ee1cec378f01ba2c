"""Record formats and bad input: each bad row is an error naming the file, the row and the field, or a
counted skip with `skip_invalid`."""
import json

import pytest

from paft_jax.data import DataConfig, DataError, build_dataset
from paft_jax.data.records import ChatPair, ChatSFT, RawPair, RawSFT, TextSFT, normalize_preference, normalize_sft
from paft_jax.data.testing import llama3_style_tokenizer

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello."}
B = {"role": "assistant", "content": "Go away."}


def test_sft_formats_normalize():
    assert normalize_sft({"messages": [U, A]}, "w") == ChatSFT((U, A), 0)
    assert normalize_sft({"prompt": [U], "completion": [A]}, "w") == ChatSFT((U, A), 1)
    assert normalize_sft({"prompt": "Hi", "completion": "Hello."}, "w") == ChatSFT((U, A), 1)
    assert normalize_sft({"prompt": "Hi", "completion": "Hello."}, "w", string_format="raw") == RawSFT("Hi", "Hello.")
    assert normalize_sft({"text": "Plain text."}, "w") == TextSFT("Plain text.")
    # extra columns (ids, metadata) are ignored
    assert normalize_sft({"messages": [U, A], "id": 7}, "w") == ChatSFT((U, A), 0)


def test_preference_formats_normalize():
    assert normalize_preference({"prompt": [U], "chosen": [A], "rejected": [B]}, "w") == ChatPair((U,), (A,), (B,))
    assert normalize_preference({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}, "w") == \
        ChatPair((U,), (A,), (B,))
    assert normalize_preference({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}, "w",
                                string_format="raw") == RawPair("Hi", "Hello.", "Go away.")
    # implicit prompt: split at the longest shared prefix
    sys_ = {"role": "system", "content": "Be kind."}
    assert normalize_preference({"chosen": [sys_, U, A], "rejected": [sys_, U, B]}, "w") == \
        ChatPair((sys_, U), (A,), (B,))


@pytest.mark.parametrize("row,field,reason", [
    ({"messages": [U]}, "messages", "no assistant turn"),
    ({"messages": "hello"}, "messages", "wrong type"),
    ({"messages": [{"role": "robot", "content": "x"}, A]}, "messages[0].role", "unknown role"),
    ({"messages": [{"role": "user"}, A]}, "messages[0].content", "missing field"),
    ({"messages": [U, {"role": "assistant", "content": 5}]}, "messages[1].content", "wrong type"),
    ({"prompt": "Hi"}, "completion", "missing field"),
    ({"prompt": "Hi", "completion": ""}, "completion", "empty"),
    ({"text": 3}, "text", "wrong type"),
    ({"foo": 1}, None, "missing field"),
    ({"text": "a", "messages": [U, A]}, None, "ambiguous format"),
    ([1, 2], None, "wrong type"),
])
def test_bad_sft_rows(row, field, reason):
    with pytest.raises(DataError) as e:
        normalize_sft(row, "f.jsonl:4")
    assert (e.value.field, e.value.reason) == (field, reason)
    assert str(e.value).startswith("f.jsonl:4:")


@pytest.mark.parametrize("row,field,reason", [
    ({"prompt": "Hi", "chosen": "", "rejected": "No."}, "chosen", "empty"),
    ({"prompt": [U], "chosen": [{"role": "assistant", "content": "  "}], "rejected": [B]}, "chosen", "empty"),
    ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, "rejected", "chosen equals rejected"),
    ({"chosen": [U, A], "rejected": [U, A]}, "rejected", "chosen equals rejected"),
    ({"prompt": "Hi", "rejected": "No."}, "chosen", "missing field"),
    ({"prompt": "Hi", "chosen": 1, "rejected": "No."}, "chosen", "wrong type"),
    ({"chosen": [U, A, U], "rejected": [U, B, U]}, "chosen", "last turn is not assistant"),
    ({"chosen": [A], "rejected": [B]}, "chosen", "no shared prompt"),
    ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": [A], "rejected": [B]}, "prompt[0].role",
     "unknown role"),
])
def test_bad_preference_rows(row, field, reason):
    with pytest.raises(DataError) as e:
        normalize_preference(row, "f.jsonl:9")
    assert (e.value.field, e.value.reason) == (field, reason)


GOOD = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
BAD_LINES = [  # (raw line, reason, field)
    (b'{"prompt": "Hi", "chosen": "Hello.", ', "malformed JSON", None),
    (json.dumps({"prompt": "Hi", "rejected": "x"}).encode(), "missing field", "chosen"),
    (json.dumps({"prompt": "Hi", "chosen": ["x"], "rejected": "x"}).encode(), "wrong type", "chosen[0]"),
    (json.dumps({"prompt": "Hi", "chosen": "", "rejected": "x"}).encode(), "empty", "chosen"),
    (json.dumps({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}).encode(), "chosen equals rejected",
     "rejected"),
    (b'{"prompt": "Hi \xff\xfe", "chosen": "a", "rejected": "b"}', "invalid UTF-8", None),
    (json.dumps({"prompt": [{"role": "bot", "content": "Hi"}], "chosen": "a", "rejected": "b"}).encode(),
     "unknown role", "prompt[0].role"),
]


def _write(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("k", range(len(BAD_LINES)))
def test_bad_line_in_file_names_file_line_and_field(tmp_path, k):
    raw, reason, field = BAD_LINES[k]
    path = _write(tmp_path / "prefs.jsonl", [json.dumps(GOOD).encode(), b"", raw])  # line 2 blank: line 3 is bad
    cfg = DataConfig(kind="preference", seq_len=256, sources=[{"path": str(path)}])
    with pytest.raises(DataError) as e:
        build_dataset(cfg, llama3_style_tokenizer(), process_index=0, process_count=1)
    assert e.value.where == f"{path}:3" and e.value.reason == reason and e.value.field == field
    assert f"{path}:3:" in str(e.value)


def test_skip_invalid_counts_reasons(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", [json.dumps(GOOD).encode()] + [r for r, _, _ in BAD_LINES])
    cfg = DataConfig(kind="preference", seq_len=256, skip_invalid=True, sources=[{"path": str(path)}])
    ds = build_dataset(cfg, llama3_style_tokenizer(), process_index=0, process_count=1)
    st = ds.stats[0]
    assert (st.rows, st.valid, len(ds.examples)) == (8, 1, 1)
    assert dict(st.invalid) == {"malformed JSON": 1, "missing field": 1, "wrong type": 1, "empty": 1,
                                "chosen equals rejected": 1, "invalid UTF-8": 1, "unknown role": 1}
    assert all(str(path) in m for m in st.invalid_examples)


def test_truncation_counted_and_sides(tmp_path):
    tok = llama3_style_tokenizer()
    long = " ".join(["apples"] * 80)
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": long}) + "\n" + json.dumps({"messages": [U, A]}) + "\n")
    for keep in ("start", "end"):
        cfg = DataConfig(kind="sft", seq_len=64, max_length=32, truncation_keep=keep, sources=[{"path": str(path)}])
        ds = build_dataset(cfg, tok, process_index=0, process_count=1)
        assert ds.stats[0].truncated == 1
        ids = ds.examples[0].seqs[0][0]
        full = tok.apply_chat_template([U, {"role": "assistant", "content": long}], tokenize=True,
                                       return_dict=True)["input_ids"]
        assert len(ids) == 32
        assert ids.tolist() == (full[:32] if keep == "start" else full[-32:])
    cfg = DataConfig(kind="sft", seq_len=64, max_length=32, too_long="drop", sources=[{"path": str(path)}])
    ds = build_dataset(cfg, tok, process_index=0, process_count=1)
    assert (ds.stats[0].dropped_too_long, len(ds.examples)) == (1, 1)


def test_preference_prompt_truncation_keeps_the_end():
    from paft_jax.data.sources import ListSource
    tok = llama3_style_tokenizer()
    row = {"prompt": " ".join(["quick"] * 60), "chosen": "Hello.", "rejected": "Go away."}
    cfg = DataConfig(kind="preference", seq_len=128, max_prompt_length=20)
    ds = build_dataset(cfg, tok, process_index=0, process_count=1, sources=[ListSource([row], "mem")])
    (c_ids, c_mask), (r_ids, r_mask) = ds.examples[0].seqs
    assert ds.stats[0].truncated == 1
    n_prompt = int((~c_mask).argmin())
    assert n_prompt == 20 and c_ids[:20].tolist() == r_ids[:20].tolist()
    gen = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=True,
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    assert c_ids[:20].tolist() == list(gen[-20:])


def test_config_refuses_bad_values():
    from paft_jax.config import from_dict
    with pytest.raises(ValueError, match="unknown config key"):
        from_dict(DataConfig, {"kind": "sft", "sequence_length": 3})
    with pytest.raises(ValueError, match="sources\\[0\\]"):
        from_dict(DataConfig, {"sources": [{"path": "x", "wieght": 2}]})
    with pytest.raises(ValueError, match="max_length"):
        DataConfig(kind="preference", seq_len=512, max_length=300)
    with pytest.raises(ValueError, match="truncation_keep"):
        DataConfig(truncation_keep="left")
    cfg = from_dict(DataConfig, {"kind": "preference", "sources": [{"path": "a.jsonl", "weight": 0.5}]})
    assert cfg.sources[0].weight == 0.5 and cfg.sequence_limit() == 256


def test_config_round_trips_through_to_dict_and_nests():
    from dataclasses import dataclass, field

    from paft_jax.config import from_dict, to_dict

    @dataclass
    class Branch:  # how a trainer config embeds it
        data: DataConfig = field(default_factory=DataConfig)

    cfg = from_dict(Branch, {"data": {"kind": "preference", "sources": [{"path": "a.jsonl", "columns": {"q": "prompt"}}],
                                      "seq_len": 1024, "max_pairs_per_row": 8}})
    assert from_dict(Branch, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"data\.sources\[0\]"):
        from_dict(Branch, {"data": {"sources": [{"path": "a", "type": "xml"}]}})


S = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("row,field", [
    ({"messages": [A, U, A]}, "messages"),                                  # starts with the assistant
    ({"messages": [U, U, A]}, "messages"),                                  # two user turns in a row
    ({"messages": [U, S, A]}, "messages"),                                  # a system message after the user's
    ({"messages": [S, U, A, A]}, "messages"),                               # two assistant turns in a row
    ({"prompt": [U, U], "completion": [A]}, "prompt"),
    ({"prompt": [U], "completion": [U, A]}, "completion"),
])
def test_sft_role_order_is_checked(row, field, tmp_path):
    """Bug 7 of issue 14: out-of-order roles counted as valid SFT rows."""
    with pytest.raises(DataError) as e:
        normalize_sft(row, "f.jsonl:4")
    assert (e.value.field, e.value.reason) == (field, "role order")
    assert str(e.value).startswith("f.jsonl:4:")
    # through a file: the error names the file and the row
    path = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": [U, A]}).encode(), json.dumps(row).encode()])
    with pytest.raises(DataError, match=rf"{path}:2: field '{field}': role order"):
        build_dataset(DataConfig(kind="sft", seq_len=128, sources=[{"path": str(path)}]), llama3_style_tokenizer(),
                      process_index=0, process_count=1)


def test_valid_role_orders_pass():
    tool_call = {"role": "tool", "content": "42"}
    for msgs in ([U, A], [S, U, A], [U, A, U, A], [U, A, tool_call, A]):
        assert isinstance(normalize_sft({"messages": msgs}, "f:1"), ChatSFT)
    with pytest.raises(DataError, match="role order"):
        normalize_preference({"prompt": [U, U], "chosen": [A], "rejected": [B]}, "f:1")
    with pytest.raises(DataError, match="role order"):
        normalize_preference({"chosen": [U, A, A], "rejected": [U, B]}, "f:1")
