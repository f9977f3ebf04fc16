"""Tests for paddlefsl.datasets.FewRel on synthetic JSON and the real shared files."""
import json
import os

import numpy as np
import pytest

from paddlefsl.datasets import CorruptDatasetError, DatasetNotFoundError, FewRel, mark_entities
from paddlefsl.episodes import EpisodeSampler

from .conftest import real_file


def _instance(n_tokens, h, t):
    return {"tokens": [f"w{i}" for i in range(n_tokens)], "h": ["head", "Q1", [h]], "t": ["tail", "Q2", [t]]}


@pytest.fixture
def fewrel_root(tmp_path):
    data = {"P2": [_instance(6, [1, 2], [4]), _instance(5, [0], [3, 4])],
            "P1": [_instance(12, [9, 10], [2]), _instance(4, [3], [0])],
            "P9": [_instance(20, [0], [18, 19])]}
    (tmp_path / "val_x.json").write_text(json.dumps(data))
    (tmp_path / "pid2name.json").write_text(json.dumps({"P1": ["one", "d"], "P2": ["two", "d"]}))
    return tmp_path


def test_parse(fewrel_root):
    ds = FewRel(fewrel_root, "val_x.json")
    assert ds.relations == ["P1", "P2", "P9"] and ds.relation_names == ["one", "two", "P9"]
    assert len(ds) == 5 and ds.num_classes == 3 and ds.labels.tolist() == [0, 0, 1, 1, 2]
    (tokens, head, tail), label = ds[2]
    assert label == 1 and head == (1, 3) and tail == (4, 5) and tokens[head[0]:head[1]] == ["w1", "w2"]
    assert ds.entities[2] == ("head", "Q1", "tail", "Q2")
    assert ds.num_clipped == 0


@pytest.mark.parametrize("max_length", [4, 8, 100])
def test_max_length_window(fewrel_root, max_length):
    full = FewRel(fewrel_root, "val_x.json")
    ds = FewRel(fewrel_root, "val_x.json", max_length=max_length)
    for (tokens, head, tail), ((ftok, fhead, ftail), _) in zip(ds.items, full):
        assert len(tokens) == min(len(ftok), max_length)
        for span in (head, tail):
            assert 0 <= span[0] < span[1] <= len(tokens)
        fits = max(fhead[1], ftail[1]) - min(fhead[0], ftail[0]) <= max_length
        if fits:  # entities kept intact
            assert tokens[head[0]:head[1]] == ftok[fhead[0]:fhead[1]]
            assert tokens[tail[0]:tail[1]] == ftok[ftail[0]:ftail[1]]
    expected = {4: 3, 8: 2, 100: 0}[max_length]  # P1[0] spans 2..11, P9[0] 0..20, P2[1] 0..5
    assert ds.num_clipped == expected


def test_transform_and_errors(fewrel_root, tmp_path):
    ds = FewRel(fewrel_root, "val_x.json", transform=lambda item: len(item[0]), pid2name=None)
    assert ds[0][0] == 12 and ds.relation_names == ds.relations
    with pytest.raises(DatasetNotFoundError, match="nope.json"):
        FewRel(fewrel_root, "nope.json")
    with pytest.raises(ValueError, match="max_length"):
        FewRel(fewrel_root, "val_x.json", max_length=0)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptDatasetError, match="not valid JSON"):
        FewRel(tmp_path, "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"P1": [{"tokens": ["a"], "h": ["x", "Q", []], "t": []}]}))
    with pytest.raises(CorruptDatasetError, match="bad2.json:P1\\[0\\]"):
        FewRel(tmp_path, "bad2.json")


@pytest.mark.parametrize("file,relations,per_relation", [("val_wiki.json", 16, {700}),
                                                         ("val_semeval.json", 17, None)])
def test_real_files(file, relations, per_relation):
    path = real_file("fewrel", file)
    ds = FewRel(os.path.dirname(path), file, max_length=40)
    assert ds.num_classes == relations and len(ds) == len(ds.labels)
    counts = np.bincount(ds.labels)
    if per_relation is not None:
        assert set(counts.tolist()) == per_relation
    with open(path) as f:
        raw = json.load(f)
    first_rel = ds.relations[0]
    inst = raw[first_rel][0]
    (tokens, head, tail), label = ds[0]
    assert label == 0 and tokens[head[0]:head[1]] == [inst["tokens"][p] for p in inst["h"][2][0]][:head[1] - head[0]]
    if file == "val_wiki.json":
        assert ds.relation_names[ds.relations.index("P177")] == "crosses"
    sampler = EpisodeSampler(ds.labels, ways=5, shots=1, queries=2, seed=0)
    task = sampler.sample()
    assert len(task.support_indices) == 5 and len(task.query_indices) == 10


def test_entity_positions_outside_the_sentence_are_named(tmp_path):
    (tmp_path / "out.json").write_text(json.dumps({"P7": [_instance(5, [1], [3]), _instance(4, [1], [2, 4])]}))
    with pytest.raises(CorruptDatasetError, match=r"out.json:P7\[1\]: entity 'tail' has token positions \[4\] "
                                                  r"outside the sentence of 4 tokens"):
        FewRel(tmp_path, "out.json")


MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")


def _words(n):
    return [f"w{i}" for i in range(n)]


def test_mark_entities_short_sentence_keeps_everything():
    pieces, cut = mark_entities((_words(5), (1, 3), (4, 5)), lambda w: [w, "##x"] if w == "w0" else [w], 32)
    assert pieces == ["w0", "##x", "[E1]", "w1", "w2", "[/E1]", "w3", "[E2]", "w4", "[/E2]"] and not cut
    pieces, _ = mark_entities((_words(4), (3, 4), (0, 2)), lambda w: [w], 32)  # tail first
    assert pieces == ["[E2]", "w0", "w1", "[/E2]", "w2", "[E1]", "w3", "[/E1]"]


@pytest.mark.parametrize("max_length", [6, 9, 12, 20])
@pytest.mark.parametrize("head,tail", [((2, 4), (30, 31)), ((35, 39), (1, 2)), ((10, 12), (14, 15)),
                                       ((0, 40), (5, 6)), ((3, 8), (3, 8))])
def test_mark_entities_truncates_around_the_entities_and_keeps_the_markers(max_length, head, tail):
    pieces, cut = mark_entities((_words(40), head, tail), lambda w: [w], max_length)
    assert len(pieces) <= max_length
    assert [p for p in pieces if p in MARKERS and p.startswith("[E")] == \
        (["[E1]", "[E2]"] if head[0] <= tail[0] else ["[E2]", "[E1]"])
    assert sorted(p for p in pieces if p in MARKERS) == sorted(MARKERS)
    for start_marker, end_marker, (s, e) in (("[E1]", "[/E1]", head), ("[E2]", "[/E2]", tail)):
        inside = pieces[pieces.index(start_marker) + 1:pieces.index(end_marker)]
        words = [p for p in inside if p not in MARKERS]
        assert words and words[0] == f"w{s}"  # each entity keeps at least its first word
        if not cut:
            assert words == _words(40)[s:e]
    span = max(head[1], tail[1]) - min(head[0], tail[0]) + 4
    assert cut == (span > max_length)


def test_mark_entities_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_length must be at least 6"):
        mark_entities((_words(3), (0, 1), (2, 3)), lambda w: [w], 5)
    with pytest.raises(ValueError, match=r"tail span \(2, 9\) lies outside the sentence of 3 tokens"):
        mark_entities((_words(3), (0, 1), (2, 9)), lambda w: [w], 10)
