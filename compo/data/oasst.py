"""OpenAssistant message trees (the ``*_tree.jsonl`` exports): ranked replies and emoji feedback.

One tree per row: ``{message_tree_id, tree_state, prompt}`` where ``prompt`` is the root
prompter message and every message is ``{message_id, role, text, rank?, emojis?, synthetic?,
deleted?, replies: [...]}``, prompter and assistant turns alternating. Synthetic and deleted
messages are dropped together with everything below them (DESIGN.md §5).

* :func:`tree_pairs`: sibling assistant replies to one prompter message with different
  ``rank`` give a :class:`~compo.data.rows.PairRow` (lower rank = better = chosen);
* :func:`tree_thumbs`: an assistant message whose ``emojis`` hold more ``+1`` than ``-1`` is a
  thumbs-up :class:`~compo.data.rows.UnpairedRow`, fewer is a thumbs-down, a tie is skipped.

Prompts are the conversation up to that point as a tuple of ``{"role", "content"}`` messages
(``prompter`` becomes ``user``), the same representation :mod:`compo.data.load` gives
conversational rows. An invalid tree raises :class:`TreeError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Iterator

from compo.data.rows import DataError, PairRow, UnpairedRow

FORMAT = "oasst-tree"
INVALID_TREE = "invalid tree"  # the skip-count reason of a tree that fails validation
_ROLES = {"prompter": "user", "assistant": "assistant"}


class TreeError(ValueError):
    """An invalid tree: ``field`` is the path of the offending key (e.g. ``prompt.replies[1].rank``)."""

    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field_name, message


@dataclass
class _Node:
    """One kept (non-synthetic, non-deleted) message, validated."""

    id: str
    role: str  # "user" or "assistant"
    text: str
    rank: int | None
    emojis: dict[str, int]
    replies: list["_Node"] = field(default_factory=list)


def is_tree(rec: Any) -> bool:
    """True for an OpenAssistant tree row: a ``message_tree_id`` and a ``prompt`` object, no pair keys."""
    return (isinstance(rec, dict) and "message_tree_id" in rec and isinstance(rec.get("prompt"), dict)
            and rec.get("chosen") is None and rec.get("rejected") is None)


def _describe(v: Any) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


def _flag(msg: dict, key: str, where: str) -> bool:
    v = msg.get(key)
    if v is not None and not isinstance(v, bool):
        raise TreeError(f"{where}.{key}", f"wrong type: expected a boolean, got {_describe(v)}")
    return bool(v)


def _count(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TreeError(where, f"wrong type: expected a non-negative integer, got {_describe(v)}")
    return v


def _node(msg: Any, where: str, parent_role: str | None) -> _Node | None:
    """Validate ``msg`` and its replies (``parent_role``: the OASST role above it, None at the
    root); None when it is synthetic or deleted, which drops its whole subtree."""
    if not isinstance(msg, dict):
        raise TreeError(where, f"wrong type: expected a message object, got {_describe(msg)}")
    role = msg.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise TreeError(f"{where}.role", f"expected 'prompter' or 'assistant', got {_describe(role)}")
    expected = "prompter" if parent_role in (None, "assistant") else "assistant"
    if role != expected:
        what = "the root message" if parent_role is None else f"a reply to a {parent_role} message"
        raise TreeError(f"{where}.role", f"{what} must be {expected}, got {role!r}")
    mid = msg.get("message_id")
    if not isinstance(mid, str) or not mid:
        raise TreeError(f"{where}.message_id", f"missing field or wrong type: expected a string, got {_describe(mid)}")
    text = msg.get("text")
    if not isinstance(text, str):
        raise TreeError(f"{where}.text", f"missing field or wrong type: expected a string, got {_describe(text)}")
    rank = msg.get("rank")
    if rank is not None:
        rank = _count(rank, f"{where}.rank")
    emojis_v = msg.get("emojis")
    if emojis_v is not None and not isinstance(emojis_v, dict):
        raise TreeError(f"{where}.emojis", f"wrong type: expected an object of counts, got {_describe(emojis_v)}")
    emojis = {str(k): _count(v, f"{where}.emojis.{k}") for k, v in (emojis_v or {}).items()}
    replies_v = msg.get("replies")
    if replies_v is not None and not isinstance(replies_v, list):
        raise TreeError(f"{where}.replies", f"wrong type: expected a list of messages, got {_describe(replies_v)}")
    dropped = _flag(msg, "synthetic", where) | _flag(msg, "deleted", where)
    replies = [_node(r, f"{where}.replies[{i}]", role) for i, r in enumerate(replies_v or ())]
    if dropped:
        return None
    if not text.strip():
        raise TreeError(f"{where}.text", "empty message text (empty or whitespace-only)")
    return _Node(mid, _ROLES[role], text, rank, emojis, [r for r in replies if r is not None])


def _root(tree: Any) -> tuple[str, _Node | None]:
    """(tree id, validated root or None when the root itself is dropped)."""
    if not isinstance(tree, dict):
        raise TreeError(None, f"wrong type: expected an OpenAssistant message tree object, got {_describe(tree)}")
    tid = tree.get("message_tree_id")
    if not isinstance(tid, str) or not tid:
        raise TreeError("message_tree_id", f"missing field or wrong type: expected a string, got {_describe(tid)}")
    if not isinstance(tree.get("prompt"), dict):
        raise TreeError("prompt", f"missing field or wrong type: expected the root message object, "
                        f"got {_describe(tree.get('prompt'))}")
    return tid, _node(tree["prompt"], "prompt", None)


def _walk(node: _Node, history: tuple) -> Iterator[tuple[_Node, tuple]]:
    """(node, the conversation before it) for every node, depth first in file order."""
    yield node, history
    here = history + ({"role": node.role, "content": node.text},)
    for r in node.replies:
        yield from _walk(r, here)


def tree_pairs(tree: Any, file: str = "") -> list[PairRow]:
    """Every pair of ranked sibling assistant replies with different ranks, better one chosen.

    The prompt is the conversation up to and including the prompter message; the source is
    ``<file>:tree=<tree id>:msg=<prompter message id>``. Replies with equal texts give no pair.
    Raises TreeError for an invalid tree.
    """
    tid, root = _root(tree)
    if root is None:
        return []
    out: list[PairRow] = []
    for node, history in _walk(root, ()):
        if node.role != "user":
            continue
        ranked = sorted((r for r in node.replies if r.rank is not None), key=lambda r: r.rank)
        prompt = history + ({"role": "user", "content": node.text},)
        for good, bad in combinations(ranked, 2):
            if good.rank == bad.rank or good.text.strip() == bad.text.strip():
                continue
            meta = {"format": FORMAT, "tree_id": tid, "chosen_id": good.id, "rejected_id": bad.id,
                    "chosen_rank": good.rank, "rejected_rank": bad.rank}
            out.append(PairRow(prompt, good.text, bad.text, f"{file}:tree={tid}:msg={node.id}", meta))
    return out


def tree_thumbs(tree: Any, file: str = "") -> list[UnpairedRow]:
    """Assistant messages judged by emojis: ``+1`` > ``-1`` is thumbs-up, ``<`` thumbs-down, ties skipped.

    The prompt is the conversation before the reply; the source is
    ``<file>:tree=<tree id>:msg=<assistant message id>``. Raises TreeError for an invalid tree.
    """
    tid, root = _root(tree)
    if root is None:
        return []
    out: list[UnpairedRow] = []
    for node, history in _walk(root, ()):
        up, down = node.emojis.get("+1", 0), node.emojis.get("-1", 0)
        if node.role != "assistant" or up == down:
            continue
        meta = {"format": FORMAT, "tree_id": tid, "message_id": node.id, "+1": up, "-1": down}
        out.append(UnpairedRow(history, node.text, up > down, f"{file}:tree={tid}:msg={node.id}", meta))
    return out


def normalise_trees(records: list, file: str, *, kind: str = "auto",
                    on_invalid: str = "error") -> tuple[list, str, dict[str, int]]:
    """Rows of a file of trees: pairs (``kind`` paired or auto) or thumbs rows (unpaired).

    Returns ``(rows, kind, skipped)``. A row that is not a valid tree raises a one-line
    DataError naming the file, the 1-based row and the field (``.category`` = "invalid tree"),
    or with ``on_invalid="skip"`` is counted in ``skipped``.
    """
    out_kind = "unpaired" if kind == "unpaired" else "paired"
    rows: list = []
    skipped: dict[str, int] = {}
    for i, rec in enumerate(records, 1):
        try:
            if not is_tree(rec):
                keys = sorted(str(k) for k in rec) if isinstance(rec, dict) else type(rec).__name__
                raise TreeError(None, f"not an OpenAssistant message tree (found {keys}) but row 1 is "
                                "one; all rows of one file must be of one format")
            rows.extend(tree_thumbs(rec, file) if out_kind == "unpaired" else tree_pairs(rec, file))
        except TreeError as bad:
            if on_invalid == "error":
                err = DataError(file, i, bad.field, bad.message)
                err.category = INVALID_TREE
                raise err from None
            skipped[INVALID_TREE] = skipped.get(INVALID_TREE, 0) + 1
    if not rows:
        what = ("ranked sibling replies" if out_kind == "paired"
                else "assistant messages with more +1 than -1 emojis or the reverse")
        detail = f"; {skipped[INVALID_TREE]} invalid trees skipped" if skipped else ""
        raise DataError(file, None, None, f"no valid rows: the OpenAssistant trees hold no {what}{detail}")
    return rows, out_kind, skipped
