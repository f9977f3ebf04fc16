"""FewRel 1.0 N-way K-shot relation classification with a PaddleNLP ERNIE encoder: MAML, FOMAML, ANIL or a baseline.

    python examples/fewrel.py --data-root ../shared/data/fewrel --out runs/fewrel-maml-1shot \\
        --algorithm maml --ways 5 --shots 1 --iterations 300

The relations of --file (val_wiki.json: 16 relations x 700 sentences) are split by sorted id into --train-relations
meta-training relations and the rest for meta-testing, so the two never share a relation. Each sentence gets entity
markers ([E1] head [/E1], [E2] tail [/E2]); the relation is read from the encoder's states at the two start markers.
Without --pretrained the encoder is a small ERNIE built from a config (no weights are downloaded) and the tokenizer
is PaddleNLP's ErnieTokenizer over a vocabulary built from the meta-training sentences alone (written to
OUT/vocab.txt). With --pretrained NAME both come from PaddleNLP's hub (needs internet).

--algorithm baseline pre-trains the same encoder with a head over all meta-training relations, then fine-tunes a fresh
head on each test support set (the same test episodes). Writes OUT/metrics.jsonl, OUT/learning_curve.png,
OUT/checkpoint.pkl (plain model keys; --resume continues from it) and OUT/results.json (test accuracy and its 95%
confidence interval over --eval-tasks episodes, and the same on --cross-domain-file, SemEval relations, when present).
"""
import os
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline  # noqa: E402
import episodic  # noqa: E402

from paddlefsl.datasets import CorruptDatasetError, DatasetNotFoundError, FewRel, mark_entities  # noqa: E402

try:
    from paddlenlp.transformers import ErnieConfig, ErnieModel, ErnieTokenizer
except ImportError as err:  # pragma: no cover - depends on the environment
    sys.exit(f"examples/fewrel.py needs PaddleNLP: pip install -e '.[nlp]' ({err})")

MARKERS = ["[E1]", "[/E1]", "[E2]", "[/E2]"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class EntityMarkerEncoder(nn.Layer):
    """An ERNIE encoder read at the head and tail start markers: ``ids [B, L]`` to ``[B, 2 * hidden]``.

    ``ErnieModel`` returns a tuple ``(sequence, pooled)``; this wrapper keeps the sequence output and gathers the two
    marker states with a one-hot product (plain differentiable ops, so MAML's second order stays exact). The unused
    pooler is replaced by an identity (MAML rejects trainable parameters that the loss does not use), so the padding
    mask, which ErnieModel derives from the pooler's dtype, is passed in.
    """

    def __init__(self, ernie: nn.Layer, head_marker: int, tail_marker: int) -> None:
        super().__init__()
        ernie.pooler = nn.Identity()  # the pooled [CLS] state is unused, and MAML rejects parameters the loss skips
        self.ernie, self.head_marker, self.tail_marker = ernie, head_marker, tail_marker

    def forward(self, ids):
        dtype = self.ernie.embeddings.word_embeddings.weight.dtype  # ErnieModel reads it off the pooler we dropped
        mask = ((ids == self.ernie.pad_token_id).astype(dtype) * -1e4).unsqueeze([1, 2])
        sequence, _ = self.ernie(ids, attention_mask=mask)
        length = ids.shape[1]
        picked = []
        for marker in (self.head_marker, self.tail_marker):
            where = F.one_hot((ids == marker).astype("int64").argmax(axis=1), length).astype(sequence.dtype)
            picked.append((where.unsqueeze(-1) * sequence).sum(axis=1))
        return paddle.concat(picked, axis=1)


class RelationClassifier(nn.Layer):
    """``head(features(ids))``: the ``features`` / ``head`` split ANIL needs."""

    def __init__(self, features: nn.Layer, head: nn.Layer) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, ids):
        return self.head(self.features(ids))


def build_vocab(dataset: FewRel, indices: np.ndarray, min_freq: int, path: str) -> str:
    """Write a vocabulary of the words (after PaddleNLP's basic tokenization, lower-cased) that occur at least
    ``min_freq`` times in the given sentences, plus the special and marker tokens; return its path."""
    from paddlenlp.transformers import BasicTokenizer
    basic = BasicTokenizer(do_lower_case=True)
    counts = Counter()
    for i in indices:
        for word in dataset.items[int(i)][0]:
            counts.update(basic.tokenize(word))
    words = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIAL + MARKERS),
                   key=lambda w: (-counts[w], w))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(w + "\n" for w in SPECIAL + MARKERS + words)
    return path


