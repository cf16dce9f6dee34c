"""Influence functions (kronfluence): which training documents help which ability items.

For a document ``z`` and an item ``q`` the score is the influence-function estimate

    score(z, q) = ∇_θ f(q)ᵀ (G + λI)⁻¹ ∇_θ L(z)

with ``L(z)`` the summed next-token NLL of the document chunk, ``f(q)`` the summed NLL of the
item's gold answer tokens given its context (a *loss*, not a log-probability), ``θ`` the weights
of the tracked modules and ``G`` a curvature (Gauss-Newton / Fisher) approximation chosen by
``strategy``:

- ``"ekfac"``: eigenvalue-corrected K-FAC (George et al. 2018; Grosse et al. 2023): ``G``'s
  eigenbasis is that of K-FAC, ``Q = Q_S ⊗ Q_A``, its eigenvalues are re-fitted per weight as
  ``Λ = E_z[(Qᵀ ∇L(z))²]``;
- ``"kfac"``: ``G = S ⊗ A`` per linear module, ``A = E_t[a_t a_tᵀ]`` over the input activations of
  every (unpadded) token, ``S = E_t[g_t g_tᵀ]`` over the gradients at its output;
- ``"diagonal"``: ``G = diag(E_z[∇L(z)²])``;
- ``"identity"``: ``G = 0``, so the score is the plain gradient dot product ``∇f(q)·∇L(z)``.

Sign: one gradient step on ``z`` changes ``f(q)`` by ``−η ∇f(q)·∇L(z)`` to first order, so a
*positive* score means training on ``z`` lowers the item's loss: the document helps the item
(the sign of Φ). kronfluence reports exactly this product, without a minus sign
(``tests/test_influence_functions.py`` checks it against autograd, and that a document equal to
the item ranks first).

Cost, and why the defaults: every document is read by a full forward pass (the whole model) and
a backward pass that stops at the lowest tracked module. Tracking the linear modules (q/k/v/o,
gate/up/down) of the top :data:`DEFAULT_TOP_LAYERS` decoder layers keeps that backward short and
the factors small (SmolLM2-135M: about 7M weights, covariances of 576² and 1536²), never the tied
``lm_head`` and never the embeddings. EK-FAC reads the documents three times (covariances, Λ,
scores), K-FAC and diagonal twice, identity once. Each item's preconditioned gradient is kept at
rank :data:`QUERY_GRADIENT_RANK` (kronfluence's query batching) so that every item is scored in
one pass over the documents. ``docs_per_cluster`` scores (and fits the factors on) a seeded
sample of each cluster's documents instead of all of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.module.tracked_module import TrackedModule
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs

from ..artifacts import stable_hash
from ..errors import RephelpersError, require
from ..paths import cache_subdir
from ..progress import progress_bar
from ..representations.models import Model, model_fingerprint

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
DEFAULT_TOP_LAYERS = 2
"""Layers tracked by default: the top two decoder layers (see the module docstring for why)."""
QUERY_GRADIENT_RANK = 32
"""Rank of each item's preconditioned gradient per module (exact where a module is narrower)."""
MAX_DOCUMENT_TOKENS = 256
"""Documents are truncated to this many tokens (the demo's chunks are shorter)."""
_MANIFEST = "rephelpers_manifest.json"
_CACHE_SUBDIR = "influence_functions"


@dataclass(frozen=True)
class KronfluenceSettings:
    """The knobs below the contract's arguments (their defaults are the ones to use).

    ``damping``: λ added to the curvature's eigenvalues; ``None`` is kronfluence's heuristic,
    0.1 × the mean eigenvalue of each module. ``empirical_fisher``: fit the curvature on the
    documents' own next tokens (True) or on tokens sampled from the model (False, the true
    Fisher, kronfluence's default). ``query_rank``: :data:`QUERY_GRADIENT_RANK`, ``None`` keeps
    the full-rank preconditioned gradients (memory n_items × tracked weights).
    ``max_tokens``: :data:`MAX_DOCUMENT_TOKENS`.
    """

    damping: float | None = None
    empirical_fisher: bool = False
    query_rank: int | None = QUERY_GRADIENT_RANK
    max_tokens: int = MAX_DOCUMENT_TOKENS


