"""Reading compiled HLO: the collectives a sharded program runs, and the operand
shapes a custom call sees on each device."""

import re

COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def compiled_text(fn, *args) -> str:
    """The HLO of jitted ``fn`` on ``args`` after XLA's SPMD partitioner."""
    return fn.lower(*args).compile().as_text()


def collectives(text: str) -> list:
    """The collective ops in ``text``, in program order."""
    return COLLECTIVE.findall(text)


def custom_call_operands(text: str, target: str) -> list:
    """The operand shapes of each custom call to ``target`` in ``text``."""
    calls = []
    for line in text.splitlines():
        if f'custom_call_target="{target}"' in line:
            layouts = re.search(r"operand_layout_constraints=\{((?:\w+\[[\d,]*\]\{[\d,]*\},? ?)*)\}",
                                line).group(1)
            calls.append([tuple(int(d) for d in dims.split(",") if d)
                          for dims in re.findall(r"\w+\[([\d,]*)\]", layouts)])
    return calls
