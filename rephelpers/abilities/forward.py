"""The forward-pass engine of the perturbed model: right/left padding helpers, greedy decoding
with the KV cache, and the shared-prefix sweep.

:func:`greedy_generate` decodes a batch greedily inside one nnsight trace per step that
applies a list of :class:`~rephelpers.interventions.intervene.Intervention` (prompt and every new token
alike). :func:`sweep_loglikelihood` scores many configs at once: per batch, the hidden
state entering the lowest intervention layer ``L`` (:func:`split_layer`) is computed once
and every config runs only layers ``L…`` on it, several configs stacked in one batch; a
multiple-choice item's context runs once, its choices as branches of one packed row (a
4-D attention mask lets each branch see the context and itself only). Nothing here knows
lm-eval: :mod:`rephelpers.abilities.lm_eval_model` puts these behind lm-eval's model interface.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import nnsight
import torch

from ..errors import require
from ..interventions.intervene import (
    Intervention, apply_in_trace, first_identical, forward_order, needs_keys, perturb, split_layer, validate,
)
from ..interventions.tokenkeys import TokenKeys, token_keys
from ..progress import progress_bar
from ..representations.models import Model, output_tensor, replace_output


# lm-eval pads log-likelihood batches on the right with token id 0 (`pad_and_concat`).
_LM_EVAL_PAD_ID = 0


def right_padded_last_index(input_ids: torch.Tensor, pad_id: int = _LM_EVAL_PAD_ID) -> torch.Tensor:
    """Index of each row's last real token in a right-padded batch.

    lm-eval passes no attention mask to ``_model_call``; the real length of a row is the
    position after its last non-pad token. A row whose real input ends in the pad id
    itself (``<|endoftext|>`` for SmolLM2, never produced by text) would be read short.
    """
    real = input_ids != pad_id
    from_end = torch.flip(real, dims=[1]).int().argmax(dim=1)
    return (input_ids.shape[1] - 1 - from_end).clamp(min=0)


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: ``p_t = (Σ_{s≤t} m_s) − 1`` (0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _GreedyRows:
    """The bookkeeping of greedy decoding shared by :func:`greedy_generate` and :func:`sweep_generate`.

    Each step takes every row's argmax token; a finished row gets ``pad`` instead. A row is
    finished once it emits ``eos`` or the text of its last few tokens contains a ``stop``
    string. ``steps_until_done(rows)`` is the number of steps a decoding of only ``rows``
    would have run (it stops after the step that finishes its last row), so a decoding of
    stacked configs can hand each config exactly the tensor its own decoding gives.
    """

    def __init__(self, tokenizer: Any, rows: int, device: Any, eos: int | None, pad: int, stop: Sequence[str]) -> None:
        self.tokenizer, self.eos, self.pad, self.stop = tokenizer, eos, pad, tuple(stop)
        self.lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stop), default=0) + 2
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.finished_at = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.generated: list[torch.Tensor] = []

    def step(self, logits: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Record the greedy tokens of one step's last-position ``logits``; return them for every row.

        ``logits [rows, vocab]``, or ``[len(active), vocab]`` for only the ``active`` rows
        (the rest are finished and get ``pad``)."""
        token = torch.full_like(self.done, self.pad, dtype=torch.long)
        token[slice(None) if active is None else active] = logits.argmax(-1)
        token = torch.where(self.done, torch.full_like(token, self.pad), token)
        self.generated.append(token)
        if self.eos is not None:
            self.done |= token == self.eos
        if self.stop:
            recent = torch.stack(self.generated[-self.lookback:], dim=1)
            for row in torch.nonzero(~self.done).flatten().tolist():
                text = self.tokenizer.decode(recent[row], skip_special_tokens=False)
                self.done[row] = any(s in text for s in self.stop)
        self.finished_at[self.done & (self.finished_at < 0)] = len(self.generated)
        return token

    def all_done(self) -> bool:
        return bool(self.done.all())

    def steps_until_done(self, rows: slice) -> int:
        finished = self.finished_at[rows]
        return int(finished.max()) if bool((finished > 0).all()) else len(self.generated)

    def output(self, input_ids: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """``[rows, prompt + generated]`` for ``rows``, cut where their own decoding would have stopped."""
        if not self.generated:
            return input_ids
        steps = self.steps_until_done(rows)
        return torch.cat([input_ids, torch.stack(self.generated[:steps], dim=1)[rows]], dim=1)


def greedy_generate(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 16,
    stop: Sequence[str] = (),
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding with a KV cache; each step is one nnsight trace applying ``interventions``.

    ``x_{t+1} = argmax_v p(v | x_{≤t}; ĥ)``. Input is left-padded; position ids follow the
    padding. A row is finished once it emits ``eos_token_id`` or its generated text
    contains a ``stop`` string; finished rows are filled with ``pad_token_id`` and
    decoding ends when every row is finished. Returns ``[batch, prompt + generated]``.

    With the cache each step feeds only the new token, so an intervention on
    ``positions="last"`` edits the prompt's last token and then every generated token
    (each is the last one when it is processed). Token keys for noise are carried across
    steps, so each generated token gets the noise a full forward pass would give it.
    """
    model.require_local("greedy decoding")
    from transformers import DynamicCache

    ivs = validate(model, interventions)
    eos = model.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = model.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    cache = DynamicCache(config=model.hf.config)
    mask = attention_mask.to(input_ids.device)
    positions = left_padded_positions(mask)
    step_ids = input_ids
    keyed = needs_keys(ivs)
    keys: TokenKeys | None = None
    rows = _GreedyRows(model.tokenizer, input_ids.shape[0], input_ids.device, eos, pad, stop)
    for _ in range(max_new_tokens):
        inputs = {
            "input_ids": step_ids, "attention_mask": mask, "position_ids": positions,
            "past_key_values": cache, "use_cache": True, "logits_to_keep": 1,
        }
        if keyed:
            keys = token_keys(step_ids, mask if keys is None else None, keys)
        with torch.inference_mode(), model.nn.trace(inputs):
            apply_in_trace(model, ivs, keys=None if keys is None else keys.keys)
            logits = nnsight.save(model.nn.output.logits)
        token = rows.step(logits[:, -1])
        if rows.all_done():
            break
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return rows.output(input_ids)


def sweep_generate(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    configs: Mapping[str, Sequence[Intervention]],
    max_new_tokens: int = 16,
    stop: Sequence[str] = (),
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_batch_tokens: int = 16384,
) -> dict[str, torch.Tensor]:
    """:func:`greedy_generate` of one left-padded batch under every config at once.

    No config touches the layers below :func:`split_layer` ``L``, so there a row's states
    depend only on its tokens: the prompt runs through them once, and while decoding they
    run once per distinct token history (configs that have generated the same tokens so far
    share them). As many configs as ``max_batch_tokens`` allows (rows × (prompt + new
    tokens)) are stacked along the batch for layers ``L…``, each config's interventions on its
    own rows, with their own KV cache; a row that finishes leaves the stack. Each config's
    tensor is cut where its own decoding would have stopped, so it equals
    ``greedy_generate(model, input_ids, attention_mask, configs[c], …)`` up to the float
    rounding of other batch shapes. Identical configs decode once.
    """
    model.require_local("the stacked decoding sweep")
    valid = {cid: validate(model, ivs) for cid, ivs in configs.items()}
    require(len(valid) > 0, "sweep_generate: no configs given")
    same_as = first_identical(valid)
    config_ids = list(dict.fromkeys(same_as.values()))
    eos = model.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = model.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    # With no intervention anywhere every config is the same one: nothing to share.
    split = split_layer(valid, model.n_layers) % model.n_layers
    mask = attention_mask.to(input_ids.device)
    positions = left_padded_positions(mask)
    rows, width = input_ids.shape
    keyed = any(needs_keys(valid[c]) for c in config_ids)
    prompt_keys = token_keys(input_ids, mask) if keyed else None
    prompt = _SharedLower.of_prompt(model, split, input_ids, mask, positions) if split > 0 else None

    per_group = max(1, max_batch_tokens // (rows * (width + max_new_tokens)))
    outputs: dict[str, torch.Tensor] = {}
    for start in range(0, len(config_ids), per_group):
        group = config_ids[start : start + per_group]
        g = len(group)
        stacked_ivs = [valid[c] for c in group]
        config_of_row = torch.arange(g).repeat_interleave(rows)
        prompt_row = torch.arange(rows, device=input_ids.device).repeat(g)
        cache = _upper_cache(model, split)
        keys = (None if prompt_keys is None else
                TokenKeys(prompt_keys.keys.repeat(g, 1), prompt_keys.prefix.repeat(g), prompt_keys.length.repeat(g)))
        greedy = _GreedyRows(model.tokenizer, g * rows, input_ids.device, eos, pad, stop)
        # The stacked rows still decoding (a finished row leaves the batch and its cache).
        active = torch.arange(g * rows, device=input_ids.device)
        lower = prompt.for_rows(prompt_row) if prompt is not None else None
        step_ids = input_ids.repeat(g, 1)
        for step in range(max_new_tokens):
            step_mask = torch.cat([mask[prompt_row[active]], mask.new_ones(len(active), step)], dim=1)
            step_positions = positions[prompt_row[active], -1:] + step if step else positions.repeat(g, 1)
            if step and lower is not None:
                lower = lower.extend(model, step_ids[:, 0], mask, positions, step)
            if keyed and step > 0:
                keys = token_keys(step_ids, None, keys)
            counts = torch.bincount(config_of_row[active.cpu()], minlength=g).tolist()
            inputs = {"input_ids": step_ids, "attention_mask": step_mask, "position_ids": step_positions,
                      "past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
            with torch.inference_mode(), model.nn.trace(inputs):
                if lower is not None:
                    replay = lower.replay()
                    for layer in range(split):
                        model.envoy(layer).skip(replay)
                _apply_per_config(model, stacked_ivs, counts, None, None if keys is None else keys.keys)
                logits = nnsight.save(model.nn.output.logits)
            token = greedy.step(logits[:, -1], active)
            if greedy.all_done():
                break
            still = ~greedy.done[active]
            if not bool(still.all()):
                keep = torch.nonzero(still).flatten()
                cache.batch_select_indices(keep)
                active = active[keep]
                if lower is not None:
                    lower = lower.keep(keep)
                if keys is not None:
                    keys = TokenKeys(keys.keys[keep], keys.prefix[keep], keys.length[keep])
            step_ids = token[active][:, None]
        for j, cid in enumerate(group):
            outputs[cid] = greedy.output(input_ids, slice(j * rows, (j + 1) * rows))
    return {cid: outputs[same_as[cid]] for cid in valid}


def _upper_cache(model: Model, split: int) -> Any:
    """A KV cache whose layers below ``split`` are placeholders (those layers are skipped, their
    output replayed), so the attention mask takes its lengths from layer ``split``."""
    from transformers.cache_utils import Cache, DummyLayer, DynamicCache, DynamicLayer

    if split == 0:
        return DynamicCache(config=model.hf.config)
    return Cache(layers=[DummyLayer() if layer < split else DynamicLayer() for layer in range(model.n_layers)])


@dataclass
class _SharedLower:
    """The layers below the split for the distinct token histories of a stack of rows.

    ``cache`` holds the keys and values of layers ``0…split−1``, one row per distinct history;
    ``history_prompt[u]`` is the prompt row history ``u`` continues; ``of_row[i]`` is the
    history of stacked row ``i``; ``output`` is the split layer's input for each history's
    newest tokens (the prompt, then one token per step). ``owned``: whether ``cache`` belongs to
    this stack alone and may grow in place.
    """

    split: int
    cache: Any
    history_prompt: torch.Tensor
    of_row: torch.Tensor
    output: Any
    owned: bool = False

    @staticmethod
    def of_prompt(model: Model, split: int, input_ids: torch.Tensor, mask: torch.Tensor,
                  positions: torch.Tensor) -> "_SharedLower":
        """Run the prompt once through the layers below ``split``."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.hf.config)
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                  "past_key_values": cache, "use_cache": True}
        with torch.inference_mode(), model.nn.trace(inputs) as tracer:
            output = nnsight.save(model.envoy(split - 1).output)
            tracer.stop()
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return _SharedLower(split, cache, rows, rows, output)

    def for_rows(self, prompt_row: torch.Tensor) -> "_SharedLower":
        """The same histories seen from a stack whose row ``i`` continues prompt row ``prompt_row[i]``."""
        return _SharedLower(self.split, self.cache, self.history_prompt, prompt_row, self.output)

    def replay(self) -> Any:
        """The split layer's input for every stacked row (its history's)."""
        return replace_output(self.output, output_tensor(self.output)[self.of_row])

    def keep(self, index: torch.Tensor) -> "_SharedLower":
        """Only the stacked rows ``index`` go on (the others finished)."""
        return dataclasses.replace(self, of_row=self.of_row[index])

    def extend(self, model: Model, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               step: int) -> "_SharedLower":
        """Append each stacked row's new token: the distinct (history, token) pairs become the
        histories, and only their new tokens run through the layers below the split."""
        vocab = int(model.hf.config.vocab_size)
        pairs, of_row = torch.unique(self.of_row * vocab + tokens, return_inverse=True)
        parent, new_tokens = pairs // vocab, pairs % vocab
        cache = self.cache
        if not (self.owned and len(parent) == len(self.history_prompt)
                and bool((parent == torch.arange(len(parent), device=parent.device)).all())):
            cache = _cache_rows(model, cache, parent, self.split)
        history_prompt = self.history_prompt[parent]
        inputs = {"input_ids": new_tokens[:, None],
                  "attention_mask": torch.cat([mask[history_prompt], mask.new_ones(len(parent), step)], dim=1),
                  "position_ids": positions[history_prompt, -1:] + step,
                  "past_key_values": cache, "use_cache": True}
        with torch.inference_mode(), model.nn.trace(inputs) as tracer:
            output = nnsight.save(model.envoy(self.split - 1).output)
            tracer.stop()
        return _SharedLower(self.split, cache, history_prompt, of_row, output, owned=True)


def _cache_rows(model: Model, cache: Any, index: torch.Tensor, layers: int) -> Any:
    """A new cache holding rows ``index`` (repeats allowed) of ``cache``'s first ``layers`` layers."""
    from transformers import DynamicCache

    out = DynamicCache(config=model.hf.config)
    for layer in range(layers):
        out.update(cache.layers[layer].keys[index], cache.layers[layer].values[index], layer)
    return out


def _apply_per_config(
    model: Model,
    configs: Sequence[Sequence[Intervention]],
    rows_per_config: int | Sequence[int],
    last_index: torch.Tensor | None,
    keys: torch.Tensor | None = None,
) -> None:
    """Inside a trace over configs stacked along the batch, edit each config's rows with its own
    list. ``rows_per_config``: every config's number of rows (one int: the same for all; a
    list: one count per config, as when decoding drops finished rows). ``keys``: the token
    keys, either ``[rows_per_config, s]`` (the batch every config repeats) or one row per
    stacked row (each config's rows their own, as when decoding, where configs' generated
    tokens differ)."""
    counts = [rows_per_config] * len(configs) if isinstance(rows_per_config, int) else list(rows_per_config)
    bounds = [0, *itertools.accumulate(counts)]
    sites = sorted(
        {(iv.layer, iv.component) for ivs in configs for iv in ivs},
        key=forward_order,
    )
    for site in sites:
        envoy = model.envoy(*site)
        out = envoy.output
        h = output_tensor(out)
        parts = []
        for g, ivs in enumerate(configs):
            rows = slice(bounds[g], bounds[g + 1])
            part = h[rows]
            part_keys = keys if keys is None or keys.shape[0] != bounds[-1] else keys[rows]
            for iv in ivs:
                if (iv.layer, iv.component) == site:
                    part = perturb(part, iv, last_index, part_keys)
            parts.append(part)
        envoy.output = replace_output(out, torch.cat(parts, dim=0))


@dataclass
class _PackedRow:
    """One input row of the sweep: a trunk (a context) and branches (continuations) that
    all attend to the trunk but not to each other, so a multiple-choice item's context
    runs once for all its choices. Branch ``b`` holds continuation ``c_b`` minus its last
    token and sits at positions ``|trunk| …`` like an unpacked row ``trunk ⊕ c_b``."""

    trunk: tuple[int, ...]
    branches: list[tuple[int, ...]] = field(default_factory=list)

    def branch(self, tokens: tuple[int, ...]) -> int:
        if tokens not in self.branches:
            self.branches.append(tokens)
        return self.branches.index(tokens)

    def offset(self, b: int) -> int:
        return len(self.trunk) + sum(len(t) for t in self.branches[:b])

    @property
    def tokens(self) -> list[int]:
        return [*self.trunk, *(t for branch in self.branches for t in branch)]

    @property
    def positions(self) -> list[int]:
        """Position ids: the trunk from 0, every branch from ``|trunk|``."""
        return [*range(len(self.trunk)), *(len(self.trunk) + j for branch in self.branches for j in range(len(branch)))]

    @property
    def segments(self) -> list[int]:
        """0 for trunk tokens, ``b + 1`` for branch ``b``'s."""
        return [0] * len(self.trunk) + [b + 1 for b, branch in enumerate(self.branches) for _ in branch]


def _pack_requests(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], limit: int, branches: bool,
) -> tuple[list[_PackedRow], list[tuple[int, list[int], list[int]]]]:
    """Rows to run, and per request ``(row, positions predicting its continuation, continuation)``.

    With ``branches``, requests that share a context share one row (their continuations as
    branches) unless ``context ⊕ continuation`` is longer than ``limit + 1`` tokens; such a
    request is left-truncated as lm-eval does and gets a row of its own. Without
    ``branches`` every distinct ``(context ⊕ continuation)[:-1]`` is a row, as lm-eval runs them.
    """
    rows: list[_PackedRow] = []
    index: dict[tuple, int] = {}
    targets = []
    for context, continuation in requests:
        require(len(context) > 0 and len(continuation) > 0, "sweep_loglikelihood: empty context or continuation")
        cont = list(continuation)
        if branches and len(context) + len(cont) <= limit + 1:
            r = index.setdefault(("trunk", tuple(context)), len(rows))
            if r == len(rows):
                rows.append(_PackedRow(tuple(context)))
            if len(cont) > 1:
                rows[r].branch(tuple(cont[:-1]))
            targets.append((r, None, cont))  # positions resolved once the row's branches are all known
        else:
            tokens = (list(context) + cont)[-(limit + 1):]
            r = index.setdefault(("row", tuple(tokens[:-1])), len(rows))
            if r == len(rows):
                rows.append(_PackedRow(tuple(tokens[:-1])))
            n = len(tokens) - 1
            targets.append((r, [n - len(cont) + j for j in range(len(cont))], cont))
    resolved = []
    for r, where, cont in targets:
        if where is None:
            # c_0 is predicted at the trunk's last token, c_j (j ≥ 1) at the branch's token j − 1.
            row = rows[r]
            start = row.offset(row.branch(tuple(cont[:-1]))) if len(cont) > 1 else 0
            where = [len(row.trunk) - 1, *range(start, start + len(cont) - 1)]
        resolved.append((r, where, cont))
    return rows, resolved