# -- what is tracked -------------------------------------------------------------------------
def default_layers(model: Model) -> list[int]:
    """The top :data:`DEFAULT_TOP_LAYERS` decoder layers of ``model``."""
    return list(range(max(0, model.n_layers - DEFAULT_TOP_LAYERS), model.n_layers))


def tracked_modules(model: Model, layers: Sequence[int] | None = None) -> list[str]:
    """Names (in ``model.hf``) of every ``nn.Linear`` inside decoder layers ``layers``.

    Only modules inside the decoder blocks are named, so the (tied) ``lm_head`` and the
    embeddings never are.
    """
    chosen = default_layers(model) if layers is None else [
        model.check_layer(int(layer) if isinstance(layer, np.integer) else layer) for layer in layers]
    require(len(chosen) > 0, "layers is empty: name at least one decoder layer, or pass None for the default.")
    names: list[str] = []
    for layer in sorted(set(chosen)):
        prefix = f"{model.layers_path}.{layer}"
        block = model.hf.get_submodule(prefix)
        names += [f"{prefix}.{name}" for name, module in block.named_modules()
                  if isinstance(module, torch.nn.Linear)]
    require(len(names) > 0, f"decoder layers {sorted(set(chosen))} of {model.name} hold no nn.Linear module to track.")
    return names


# -- documents and items as token batches -----------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    """Token rows ``{"input_ids", "labels"}``; ``labels`` is −100 where no loss is taken."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _document_rows(model: Model, texts: Sequence[str], max_tokens: int) -> _Rows:
    rows = []
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return _Rows(rows)


def _item_rows(model: Model, contexts: Sequence[str], answers: Sequence[str], max_tokens: int) -> _Rows:
    """``context`` then ``answer`` (appended verbatim: the answer carries its own delimiter, e.g.
    a leading space); only the answer's tokens carry a label. A long context is cut on the left,
    so the answer always stays."""
    rows = []
    for context, answer in zip(contexts, answers):
        ctx = model.tokenizer(context, add_special_tokens=False)["input_ids"]
        ans = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        ctx = ctx[max(0, len(ctx) + len(ans) - max_tokens):]
        ids = torch.tensor(ctx + ans, dtype=torch.long)
        labels = torch.tensor([-100] * len(ctx) + ans, dtype=torch.long)
        rows.append({"input_ids": ids, "labels": labels})
    return _Rows(rows)


def _collate(pad_id: int):
    """Right-pad a batch: positions count from 0 on every row, padding gets mask 0 and label −100."""
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


def summed_nll(hf: torch.nn.Module, batch: Mapping[str, torch.Tensor], sample: bool = False) -> torch.Tensor:
    """``Σ_rows Σ_t −log p(y_t | x_<t)`` over the labelled positions of a right-padded batch.

    ``sample=True`` replaces each labelled target by a token drawn from the model's own
    prediction (the true Fisher's pseudo-targets).
    """
    device = next(hf.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"].to(device)[:, 1:]
    if sample:
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), dim=-1)
            drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(labels.shape)
            labels = torch.where(labels == -100, labels, drawn)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


class LanguageModelTask(Task):
    """kronfluence's ``Task``: training loss = a document's summed NLL, measurement = an item's
    summed gold-answer NLL, over the tracked ``modules``; padding is masked out of the curvature."""

    def __init__(self, modules: Sequence[str]) -> None:
        super().__init__()
        self.modules = list(modules)

    def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
        return summed_nll(model, batch, sample=sample)

    def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
        return summed_nll(model, batch)

    def get_influence_tracked_modules(self) -> list[str]:
        return list(self.modules)

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return batch["attention_mask"]


@contextmanager
def _prepared(hf: torch.nn.Module, task: Any) -> Iterator[torch.nn.Module]:
    """kronfluence's ``prepare_model`` on ``hf``, undone on exit.

    It freezes every parameter and swaps the tracked ``nn.Linear`` modules for wrappers in
    place; ``load_model`` shares one module per process, so the originals (same weights), the
    ``requires_grad`` flags and the train/eval mode are put back whatever happens.
    """
    grads = {name: p.requires_grad for name, p in hf.named_parameters()}
    training = hf.training
    try:
        yield prepare_model(hf, task)
    finally:
        for name, module in list(hf.named_modules()):
            if isinstance(module, TrackedModule):
                parent, _, child = name.rpartition(".")
                setattr(hf.get_submodule(parent) if parent else hf, child, module.original_module)
        for name, p in hf.named_parameters():
            p.requires_grad_(grads.get(name, p.requires_grad))
        hf.train(training)


