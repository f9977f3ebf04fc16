"""PaddleNLP architectures other than ERNIE (BERT, RoBERTa, ELECTRA, GPT), unchanged, at small sizes in float64:
second-order MAML's meta-gradient against central differences, the first-order answer shown to differ (issue 18).
Needs the `nlp` extra; skipped without it."""
import numpy as np
import paddle
import pytest
from paddle import nn

from tests.metaopt.models import assert_meta_gradient_exact

pytestmark = pytest.mark.nlp
pytest.importorskip("paddlenlp", reason="PaddleNLP is not installed (see the `nlp` extra)")
from paddlenlp import transformers as T  # noqa: E402

SMALL = dict(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
             max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
MODELS = {
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**SMALL, type_vocab_size=2)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**SMALL, type_vocab_size=1, pad_token_id=0)),
    "electra": lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**SMALL, embedding_size=8)),
    "gpt": lambda: T.GPTForSequenceClassification(T.GPTConfig(**SMALL, pad_token_id=0)),
}


class Logits(nn.Layer):
    """The models return logits, a tuple or an output object depending on the version: take the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        out = self.model(ids)
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)


@pytest.mark.parametrize("name", list(MODELS))
def test_paddlenlp_model_meta_gradient_is_exact(name):
    paddle.seed(0)
    model = Logits(MODELS[name]())
    model.to(dtype="float64")
    rng = np.random.default_rng(0)
    ids, labels = paddle.to_tensor(rng.integers(2, 30, (6, 7))), paddle.to_tensor(np.arange(6) % 3)
    params = [n for n, p in model.named_parameters() if not p.stop_gradient]
    norms = [n for n in params if "norm" in n and n.endswith("weight")]
    # The first layer norm (its meta-gradient needs layer norm's and attention's second derivatives) and the head.
    assert_meta_gradient_exact(model, ids, labels, 0.1, norms[:1] + [params[-1]])
