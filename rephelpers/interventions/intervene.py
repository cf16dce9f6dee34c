"""Apply perturbations inside the forward pass, through nnsight.

An :class:`Intervention` places a :class:`~rephelpers.interventions.edits.Perturbation` at a
``(layer, component)`` site and a token scope. A list of interventions applies in
order; sites are visited in the order the forward pass reaches them (nnsight requires
it), and several perturbations at one site compose left to right.

``run_logits`` and ``sequence_nll`` are the two primitives the later stages build on:
logits of a perturbed forward pass, and per-text negative log-likelihood (perplexity).
``forward_readout`` adds what the specificity checks compare between an original and a
perturbed pass of one batch: per-text NLL, pooled hidden states at chosen layers and
attention patterns.

For a masked LM (``model.masked``) the same functions return the *pseudo*-negative
log-likelihood instead (Salazar et al., 2020): ``PLL(x) = Σ_t log p(x_t | x_{\\t})`` over the
real tokens (not [CLS], [SEP] or padding), each masked in turn in its own copy of the text
with the perturbation applied in every copy (:func:`pseudo_nll`), and the
pseudo-perplexity of a set is ``exp(−Σ PLL / Σ tokens)`` (:func:`perplexity`). Stages 03 and
04 call one function whatever the model is.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Iterator, Mapping, Sequence, TypeVar

import nnsight
import numpy as np
import torch

from ..errors import require
from ..progress import progress_bar
from ..representations.activations import last_real_index, pool
from ..representations.models import Model, output_tensor, replace_output
from .edits import Perturbation, perturbation_from_dict
from .tokenkeys import token_keys

K = TypeVar("K", bound=Hashable)

POSITION_SCOPES = ("all", "last")
_COMPONENT_ORDER = {"attn": 0, "mlp": 1, "resid": 2}


@dataclass(frozen=True)
class Intervention:
    """``perturbation`` applied at decoder ``layer``'s ``component``, on ``positions``.

    ``positions="all"`` edits every token; ``"last"`` edits only each row's last real
    token (the one whose next-token prediction is read off).
    """

    perturbation: Perturbation
    layer: int
    component: str = "resid"
    positions: str = "all"

    def __post_init__(self) -> None:
        require(
            self.positions in POSITION_SCOPES,
            f"positions must be one of {POSITION_SCOPES}, got {self.positions!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "perturbation": self.perturbation.to_dict(),
            "layer": self.layer,
            "component": self.component,
            "positions": self.positions,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Intervention":
        return Intervention(
            perturbation=perturbation_from_dict(data["perturbation"]),
            layer=int(data["layer"]),
            component=data.get("component", "resid"),
            positions=data.get("positions", "all"),
        )

    def describe(self) -> str:
        return f"L{self.layer}.{self.component}[{self.positions}]:{self.perturbation.describe()}"


def interventions_to_json(interventions: Sequence[Intervention]) -> str:
    return json.dumps([iv.to_dict() for iv in interventions], sort_keys=True)


def first_identical(configs: Mapping[K, Sequence[Intervention]]) -> dict[K, K]:
    """Each key of ``configs`` mapped to the first key whose interventions are identical to its
    own (itself when none before it is), so identical configs are computed once and shared."""
    first: dict[str, K] = {}
    return {key: first.setdefault(interventions_to_json(ivs), key) for key, ivs in configs.items()}


def interventions_from_json(text: str) -> list[Intervention]:
    return [Intervention.from_dict(d) for d in json.loads(text)]


def validate(model: Model, interventions: Sequence[Intervention]) -> list[Intervention]:
    """Check every site and perturbation against ``model`` before any compute starts.

    Returns the interventions with negative layers resolved, sorted into forward order.
    """
    resolved = []
    for iv in interventions:
        require(
            not (model.masked and iv.positions == "last"),
            f"positions='last' edits the token whose next-token prediction is read; {model.name} is a masked LM, "
            "which predicts no next token (it is scored by masking every token in turn): use positions='all'.",
        )
        layer = model.check_layer(iv.layer)
        model.check_component(iv.component)
        iv.perturbation.check(model.d_model)
        resolved.append(Intervention(iv.perturbation, layer, iv.component, iv.positions))
    # Stable sort: forward order across sites, user order within a site.
    return sorted(resolved, key=lambda iv: (iv.layer, _COMPONENT_ORDER[iv.component]))


def needs_keys(interventions: Sequence[Intervention]) -> bool:
    """Whether any perturbation draws per-token randomness and so needs token keys."""
    return any(getattr(iv.perturbation, "keyed", False) for iv in interventions)


def batch_keys(interventions: Sequence[Intervention], batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Token keys ``[b, s]`` of ``batch`` (:func:`rephelpers.interventions.tokenkeys.token_keys`; its
    attention mask marks real tokens), or ``None`` when no perturbation needs them."""
    if not needs_keys(interventions):
        return None
    return token_keys(batch["input_ids"], batch.get("attention_mask")).keys