# -- the factor cache ---------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _factor_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _file_digest(p)
            for p in sorted(folder.rglob("*.safetensors"))}


def _valid_factors(folder: Path, key: str) -> bool:
    """Whether ``folder`` holds the complete factors of ``key``, byte for byte as written.

    A folder without the manifest (an interrupted fit) is not valid; one whose files no longer
    match their recorded digests (a corrupt or edited cache) is not valid either, and is named
    in a warning before it is fitted again.
    """
    manifest = folder / _MANIFEST
    if not manifest.exists():
        return False
    try:
        recorded = json.loads(manifest.read_text())
        ok = recorded.get("key") == key and recorded.get("files") == _factor_files(folder)
    except (OSError, ValueError, KeyError, AttributeError):
        ok = False
    if not ok:
        warnings.warn(f"influence-function factors at {folder} do not match their manifest (corrupt or edited); "
                      "they are fitted again.", stacklevel=3)
    return bool(ok)


# -- the estimator ----------------------------------------------------------------------------
def sample_documents(documents: pd.DataFrame, labels: Mapping[str, int], docs_per_cluster: int,
                     seed: int = 0) -> pd.DataFrame:
    """A seeded sample of at most ``docs_per_cluster`` documents of each cluster, in corpus order.

    ``labels`` maps a document id (as a string) to its cluster; every document needs one.
    """
    require(isinstance(docs_per_cluster, (int, np.integer)) and not isinstance(docs_per_cluster, bool)
            and docs_per_cluster > 0, f"docs_per_cluster must be a positive int or None, got {docs_per_cluster!r}.")
    ids = documents["id"].astype(str)
    missing = [i for i in ids if i not in labels]
    require(not missing, f"{len(missing)} document(s) have no cluster in labels (e.g. {missing[:3]}): "
                         "pass labels for every document id (clusters.json's assignment) to sample per cluster.")
    cluster = ids.map(lambda i: int(labels[i])).to_numpy()
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(documents), dtype=bool)
    for k in np.unique(cluster):
        rows = np.flatnonzero(cluster == k)
        keep[rng.choice(rows, size=min(int(docs_per_cluster), len(rows)), replace=False)] = True
    return documents.loc[keep]


def _check_inputs(model: Model, documents: pd.DataFrame, items: pd.DataFrame | None, strategy: str,
                  batch_size: int, labels: Mapping[str, int] | None, docs_per_cluster: int | None) -> None:
    require(strategy in STRATEGIES, f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)} "
                                    "(ekfac is the most accurate, identity the cheapest).")
    require(not model.masked, f"{model.name} is a masked LM: influence functions here score next-token NLL; "
                              "use a causal LM.")
    model.require_local("influence functions (gradients through the weights)")
    frames = [("documents", documents, ("id", "text"))]
    if items is not None:
        frames.append(("items", items, ("ability", "item_id", "context", "answer")))
    for name, frame, columns in frames:
        require(isinstance(frame, pd.DataFrame), f"{name} must be a pandas DataFrame, got {type(frame).__name__}.")
        lacking = [c for c in columns if c not in frame.columns]
        require(not lacking, f"{name} lacks column(s) {lacking}; it needs {list(columns)}.")
        require(len(frame) > 0, f"{name} is empty: influence scores need at least one document and one item.")
    require(documents["id"].astype(str).is_unique, "documents has duplicate ids: each document id must be unique.")
    if items is not None:
        require(not items.duplicated(["ability", "item_id"]).any(),
                "items has duplicate (ability, item_id) pairs: each item must be named once.")
        empty = items["answer"].astype(str).str.len() == 0
        require(not empty.any(), f"{int(empty.sum())} item(s) have an empty answer: the measurement is the gold "
                                 "answer's NLL, so every item needs one.")
    require(isinstance(batch_size, int) and batch_size > 0, f"batch_size must be a positive int, got {batch_size!r}.")
    require(docs_per_cluster is None or labels is not None,
            "docs_per_cluster needs labels (document id → cluster) to know each document's cluster.")


