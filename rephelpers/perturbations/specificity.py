"""Stage 04: does a cluster's perturbation hit that cluster's text, and only it?

For each cluster k, the perturbation built from k's subspace (:func:`rephelpers.perturbations.kinds.build`)
and its matched random control (:func:`rephelpers.perturbations.kinds.matched_controls`) run on
k's held-out texts (the *target* set) and on held-out texts of the other clusters (the
*rest* set). Per arm the report holds:

- perplexity before/after on both sets and ``Δ = log ppl_after − log ppl_before`` (the
  change in mean next-token NLL, nats per token). For a masked LM these are
  pseudo-perplexities (``exp(−Σ PLL / Σ tokens)``, :func:`rephelpers.interventions.intervene.pseudo_nll`)
  and the report has a column ``ppl_kind = "pseudo-perplexity"`` (a causal LM's report has
  none, so its rows are as before);
- ``specificity_gap = Δ_target − Δ_rest`` and ``specificity_ratio = Δ_target / Δ_rest``
  (NaN when ``|Δ_rest| < 1e-9``): a specific perturbation has a large gap and a ratio
  above 1, its control neither;
- linear CKA between the original and perturbed mean-pooled residual streams at a few
  layers after the intervention, per set (NaN below three texts, where CKA is always 1);
- optionally the mean attention-pattern Jensen–Shannon divergence over those layers;
- the balanced accuracy of a fresh logistic probe for "is cluster k", refit on the
  perturbed training representations and scored on the perturbed held-out ones (0.5 is
  chance; after LEACE it must sit there);
- the edit size ``‖ĥ − h‖`` at the intervention site, averaged over the real tokens of
  the target and rest texts (``edit_norm``), and for each control its ratio to the
  perturbation's (``edit_ratio``): a control that changes the state far less than the
  perturbation controls for nothing, so ``edit_matched`` flags ratios outside
  ``[1/edit_tolerance, edit_tolerance]`` (default :data:`EDIT_TOLERANCE`; the row carries
  it as ``edit_tolerance``) and ``matching`` says how the control was drawn
  (:func:`rephelpers.perturbations.kinds.matched_control`: magnitude strata, captured second
  moment of the layer's token spectrum from :func:`control_spectrum`, or uniform).

:func:`specificity_verdicts` turns the report into the gate stage 06 reads: a
perturbation is *specific* only if its Δlog-ppl on the cluster's held-out texts clearly
exceeds that on the rest and its target-minus-rest gap beats every control draw's.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..artifacts import RunDir, stable_hash
from ..dimensions.components import ClusterComponents, as_components
from ..errors import require
from ..representations.activations import load_activations
from ..representations.models import Model, model_fingerprint
from ..progress import progress_bar
from ..setting import Setting
from ..interventions.intervene import (
    Intervention, Readout, batch_keys, first_identical, forward_readouts, interventions_to_json, likelihood_names,
    perplexity, perturb, site_states, validate,
)
from ..interventions.edits import Perturbation
from .controls import Spectrum, second_moment_spectrum
from .kinds import KINDS, build, fit_leace, matched_controls
from .rounds import (  # noqa: F401  (control_arms_run, draws_used, replay_rounds, settled_settings: stage 04's API)
    MIN_GAP, MIN_RATIO, all_drawn, own_specific, check_rounds, control_arms_run, draws_settled, draws_used,
    replay_rounds, settled_settings,
)
from .similarity import attention_js, linear_cka

SPECIFICITY = "specificity.parquet"
EDIT_TOLERANCE = 1.25
"""A control's edit size ‖ĥ − h‖ must lie within this factor of its perturbation's to count as
matched (``edit_matched``). Matched controls (magnitude strata, captured second moment) land
within a few percent where a match exists at all; 1.25 leaves room for the draw and for
held-out tokens differing from the training tokens the profiles come from."""
SPECTRUM_TEXTS = 64
"""Training texts whose token states give a layer's spectrum for matched controls (:func:`control_spectrum`)."""
ARMS = ("perturbation", "control")
SETS = ("target", "rest")
_REQUIRED_COLUMNS = ("text", "split", "cluster")


def sample_heldout(
    documents: pd.DataFrame, cluster: int, n_texts: int, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cluster ``cluster``'s held-out rows (up to ``n_texts``) and as many from the rest.

    The rest set takes the other clusters' held-out rows in turn (round robin over
    clusters, each shuffled), so every other cluster is represented about equally.
    """
    return sample_texts(documents, cluster, n_texts, seed, split="heldout")


def sample_texts(
    documents: pd.DataFrame, cluster: int, n_texts: int, seed: int = 0, split: str = "heldout"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`sample_heldout` on the rows of ``split`` (``"train"`` for fitting a learned subspace)."""
    require(n_texts >= 1, f"n_texts must be ≥ 1, got {n_texts}")
    heldout = documents[documents["split"] == split]
    rng = np.random.default_rng([int(seed), int(cluster)])
    target = heldout[heldout["cluster"] == cluster]
    target = target.iloc[rng.permutation(len(target))[:n_texts]]
    queues = [
        list(group.index[rng.permutation(len(group))])
        for _, group in sorted(heldout[heldout["cluster"] != cluster].groupby("cluster"))
    ]
    picked: list[Any] = []
    while len(picked) < n_texts and any(queues):
        for queue in queues:
            if queue and len(picked) < n_texts:
                picked.append(queue.pop(0))
    return target, heldout.loc[picked]