def encode(dataset: FewRel, tokenizer, max_length: int, vocab_size: int, where: str,
           added: tuple = ()) -> tuple:
    """Token ids ``[N, max_length]`` (``[CLS] marked pieces [SEP]`` then padding) and how many sentences were cut.

    Args:
        dataset: The sentences.
        tokenizer: A PaddleNLP tokenizer that knows the four markers.
        max_length: Pieces per sentence, ``[CLS]`` and ``[SEP]`` included.
        vocab_size: Rows of the model's word embedding: every id must lie in ``0..vocab_size - 1``.
        where: The file name, for messages.
        added: Ids the script adds rows for after this check (the markers added to a pretrained tokenizer).

    Returns:
        ``(ids, cut)``.

    Raises:
        ValueError: naming the sentence, the id and the vocabulary size, if a token id falls outside the model's
            vocabulary (a tokenizer that does not belong to the model).
    """
    cache = {}

    def pieces_of(word):
        if word not in cache:
            cache[word] = tokenizer.tokenize(word)
        return cache[word]

    ids = np.full((len(dataset), max_length), tokenizer.pad_token_id, dtype=np.int64)
    cut = 0
    for n, item in enumerate(dataset.items):
        pieces, was_cut = mark_entities(item, pieces_of, max_length - 2, MARKERS)
        cut += was_cut
        row = tokenizer.convert_tokens_to_ids([tokenizer.cls_token] + pieces + [tokenizer.sep_token])
        ids[n, :len(row)] = row
    bad = np.argwhere((ids < 0) | ((ids >= vocab_size) & ~np.isin(ids, np.asarray(added, dtype=np.int64))))
    if len(bad):
        n, column = (int(i) for i in bad[0])
        token = tokenizer.convert_ids_to_tokens(int(ids[n, column]))
        raise ValueError(f"{where}: sentence {n} (relation {dataset.relations[dataset.labels[n]]}) has token id "
                         f"{int(ids[n, column])} ({token!r}), outside the model's vocabulary of {vocab_size} ids "
                         f"(0..{vocab_size - 1}); {len(bad)} token(s) in all. The tokenizer does not belong to the "
                         f"model: give --pretrained a name or folder whose tokenizer and weights match (its "
                         f"vocab.txt must not list more tokens than the model's config has vocab_size), or leave out "
                         f"--pretrained to build both from the data")
    return ids, cut


def check_relations(p, dataset: FewRel, labels: np.ndarray, need: int, where: str) -> None:
    """Exit with the relation's id if it has fewer sentences than an episode draws from it."""
    counts = np.bincount(labels, minlength=dataset.num_classes)
    for label in np.unique(labels):
        if counts[label] < need:
            p.error(f"{where}: relation {dataset.relations[label]} ({dataset.relation_names[label]}) has "
                    f"{counts[label]} sentences, fewer than --shots + --query = {need}")


p = episodic.parser(__doc__.splitlines()[0], dict(query=5, iterations=300, meta_batch=4, inner_steps=1,
                                                  test_inner_steps=1, inner_lr=1.0),
                    algorithms=episodic.ALGORITHMS + ("baseline",))
p.set_defaults(eval_tasks=600, meta_lr=5e-4)
p.add_argument("--file", default="val_wiki.json", help="FewRel file whose relations are split (default val_wiki.json)")
p.add_argument("--train-relations", type=int, default=10,
               help="meta-train on the first N relations of --file (sorted by id), meta-test on the rest")
p.add_argument("--cross-domain-file", default="val_semeval.json",
               help="also test on this file's relations, after meta-training ('' to skip; skipped when absent)")
p.add_argument("--max-length", type=int, default=40, help="word pieces per sentence, [CLS] and [SEP] included")
p.add_argument("--min-freq", type=int, default=2, help="own vocabulary: keep words seen this often in meta-training")
p.add_argument("--hidden-size", type=int, default=32)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--heads", type=int, default=2)
p.add_argument("--pretrained", default=None, metavar="NAME",
               help="a PaddleNLP ERNIE name (e.g. ernie-2.0-base-en) for weights and tokenizer (needs internet)")
episodic.add_head_init_argument(p)
baseline.add_arguments(p)
args = p.parse_args()
episodic.check_args(p, args)
if args.algorithm == "baseline":
    baseline.check_arguments(p, args)
if args.augment_shift:
    p.error("--augment-shift shifts images; it has no meaning for sentences")
if args.split != "minimal":
    p.error("--split applies to Omniglot; FewRel splits --file by --train-relations")
for name, least in (("max_length", 8), ("min_freq", 1), ("hidden_size", 2), ("layers", 1), ("heads", 1)):
    if getattr(args, name) < least:
        p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