@dataclass
class _Fit:
    """What fitting and scoring share: the documents as token rows, the tracked modules, the cache key."""

    model: Model
    documents: pd.DataFrame
    train: _Rows
    modules: list[str]
    strategy: str
    settings: KronfluenceSettings
    key: str
    root: Path
    batch_size: int


def _plan(model: Model, documents: pd.DataFrame, strategy: str, layers: Sequence[int] | None,
          cache_dir: Path | None, seed: int, batch_size: int, settings: KronfluenceSettings) -> _Fit:
    modules = tracked_modules(model, layers)
    require(settings.max_tokens > 1, f"max_tokens must be at least 2, got {settings.max_tokens}.")
    documents = documents.reset_index(drop=True)
    train = _document_rows(model, documents["text"].astype(str).tolist(), settings.max_tokens)
    short = [str(documents["id"][i]) for i, r in enumerate(train.rows) if len(r["input_ids"]) < 2]
    require(not short, f"{len(short)} document(s) have fewer than 2 tokens (e.g. {short[:3]}): they carry no "
                       "next-token loss; drop them.")
    # the seed draws the true Fisher's pseudo-targets, so it is part of what the factors are
    key = stable_hash("influence_functions/factors/v1", model_fingerprint(model), modules, strategy,
                      settings.empirical_fisher, settings.max_tokens, None if settings.empirical_fisher else seed,
                      documents[["id", "text"]].astype(str))
    root = Path(cache_dir) if cache_dir is not None else cache_subdir(_CACHE_SUBDIR)
    root.mkdir(parents=True, exist_ok=True)
    return _Fit(model, documents, train, modules, strategy, settings, key, root, batch_size)


@contextmanager
def _analyzer(fit: _Fit, seed: int) -> Iterator[Any]:
    """A kronfluence ``Analyzer`` on the prepared model, its factors fitted (or found in the cache)."""
    task = LanguageModelTask(fit.modules)
    pad = fit.model.tokenizer.pad_token_id if fit.model.tokenizer.pad_token_id is not None else 0
    with _prepared(fit.model.hf, task) as hf, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        analyzer = Analyzer(
            analysis_name=fit.key, model=hf, task=task, cpu=fit.model.device.type == "cpu", output_dir=str(fit.root),
            disable_tqdm=False, disable_model_save=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=_collate(pad)))
        factors = analyzer.factors_output_dir(fit.strategy)
        if not _valid_factors(factors, fit.key):
            shutil.rmtree(factors, ignore_errors=True)
            analyzer.fit_all_factors(
                factors_name=fit.strategy, dataset=fit.train, per_device_batch_size=fit.batch_size,
                factor_args=FactorArguments(strategy=fit.strategy, use_empirical_fisher=fit.settings.empirical_fisher),
                overwrite_output_dir=True)
            factors.mkdir(parents=True, exist_ok=True)
            (factors / _MANIFEST).write_text(json.dumps({
                "key": fit.key, "model": model_fingerprint(fit.model), "modules": fit.modules,
                "strategy": fit.strategy, "settings": asdict(fit.settings), "documents": len(fit.documents),
                "files": _factor_files(factors)}, indent=1))
        yield analyzer


def fit_factors(
    model: Model,
    documents: pd.DataFrame,
    *,
    strategy: str = "ekfac",
    layers: Sequence[int] | None = None,
    cache_dir: Path | None = None,
    seed: int = 0,
    batch_size: int = 4,
    settings: KronfluenceSettings | None = None,
) -> Path:
    """Fit the curvature factors of ``strategy`` on ``documents`` (or find them in the cache);
    returns their folder. :func:`influence_scores` does this itself: call it alone to fit
    ahead of time, or to time the two phases apart."""
    settings = settings or KronfluenceSettings()
    _check_inputs(model, documents, None, strategy, batch_size, None, None)
    fit = _plan(model, documents, strategy, layers, cache_dir, seed, batch_size, settings)
    with _analyzer(fit, seed) as analyzer:
        return analyzer.factors_output_dir(strategy)


