"""Chained sweep methods: ``X@Y`` is method ``X`` initialised from the finished cell of method ``Y`` with the same
protocol, dataset, shots and seed (``leanclip train --method X --init-from <Y's cell>``), the papers' "X with LN as
initialisation" rows (``--methods ln,coop@ln``).

The name splits at its first ``@``: ``Y`` may itself be chained (``a@b@c`` starts from the ``b@c`` cell). Every base
must be a trained method listed in the same ``--methods`` (``zeroshot`` has no checkpoint to start from). The cells
run in dependency order (:func:`dependency_order`), a base before the cells that start from it; a cycle, an unknown
base or one missing from the grid is a one-line refusal before anything is written.
"""
from __future__ import annotations

from leanclip.cli.common import UsageError

__all__ = ["SEP", "split_chain", "chain_bases", "dependency_order"]

SEP = "@"


def split_chain(method: str) -> tuple[str, str | None]:
    """``"coop@ln"`` -> ``("coop", "ln")``; a method without ``@`` -> ``(method, None)``."""
    head, sep, base = method.partition(SEP)
    return (head, base) if sep else (method, None)


def chain_bases(methods: list[str], untrained: frozenset = frozenset()) -> dict[str, str]:
    """``{chained method: its base}`` for the ``X@Y`` entries of ``methods`` (canonical names), each base checked:
    listed in ``methods`` and not one of ``untrained`` (rows without a checkpoint, e.g. zeroshot). UsageError naming
    the entry otherwise; a cycle is refused by :func:`dependency_order`."""
    deps = {}
    for m in methods:
        head, base = split_chain(m)
        if base is None:
            continue
        if not head or not base:
            raise UsageError(f"--methods: {m!r}: a chained method is X{SEP}Y, X initialised from the cell of Y")
        if base in untrained:
            raise UsageError(f"--methods: {m!r}: {base!r} trains nothing, so it has no checkpoint to start from")
        if base not in methods:
            raise UsageError(f"--methods: {m!r} starts from the {base!r} cell of the same dataset, shots and seed: "
                             f"list {base!r} in --methods too")
        deps[m] = base
    dependency_order(methods, deps)
    return deps


def dependency_order(items: list, deps: dict) -> list:
    """``items`` ordered so that each comes after ``deps[item]`` (its base), otherwise in the given order (a stable
    depth-first topological sort). UsageError naming the cycle when the bases form one."""
    order, state, members = [], {}, set(items)  # state: 1 = on the current path, 2 = placed

    def visit(item, path):
        if state.get(item) == 2:
            return
        if state.get(item) == 1:
            cycle = path[path.index(item):] + [item]
            raise UsageError(f"--methods: the chained methods form a cycle ({' -> '.join(map(str, cycle))})")
        state[item] = 1
        if deps.get(item) in members:  # a base outside ``items`` is not placed (chain_bases refuses one)
            visit(deps[item], path + [item])
        state[item] = 2
        order.append(item)

    for item in items:
        visit(item, [])
    return order
