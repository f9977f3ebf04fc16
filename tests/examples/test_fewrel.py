"""examples/fewrel.py end to end on the real FewRel files: beats chance, writes the outputs, resumes exactly, and
rejects bad input with clear messages. Needs the `nlp` extra; skipped without it or without the data."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.examples.scripts import ROOT, read_checkpoint, run_example

pytestmark = pytest.mark.nlp
pytest.importorskip("paddlenlp", reason="PaddleNLP is not installed (see the `nlp` extra)")
DATA = Path(os.environ.get("PADDLEFSL_DATA", ROOT.parent / "shared" / "data")) / "fewrel"
needs_data = pytest.mark.skipif(not (DATA / "val_wiki.json").exists(), reason=f"FewRel files not found in {DATA}")
TINY = ["--max-length", "32", "--hidden-size", "16", "--layers", "1", "--query", "3", "--min-freq", "3"]


def _fewrel(out: Path, *extra, data=DATA):
    return run_example("fewrel.py", "--data-root", data, "--out", out, *TINY, *extra)


@needs_data
@pytest.mark.parametrize("algorithm", ["maml", "baseline"])
def test_short_run_beats_chance_and_writes_everything(tmp_path, algorithm):
    extra = ["--meta-batch", "2", "--inner-lr", "0.01", "--test-inner-steps", "3", "--eval-tasks", "100", "--ways", "3"]
    if algorithm == "baseline":  # cheap iterations (one minibatch each), and it needs more of them
        extra += ["--iterations", "150", "--log-every", "25", "--batch-size", "32", "--finetune-steps", "30"]
    else:
        extra += ["--iterations", "30", "--log-every", "5"]
    run = _fewrel(tmp_path, "--algorithm", algorithm, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    # chance is 1/3. MAML's 95 % interval clears it; the baseline's short pre-training of a 16-wide ERNIE measured
    # 36.1 +- 2.8 %, above chance only as a point estimate, which is what it is held to.
    margin = results["test_ci95"] if algorithm == "maml" else 0.0
    assert results["test_accuracy"] - margin > 1 / 3, results
    assert 0 < results["cross_domain_accuracy"] < 1 and results["cross_domain_ci95"] > 0
    assert (tmp_path / "learning_curve.png").stat().st_size > 5000
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6
    keys = set(read_checkpoint(tmp_path)["model"])
    assert "head.weight" in keys and any(k.startswith("features.ernie.") for k in keys)
    assert not any(k.startswith("model.") for k in keys)
    vocab = (tmp_path / "vocab.txt").read_text().split("\n")
    assert vocab[:9] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[E1]", "[/E1]", "[E2]", "[/E2]"]


@needs_data
@pytest.mark.parametrize("algorithm", ["anil", "baseline"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, algorithm):
    common = ["--algorithm", algorithm, "--meta-batch", "2", "--eval-tasks", "2", "--checkpoint-every", "2",
              "--cross-domain-file", "", "--batch-size", "8", "--finetune-steps", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _fewrel(straight, "--iterations", "4", *common).returncode == 0
    assert _fewrel(split, "--iterations", "2", *common).returncode == 0
    resumed = _fewrel(split, "--iterations", "4", "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_checkpoint(straight), read_checkpoint(split)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        np.testing.assert_array_equal(a["model"][key], b["model"][key], err_msg=key)
    assert json.loads((straight / "results.json").read_text())["test_accuracy"] == \
        json.loads((split / "results.json").read_text())["test_accuracy"]


def _instance(words, h, t):
    return {"tokens": words, "h": ["head", "Q1", [h]], "t": ["tail", "Q2", [t]]}


def _write(root: Path, relations: int, per_relation: int, instance=None):
    data = {f"P{r}": [instance or _instance([f"w{r}", "x", f"v{k % 3}", "y"], [0], [2])
                      for k in range(per_relation)] for r in range(relations)}
    root.mkdir(exist_ok=True)
    (root / "val_wiki.json").write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("case,message", [
    ("few", "relation P3 (P3) has 3 sentences, fewer than --shots + --query = 4"),
    ("outside", "entity 'tail' has token positions [9] outside the sentence of 4 tokens"),
    ("split", "--train-relations must lie in 1..3 so that 3 relations of val_wiki.json"),
    ("heads", "--hidden-size 16 must be a multiple of --heads 3"),
    ("shift", "--augment-shift shifts images"),
])
def test_bad_input_is_named(tmp_path, case, message):
    root = tmp_path / "data"
    extra = ["--ways", "3", "--shots", "1", "--train-relations", "3", "--iterations", "1"]
    if case == "few":
        _write(root, 6, 4)
        data = json.loads((root / "val_wiki.json").read_text())
        data["P3"] = data["P3"][:3]
        (root / "val_wiki.json").write_text(json.dumps(data))
    elif case == "outside":
        _write(root, 6, 5, _instance(["a", "b", "c", "d"], [0], [9]))
    else:
        _write(root, 6, 5)
        extra += {"split": ["--train-relations", "4"], "heads": ["--heads", "3"], "shift": ["--augment-shift", "1"]}[case]
    run = _fewrel(tmp_path / "out", *extra, data=root)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "fewrel.py: error: " in run.stderr and message in run.stderr, run.stderr[-2000:]


def _pretrained_folder(folder: Path, vocab_size: int, words: list) -> Path:
    """A --pretrained folder as PaddleNLP writes it (model_config.json, model_state.pdparams, vocab.txt) whose
    tokenizer lists ``words`` after the special tokens and whose model has ``vocab_size`` embedding rows."""
    from paddlenlp.transformers import ErnieConfig, ErnieModel, ErnieTokenizer

    folder.mkdir()
    ErnieModel(ErnieConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32)).save_pretrained(str(folder))
    vocab = folder / "vocab.txt"
    vocab.write_text("".join(w + "\n" for w in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    ErnieTokenizer(str(vocab)).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("model_rows", [13, 20])
def test_token_ids_outside_the_model_vocabulary_are_named(tmp_path, model_rows):
    """A --pretrained folder whose tokenizer lists more tokens than its weights have rows: the example names the
    first such id, the vocabulary size and what to do, instead of growing the embedding with random rows (or failing
    deep inside Paddle). With enough rows the same folder runs."""
    root = _write(tmp_path / "data", 6, 5)
    words = ["w0", "w1", "w2", "w3", "w4", "w5", "x", "v0", "v1", "v2", "y"]  # ids 5..15, in order
    folder = _pretrained_folder(tmp_path / "model", model_rows, words)
    run = _fewrel(tmp_path / "out", "--pretrained", folder, "--ways", "3", "--train-relations", "3",
                  "--iterations", "1", "--eval-tasks", "2", "--cross-domain-file", "", data=root)
    if model_rows == 20:
        assert run.returncode == 0, run.stderr[-3000:]
        return
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    # sentence 0 reads [CLS] [E1] w0 [/E1] x [E2] v0 [/E2] y [SEP]: w0, x and v0 are ids 5, 11 and 12, y is 15
    assert "fewrel.py: error: val_wiki.json: sentence 0 (relation P0) has token id 15 ('y'), outside the model's " \
           "vocabulary of 13 ids (0..12)" in run.stderr, run.stderr[-3000:]
    assert "give --pretrained a name or folder whose tokenizer and weights match" in run.stderr
