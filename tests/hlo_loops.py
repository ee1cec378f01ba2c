"""Collectives inside loops, read from optimized HLO text (`compiled.as_text()` or an `--xla_dump_to` file).

XLA:CPU orders the collectives of one program only by when they start, and a `while` whose body holds
collectives may finish on pool threads after the executor has moved on: a later top-level collective
can then start on some simulated devices while others are still inside the loop, and the in-process
rendezvous waits forever.  A program is safe from that when no collective is reachable from any `while`
body or condition, which is what `loop_collectives` finds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\{\s*$")
_REF = re.compile(r"\b(?:condition|body|calls|to_apply|true_computation|false_computation)=%?(?P<name>[\w.\-]+)")
_REF_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{(?P<names>[^}]*)\}")
_WHILE = re.compile(r"^\s*%?(?P<name>[\w.\-]+)\s*=.*\swhile\(.*\bcondition=%?(?P<cond>[\w.\-]+), "
                    r"body=%?(?P<body>[\w.\-]+)")
_COLLECTIVE = re.compile(r"^\s*%?(?P<name>[\w.\-]+)\s*=.*?\s(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')


@dataclass(frozen=True)
class LoopCollective:
    module: str
    loop: str          # the while instruction
    loop_op: str       # its metadata op_name (the JAX source of the loop)
    collective: str    # the collective instruction
    op: str            # all-gather, all-reduce, ...
    op_name: str       # its metadata op_name

    def __str__(self) -> str:
        return (f"{self.module}: {self.op} {self.collective} ({self.op_name}) inside {self.loop} "
                f"({self.loop_op})")


def computations(text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m["name"], [])
        elif line.strip() == "}":
            current = None
        else:
            current.append(line)
    return comps


def _callees(lines: list[str]) -> set[str]:
    out = set()
    for line in lines:
        out.update(m["name"] for m in _REF.finditer(line))
        for m in _REF_LIST.finditer(line):
            out.update(n.strip().lstrip("%") for n in m["names"].split(",") if n.strip())
    return out


def _op_name(line: str) -> str:
    m = _OP_NAME.search(line)
    return m["op_name"] if m else "?"


def loop_collectives(text: str, module: str = "") -> list[LoopCollective]:
    """Every collective reachable from a `while` body or condition of the module, with the loop it is in."""
    comps = computations(text)
    found = []
    for lines in comps.values():
        for line in lines:
            w = _WHILE.match(line)
            if w is None:
                continue
            todo, seen = [w["cond"], w["body"]], set()
            while todo:
                name = todo.pop()
                if name in seen or name not in comps:
                    continue
                seen.add(name)
                for inner in comps[name]:
                    c = _COLLECTIVE.match(inner)
                    if c:
                        found.append(LoopCollective(module, w["name"], _op_name(line), c["name"], c["op"],
                                                    _op_name(inner)))
                todo.extend(_callees(comps[name]))
    return found


def collective_count(text: str) -> int:
    """Collective instructions anywhere in the module (a check that the parser sees them at all)."""
    return sum(1 for lines in computations(text).values() for line in lines if _COLLECTIVE.match(line))


def while_count(text: str) -> int:
    return sum(1 for lines in computations(text).values() for line in lines if _WHILE.match(line))
