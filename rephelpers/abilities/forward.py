"""The forward-pass engine of the perturbed model: right/left padding helpers, greedy decoding
with the KV cache, and the shared-prefix sweep.

:func:`greedy_generate` decodes a batch greedily inside one nnsight trace per step that
applies a list of :class:`~rephelpers.perturbations.intervene.Intervention` (prompt and every new token
alike). :func:`sweep_loglikelihood` scores many configs at once: per batch, the hidden
state entering the lowest intervention layer ``L`` (:func:`split_layer`) is computed once
and every config runs only layers ``L…`` on it, several configs stacked in one batch; a
multiple-choice item's context runs once, its choices as branches of one packed row (a
4-D attention mask lets each branch see the context and itself only). Nothing here knows
lm-eval: :mod:`rephelpers.abilities.lm_eval_model` puts these behind lm-eval's model interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import nnsight
import torch

from ..errors import require
from ..perturbations.intervene import (
    Intervention, apply_in_trace, first_identical, forward_order, needs_keys, perturb, validate,
)
from ..perturbations.tokenkeys import TokenKeys, token_keys
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
    from transformers import DynamicCache

    ivs = validate(model, interventions)
    eos = model.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = model.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    tokenizer = model.tokenizer
    lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) for s in stop), default=0) + 2
    cache = DynamicCache(config=model.hf.config)
    mask = attention_mask.to(input_ids.device)
    positions = left_padded_positions(mask)
    step_ids = input_ids
    keyed = needs_keys(ivs)
    keys: TokenKeys | None = None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    generated: list[torch.Tensor] = []
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
        token = logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        generated.append(token)
        done |= token == eos
        if stop:
            recent = torch.stack(generated[-lookback:], dim=1)
            for row in torch.nonzero(~done).flatten().tolist():
                text = tokenizer.decode(recent[row], skip_special_tokens=False)
                done[row] = any(s in text for s in stop)
        if bool(done.all()):
            break
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1) if generated else input_ids


def split_layer(configs: Mapping[str, Sequence[Intervention]], n_layers: int) -> int:
    """The lowest layer any config intervenes at (``n_layers`` when none does)."""
    return min((iv.layer for ivs in configs.values() for iv in ivs), default=n_layers)


def _apply_per_config(
    model: Model,
    configs: Sequence[Sequence[Intervention]],
    rows_per_config: int,
    last_index: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> None:
    """Inside a trace over configs stacked along the batch, edit each config's rows with its own
    list (``keys [rows_per_config, s]``: the token keys of the batch every config repeats)."""
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
            part = h[g * rows_per_config : (g + 1) * rows_per_config]
            for iv in ivs:
                if (iv.layer, iv.component) == site:
                    part = perturb(part, iv, last_index, keys)
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
    for batch in progress_bar(batches, desc="shared-prefix batches", disable=not progress, leave=False):
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