if args.hidden_size % args.heads:
    p.error(f"--hidden-size {args.hidden_size} must be a multiple of --heads {args.heads}")

try:
    data = FewRel(args.data_root, args.file)
except (DatasetNotFoundError, CorruptDatasetError) as err:
    p.exit(2, f"{p.prog}: error: {err}\n")
if not 1 <= args.train_relations <= data.num_classes - args.ways:
    p.error(f"--train-relations must lie in 1..{data.num_classes - args.ways} so that {args.ways} relations of "
            f"{args.file} ({data.num_classes} in all) remain for meta-testing, got {args.train_relations}")
is_train = data.labels < args.train_relations
check_relations(p, data, data.labels, args.shots + args.query, args.file)

if args.pretrained:
    tokenizer = ErnieTokenizer.from_pretrained(args.pretrained)
    tokenizer.add_tokens(MARKERS)
    ernie = ErnieModel.from_pretrained(args.pretrained, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vocab_size = ernie.config.vocab_size  # the tokenizer's own ids must fit the weights; the markers get new rows
    added = tuple(i for i in tokenizer.convert_tokens_to_ids(MARKERS) if i >= vocab_size)
else:
    vocab = build_vocab(data, np.flatnonzero(is_train), args.min_freq,
                        os.path.join(args.out, "vocab.txt"))
    tokenizer = ErnieTokenizer(vocab)
    vocab_size, added = len(tokenizer.vocab), ()
    paddle.seed(args.seed)
    config = ErnieConfig(vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, intermediate_size=2 * args.hidden_size,
                         max_position_embeddings=args.max_length, type_vocab_size=2, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    ernie = ErnieModel(config)
head_id, tail_id = tokenizer.convert_tokens_to_ids([MARKERS[0], MARKERS[2]])
try:
    ids, cut = encode(data, tokenizer, args.max_length, vocab_size, args.file, added)
except ValueError as err:
    p.error(str(err))
if added:
    ernie.resize_token_embeddings(max(added) + 1)
    vocab_size = max(added) + 1
unknown = float(np.mean(ids[~is_train][ids[~is_train] != tokenizer.pad_token_id] == tokenizer.unk_token_id))
print(f"{args.file}: {int(is_train.sum())} meta-training and {int((~is_train).sum())} meta-test sentences, "
      f"vocabulary {vocab_size}, {cut} sentences cut to --max-length {args.max_length}, "
      f"{100 * unknown:.1f} % unknown pieces in meta-test")
train = SimpleNamespace(images=ids[is_train], labels=data.labels[is_train])
test = SimpleNamespace(images=ids[~is_train], labels=data.labels[~is_train])

cross = None
if args.cross_domain_file and os.path.exists(os.path.join(args.data_root, args.cross_domain_file)):
    try:
        other = FewRel(args.data_root, args.cross_domain_file)
    except CorruptDatasetError as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    check_relations(p, other, other.labels, args.shots + args.query, args.cross_domain_file)
    try:
        other_ids, _ = encode(other, tokenizer, args.max_length, vocab_size, args.cross_domain_file)
    except ValueError as err:
        p.error(str(err))
    cross = SimpleNamespace(images=other_ids, labels=other.labels)
elif args.cross_domain_file:
    print(f"{args.cross_domain_file} not found in {args.data_root}: no cross-domain test")

features = EntityMarkerEncoder(ernie, head_id, tail_id)
key = "cross_domain"


def cross_domain(trained) -> dict:
    """Accuracy and 95% CI on the cross-domain file's relations (the same episode count and seed)."""
    if cross is None:
        return {}
    evaluate = baseline.evaluate if args.algorithm == "baseline" else episodic.evaluate
    accuracy, ci95 = evaluate(trained, args, cross.images, cross.labels, args.eval_tasks, seed=args.seed + 2000)
    return {f"{key}_accuracy": accuracy, f"{key}_ci95": ci95}


if args.algorithm == "baseline":
    results = baseline.run(args, features, 2 * ernie.config.hidden_size, train, test, extra_eval=cross_domain)
else:
    paddle.seed(args.seed + 1)
    model = RelationClassifier(features, episodic.linear_head(2 * ernie.config.hidden_size, args.ways,
                                                              args.head_init))
    results = episodic.run(args, model, train, test, extra_eval=cross_domain)
if cross is not None:
    print(f"cross-domain ({args.cross_domain_file}) accuracy {100 * results[f'{key}_accuracy']:.2f} "
          f"+- {100 * results[f'{key}_ci95']:.2f} %")