def _packed_inputs(
    rows: Sequence[_PackedRow], dtype: torch.dtype, device: Any, keyed: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The model inputs: right-padded ``input_ids``, and for rows with branches the 4-D additive
    attention mask and ``position_ids`` that make each branch see only the trunk and itself;
    and (``keyed``) the token keys each token has in its unpacked row ``trunk ⊕ branch``."""
    width = max(len(row.tokens) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.tokens)] = torch.tensor(row.tokens)
    inputs = {"input_ids": ids.to(device)}
    keys = None
    if keyed:
        keys = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            keys[i, : len(row.trunk)] = token_keys(torch.tensor([row.trunk])).keys[0]
            for b, branch in enumerate(row.branches):
                full = token_keys(torch.tensor([[*row.trunk, *branch]])).keys[0]
                keys[i, row.offset(b) : row.offset(b) + len(branch)] = full[len(row.trunk):]
        keys = keys.to(device)
    if any(row.branches for row in rows):
        positions = torch.arange(width).repeat(len(rows), 1)
        segment = torch.full((len(rows), width), -1)
        for i, row in enumerate(rows):
            positions[i, : len(row.tokens)] = torch.tensor(row.positions)
            segment[i, : len(row.tokens)] = torch.tensor(row.segments)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_branch = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        allowed = causal & same_branch & (segment[:, None, :] >= 0)
        allowed |= torch.eye(width, dtype=torch.bool)  # padding queries attend to themselves: no empty softmax
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        inputs["attention_mask"] = mask[:, None].to(device)
        inputs["position_ids"] = positions.to(device)
    return inputs, keys


def sweep_loglikelihood(
    model: Model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    configs: Mapping[str, Sequence[Intervention]],
    batch_size: int = 8,
    max_length: int | None = None,
    max_batch_tokens: int = 16384,
    max_logit_elements: int = 1 << 26,
    progress: bool = False,
    pack_choices: bool = True,
) -> dict[str, list[tuple[float, bool]]]:
    """``(log p(continuation | context), is_greedy)`` per request, for every config at once.

    ``log p = Σ_j log softmax(z_{t_j})[c_j]`` over the continuation tokens ``c_j`` (the
    lm-eval definition). Per batch, the layers below :func:`split_layer` ``L`` run once;
    their output enters layers ``L…`` for each config, with as many configs stacked in
    one batch as ``max_batch_tokens`` (rows × length through the layers) and
    ``max_logit_elements`` (rows × kept positions × vocabulary) allow. Only positions that
    score a continuation token go through the output head.

    ``pack_choices``: requests with the same context (a multiple-choice item's choices) run
    as one row, the context once and each continuation as a branch that attends to the
    context and to itself only (a 4-D attention mask; position ids restart at the
    context's end for every branch), so every token sees exactly the tokens it sees in its
    own unpacked row. Configs that edit only each row's last token (``positions="last"``)
    are not packed, since a packed row has several last tokens, nor are models whose
    attention kernel ignores a 4-D mask (flash attention).
    """
    model.require_local("the shared-prefix sweep")
    valid = {cid: validate(model, ivs) for cid, ivs in configs.items()}
    require(len(valid) > 0, "sweep_loglikelihood: no configs given")
    limit = max_length or model.max_length
    split = split_layer(valid, model.n_layers)
    # Configs with identical interventions (e.g. control draws that could only pick one set) run once.
    same_as = first_identical(valid)
    config_ids = list(dict.fromkeys(same_as.values()))
    # A 4-D additive mask is honoured by the eager and SDPA attention kernels, not by flash attention.
    pack = (pack_choices and all(iv.positions == "all" for ivs in valid.values() for iv in ivs)
            and getattr(model.hf.config, "_attn_implementation", "eager") in ("eager", "sdpa"))
    rows, targets = _pack_requests(requests, limit, branches=pack)
    requests_of_row: dict[int, list[int]] = {}
    for q, (r, _, _) in enumerate(targets):
        requests_of_row.setdefault(r, []).append(q)
    keyed = any(needs_keys(valid[c]) for c in config_ids)

    answers: dict[str, list[tuple[float, bool]]] = {cid: [(math.nan, False)] * len(requests) for cid in config_ids}
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r].tokens))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = model.device
    for batch in progress_bar(batches, desc=f"{len(config_ids)} configs together: batches", disable=not progress,
                              leave=False):
        inputs, keys = _packed_inputs([rows[r] for r in batch], model.hf.dtype, device, keyed)
        width = inputs["input_ids"].shape[1]
        lengths = torch.tensor([len(rows[r].tokens) for r in batch], device=device)
        keep = sorted({p for r in batch for q in requests_of_row[r] for p in targets[q][1]})
        keep_index = {p: k for k, p in enumerate(keep)}
        prefix = None
        if split > 0:
            with torch.inference_mode(), model.nn.trace(dict(inputs)) as tracer:
                prefix = nnsight.save(model.envoy(split - 1).output)
                tracer.stop()
        per_group = max(1, min(
            max_batch_tokens // (len(batch) * width),
            max_logit_elements // (len(batch) * len(keep) * model.hf.config.vocab_size),
        ))
        for start in range(0, len(config_ids), per_group):
            group = config_ids[start : start + per_group]
            stacked = {name: value.repeat(len(group), *([1] * (value.dim() - 1))) for name, value in inputs.items()}
            stacked["logits_to_keep"] = torch.tensor(keep, device=device)
            with torch.inference_mode(), model.nn.trace(stacked):
                if prefix is not None:
                    replay = replace_output(prefix, output_tensor(prefix).repeat(len(group), 1, 1))
                    for layer in range(split):
                        model.envoy(layer).skip(replay)
                _apply_per_config(model, [valid[c] for c in group], len(batch), lengths - 1, keys)
                logits = nnsight.save(model.nn.output.logits)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            greedy = logprobs.argmax(dim=-1)
            for g, cid in enumerate(group):
                for i, r in enumerate(batch):
                    row_index = g * len(batch) + i
                    for q in requests_of_row[r]:
                        _, where, cont = targets[q]
                        positions = torch.tensor([keep_index[p] for p in where], device=device)
                        tokens = torch.tensor(cont, device=device)
                        answers[cid][q] = (
                            float(logprobs[row_index, positions, tokens].sum()),
                            bool((greedy[row_index, positions] == tokens).all()),
                        )
    return {cid: answers[same_as[cid]] for cid in valid}