def influence_scores(
    model: Model,
    documents: pd.DataFrame,
    items: pd.DataFrame,
    *,
    strategy: str = "ekfac",
    layers: Sequence[int] | None = None,
    docs_per_cluster: int | None = None,
    labels: Mapping[str, int] | None = None,
    cache_dir: Path | None = None,
    seed: int = 0,
    batch_size: int = 4,
    settings: KronfluenceSettings | None = None,
) -> pd.DataFrame:
    """Document-level influence scores ``score(z, q) = ∇f(q)ᵀ (G + λI)⁻¹ ∇L(z)`` (module docstring).

    ``model``: a loaded causal LM (:func:`rephelpers.representations.models.load_model`).
    ``documents``: columns ``id``, ``text``; ``items``: ``ability``, ``item_id``, ``context``,
    ``answer``. ``strategy``: one of :data:`STRATEGIES`. ``layers``: decoder layers whose linear
    modules are tracked (default :func:`default_layers`). ``docs_per_cluster`` with ``labels``
    (document id → cluster): score only a seeded sample per cluster; the factors are fitted on
    the same documents that are scored. ``cache_dir``: where the factors are kept (default the
    user cache's ``influence_functions/``), keyed by the model's fingerprint, the tracked
    modules, the strategy, the settings, the seed (true Fisher) and the documents' content.
    ``batch_size``: documents (and items) per forward pass, always explicit. ``settings``: the
    knobs below these (:class:`KronfluenceSettings`), defaults to use.

    Returns one row per (scored document, item): ``id``, ``ability``, ``item_id``, ``score``;
    ``score > 0`` means training on the document lowers the item's gold-answer loss (it helps).
    """
    settings = settings or KronfluenceSettings()
    _check_inputs(model, documents, items, strategy, batch_size, labels, docs_per_cluster)
    if docs_per_cluster is not None:
        documents = sample_documents(documents, labels, docs_per_cluster, seed)
    fit = _plan(model, documents, strategy, layers, cache_dir, seed, batch_size, settings)
    documents, items = fit.documents, items.reset_index(drop=True)
    query = _item_rows(model, items["context"].astype(str).tolist(), items["answer"].astype(str).tolist(),
                       settings.max_tokens)
    score_args = ScoreArguments(damping_factor=settings.damping, query_gradient_low_rank=settings.query_rank,
                                query_gradient_accumulation_steps=math.ceil(len(query) / batch_size))
    scores_name = stable_hash(fit.key, items[["ability", "item_id", "context", "answer"]].astype(str),
                              asdict(settings), batch_size)
    with progress_bar(total=2, desc="influence functions", unit="stage") as bar, _analyzer(fit, seed) as analyzer:
        bar.update(1)
        try:
            analyzer.compute_pairwise_scores(
                scores_name=scores_name, factors_name=strategy, query_dataset=query, train_dataset=fit.train,
                per_device_query_batch_size=batch_size, per_device_train_batch_size=batch_size,
                score_args=score_args, overwrite_output_dir=True)
            matrix = analyzer.load_pairwise_scores(scores_name)["all_modules"].to(torch.float64).cpu().numpy()
        finally:
            # scores are returned, not cached: the caller's run directory keeps them
            shutil.rmtree(analyzer.scores_output_dir(scores_name), ignore_errors=True)
        bar.update(1)
    require(matrix.shape == (len(items), len(documents)),
            f"kronfluence returned scores of shape {matrix.shape}, expected {(len(items), len(documents))}.")
    bad = ~np.isfinite(matrix)
    if bad.any():
        raise RephelpersError(
            f"{int(bad.sum())} of {bad.size} influence scores are NaN or infinite ({strategy}, modules {fit.modules[:2]}…): "
            "the curvature is singular or the model overflows. Use a damping (KronfluenceSettings(damping=...)), "
            "strategy='identity', or float32 weights.")
    n_docs, n_items = len(documents), len(items)
    return pd.DataFrame({
        "id": np.tile(documents["id"].to_numpy(), n_items),
        "ability": np.repeat(items["ability"].to_numpy(), n_docs),
        "item_id": np.repeat(items["item_id"].to_numpy(), n_docs),
        "score": matrix.reshape(-1),
    })
