"""Record schemas (the formats TRL users already have) and their validation.

A raw row is a dict read from some source; `normalize_sft` / `normalize_preference` turn it into one
of a few normalized forms or raise `DataError` naming the file, the row and the field.  Pure functions:
no tokenizer here.

SFT forms
  ChatSFT(messages, train_from)   `messages`, or `prompt`/`completion` (message lists or strings in
                                  chat mode): assistant turns at index >= train_from are trained.
  RawSFT(prompt, completion)      `prompt`/`completion` strings in raw mode: no template, the
                                  completion (plus EOS) is trained.
  TextSFT(text)                   plain `text`: every token is trained (explicit, never a fallback).
Preference forms
  ChatPair(prompt, chosen, rejected)   message lists (explicit prompt, or split from the implicit form)
  RawPair(prompt, chosen, rejected)    strings in raw mode
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A row that does not fit the schema.  `reason` is a short category used to count skips."""

    def __init__(self, where: str, field: str | None, reason: str, detail: str = ""):
        self.where, self.field, self.reason, self.detail = where, field, reason, detail
        f = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{f} {reason}{': ' + detail if detail else ''}")


@dataclass(frozen=True)
class ChatSFT:
    messages: tuple  # of {"role", "content"} dicts
    train_from: int  # assistant turns with index >= train_from carry the loss


@dataclass(frozen=True)
class RawSFT:
    prompt: str
    completion: str


@dataclass(frozen=True)
class TextSFT:
    text: str


@dataclass(frozen=True)
class ChatPair:
    prompt: tuple
    chosen: tuple
    rejected: tuple


@dataclass(frozen=True)
class RawPair:
    prompt: str
    chosen: str
    rejected: str


SFT_FORMATS = ("messages", "prompt/completion", "text")
PREFERENCE_FORMATS = ("prompt/chosen/rejected", "chosen/rejected (implicit prompt)")