def readout_layers(model: Model, layer: int, n: int = 3) -> list[int]:
    """Up to ``n`` evenly spaced layers after ``layer`` (always including the last one)."""
    layer = model.check_layer(layer)
    later = np.arange(layer + 1, model.n_layers)
    if len(later) == 0:
        return []
    picks = np.linspace(0, len(later) - 1, num=min(n, len(later))).round().astype(int)
    return sorted({int(later[i]) for i in picks})


def probe_balanced_accuracy(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int = 0
) -> float:
    """Balanced held-out accuracy of a fresh L2 logistic probe (standardised inputs).

    ``(TPR + TNR) / 2``, so 0.5 is chance whatever the class balance; the probe weighs
    classes by inverse frequency so that it cannot score by predicting the majority.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    require(
        len(np.unique(y_train)) == 2 and len(np.unique(y_test)) == 2,
        "probe accuracy needs both classes among the training and the held-out rows.",
    )
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed),
    )
    probe.fit(X_train, y_train)
    return float(balanced_accuracy_score(y_test, probe.predict(X_test)))


def specificity_report(
    model: Model,
    documents_df: pd.DataFrame,
    components: Sequence[ClusterComponents],
    kind: str,
    layer: int,
    magnitude: float = 1.0,
    clusters: Sequence[int] | None = None,
    component: str = "resid",
    positions: str = "all",
    n_texts: int = 16,
    max_length: int = 128,
    seed: int = 0,
    with_attention: bool = False,
    probes: np.ndarray | None = None,
    *,
    batch_size: int = 8,
    n_readout_layers: int = 3,
    n_controls: int = 1,
    progress: bool = True,
    spectrum: Any = "auto",
    edit_tolerance: float = EDIT_TOLERANCE,
    layers: Sequence[int] | None = None,
    control_rounds: int | None = None,
    min_gap: float = MIN_GAP,
    min_ratio: float = MIN_RATIO,
) -> pd.DataFrame:
    """One row per (cluster k, arm ∈ {perturbation, control}, draw); see the module docstring.

    ``layers`` (default ``[layer]``) makes the perturbation act at several layers at once, in
    one forward pass: at each layer ℓ of ``layers`` the ``kind`` is built from that layer's
    components of cluster k (multi-layer LEACE: ``kind="leace"`` erases k's concept with the
    eraser stage 03 fitted at every ℓ), and each control draw j is the matched control of
    every layer's perturbation, drawn at that layer with draw j's seed. ``layer`` must be one
    of ``layers``: its perturbation gives the probe columns. The rows' ``kind`` is then
    ``multi_<kind>`` (a setting of its own for stages 04 and 06), ``layers`` lists the layers
    (``"9,15,21"``; one layer for a single-layer report), ``edit_norm`` is the sum over the
    layers of each layer's mean edit on the unperturbed states there, and the CKA read-outs
    lie after the last of them.

    ``spectrum`` is the layer's token spectrum the controls are matched with
    (:func:`rephelpers.perturbations.kinds.matched_control`): ``"auto"`` computes it with
    :func:`control_spectrum` from the training texts of ``documents_df`` (what stage 05
    does too, so both stages draw the same controls), a dict passes one in, and None draws
    dimension controls from the components' own statistics and project controls uniformly.
    ``edit_tolerance`` sets the ``edit_matched`` flag.

    ``n_controls`` independent random controls are drawn per cluster (draw j uses seed
    ``seed + j``, as in :func:`rephelpers.abilities.evaluation.cluster_configs`); each is a row with
    ``arm = "control"`` and ``draw = j`` (the perturbation's row has ``draw = 0``). The
    charts average the draws.

    ``control_rounds`` R (None: all ``n_controls`` draws at once) draws them in rounds: the
    perturbation and draws ``0…R−1`` run, then a cluster draws the next R only while its
    verdict is still open (:func:`draws_settled`): the verdict is "specific" only if the
    perturbation's gap beats every draw's, so once its own Δs rule that out (with
    ``min_gap``, ``min_ratio``: pass :func:`specificity_verdicts` the same) or one draw's gap
    reaches its gap, no later draw can change it. Draw j is the same control either way
    (seed ``seed + j``), so the rows of the draws run equal those of a run of all draws and
    :func:`specificity_verdicts` gives the same verdicts. Rows say ``n_controls`` (the cap),
    ``n_draws_used``, ``draws_stopped`` (why before the cap) and ``own_pass`` (False: a draw
    identical to an earlier arm shared its passes); see :mod:`rephelpers.perturbations.rounds`.

    ``components`` are stage 03's :class:`~rephelpers.dimensions.components.ClusterComponents`
    (:func:`rephelpers.dimensions.association.load_components`); the ones at ``layer`` are
    used, for ``clusters`` (default: every cluster with components there). ``probes`` are pooled representations at ``layer`` for every row of
    ``documents_df`` (stage 02's activations, :func:`probe_activations`): they give the
    probe-accuracy columns (NaN without them) and fit the LEACE eraser of components that
    have none. The probe columns apply the perturbation to the pooled representation,
    which equals perturbing every token and then pooling for the affine kinds (ablate,
    shift, project, leace, and gradient wherever its probe is not saturated).

    Everything is validated, and every perturbation built and checked, before the first
    forward pass. ``with_attention`` reads the attention patterns of every layer after the
    intervention (under eager attention, switched on for those passes only: slower).
    """
    # before anything runs: control_spectrum below already makes forward passes
    check_rounds(control_rounds, min_gap, min_ratio)
    layer, documents, at_layer, clusters, probes = _report_inputs(
        model, documents_df, components, kind, layer, clusters, component, probes, edit_tolerance)
    sites = intervention_sites(components, layer, layers, clusters, model.check_layer)
    read = readout_layers(model, max(sites), n_readout_layers)
    attend = list(range(max(sites) + 1, model.n_layers)) if with_attention else []
    if isinstance(spectrum, str):
        require(spectrum == "auto", f"spectrum must be 'auto', None or control_spectrum(...)'s Spectrum, got {spectrum!r}")
        # fixed settings: stage 05 gets the same
        spectra = {l: control_spectrum(model, documents, l, component) for l in sites}
    else:
        require(spectrum is None or len(sites) == 1,
                "a multi-layer report draws each layer's controls with that layer's spectrum: pass spectrum='auto' or None.")
        spectra = {layer: spectrum}
    by_layer = {l: {c.cluster: c for c in map(as_components, components) if c.layer == l} for l in sites}

    plans = [_plan_cluster(model, documents, k, {l: by_layer[l][k] for l in sites} | {layer: at_layer[k]}, kind,
                           layer, magnitude, component, positions, n_texts, seed, probes, n_controls, spectra)
             for k in clusters]

    # The most a cluster can take: every round (the bar shrinks when one stops early).
    rounds = 1 if control_rounds is None else math.ceil(n_controls / control_rounds)
    total = sum(rounds * (1 + len(sites)) * math.ceil((len(t) + len(r)) / batch_size) for _, t, r, _, _ in plans)
    bar = progress_bar(total=total, desc=f"specificity ({kind})", disable=not progress, unit="batch")
    rows = []
    for plan in plans:
        rows += _cluster_rows(model, plan, documents, kind, magnitude, layer, component, positions, seed, probes,
                              read, attend, with_attention, batch_size, max_length, bar,
                              control_rounds, min_gap, min_ratio, len(sites))
    bar.close()
    report = pd.DataFrame(rows)
    report["layers"] = ",".join(str(l) for l in sites)
    if len(sites) > 1:
        report["kind"] = f"multi_{kind}"
        report["setting"] = [Setting(k, f"multi_{kind}", magnitude, layer, component, positions, control=arm == "control",
                                     draw=draw).id for k, arm, draw in zip(report["cluster"], report["arm"], report["draw"])]
    ratio = report["edit_ratio"]
    report["edit_tolerance"] = float(edit_tolerance)
    report["edit_matched"] = (ratio >= 1 / edit_tolerance) & (ratio <= edit_tolerance)
    if model.masked:
        report["ppl_kind"] = likelihood_names(model).perplexity
    return report


def _report_inputs(
    model: Model, documents_df: pd.DataFrame, components: Sequence[ClusterComponents], kind: str, layer: int,
    clusters: Sequence[int] | None, component: str, probes: np.ndarray | None, edit_tolerance: float,
) -> tuple[int, pd.DataFrame, dict[int, ClusterComponents], list[int], np.ndarray | None]:
    """:func:`specificity_report`'s checks of its inputs; ``(layer, documents, components at the
    layer by cluster, clusters, probes)``."""
    missing = [c for c in _REQUIRED_COLUMNS if c not in documents_df.columns]
    require(not missing, f"documents_df lacks columns {missing}; it must be notebook 01's documents.parquet.")
    require(kind in KINDS, f"unknown perturbation kind {kind!r}; use one of {sorted(KINDS)}")
    layer = model.check_layer(int(layer))
    model.check_component(component)
    documents = documents_df.reset_index(drop=True)
    components = [as_components(c) for c in components]
    at_layer = {c.cluster: c for c in components if c.layer == layer}
    require(
        bool(at_layer),
        f"no cluster components at layer {layer}; stage 03 covered layers "
        f"{sorted({c.layer for c in components})}. Pick one of those or re-run notebooks 02/03.",
    )
    clusters = sorted(at_layer) if clusters is None else [int(k) for k in clusters]
    absent = [k for k in clusters if k not in at_layer]
    require(not absent, f"clusters {absent} have no components at layer {layer} (available: {sorted(at_layer)}).")
    if probes is not None:
        probes = np.asarray(probes, dtype=np.float64)
        require(
            probes.shape == (len(documents), model.d_model),
            f"probes must be pooled representations [{len(documents)}, {model.d_model}] in documents_df "
            f"row order, got shape {probes.shape}",
        )
    require(
        math.isfinite(edit_tolerance) and edit_tolerance >= 1,
        f"edit_tolerance must be a factor ≥ 1, got {edit_tolerance!r}",
    )
    return layer, documents, at_layer, clusters, probes


def intervention_sites(components: Sequence[ClusterComponents], layer: int, layers: Sequence[int] | None,
                       clusters: Sequence[int], check_layer: Callable[[int], int] | None = None,
                       component: str | None = None, names: tuple[str, str] = ("layer", "layers"),
                       why: str = "its perturbation gives the probe columns.") -> list[int]:
    """The layers a multi-layer perturbation acts at (sorted; ``[layer]`` for ``layers`` None), checked
    before anything runs: a list, ``layer`` among them, and every cluster's components present at each
    (of ``component``, where given). Stage 04's ``layers`` and stage 05's ``leace_layers`` both pass
    here; ``names`` are the two parameters' names in the messages, ``why`` says why ``layer`` must be
    among them, and ``check_layer`` (the model's) range-checks each layer."""
    if layers is None:
        return [layer]
    layer_name, layers_name = names
    require(not isinstance(layers, (str, int)) and len(layers) > 0,
            f"{layers_name} must be None or a list of layer indices (e.g. [9, 15, 21]), got {layers!r}")
    sites = sorted({check_layer(int(l)) if check_layer else int(l) for l in layers})
    require(layer in sites, f"{layer_name} {layer} must be one of {layers_name} {sites}: {why}")
    have = {(c.layer, c.cluster) for c in map(as_components, components) if component is None or c.component in (None, component)}
    missing = [(l, k) for l in sites for k in clusters if (l, k) not in have]
    require(not missing, f"no stage-03 components for (layer, cluster) {missing[:5]}; stage 03 covered layers "
                         f"{sorted({l for l, _ in have})}: pick {layers_name} among those or re-run notebooks 02/03 with them.")
    return sites


def _plan_cluster(
    model: Model, documents: pd.DataFrame, k: int, by_layer: dict[int, ClusterComponents], kind: str, layer: int,
    magnitude: float, component: str, positions: str, n_texts: int, seed: int, probes: np.ndarray | None,
    n_controls: int, spectra: dict[int, Spectrum | None],
) -> tuple:
    """Cluster ``k``'s texts (target and rest), its perturbation and control arms, each checked
    as interventions at every layer of ``by_layer``: ``(k, target, rest, arms, interventions)``
    (``arms`` holds each arm's perturbation at ``layer``), all before any forward pass."""
    target, rest = sample_heldout(documents, k, n_texts, seed)
    require(len(target) > 0, f"cluster {k} has no held-out documents (split == 'heldout'); check notebook 01's split.")
    require(len(rest) > 0, f"no held-out documents outside cluster {k}: the rest set is empty.")
    if probes is not None:
        in_train = documents.loc[documents["split"] == "train", "cluster"]
        require(
            0 < int((in_train == k).sum()) < len(in_train),
            f"cluster {k}: the probe columns need training documents inside and outside the cluster.",
        )
    by_layer = {l: _with_eraser(c, kind, k, documents, probes) if l == layer else c for l, c in by_layer.items()}
    per_layer = {}
    for l, cluster_components in by_layer.items():
        controls = matched_controls(kind, cluster_components, model.d_model, magnitude, seed, n_controls, spectra.get(l))
        per_layer[l] = {("perturbation", 0): build(kind, cluster_components, magnitude, seed)}
        per_layer[l] |= {("control", draw): control for draw, control in enumerate(controls)}
    arms = per_layer[layer]
    ivs = {arm: validate(model, [Intervention(per_layer[l][arm], l, component, positions) for l in per_layer])
           for arm in arms}
    return k, target, rest, arms, ivs



def _cluster_rows(
    model: Model, plan: tuple, documents: pd.DataFrame, kind: str, magnitude: float, layer: int, component: str,
    positions: str, seed: int, probes: np.ndarray | None, read: list[int], attend: list[int], with_attention: bool,
    batch_size: int, max_length: int, bar: Any, control_rounds: int | None, min_gap: float, min_ratio: float,
    n_sites: int,
) -> list[dict[str, Any]]:
    """The report's rows of one planned cluster: its forward passes (original and each distinct arm,
    round by round, see :func:`specificity_report`) and one row per arm run.

    The progress bar counted every round of the cluster (a batch of passes and one of edit
    norms per site, per round); the rounds it does not run come off the bar's total."""
    k, target, rest, arms, ivs = plan
    rows = []
    texts = list(target["text"]) + list(rest["text"])
    is_target = np.arange(len(texts)) < len(target)
    order = list(arms)  # the perturbation, then draws 0, 1, … in draw order
    n_draws = len(order) - 1
    per_round = n_draws if control_rounds is None else int(control_rounds)
    round_batches = (1 + n_sites) * math.ceil(len(texts) / batch_size)
    most_batches = round_batches * math.ceil(n_draws / per_round)
    originals: dict[int, Readout] = {}  # the unperturbed pass of each batch, run once for all rounds
    passes: dict[Any, dict[str, Any]] = {}
    edits: dict[tuple[str, int], float] = {}
    own_pass: dict[tuple[str, int], bool] = {}
    drawn, stopped, ran_batches = 0, "", 0
    while True:
        upto = min(n_draws, drawn + per_round)
        new = order[len(own_pass): 1 + upto]
        # Control draws that came out identical (size-matched controls with no freedom left) run once.
        same_as = first_identical({arm: ivs[arm] for arm in order[: 1 + upto]})
        fresh = {arm: ivs[arm] for arm in new if same_as[arm] == arm}
        if fresh:
            passes |= _compare_passes(model, texts, fresh, read, attend, batch_size, max_length, bar, originals)
            edits |= edit_norms(model, texts, fresh, layer, component, batch_size, max_length, bar)
        else:
            bar.update(round_batches)
        ran_batches += round_batches
        for arm in new:
            passes[arm], edits[arm], own_pass[arm] = passes[same_as[arm]], edits[same_as[arm]], same_as[arm] == arm
        drawn = upto
        pert = _perplexity_columns(passes["original"], passes[("perturbation", 0)], is_target)
        gaps = [_perplexity_columns(passes["original"], passes[("control", j)], is_target)["specificity_gap"]
                for j in range(drawn)]
        if drawn == n_draws:
            break
        stopped = draws_settled(pert["dlogppl_target"], pert["dlogppl_rest"], gaps, min_gap, min_ratio)
        if stopped:
            break
    if ran_batches < most_batches:
        bar.total -= most_batches - ran_batches
        bar.refresh()
    probe_before = _probe_score(probes, documents, k, None, seed)
    for (arm, draw), perturbation in list(arms.items())[: 1 + drawn]:
        setting = Setting(k, kind, magnitude, layer, component, positions, control=arm == "control", draw=draw)
        rows.append({
            "setting": setting.id,
            "cluster": k,
            "arm": setting.arm,
            "draw": draw,
            "kind": kind,
            "magnitude": float(magnitude),
            "layer": layer,
            "component": component,
            "positions": positions,
            "perturbation": perturbation.describe(),
            "matching": getattr(perturbation, "matching", None) or ("" if arm == "perturbation" else "unmatched"),
            "config": perturbation.to_json() if len(ivs[(arm, draw)]) == 1 else interventions_to_json(ivs[(arm, draw)]),
            "seed": int(seed),
            "n_target": int(len(target)),
            "n_rest": int(len(rest)),
            **_perplexity_columns(passes["original"], passes[(arm, draw)], is_target),
            **_cka_columns(passes["original"], passes[(arm, draw)], is_target, read),
            **_attention_columns(passes, (arm, draw), is_target, with_attention),
            "probe_bacc_before": probe_before,
            "probe_bacc_after": _probe_score(probes, documents, k, perturbation, seed),
            "edit_norm": edits[(arm, draw)],
            "edit_ratio": edits[(arm, draw)] / edits[("perturbation", 0)] if edits[("perturbation", 0)] > 0 else math.nan,
            "n_controls": n_draws,
            "n_draws_used": drawn,
            "draws_stopped": stopped,
            "own_pass": own_pass[(arm, draw)],
        })
    return rows


_SPECTRA: dict[tuple, Spectrum] = {}


def control_spectrum(
    model: Model,
    documents_df: pd.DataFrame,
    layer: int,
    component: str = "resid",
    n_texts: int = SPECTRUM_TEXTS,
    max_length: int = 128,
    batch_size: int = 8,
) -> Spectrum:
    """The token spectrum of ``(layer, component)`` that matched controls use.

    :func:`rephelpers.perturbations.controls.second_moment_spectrum` of the states of every real
    token (the first, attention-sink token included: the perturbations act on it too) of
    up to ``n_texts`` training documents (``split == "train"``; a fixed random sample,
    seed 0, when there are more), read with one trace per batch that stops at the site.
    The same documents give the same spectrum, so stages 04 and 05 draw identical
    controls; results are kept in memory for the session (one ``d × d`` matrix per layer).
    """
    require("split" in documents_df.columns and "text" in documents_df.columns,
            "control_spectrum needs notebook 01's documents (columns text, split).")
    layer = model.check_layer(int(layer))
    model.check_component(component)
    train = documents_df[documents_df["split"] == "train"]
    require(len(train) > 0, "control_spectrum: no training documents (split == 'train').")
    picked = np.sort(np.random.default_rng(0).permutation(len(train))[:n_texts])
    texts = [str(t) for t in train["text"].iloc[picked]]
    key = (model_fingerprint(model), stable_hash(texts), layer, component, int(max_length))
    if key not in _SPECTRA:
        states = []
        for batch, saved in site_states(model, texts, layer, component, batch_size, max_length):
            states.append(saved.float()[batch["attention_mask"].bool()].double().cpu())
        if len(_SPECTRA) >= 8:
            _SPECTRA.clear()
        _SPECTRA[key] = second_moment_spectrum(
            torch.cat(states), source=f"{component} L{layer}, {len(texts)} training texts"
        )
    return _SPECTRA[key]


def edit_norms(
    model: Model,
    texts: list[str],
    arms: Mapping[tuple[str, int], list[Intervention]],
    layer: int,
    component: str,
    batch_size: int,
    max_length: int,
    bar: Any = None,
) -> dict[tuple[str, int], float]:
    """Mean over real tokens of ``‖ĥ_t − h_t‖`` at ``(layer, component)``, per arm.

    ``h`` is the unperturbed state at the site (read with one trace per batch that stops
    there), ``ĥ`` each arm's perturbation of it, applied exactly as the forward pass does
    (:func:`rephelpers.interventions.intervene.perturb`). An arm whose interventions sit at
    several layers gets the sum over those layers of each layer's mean edit on the
    unperturbed states there (``layer`` is then not read).
    """
    sites = sorted({iv.layer for ivs in arms.values() for iv in ivs}) or [layer]
    total = {arm: 0.0 for arm in arms}
    for site in sites:
        count, part = 0, {arm: 0.0 for arm in arms}
        for batch, saved in site_states(model, texts, site, component, batch_size, max_length):
            h = saved.float()
            mask = batch["attention_mask"].bool()
            keys = batch_keys([iv for ivs in arms.values() for iv in ivs], batch)
            for arm, ivs in arms.items():
                edited = h
                for iv in ivs:
                    if iv.layer != site and len(sites) > 1:
                        continue
                    edited = perturb(edited, iv, None, keys) if keys is not None else perturb(edited, iv, None)
                part[arm] += float((edited - h).norm(dim=-1)[mask].sum())
            count += int(mask.sum())
            if bar is not None:
                bar.update(1)
        for arm in arms:
            total[arm] += part[arm] / max(count, 1)
    return total


def repeated_controls(report: pd.DataFrame) -> pd.DataFrame:
    """Per kind × magnitude × cluster: control draws requested and distinct (by their
    parameters). Fewer distinct than requested means the size-matched draw had little freedom
    (R_k holds the layer's largest dimensions), so the draws repeat the same few sets."""
    controls = report[report["arm"] == "control"]
    counts = controls.groupby(["kind", "magnitude", "cluster"]).agg(
        requested=("draw", "nunique"), distinct=("config", "nunique")).reset_index()
    return counts[counts["distinct"] < counts["requested"]].reset_index(drop=True)


def specificity_verdicts(
    report: pd.DataFrame, min_gap: float = MIN_GAP, min_ratio: float = MIN_RATIO
) -> pd.DataFrame:
    """Add ``specific`` and ``specificity_verdict`` to the perturbation rows of a report.

    With ``Δ_T`` and ``Δ_R`` the perturbation's Δlog-ppl on the cluster's and on the rest's
    held-out texts, and ``g = Δ_T − Δ_R``, the perturbation of a (cluster, setting) is:

    - ``"no measurable change"`` if ``|Δ_T| < min_gap`` and ``|Δ_R| < min_gap``;
    - ``"specific"`` if ``g ≥ min_gap``, ``Δ_T ≥ min_ratio · max(Δ_R, 0)`` and ``g`` exceeds
      the gap of every control draw of that setting;
    - ``"non-specific damage"`` if it raises log-perplexity on the rest by ``min_gap`` or
      more without being specific (it hurts every text alike);
    - ``"not beyond controls"`` otherwise (a gap, but random edits of its size do as much).

    Control rows get ``specific = NaN``. ``specificity_ratio`` is blanked where both
    changes are below ``min_gap``: a ratio of two near-zero changes is noise, not specificity.
    """
    out = report.copy()
    keys = [c for c in ("cluster", "kind", "magnitude", "layer", "layers", "component", "positions") if c in out.columns]
    small = (out["dlogppl_target"].abs() < min_gap) & (out["dlogppl_rest"].abs() < min_gap)
    out.loc[small, "specificity_ratio"] = math.nan
    out["specific"] = None
    out["specificity_verdict"] = ""
    for _, group in out.groupby(keys, dropna=False):
        pert = group[group["arm"] == "perturbation"]
        controls = group[group["arm"] == "control"]
        best_control_gap = controls["specificity_gap"].max() if len(controls) else -math.inf
        for index, row in pert.iterrows():
            gap, target, rest = row["specificity_gap"], row["dlogppl_target"], row["dlogppl_rest"]
            if abs(target) < min_gap and abs(rest) < min_gap:
                verdict, specific = "no measurable change", False
            elif own_specific(target, rest, min_gap, min_ratio) and gap > best_control_gap:
                # Drawn in rounds, a cluster stops early only once its verdict cannot be "specific"
                # under the thresholds it stopped with; other thresholds here could make it so.
                require(all_drawn(row),
                        f"cluster {row['cluster']}: its control draws stopped after {row.get('n_draws_used')} of "
                        f"{row.get('n_controls')} ({row.get('draws_stopped')}) under other min_gap/min_ratio than "
                        f"these ({min_gap}, {min_ratio}): pass specificity_report and specificity_verdicts the same "
                        "thresholds, or draw all controls (control_rounds=None).")
                verdict, specific = "specific", True
            elif rest >= min_gap:
                verdict, specific = "non-specific damage", False
            else:
                verdict, specific = "not beyond controls", False
            out.at[index, "specific"] = specific
            out.at[index, "specificity_verdict"] = verdict
    return out


def probe_activations(
    run_dir: RunDir | str, documents_df: pd.DataFrame, layer: int, component: str = "resid"
) -> np.ndarray | None:
    """Stage 02's pooled activations at ``layer`` in ``documents_df`` row order, or None.

    None (with the reason printed) when stage 02 did not extract that layer or component,
    so the specificity report simply leaves its probe columns empty.
    """
    ids, _, meta = load_activations(run_dir, layers=[])
    if int(layer) not in meta["layers"] or meta["component"] != component:
        print(
            f"probe columns skipped: stage 02 extracted {meta['component']} at layers {meta['layers']}, "
            f"not {component} at layer {layer}."
        )
        return None
    _, acts, _ = load_activations(run_dir, layers=[int(layer)])
    row_of = {doc_id: i for i, doc_id in enumerate(ids)}
    unknown = [d for d in documents_df["id"] if d not in row_of]
    require(not unknown, f"documents {unknown[:3]} have no activations: re-run notebook 02 on this corpus.")
    return acts[int(layer)][[row_of[d] for d in documents_df["id"]]]


def _with_eraser(
    components: ClusterComponents, kind: str, cluster: int, documents: pd.DataFrame, probes: np.ndarray | None
) -> ClusterComponents:
    """``components``, with a LEACE eraser of "is cluster k" fitted on the training rows if they lack one.

    Stage 03 fits it (``with_leace=True``, the default); this is for components built without.
    """
    if kind != "leace" or components.leace is not None:
        return components
    require(
        probes is not None,
        f"leace: the components of cluster {cluster} have no fitted eraser; pass probes= (stage 02 "
        "activations at this layer) so that one is fitted on the training documents.",
    )
    train = (documents["split"] == "train").to_numpy()
    is_k = (documents["cluster"] == cluster).to_numpy()
    return replace(components, leace=fit_leace(probes[train], is_k[train]))


def _compare_passes(
    model: Model,
    texts: list[str],
    arms: Mapping[tuple[str, int], list[Intervention]],
    read: list[int],
    attend: list[int],
    batch_size: int,
    max_length: int,
    bar: Any,
    originals: dict[int, Readout] | None = None,
) -> dict[Any, dict[str, Any]]:
    """The original pass and every ``(arm, draw)`` pass over ``texts``, batch by batch.

    Batches are identical across passes, so the original and perturbed numbers differ
    only by the perturbation (not by padding); attention patterns are reduced to a
    per-text JS divergence as soon as both passes of a batch exist. ``originals`` (batch
    start → unperturbed readout) keeps the original pass of each batch for later calls
    with more arms (control rounds), which then skip it.
    """
    names = ("original", *arms)
    out: dict[Any, dict[str, Any]] = {
        name: {"nll": np.zeros(len(texts)), "count": np.zeros(len(texts)),
               "pooled": {l: np.zeros((len(texts), model.d_model)) for l in read},
               "js": np.zeros(len(texts))}
        for name in names
    }
    for start in range(0, len(texts), batch_size):
        idx = np.arange(start, min(start + batch_size, len(texts)))
        batch = model.encode([texts[i] for i in idx], max_length=max_length)
        if originals is None:
            original, perturbed_by_arm = forward_readouts(model, batch, arms, read, attend)
        else:
            original, perturbed_by_arm = forward_readouts(model, batch, arms, read, attend, original=originals.get(start),
                                                          keep_original=True)
            originals[start] = original
        _store(out["original"], idx, original)
        for arm, perturbed in perturbed_by_arm.items():
            _store(out[arm], idx, perturbed)
            if attend:
                js = [attention_js(original.attention[l], perturbed.attention[l], batch["attention_mask"]) for l in attend]
                out[arm]["js"][idx] = torch.stack(js).mean(0).cpu().numpy()
        bar.update(1)
    return out


def _store(into: dict[str, Any], idx: np.ndarray, readout: Readout) -> None:
    into["nll"][idx] = readout.nll.cpu().numpy()
    into["count"][idx] = readout.count.cpu().numpy()
    for l, pooled in readout.pooled.items():
        into["pooled"][l][idx] = pooled.cpu().numpy()


def _perplexity_columns(before: dict[str, Any], after: dict[str, Any], is_target: np.ndarray) -> dict[str, float]:
    cols: dict[str, float] = {}
    for name, rows in (("target", is_target), ("rest", ~is_target)):
        ppl_before = perplexity(before["nll"][rows], before["count"][rows])
        ppl_after = perplexity(after["nll"][rows], after["count"][rows])
        cols[f"ppl_{name}_before"] = ppl_before
        cols[f"ppl_{name}_after"] = ppl_after
        cols[f"dlogppl_{name}"] = math.log(ppl_after) - math.log(ppl_before)
    gap = cols["dlogppl_target"] - cols["dlogppl_rest"]
    ratio = cols["dlogppl_target"] / cols["dlogppl_rest"] if abs(cols["dlogppl_rest"]) >= 1e-9 else math.nan
    return {**cols, "specificity_gap": gap, "specificity_ratio": ratio}


def _cka_columns(
    before: dict[str, Any], after: dict[str, Any], is_target: np.ndarray, read: list[int]
) -> dict[str, float]:
    cols: dict[str, float] = {}
    for name, rows in (("target", is_target), ("rest", ~is_target)):
        # With two inputs the centred configurations are collinear and CKA is 1 whatever
        # the perturbation: report it from three texts on.
        per_layer = [
            linear_cka(before["pooled"][l][rows], after["pooled"][l][rows]) if rows.sum() >= 3 else math.nan
            for l in read
        ]
        for l, value in zip(read, per_layer):
            cols[f"cka_{name}_L{l:02d}"] = value
        cols[f"cka_{name}"] = float(np.mean(per_layer)) if per_layer else math.nan
    return cols


def _attention_columns(
    passes: dict[Any, dict[str, Any]], arm: tuple[str, int], is_target: np.ndarray, with_attention: bool
) -> dict[str, float]:
    if not with_attention:
        return {"attn_js_target": math.nan, "attn_js_rest": math.nan}
    js = passes[arm]["js"]
    return {"attn_js_target": float(js[is_target].mean()), "attn_js_rest": float(js[~is_target].mean())}


def _probe_score(
    probes: np.ndarray | None, documents: pd.DataFrame, cluster: int, perturbation: Perturbation | None, seed: int
) -> float:
    if probes is None:
        return math.nan
    X = probes
    if perturbation is not None:
        X = perturbation.apply(torch.as_tensor(probes)).numpy()
    train = (documents["split"] == "train").to_numpy()
    heldout = (documents["split"] == "heldout").to_numpy()
    y = (documents["cluster"] == cluster).to_numpy()
    return probe_balanced_accuracy(X[train], y[train], X[heldout], y[heldout], seed)


# -- tables and charts --------------------------------------------------------------------
METRICS = {
    "dlogppl": "Δ log perplexity",
    "cka": "CKA (original, perturbed)",
    "attn_js": "attention JS (bits)",
}


def metric_labels(report: pd.DataFrame) -> dict[str, str]:
    """:data:`METRICS`, with "perplexity" read as the report's ``ppl_kind`` (a masked LM's pseudo-perplexity)."""
    kind = str(report["ppl_kind"].iloc[0]) if "ppl_kind" in report.columns and len(report) else "perplexity"
    return {key: label.replace("perplexity", kind) for key, label in METRICS.items()}


def specificity_long(report: pd.DataFrame) -> pd.DataFrame:
    """``report`` in long form: one row per (cluster, arm, draw, metric, set ∈ {target, rest}).

    Metrics without values (attention JS when not measured) are dropped; ``metric`` holds
    :func:`metric_labels`.
    """
    frames = []
    for key, label in metric_labels(report).items():
        for name in SETS:
            column = f"{key}_{name}"
            frames.append(report[["cluster", "arm", "draw", "kind", "magnitude", "layer"]].assign(
                metric=label, set=name, value=report[column]
            ))
    long = pd.concat(frames, ignore_index=True)
    return long.dropna(subset=["value"])


__all__ = [
    "SPECIFICITY",
    "sample_heldout",
    "sample_texts",
    "readout_layers",
    "probe_balanced_accuracy",
    "probe_activations",
    "specificity_report",
    "specificity_verdicts",
    "draws_settled",
    "control_arms_run",
    "draws_used",
    "replay_rounds",
    "edit_norms",
    "control_spectrum",
    "EDIT_TOLERANCE",
    "specificity_long",
    "metric_labels",
]
