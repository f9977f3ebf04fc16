"""FewRel 1.0 relation classification (Han et al., 2018), tokenizer-agnostic."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from .errors import CorruptDatasetError, DatasetNotFoundError

__all__ = ["FewRel", "FewRelItem", "mark_entities"]

#: ``(tokens, head_span, tail_span)``; spans are ``(start, end)`` token offsets, end exclusive.
FewRelItem = Tuple[List[str], Tuple[int, int], Tuple[int, int]]


def _span(entity: Sequence[Any], where: str, n_tokens: int) -> Tuple[int, int]:
    try:
        positions = [int(p) for p in entity[2][0]]
    except (IndexError, TypeError, ValueError) as err:
        raise CorruptDatasetError(f"{where}: entity {entity!r} lacks [name, id, [[positions]]]") from err
    if not positions:
        raise CorruptDatasetError(f"{where}: entity {entity!r} has no token positions")
    outside = [p for p in positions if not 0 <= p < n_tokens]
    if outside:
        raise CorruptDatasetError(f"{where}: entity {entity[0]!r} has token positions {outside} outside the sentence "
                                  f"of {n_tokens} tokens (valid: 0..{n_tokens - 1})")
    return min(positions), max(positions) + 1


def _window(tokens: List[str], head: Tuple[int, int], tail: Tuple[int, int],
            max_length: int) -> Tuple[FewRelItem, bool]:
    """Cut ``tokens`` to ``max_length``, keeping both entities when they fit; returns (item, entities_kept)."""
    if len(tokens) <= max_length:
        return (tokens, head, tail), True
    lo, hi = min(head[0], tail[0]), max(head[1], tail[1])
    fits = hi - lo <= max_length
    start = max(0, hi - max_length) if fits else lo
    end = start + max_length

    def shift(span: Tuple[int, int]) -> Tuple[int, int]:
        s = min(max(span[0] - start, 0), max_length - 1)
        return s, max(min(span[1] - start, max_length), s + 1)

    return (tokens[start:end], shift(head), shift(tail)), fits


def mark_entities(item: FewRelItem, tokenize: Callable[[str], List[str]], max_length: int,
                  markers: Sequence[str] = ("[E1]", "[/E1]", "[E2]", "[/E2]")) -> Tuple[List[str], bool]:
    """Tokenize a FewRel sentence with markers around the head and tail entity, within ``max_length`` pieces.

    Each word goes through ``tokenize`` (a word-piece tokenizer, for example); ``markers`` (head start, head end,
    tail start, tail end) are inserted as single pieces. A longer sentence is cut to a window around the entities
    that keeps all four markers: the smallest span holding both marked entities, widened with context on both sides
    when it fits; when even that span is too long, the two marked entities alone, each cut short inside its markers.

    Args:
        item: ``(tokens, head_span, tail_span)`` as `FewRel` yields it.
        tokenize: maps one word to its pieces.
        max_length: the most pieces to return (at least 6: four markers and a piece of each entity).
        markers: the four marker pieces.

    Returns:
        ``(pieces, cut)``: the marked pieces and whether the entities had to be cut short.

    Raises:
        ValueError: if ``max_length`` is below 6, or a span lies outside the sentence.

    Example:
        >>> mark_entities((["a", "b", "c"], (0, 1), (2, 3)), lambda w: [w], 16)[0]
        ['[E1]', 'a', '[/E1]', 'b', '[E2]', 'c', '[/E2]']
    """
    if int(max_length) < 6:
        raise ValueError(f"max_length must be at least 6 (four markers and a piece of each entity), got {max_length}")
    tokens, head, tail = item
    for name, (start, end) in (("head", head), ("tail", tail)):
        if not 0 <= start < end <= len(tokens):
            raise ValueError(f"{name} span {(start, end)} lies outside the sentence of {len(tokens)} tokens")
    opens = {head[0]: [markers[0]], tail[0]: [markers[2]]}
    closes = {head[1]: [markers[1]], tail[1]: [markers[3]]}
    if head[0] == tail[0]:
        opens[head[0]] = [markers[0], markers[2]]
    if head[1] == tail[1]:
        closes[head[1]] = [markers[3], markers[1]]
    pieces: List[str] = []
    bounds = {}
    for i in range(len(tokens) + 1):
        pieces += closes.get(i, [])
        if i in closes:
            bounds[("end", i)] = len(pieces)
        if i in opens:
            bounds[("start", i)] = len(pieces)
        pieces += opens.get(i, [])
        if i < len(tokens):
            pieces += tokenize(tokens[i])
    if len(pieces) <= max_length:
        return pieces, False
    lo = min(bounds[("start", head[0])], bounds[("start", tail[0])])
    hi = max(bounds[("end", head[1])], bounds[("end", tail[1])])
    if hi - lo <= max_length:
        start = max(0, min(lo - (max_length - (hi - lo)) // 2, len(pieces) - max_length))
        return pieces[start:start + max_length], False
    spans = sorted([(bounds[("start", head[0])], bounds[("end", head[1])]),
                    (bounds[("start", tail[0])], bounds[("end", tail[1])])])
    if spans[0][1] > spans[1][0]:  # nested or crossing entities: the markers and each entity's first piece, then
        window = pieces[lo:hi]      # the other pieces in order as they fit
        keep = {i for i, p in enumerate(window) if p in markers}
        keep |= {i + 1 for i, p in enumerate(window) if p in (markers[0], markers[2]) and i + 1 < len(window)
                 and window[i + 1] not in markers}
        room = max_length - len(keep)
        out = []
        for i, p in enumerate(window):
            if i in keep or room > 0:
                room -= i not in keep
                out.append(p)
        return out, True
    budget = max_length // 2
    out: List[str] = []
    for first, last in spans:
        span = pieces[first:last]
        room = budget if not out else max_length - len(out)
        out += span if len(span) <= room else span[:room - 1] + [span[-1]]
    return out[:max_length], True


class FewRel(paddle.io.Dataset):
    """FewRel 1.0 JSON file (``{relation: [{tokens, h, t}, ...]}``) as a labelled dataset.

    Items are ``((tokens, head_span, tail_span), label)`` where spans are ``(start, end)`` token
    offsets (end exclusive) of the first mention of the head/tail entity, and ``label`` indexes
    `relations` (sorted relation ids). Tokenization is left to ``transform``, which receives
    the ``(tokens, head_span, tail_span)`` tuple.

    Args:
        root: Folder with the JSON files.
        file: FewRel JSON file name (``train_wiki.json``, ``val_wiki.json``, ``val_semeval.json``, ...).
        max_length: If set, sentences longer than this are cut to a window of ``max_length``
            tokens that contains both entities when they are at most ``max_length`` apart; otherwise
            the window starts at the first entity and spans are clipped into it (counted in
            `num_clipped`).
        transform: Optional callable applied to ``(tokens, head_span, tail_span)``.
        pid2name: File mapping relation ids to ``[name, description]`` (optional; used for
            `relation_names` when present).

    Attributes:
        labels: int64 ``[N]``.
        relations: Relation id of each label.
        relation_names: Human-readable relation name of each label (the id when unknown).
        entities: ``(head_name, head_id, tail_name, tail_id)`` per instance.
    """

    def __init__(self, root: str, file: str = "val_wiki.json", max_length: Optional[int] = None,
                 transform: Optional[Callable[[FewRelItem], Any]] = None,
                 pid2name: Optional[str] = "pid2name.json") -> None:
        super().__init__()
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be positive or None, got {max_length}")
        self.root, self.transform = os.fspath(root), transform
        path = os.path.join(self.root, file)
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"FewRel file {file} not found: expected it at {os.path.abspath(path)}. "
                                       "Get it from https://github.com/thunlp/FewRel (data/ folder).")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptDatasetError(f"{path} is not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise CorruptDatasetError(f"{path} must map relation ids to instance lists")
        self.relations = sorted(data)
        names: Dict[str, Any] = {}
        if pid2name:
            name_path = os.path.join(self.root, pid2name)
            if os.path.isfile(name_path):
                with open(name_path, encoding="utf-8") as f:
                    names = json.load(f)
        self.relation_names = [names[r][0] if isinstance(names.get(r), list) and names[r] else r
                               for r in self.relations]
        self.items: List[FewRelItem] = []
        self.entities: List[Tuple[str, str, str, str]] = []
        labels: List[int] = []
        self.num_clipped = 0
        for label, rel in enumerate(self.relations):
            for k, inst in enumerate(data[rel]):
                where = f"{file}:{rel}[{k}]"
                try:
                    tokens, h, t = list(inst["tokens"]), inst["h"], inst["t"]
                except (KeyError, TypeError) as err:
                    raise CorruptDatasetError(f"{where}: instance needs tokens, h and t") from err
                item: FewRelItem = (tokens, _span(h, where, len(tokens)), _span(t, where, len(tokens)))
                if max_length is not None:
                    item, kept = _window(*item, int(max_length))
                    self.num_clipped += not kept
                self.items.append(item)
                self.entities.append((str(h[0]), str(h[1]), str(t[0]), str(t[1])))
                labels.append(label)
        self.labels = np.asarray(labels, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """Number of relations."""
        return len(self.relations)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> Tuple[Any, np.int64]:
        item = self.items[int(idx)]
        return (self.transform(item) if self.transform is not None else item), self.labels[int(idx)]
