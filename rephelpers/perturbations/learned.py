"""Stage 04: a learned, specificity-seeking subspace per cluster (the ``learned`` kind).

Stage 03's R_k (the top mean-difference dimensions) says where cluster k's activations
differ, not where the model processes k: zero-ablating it can hurt every text alike. Here a
rank-r subspace U is *fitted* for what stage 04 measures: the edit
``ĥ = h − α·UUᵀ(h − μ)`` (:class:`~rephelpers.interventions.edits.LearnedProjection`) at one
layer, with the model frozen, is trained by gradient to raise cluster k's next-token loss by a
set amount while keeping the other clusters' loss where it was,

    maximise  J(U) = Δ − |L_k(U) − L_k⁰ − Δ| − λ·max(0, L_rest(U) − L_rest⁰),

L the mean next-token NLL per token of a batch of **training** texts (``split == "train"``;
stage 04 scores held-out texts only, so the fit never sees what it is judged on) and L⁰ the same
texts' loss with no edit. The objective is bounded: the first fit (``J = L_k − λ·L_rest``,
``target=None`` here) raised the demo clusters' own held-out loss by 15-31 nats per token and
the rest's by 3-10, damage rather than a cluster-specific edit; here k's loss is aimed at a
rise of Δ (more is penalised like less), and any rise of the rest is paid at λ per nat. U is
parametrised as the Q factor of the QR decomposition of a free matrix A [d, r], so every
step is an orthonormal basis. :func:`with_learned` fits one U per cluster and caches it in
the run directory (``cache/learned/…json``, keyed by its inputs like every artifact).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..artifacts import RunDir
from ..dimensions.components import ClusterComponents, as_components
from ..errors import require
from ..interventions.edits import LearnedProjection
from ..interventions.intervene import site_states, token_nll
from ..progress import progress_bar
from ..representations.models import Model, model_fingerprint, output_tensor, replace_output
from .specificity import sample_texts

RANK = 8
"""Default rank r: a handful of directions, like stage 03's V_k, small against d = 576 so
that a size-matched random control of the same rank exists in plenty."""
STEPS = 50
"""Default number of Adam steps: J(U) levels off within a few dozen steps on the demo's
clusters at lr = 0.05; each step is one forward and one backward pass above the layer."""
LR = 0.05
"""Adam's learning rate on A (initialised with unit-variance entries): U rotates by a few
degrees per step."""
TARGET = 1.0
"""Δ = 1 nat per token: the rise of cluster k's loss the fit aims at (×e ≈ 2.7 in perplexity), a
clear effect on k's text that leaves the model working, against the 15-31 nats the unbounded
objective produced. None: the unbounded objective J = L_k − λ·L_rest of the first version."""
LAMBDA = 10.0
"""λ = 10: the price of a nat of rise on the rest. Since J ≤ Δ − λ·rise_rest and J = 0 with no
edit, any U the fit prefers to no edit (J > 0) raises the rest's loss by less than Δ/λ = 0.1
nats per token (a tenth of the target), and a trade of own rise for rest rise is only taken
at better than 10 : 1. (λ = 1 with the unbounded objective let the rest rise by 3-10 nats.)"""
BATCH_TEXTS = 4
"""Texts of cluster k and as many of the rest per step (small: 2 CPU cores)."""
N_TEXTS = 16
"""Training texts of cluster k (and as many of the rest) the fit cycles through."""
MAX_LENGTH = 64
"""Tokens per text in fitting (shorter than stage 04's scoring: the gradient needs no more)."""
VERSION = "learned-v2"  # v2: the bounded objective (TARGET, λ = 10)


@dataclass(frozen=True)
class LearnedFit:
    """A fitted :class:`LearnedProjection` and how the fit went.

    ``objective`` holds J on each step's mini-batch; ``losses`` the mean NLL per token on
    all the fitting texts (cluster k's: ``k``, the rest's: ``rest``) under ``none`` (no
    edit), ``learned`` (the fitted U) and ``random`` (a seeded random orthonormal U of the
    same rank and the same μ, at α = 1): the fit must beat a random subspace on J.
    ``seconds`` is the fitting time (on a loaded machine it says little).
    """

    projection: LearnedProjection
    objective: tuple[float, ...]
    losses: dict[str, dict[str, float]]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def gain(self, which: str = "learned") -> float:
        """J of ``which`` on all the fitting texts (J of no edit is 0): :func:`objective` with
        L⁰ the ``none`` losses and the fit's own λ and Δ."""
        lam = float(self.settings.get("lam", LAMBDA))
        target = self.settings.get("target", None)
        return float(objective(torch.tensor(self.losses[which]["k"]), torch.tensor(self.losses[which]["rest"]),
                               self.losses["none"]["k"], self.losses["none"]["rest"], lam, target))

    def to_dict(self) -> dict[str, Any]:
        return {"projection": self.projection.to_dict(), "objective": list(self.objective), "losses": self.losses,
                "seconds": self.seconds, "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LearnedFit":
        data = dict(data)
        projection = {k: v for k, v in data.pop("projection").items() if k != "kind"}
        return cls(projection=LearnedProjection(**projection), objective=tuple(data["objective"]), **{
            k: data[k] for k in ("losses", "seconds", "settings")})


def objective(loss_k: torch.Tensor, loss_rest: torch.Tensor, base_k: float | torch.Tensor,
              base_rest: float | torch.Tensor, lam: float, target: float | None) -> torch.Tensor:
    """The fit's objective, to maximise: ``J = Δ − |L_k − L_k⁰ − Δ| − λ·max(0, L_rest − L_rest⁰)``.

    ``loss_*`` the edited losses L (mean NLL per token), ``base_*`` the same texts' unedited
    losses L⁰, ``lam`` λ, ``target`` Δ in nats per token. J = 0 with no edit; it is at most Δ,
    reached when k's loss has risen by exactly Δ and the rest's not at all. The first term is
    ``min(rise, 2Δ − rise)``, not ``min(rise, Δ)``: with a flat cap nothing stops Adam's momentum
    past Δ, while this tent pulls the rise back towards Δ, so the clusters' edits are of one
    chosen size. (tests/test_learned.py's prose cluster, layer 26, r = 2, lr 0.1, 20 steps, Δ = 1:
    the capped fit ended at a rise of 1.95 nats on its fitting texts, the tent at 1.48, the
    unbounded one at 8.7 with the rest's loss up 3.7 nats; both bounded ones left the rest lower.) ``target=None`` is the
    first version's unbounded ``J = (L_k − L_k⁰) − λ·(L_rest − L_rest⁰)`` (the same gradient
    as ``L_k − λ·L_rest``), kept to compare against.
    """
    rise_k, rise_rest = loss_k - base_k, loss_rest - base_rest
    if target is None:
        return rise_k - lam * rise_rest
    return target - torch.abs(rise_k - float(target)) - lam * torch.clamp(rise_rest, min=0.0)


def _check_fit_inputs(model: Model, documents: pd.DataFrame, cluster: int, layer: int, component: str,
                      rank: int, steps: int, lam: float, batch_texts: int, target: float | None = TARGET) -> int:
    require(not model.masked, f"learned: fitting needs a causal LM's next-token loss; {model.name} is a masked LM.")
    require(not model.remote, f"learned: fitting back-propagates through {model.name}, which runs remotely; load it here.")
    layer = model.check_layer(int(layer))
    model.check_component(component)
    require(isinstance(rank, (int, np.integer)) and 1 <= int(rank) < model.d_model,
            f"learned: rank must be an integer in 1..{model.d_model - 1} (below the hidden size {model.d_model}), "
            f"got {rank!r}")
    require(isinstance(steps, (int, np.integer)) and int(steps) >= 1, f"learned: steps must be ≥ 1, got {steps!r}")
    require(math.isfinite(lam) and lam >= 0, f"learned: λ must be a finite number ≥ 0, got {lam!r}")
    require(int(batch_texts) >= 1, f"learned: batch_texts must be ≥ 1, got {batch_texts!r}")
    require(target is None or (isinstance(target, (int, float, np.number)) and not isinstance(target, bool)
                               and math.isfinite(target) and target > 0),
            f"learned: target Δ must be a finite number of nats > 0 (e.g. 1.0), or None for the unbounded "
            f"objective; got {target!r}")
    missing = [c for c in ("text", "split", "cluster") if c not in documents.columns]
    require(not missing, f"learned: documents lack columns {missing}; pass notebook 01's documents.parquet.")
    train = documents[documents["split"] == "train"]
    require(int((train["cluster"] == cluster).sum()) > 0,
            f"learned: cluster {cluster} has no training documents (split == 'train'), so there is nothing to fit "
            f"its subspace on; clusters with some: {sorted(set(train['cluster']))}.")
    require(int((train["cluster"] != cluster).sum()) > 0,
            f"learned: no training documents outside cluster {cluster}: L_rest cannot be measured.")
    return layer


def fit_learned_projection(
    model: Model,
    documents: pd.DataFrame,
    cluster: int,
    layer: int,
    component: str = "resid",
    rank: int = RANK,
    steps: int = STEPS,
    lr: float = LR,
    lam: float = LAMBDA,
    target: float | None = TARGET,
    batch_texts: int = BATCH_TEXTS,
    n_texts: int = N_TEXTS,
    max_length: int = MAX_LENGTH,
    seed: int = 0,
    progress: bool = True,
) -> LearnedFit:
    """Fit U for cluster ``cluster`` at ``(layer, component)``: maximise
    ``J(U) = Δ − |L_k(U) − L_k⁰ − Δ| − λ·max(0, L_rest(U) − L_rest⁰)`` (:func:`objective`;
    ``lam`` λ, ``target`` Δ; ``target=None``: the unbounded ``L_k − λ·L_rest``).

    - texts: up to ``n_texts`` training texts of the cluster and as many of the others
      (round robin over clusters, :func:`rephelpers.perturbations.specificity.sample_texts`);
    - μ: the mean token state at the site over all those texts (real tokens, no edit);
    - L⁰: each text's unedited NLL, computed once without gradient; a step's L⁰ is its
      batch's (so J compares the same texts with and without the edit);
    - U = Q(A), A [d, r] seeded standard normal, Adam on A for ``steps`` steps, each on
      ``batch_texts`` texts of k and as many of the rest in one forward pass (cycling);
      ``L = Σ_t NLL_t / #tokens`` per group (:func:`token_nll`); the edit is applied at α = 1
      by a forward hook on the site's module; the model's own weights take no gradient.

    Errors (masked or remote model, r ∉ [1, d), Δ ≤ 0, empty cluster, layer out of range)
    are raised before the first forward pass.
    """
    layer = _check_fit_inputs(model, documents, cluster, layer, component, rank, steps, lam, batch_texts, target)
    mine, rest = sample_texts(documents, cluster, n_texts, seed, split="train")
    k_texts, rest_texts = [str(t) for t in mine["text"]], [str(t) for t in rest["text"]]
    start = time.perf_counter()
    total, count = torch.zeros(model.d_model, dtype=torch.float64), 0
    for batch, h in site_states(model, k_texts + rest_texts, layer, component, 8, max_length):
        real = h[batch["attention_mask"].bool()].double().cpu()
        total += real.sum(0)
        count += real.shape[0]
    mu = (total / max(count, 1)).to(model.device, torch.float32)
    base_k, base_rest = (_text_nll(model, texts, max_length, 2 * batch_texts) for texts in (k_texts, rest_texts))
    generator = torch.Generator().manual_seed(int(seed))
    A = torch.nn.Parameter(torch.randn(model.d_model, int(rank), generator=generator).to(model.device))
    optimiser = torch.optim.Adam([A], lr=float(lr))
    basis = lambda: torch.linalg.qr(A)[0]  # noqa: E731 - [d, r], orthonormal columns
    module = model.module(layer, component)
    rng = np.random.default_rng([int(seed), int(cluster)])
    k_order, rest_order = rng.permutation(len(k_texts)), rng.permutation(len(rest_texts))
    trace = []
    params = [p for p in model.hf.parameters() if p.requires_grad]
    for p in params:  # frozen: no weight gradients to compute or leave behind
        p.requires_grad_(False)
    try:
        with _edit_hook(module, lambda: basis(), mu):
            for step in progress_bar(range(int(steps)), desc=f"learned U (cluster {cluster})", disable=not progress):
                ki = [int(k_order[(step * batch_texts + i) % len(k_texts)]) for i in range(batch_texts)]
                ri = [int(rest_order[(step * batch_texts + i) % len(rest_texts)]) for i in range(batch_texts)]
                loss_k, loss_rest = _group_losses(model, [k_texts[i] for i in ki], [rest_texts[i] for i in ri],
                                                  max_length)
                j = objective(loss_k, loss_rest, _mean_nll(base_k, ki), _mean_nll(base_rest, ri), lam, target)
                optimiser.zero_grad()
                (-j).backward()
                optimiser.step()
                trace.append(float(j.detach()))
        U = basis().detach()
    finally:
        for p in params:
            p.requires_grad_(True)
    seconds = time.perf_counter() - start
    random_U = torch.linalg.qr(torch.randn(model.d_model, int(rank), generator=generator))[0].to(model.device)
    losses = {"none": {"k": _mean_nll(base_k), "rest": _mean_nll(base_rest)}}
    losses |= {name: _set_losses(model, module, k_texts, rest_texts, basis_, mu, max_length, batch_texts)
               for name, basis_ in (("learned", U), ("random", random_U))}
    projection = LearnedProjection(basis=U.T.double().cpu().numpy(), mean=mu.double().cpu().numpy())
    settings = dict(cluster=int(cluster), layer=layer, component=component, rank=int(rank), steps=int(steps),
                    lr=float(lr), lam=float(lam), target=None if target is None else float(target),
                    batch_texts=int(batch_texts), n_texts=int(n_texts), max_length=int(max_length), seed=int(seed),
                    n_k=len(k_texts), n_rest=len(rest_texts))
    return LearnedFit(projection, tuple(trace), losses, seconds, settings)


def _text_nll(model: Model, texts: list[str], max_length: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each text's unedited summed NLL and predicted-token count (no gradient): the fit's L⁰."""
    nll, count = [], []
    for start in range(0, len(texts), batch_size):
        batch = model.encode(texts[start:start + batch_size], max_length=max_length)
        with torch.inference_mode():
            a, b = token_nll(model.hf(**batch).logits, batch)
        nll += a.double().cpu().tolist()
        count += b.double().cpu().tolist()
    return np.asarray(nll), np.asarray(count)


def _mean_nll(per_text: tuple[np.ndarray, np.ndarray], rows: Sequence[int] | None = None) -> float:
    """``Σ NLL / Σ tokens`` over ``rows`` (with repeats, as a batch that cycles holds them; None: all)."""
    nll, count = per_text
    rows = np.arange(len(nll)) if rows is None else np.asarray(rows)
    return float(nll[rows].sum() / max(count[rows].sum(), 1.0))


class _edit_hook:  # noqa: N801 - a context manager used like a function
    """A forward hook on ``module`` that returns ``h − UUᵀ(h − μ)`` (U from ``basis()``, or no edit when None)."""

    def __init__(self, module: torch.nn.Module, basis: Any, mu: torch.Tensor) -> None:
        self.module, self.basis, self.mu = module, basis, mu

    def __enter__(self) -> "_edit_hook":
        def hook(_module: Any, _inputs: Any, output: Any) -> Any:
            U = self.basis()
            if U is None:
                return output
            h = output_tensor(output)
            mu = self.mu.to(h.dtype)
            return replace_output(output, h - ((h - mu) @ U.to(h.dtype)) @ U.T.to(h.dtype))
        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _group_losses(model: Model, ks: list[str], rs: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL per token of the ``ks`` rows and of the ``rs`` rows of one forward pass."""
    batch = model.encode(ks + rs, max_length=max_length)
    logits = model.hf(**batch).logits
    nll, count = token_nll(logits, batch)
    n = len(ks)
    return nll[:n].sum() / count[:n].sum().clamp_min(1), nll[n:].sum() / count[n:].sum().clamp_min(1)


def _set_losses(model: Model, module: torch.nn.Module, k_texts: list[str], rest_texts: list[str],
                U: torch.Tensor | None, mu: torch.Tensor, max_length: int, batch_texts: int) -> dict[str, float]:
    """Mean NLL per token over all of ``k_texts`` and over all of ``rest_texts``, with the edit of U
    (at α = 1, through the same hook as the fit) or without any edit (U None)."""
    out = {}
    for name, texts in (("k", k_texts), ("rest", rest_texts)):
        nll = count = 0.0
        for start in range(0, len(texts), 2 * batch_texts):
            batch = model.encode(texts[start:start + 2 * batch_texts], max_length=max_length)
            with torch.inference_mode(), _edit_hook(module, lambda: U, mu):
                a, b = token_nll(model.hf(**batch).logits, batch)
            nll += float(a.sum())
            count += float(b.sum())
        out[name] = nll / max(count, 1.0)
    return out


def learned_artifact(cluster: int, layer: int, component: str = "resid") -> str:
    """The run directory's name for one cluster's fitted U (under ``cache/``)."""
    return f"cache/learned/{component}_L{int(layer):02d}_k{int(cluster)}.json"


def with_learned(
    run: RunDir | str,
    model: Model,
    documents: pd.DataFrame,
    components: Sequence[ClusterComponents],
    layer: int,
    clusters: Sequence[int] | None = None,
    component: str = "resid",
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> tuple[list[ClusterComponents], dict[int, LearnedFit]]:
    """``components`` with ``learned`` set at ``layer`` for ``clusters`` (default: every cluster
    with components there), and each cluster's :class:`LearnedFit`.

    Each fit is :func:`fit_learned_projection` (``options``: rank, steps, lr, lam, target,
    batch_texts, n_texts, max_length) cached as :func:`learned_artifact` in ``run``: keyed by
    the model's fingerprint, the settings and ``documents.parquet``'s key, so a changed
    corpus or setting refits and the old fit moves to ``.history/``. Every cluster's inputs
    are checked before the first fit.
    """
    run = RunDir(run)
    components = [as_components(c) for c in components]
    layer = model.check_layer(int(layer))
    at_layer = {c.cluster: i for i, c in enumerate(components) if c.layer == layer}
    require(bool(at_layer), f"learned: no cluster components at layer {layer}; stage 03 covered layers "
                            f"{sorted({c.layer for c in components})}.")
    clusters = sorted(at_layer) if clusters is None else [int(k) for k in clusters]
    absent = [k for k in clusters if k not in at_layer]
    require(not absent, f"learned: clusters {absent} have no components at layer {layer} (available: {sorted(at_layer)}).")
    settings = dict(RANK=RANK, STEPS=STEPS, LR=LR, LAMBDA=LAMBDA, TARGET=TARGET, BATCH_TEXTS=BATCH_TEXTS,
                    N_TEXTS=N_TEXTS, MAX_LENGTH=MAX_LENGTH)
    names = {"rank": "RANK", "steps": "STEPS", "lr": "LR", "lam": "LAMBDA", "target": "TARGET",
             "batch_texts": "BATCH_TEXTS", "n_texts": "N_TEXTS", "max_length": "MAX_LENGTH"}
    unknown = sorted(set(options) - set(names))
    require(not unknown, f"learned: unknown options {unknown}; use {sorted(names)}.")
    chosen = {key: options.get(key, settings[const]) for key, const in names.items()}
    for k in clusters:
        _check_fit_inputs(model, documents, k, layer, component, chosen["rank"], chosen["steps"], chosen["lam"],
                          chosen["batch_texts"], chosen["target"])
    fingerprint = model_fingerprint(model)
    upstream = ["documents.parquet"] if run.exists("documents.parquet") else []
    out, fits = list(components), {}
    for k in clusters:
        name = learned_artifact(k, layer, component)
        params = dict(model=fingerprint, cluster=k, layer=layer, component=component, seed=int(seed),
                      version=VERSION, **chosen)
        raw = run.cached(name, lambda k=k: fit_learned_projection(
            model, documents, k, layer, component, seed=seed, progress=progress, **chosen).to_dict(),
            params=params, upstream=upstream, model=fingerprint, cluster=k, layer=layer, component=component,
            documents=run.key_of("documents.parquet"))
        fits[k] = LearnedFit.from_dict(raw)
        out[at_layer[k]] = replace(components[at_layer[k]], learned=fits[k].projection)
    return out, fits


FITTED_BY = "notebook 04_perturbations with 'learned' in perturbation"
"""The stage that writes :func:`learned_artifact` (the provenance its readers name)."""


def load_learned(
    run: RunDir | str,
    components: Sequence[ClusterComponents],
    layer: int,
    component: str = "resid",
    model: Model | None = None,
) -> tuple[list[ClusterComponents], list[str]]:
    """``components`` with ``learned`` set, at ``layer``, to the U stage 04 fitted and cached for
    every cluster there (:func:`with_learned`), and the artifact names read (a later stage's
    ``upstream``, so that a refit recomputes what was made from the old U).

    Stage 05 evaluates exactly the fitted projection; it never refits. Refused with what to
    run: a cluster without a fit (run notebook 04 with ``learned`` in ``perturbation``, the
    same ``intervention_layer`` and ``component``), a fit made by the first, unbounded
    version, a fit on another corpus than ``documents.parquet`` now holds, or (``model``
    given) a fit of another model.
    """
    run = RunDir(run)
    components = [as_components(c) for c in components]
    here = {c.cluster: i for i, c in enumerate(components) if c.layer == int(layer) and c.component in (None, component)}
    require(bool(here), f"learned: no stage-03 components at layer {layer} ({component}) to attach fitted subspaces to; "
                        f"stage 03 covered layers {sorted({c.layer for c in components})}.")
    names = {k: learned_artifact(k, layer, component) for k in sorted(here)}
    missing = [k for k, name in names.items() if not run.exists(name)]
    require(not missing, f"learned: no fitted subspace for clusters {missing} at layer {layer} ({component}) in "
                         f"{run.root}: run notebook 04 with 'learned' in perturbation (intervention_layer={layer}, "
                         f"component={component!r}, the same run_dir) first, then this one.")
    documents = run.key_of("documents.parquet")
    fingerprint = None if model is None else model_fingerprint(model)
    out = list(components)
    for k, name in names.items():
        fit = LearnedFit.from_dict(run.load_json(name, stage=FITTED_BY))
        meta = run.meta_of(name)
        redo = f"re-run notebook 04 with 'learned' in perturbation (run_dir {run.root}) to refit it, then this one."
        require("target" in fit.settings, f"learned: {name} was fitted with the first, unbounded objective; {redo}")
        require(meta.get("documents") == documents,
                f"learned: {name} was fitted on another version of documents.parquet than the run holds now; {redo}")
        require(fingerprint is None or meta.get("model") == fingerprint,
                f"learned: {name} was fitted for model {meta.get('model')!r}, not {fingerprint!r}; {redo}")
        out[here[k]] = replace(components[here[k]], learned=fit.projection)
    return out, list(names.values())


def fit_table(fits: dict[int, LearnedFit]) -> pd.DataFrame:
    """One row per cluster: the fitting texts' mean NLL with no edit, the learned U and a random U
    (``L_k``, ``L_rest``), the learned U's rises ``rise_k = L_k − L_k⁰`` and ``rise_rest``
    (the bounded objective aims at rise_k = Δ, rise_rest ≈ 0), ``gain`` (J, 0 with no edit) of
    the learned and the random U, and the fitting time."""
    rows = []
    for k, fit in sorted(fits.items()):
        row = {"cluster": k, "rank": fit.projection.rank, "steps": len(fit.objective)}
        for part in ("none", "learned", "random"):
            row[f"L_k_{part}"] = fit.losses[part]["k"]
            row[f"L_rest_{part}"] = fit.losses[part]["rest"]
        row["rise_k"] = fit.losses["learned"]["k"] - fit.losses["none"]["k"]
        row["rise_rest"] = fit.losses["learned"]["rest"] - fit.losses["none"]["rest"]
        row["gain_learned"], row["gain_random"] = fit.gain("learned"), fit.gain("random")
        row["fit_seconds"] = fit.seconds
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["LearnedFit", "fit_learned_projection", "objective", "with_learned", "learned_artifact", "load_learned",
           "fit_table", "FITTED_BY", "RANK", "STEPS", "LR", "LAMBDA", "TARGET", "BATCH_TEXTS", "N_TEXTS",
           "MAX_LENGTH"]