def _apply(perturbation: Perturbation, h: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    # Deterministic perturbations take no keys; their call stays exactly as it was.
    if keys is not None and getattr(perturbation, "keyed", False):
        return perturbation.apply(h, keys)
    return perturbation.apply(h)


def perturb(
    h: torch.Tensor, iv: Intervention, last_index: torch.Tensor | None, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """``iv``'s perturbation applied to ``h [b, s, d]`` on its token scope (``last_index``: each
    row's last real token for right-padded batches; default: the final position). ``keys
    [b, s]``: the tokens' keys, for perturbations that draw per-token noise."""
    if iv.positions == "all":
        return _apply(iv.perturbation, h, keys)
    rows = torch.arange(h.shape[0], device=h.device)
    cols = (
        torch.full_like(rows, h.shape[1] - 1)
        if last_index is None
        else last_index.to(h.device)
    )
    out = h.clone()
    out[rows, cols] = _apply(iv.perturbation, h[rows, cols], None if keys is None else keys.to(h.device)[rows, cols])
    return out


def _sites(interventions: Sequence[Intervention]) -> dict[tuple[int, str], list[Intervention]]:
    groups: dict[tuple[int, str], list[Intervention]] = {}
    for iv in interventions:
        groups.setdefault((iv.layer, iv.component), []).append(iv)
    return groups


def forward_order(site: tuple[int, str]) -> tuple[int, int]:
    """Sort key of a ``(layer, component)`` site in the order the forward pass reaches it."""
    return site[0], _COMPONENT_ORDER[site[1]]


def _edit_site(
    envoy: Any, group: Sequence[Intervention], last_index: torch.Tensor | None, keys: torch.Tensor | None = None
) -> tuple[Any, torch.Tensor]:
    """Apply ``group`` at one site; return the site's original output and the edited state."""
    out = envoy.output
    h = output_tensor(out)
    for iv in group:
        h = perturb(h, iv, last_index, keys)
    envoy.output = replace_output(out, h)
    return out, h


Placed = list[tuple[Any, list[Intervention]]]


def place(model: Model, interventions: Sequence[Intervention]) -> Placed:
    """``interventions`` (already :func:`validate`-d) grouped by site in forward order, each
    group with its site's envoy: what :func:`apply_placed` edits inside a trace. Resolved
    before the trace, so the traced block names envoys only (a remote run ships the block
    with everything it references)."""
    return [(model.envoy(*site), group)
            for site, group in sorted(_sites(interventions).items(), key=lambda item: forward_order(item[0]))]


def apply_placed(placed: Placed, last_index: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> None:
    """Apply :func:`place`'s groups inside an open trace.

    ``last_index`` gives each row's last real token for right-padded batches; with the
    package's left padding it is the final position and may be omitted. ``keys [b, s]``
    (:func:`batch_keys`) are the tokens' keys for noise; without them noise is keyed by
    row order and so depends on the batch.
    """
    for envoy, group in placed:
        _edit_site(envoy, group, last_index, keys)


def apply_in_trace(
    model: Model,
    interventions: Sequence[Intervention],
    last_index: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> None:
    """:func:`apply_placed` of :func:`place` inside an open trace of a model loaded here (the
    block then names ``model``, which a remote run would have to ship)."""
    apply_placed(place(model, interventions), last_index, keys)


def run_logits(
    model: Model,
    batch: dict[str, torch.Tensor],
    interventions: Sequence[Intervention] = (),
    last_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of one forward pass with ``interventions`` applied."""
    ivs = validate(model, interventions)
    keys = batch_keys(ivs, batch)
    placed, nn = place(model, ivs), model.nn
    with torch.inference_mode():
        with model.trace(dict(batch)):
            apply_placed(placed, last_index, keys)
            logits = nn.output.logits.save()
    return logits


def sequence_nll(
    model: Model,
    texts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = True,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-text summed next-token negative log-likelihood and token count.

    ``NLL(x) = −Σ_{t=1}^{T−1} log p(x_{t+1} | x_{≤t})`` over the real (non-pad) tokens of
    the first ``max_length`` tokens. Perplexity of a set is ``exp(Σ NLL / Σ count)``.

    A masked LM gives the pseudo-NLL ``−PLL(x) = −Σ_t log p(x_t | x_{\\t})`` over its real
    non-special tokens and their number (:func:`pseudo_nll`; ``batch_size`` masked copies
    per forward pass), so the same formula gives the pseudo-perplexity.
    """
    require(len(texts) > 0, "sequence_nll: no texts given (is the cluster empty?)")
    ivs = validate(model, interventions)
    placed, nn = place(model, ivs), model.nn
    nll = np.zeros(len(texts))
    count = np.zeros(len(texts), dtype=np.int64)
    # Sorting by length keeps padding (wasted compute) small; results go back in order.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=desc or likelihood_names(model).perplexity, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = model.encode([texts[j] for j in idx], max_length=max_length)
        keys = batch_keys(ivs, batch)
        if model.masked:
            batch_nll, batch_count = pseudo_nll(model, batch, ivs, keys, copies_per_pass=batch_size)
        else:
            with torch.inference_mode():
                with model.trace(dict(batch)):
                    apply_placed(placed, keys=keys)
                    logits = nn.output.logits.save()
            batch_nll, batch_count = token_nll(logits, batch)
        nll[idx] = batch_nll.cpu().numpy()
        count[idx] = batch_count.cpu().numpy()
    return nll, count


def token_nll(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token NLL and the number of predicted real tokens (a causal LM's;
    a masked LM's counterpart is :func:`pseudo_nll`).

    ``NLL = −Σ_t m_t m_{t+1} log p(x_{t+1} | x_{≤t})`` with ``m`` the attention mask.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["input_ids"][:, 1:]
    mask = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask
    return nll.sum(-1), mask.sum(-1)


def pll_targets(model: Model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[b, s]`` bool: the tokens pseudo-log-likelihood scores, the real tokens other than the
    tokenizer's special ones ([CLS], [SEP], padding, [MASK]; an [UNK] is a real token)."""
    tokenizer = model.tokenizer
    special = sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})
    ids = batch["input_ids"]
    return batch["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(special, dtype=ids.dtype, device=ids.device))


def masked_log_probs(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: torch.Tensor,
    interventions: Sequence[Intervention] = (),
    keys: torch.Tensor | None = None,
    copies_per_pass: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(x_t | x_{\\t})`` of a masked LM at every ``targets [b, s]`` position, and whether
    ``x_t`` is the most likely token there.

    For each target (row i, position t) a copy of row i with ``x_t`` replaced by the mask
    token runs through the model, ``interventions`` applied to every token of the copy (the
    mask included), and the log-softmax of the logits at t is read at ``x_t``. Copies run
    ``copies_per_pass`` at a time, cut to the longest real row among them. ``keys [b, s]``
    are the unmasked rows' token keys (:func:`batch_keys`), so a keyed perturbation (noise)
    draws the same values at a position in every copy of its text.

    Returns ``(logp [b, s], greedy [b, s])``: 0 and True outside ``targets``.
    """
    require(model.masked, f"masked_log_probs: {model.name} is a causal LM; score it with token_nll.")
    require(copies_per_pass >= 1, f"copies_per_pass must be ≥ 1, got {copies_per_pass}")
    ivs = validate(model, interventions)
    placed, nn = place(model, ivs), model.nn
    rows, cols = targets.nonzero(as_tuple=True)
    logp = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    greedy = torch.ones(targets.shape, dtype=torch.bool, device=input_ids.device)
    for start in range(0, len(rows), copies_per_pass):
        r, c = rows[start : start + copies_per_pass], cols[start : start + copies_per_pass]
        # Beyond the last real token of these rows there is padding only: leave it out.
        width = int(last_real_index(attention_mask[r]).max()) + 1
        ids = input_ids[r, :width].clone()
        picks = torch.arange(len(r), device=ids.device)
        ids[picks, c] = model.tokenizer.mask_token_id
        copy = {"input_ids": ids, "attention_mask": attention_mask[r, :width]}
        copy_keys = None if keys is None else keys[r, :width]
        with torch.inference_mode(), model.trace(copy):
            apply_placed(placed, None, copy_keys)
            picked = nn.output.logits[picks, c].save()
        scores = torch.log_softmax(picked.float(), dim=-1)
        target = input_ids[r, c]
        logp[r, c] = scores.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        greedy[r, c] = scores.argmax(-1) == target
    return logp, greedy


def pseudo_nll(
    model: Model,
    batch: Mapping[str, torch.Tensor],
    interventions: Sequence[Intervention] = (),
    keys: torch.Tensor | None = None,
    copies_per_pass: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row pseudo-NLL ``−PLL(x) = −Σ_{t∈T(x)} log p(x_t | x_{\\t})`` of a masked LM and ``|T(x)|``.

    ``T(x)``: the row's real tokens other than special ones (:func:`pll_targets`), each masked
    in turn (:func:`masked_log_probs`, Salazar et al. 2020). ``exp(Σ −PLL / Σ |T|)`` over a set
    of texts is its pseudo-perplexity (:func:`perplexity`).
    """
    targets = pll_targets(model, batch)
    logp, _ = masked_log_probs(model, batch["input_ids"], batch["attention_mask"], targets, interventions, keys,
                               copies_per_pass)
    return -logp.sum(-1), targets.sum(-1)


@dataclass(frozen=True)
class LikelihoodNames:
    """What a model's likelihood numbers are called: a causal LM's next-token ones, or a
    masked LM's pseudo-likelihoods."""

    perplexity: str
    nll: str
    loglik: str


def likelihood_names(model: Model) -> LikelihoodNames:
    """``perplexity``/``NLL``/``log-likelihood``, or their ``pseudo-`` forms for a masked LM."""
    if model.masked:
        return LikelihoodNames("pseudo-perplexity", "pseudo-NLL", "pseudo-log-likelihood")
    return LikelihoodNames("perplexity", "NLL", "log-likelihood")


@dataclass
class Readout:
    """What one (possibly perturbed) forward pass of a batch leaves behind.

    ``nll``/``count``: per-row summed next-token NLL and predicted-token count (see
    :func:`token_nll`; a masked LM's pseudo-NLL and scored-token count, :func:`pseudo_nll`);
    ``pooled[l]``: the residual stream after layer ``l`` (perturbed, if an intervention sits
    there), mean-pooled over real tokens, ``[b, d]``;
    ``attention[l]``: layer ``l``'s attention probabilities ``[b, heads, query, key]``.
    """

    nll: torch.Tensor
    count: torch.Tensor
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    state: Any = None
    """The output of the layer ``forward_readout(keep_state=...)`` names, as the pass left it."""
    state_layer: int | None = None
    """The layer whose output ``state`` is (None without a kept state)."""


@contextmanager
def eager_attention(model: Model) -> Iterator[None]:
    """Run the block with eager attention, which forms the attention probabilities that
    fused kernels (sdpa, flash) never materialise; the previous implementation is restored.

    On real (non-padding) tokens eager and fused attention agree to float rounding.
    """
    current = getattr(model.hf.config, "_attn_implementation", None)
    if current == "eager":
        yield
        return
    require(
        hasattr(model.hf, "set_attn_implementation"),
        f"{model.name} cannot switch attention implementation at run time: load it with "
        f"load_model({model.name!r}, attn_implementation='eager') to read attention patterns.",
    )
    model.hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.hf.set_attn_implementation(current or "sdpa")


def forward_readout(
    model: Model,
    batch: dict[str, torch.Tensor],
    interventions: Sequence[Intervention] = (),
    read_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
    keep_state: int | None = None,
    resume: tuple[int, Any] | None = None,
) -> Readout:
    """One forward pass of ``batch`` with ``interventions``, read out at the given layers.

    Attention probabilities are read under :func:`eager_attention`. For a masked LM the
    pass over the unmasked batch gives the pooled states and attention (it stops after the
    last site it reads), and the NLL is the pseudo-NLL of :func:`pseudo_nll` (as many masked
    copies per pass as the batch has rows).

    ``keep_state=l`` also returns layer ``l``'s output (``Readout.state``); ``resume=(L, state)``
    starts the pass at layer ``L`` from ``state``, the output of layer ``L − 1`` that an
    earlier pass of the same batch kept, skipping the layers below ``L`` (so nothing below
    ``L`` may be read or edited): :func:`forward_readouts` shares them that way.
    """
    ivs = validate(model, interventions)
    read = {model.check_layer(int(l)) for l in read_layers}
    attend = {model.check_layer(int(l)) for l in attention_layers}
    require(not (attend and model.remote),
            f"{model.name} runs remotely, where attention patterns cannot be read (they need eager attention "
            "on the server's model): measure without them (with_attention=False).")
    edits = _sites(ivs)
    keep = None if keep_state is None else model.check_layer(keep_state)
    sites = set(edits) | {(l, "resid") for l in read} | {(l, "attn") for l in attend}
    sites |= set() if keep is None else {(keep, "resid")}
    start = 0 if resume is None else resume[0]
    require(all(layer >= start for layer, _ in sites),
            f"forward_readout resumes at layer {start}, below which it can neither read nor edit ({sorted(sites)}).")
    skipped = [model.envoy(layer) for layer in range(start)]
    replay = None if resume is None else resume[1]
    # Each visited site, in forward order: its envoy, its edits, and what is read or kept there
    # (the block names no model).
    visits = [(site, model.envoy(*site), edits.get(site, []), site[1] == "resid" and site[0] in read,
               site[1] == "attn" and site[0] in attend, site == (keep, "resid"))
              for site in sorted(sites, key=forward_order)]
    mask = batch["attention_mask"]
    keys = batch_keys(ivs, batch)
    masked, nn = model.masked, model.nn
    if masked and not read and not attend:
        nll, count = pseudo_nll(model, batch, ivs, keys, copies_per_pass=len(mask))
        return Readout(nll=nll, count=count)
    state = None
    with eager_attention(model) if attend else nullcontext(), torch.inference_mode():
        with model.trace(dict(batch)) as tracer:
            for envoy in skipped:
                envoy.skip(replay)
            # Saved as whole dicts made here: a remote run sends back only what the block saves.
            pooled = nnsight.save({})
            attention = nnsight.save({})
            for (layer, _), envoy, group, pooled_here, attention_here, keep_here in visits:
                if group:
                    out, h = _edit_site(envoy, group, None, keys)
                else:
                    out = envoy.output
                    h = output_tensor(out)
                if keep_here:
                    state = nnsight.save(replace_output(out, h))
                if pooled_here:
                    pooled[layer] = pool(h.float(), mask, "mean")
                if attention_here:
                    attention[layer] = out[1]
            if masked:
                tracer.stop()  # the unmasked pass gives no NLL: nothing after the last read is needed
            logits = nn.output.logits.save()
    if model.masked:
        nll, count = pseudo_nll(model, batch, ivs, keys, copies_per_pass=len(mask))
    else:
        nll, count = token_nll(logits, batch)
    return Readout(nll=nll, count=count, pooled=pooled, attention=attention, state=state,
                   state_layer=None if state is None else keep)


def forward_readouts(
    model: Model,
    batch: dict[str, torch.Tensor],
    arms: Mapping[K, Sequence[Intervention]],
    read_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
    original: Readout | None = None,
    keep_original: bool = False,
) -> tuple[Readout, dict[K, Readout]]:
    """:func:`forward_readout` of ``batch`` unperturbed, and under each arm's interventions.

    No arm edits the layers below the lowest intervened layer ``L`` (:func:`split_layer`), so
    they run once: the unperturbed pass keeps the state entering ``L`` and each arm resumes
    from it, running only layers ``L…`` (the same computation on the same batch, so the
    same numbers as a full pass per arm; an arm's readouts below ``L`` are the unperturbed
    ones). Attention patterns (eager attention), masked LMs (pseudo-likelihood passes) and
    remote models (a request keeps no state) take a full pass per arm.

    Arms may come in several calls over the same batch (stage 04 draws its controls in
    rounds): ``keep_original=True`` leaves the kept state on the returned unperturbed readout,
    and passing that readout back as ``original`` (same batch, read and attention layers,
    arms with the same lowest layer) skips the unperturbed pass, so each round pays only
    for its arms.
    """
    valid = {arm: validate(model, ivs) for arm, ivs in arms.items()}
    split = split_layer(valid, model.n_layers)
    shared = not attention_layers and not model.masked and not model.remote and 0 < split < model.n_layers
    read = sorted({model.check_layer(int(l)) for l in read_layers})
    if original is None:
        original = forward_readout(model, batch, (), read, attention_layers, keep_state=split - 1 if shared else None)
    else:
        require(not shared or (original.state is not None and original.state_layer == split - 1),
                f"forward_readouts: the unperturbed readout passed back kept layer {original.state_layer}'s state, "
                f"but these arms resume at layer {split}; pass original=None.")
        keep_original = True  # a readout passed in belongs to the caller, who may pass it again
    if not shared:
        return original, {arm: forward_readout(model, batch, ivs, read, attention_layers) for arm, ivs in valid.items()}
    out = {}
    for arm, ivs in valid.items():
        readout = forward_readout(model, batch, ivs, [l for l in read if l >= split], resume=(split, original.state))
        readout.pooled = {l: readout.pooled[l] if l >= split else original.pooled[l] for l in read}
        out[arm] = readout
    if not keep_original:
        original.state = None  # not needed past here; it is a whole layer's states
    return original, out


def site_states(
    model: Model, texts: Sequence[str], layer: int, component: str = "resid", batch_size: int = 8, max_length: int = 128,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Each batch of ``texts`` (in order, ``batch_size`` at a time, as :meth:`Model.encode`
    gives it) and the unperturbed output ``h [b, s, d]`` of ``(layer, component)`` on it, read
    with one trace per batch that stops at the site."""
    site = model.envoy(layer, component)
    for start in range(0, len(texts), batch_size):
        batch = model.encode(list(texts[start : start + batch_size]), max_length=max_length)
        with torch.inference_mode(), model.trace(dict(batch)) as tracer:
            saved = output_tensor(site.output).save()
            tracer.stop()
        yield batch, saved


def split_layer(configs: Mapping[Any, Sequence[Intervention]], n_layers: int) -> int:
    """The lowest layer any config intervenes at (``n_layers`` when none does)."""
    return min((iv.layer for ivs in configs.values() for iv in ivs), default=n_layers)


def perplexity(nll: Iterable[float], count: Iterable[int]) -> float:
    """``exp(Σ NLL / Σ tokens)``: corpus-level perplexity from :func:`sequence_nll` output (a masked
    LM's pseudo-perplexity ``exp(−Σ PLL / Σ tokens)`` from its pseudo-NLL)."""
    total = float(np.sum(count))
    require(total > 0, "perplexity: no predicted tokens (texts too short?)")
    return math.exp(float(np.sum(nll)) / total)