def _messages(value: Any, where: str, field: str, *, allow_empty: bool = False) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise DataError(where, field, "wrong type", f"expected a list of {{role, content}} messages, got "
                                                    f"{type(value).__name__}")
    if not value and not allow_empty:
        raise DataError(where, field, "empty", "no messages")
    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(where, f, "wrong type", f"expected a {{role, content}} mapping, got {type(m).__name__}")
        if "role" not in m:
            raise DataError(where, f + ".role", "missing field")
        if "content" not in m:
            raise DataError(where, f + ".content", "missing field")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise DataError(where, f + ".role", "wrong type", f"expected a string, got {type(role).__name__}")
        if role not in ROLES:
            raise DataError(where, f + ".role", "unknown role", f"{role!r}; known roles: {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(where, f + ".content", "wrong type",
                            f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return tuple(out)


def _string(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(where, field, "wrong type", f"expected a string or message list, got {type(value).__name__}")
    return value


def _is_conv(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _require(row: dict, where: str, *fields: str) -> None:
    for f in fields:
        if f not in row or row[f] is None:
            raise DataError(where, f, "missing field")


# which role may follow which (None: the start): a system message only first, then user and assistant
# alternating, tool results only after an assistant turn (its call) and before the assistant's next turn
_FOLLOWS = {None: ("system", "user"), "system": ("user",), "user": ("assistant",), "assistant": ("user", "tool"),
            "tool": ("tool", "assistant")}


def _check_order(msgs: tuple, where: str, field: str, prompt_len: int = 0) -> None:
    """The role order of a whole conversation (the first `prompt_len` messages are the prompt's), as chat
    templates expect it."""
    prev = None
    for i, m in enumerate(msgs):
        if m["role"] not in _FOLLOWS[prev]:
            seq = [x["role"] for x in msgs]
            what = f"turn {i} is {m['role']}" + ("" if prev is None else f" after {prev}")
            raise DataError(where, "prompt" if i < prompt_len else field, "role order",
                            f"{what}: expected {' or '.join(_FOLLOWS[prev])} (roles {seq}; a system message only "
                            "first, then user and assistant alternating)")
        prev = m["role"]


def _nonempty_completion(msgs: tuple, where: str, field: str) -> None:
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(where, field, "no assistant turn", "nothing to train on")
    if msgs[-1]["role"] != "assistant":
        raise DataError(where, field, "last turn is not assistant", f"got {msgs[-1]['role']!r}")
    if not "".join(m["content"] for m in msgs if m["role"] == "assistant").strip():
        raise DataError(where, field, "empty", "the assistant content is empty")


def normalize_sft(row: Any, where: str, *, string_format: str = "chat") -> ChatSFT | RawSFT | TextSFT:
    """One SFT row -> normalized form.  `string_format`: 'chat' wraps string prompt/completion as a
    user/assistant exchange through the chat template; 'raw' concatenates them with no template."""
    if not isinstance(row, dict):
        raise DataError(where, None, "wrong type", f"a row must be a JSON object, got {type(row).__name__}")
    present = [f for f, keys in (("messages", ("messages",)), ("prompt/completion", ("prompt", "completion")),
                                 ("text", ("text",))) if any(k in row for k in keys)]
    if not present:
        raise DataError(where, None, "missing field", f"an SFT row needs one of {list(SFT_FORMATS)}; "
                                                      f"got keys {sorted(row)}")
    if len(present) > 1:
        raise DataError(where, None, "ambiguous format", f"the row has fields of {present}; use one format per row")
    fmt = present[0]
    if fmt == "messages":
        msgs = _messages(row["messages"], where, "messages")
        _check_order(msgs, where, "messages")
        _nonempty_completion(msgs, where, "messages")
        return ChatSFT(msgs, 0)
    if fmt == "text":
        text = _string(row["text"], where, "text")
        if not text.strip():
            raise DataError(where, "text", "empty")
        return TextSFT(text)
    _require(row, where, "prompt", "completion")
    prompt, completion = row["prompt"], row["completion"]
    if _is_conv(prompt) or _is_conv(completion):
        p = _messages(prompt, where, "prompt", allow_empty=True) if _is_conv(prompt) else \
            ({"role": "user", "content": _string(prompt, where, "prompt")},)
        c = _messages(completion, where, "completion") if _is_conv(completion) else \
            ({"role": "assistant", "content": _string(completion, where, "completion")},)
        _check_order(p + c, where, "completion", prompt_len=len(p))
        _nonempty_completion(c, where, "completion")
        return ChatSFT(p + c, len(p))
    prompt, completion = _string(prompt, where, "prompt"), _string(completion, where, "completion")
    if not completion.strip():
        raise DataError(where, "completion", "empty")
    if string_format == "raw":
        return RawSFT(prompt, completion)
    return ChatSFT(({"role": "user", "content": prompt}, {"role": "assistant", "content": completion}), 1)


def normalize_preference(row: Any, where: str, *, string_format: str = "chat") -> ChatPair | RawPair:
    """One preference row -> normalized pair.  The implicit-prompt form (no `prompt`; `chosen` and
    `rejected` are whole conversations) is split at their longest common message prefix."""
    if not isinstance(row, dict):
        raise DataError(where, None, "wrong type", f"a row must be a JSON object, got {type(row).__name__}")
    _require(row, where, "chosen", "rejected")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row or row["prompt"] is None:
        c = _messages(chosen, where, "chosen")
        r = _messages(rejected, where, "rejected")
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        if k == len(c) and k == len(r):
            raise DataError(where, "rejected", "chosen equals rejected")
        if k == 0:
            raise DataError(where, "chosen", "no shared prompt",
                            "implicit-prompt rows need chosen and rejected to start with the same messages")
        prompt, c, r = c[:k], c[k:], r[k:]
        for name, part in (("chosen", c), ("rejected", r)):
            if not part:
                raise DataError(where, name, "empty", "nothing after the shared prompt")
            _check_order(prompt + part, where, name)
            _nonempty_completion(part, where, name)
        return ChatPair(prompt, c, r)
    prompt = row["prompt"]
    if _is_conv(prompt) or _is_conv(chosen) or _is_conv(rejected):
        p = _messages(prompt, where, "prompt", allow_empty=True) if _is_conv(prompt) else \
            ({"role": "user", "content": _string(prompt, where, "prompt")},)
        parts = []
        for name, v in (("chosen", chosen), ("rejected", rejected)):
            if _is_conv(v):
                m = _messages(v, where, name)
            else:
                m = ({"role": "assistant", "content": _string(v, where, name)},)
            _check_order(p + m, where, name, prompt_len=len(p))
            _nonempty_completion(m, where, name)
            parts.append(m)
        if parts[0] == parts[1]:
            raise DataError(where, "rejected", "chosen equals rejected")
        if not p:
            raise DataError(where, "prompt", "empty", "no prompt messages")
        return ChatPair(p, parts[0], parts[1])
    prompt = _string(prompt, where, "prompt")
    chosen, rejected = _string(chosen, where, "chosen"), _string(rejected, where, "rejected")
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if not v.strip():
            raise DataError(where, name, "empty")
    if chosen == rejected:
        raise DataError(where, "rejected", "chosen equals rejected")
    if string_format == "raw":
        return RawPair(prompt, chosen, rejected)
    u = ({"role": "user", "content": prompt},)
    return ChatPair(u, ({"role": "assistant", "content": chosen},), ({"role": "assistant", "content": rejected},))
