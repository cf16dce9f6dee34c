"""Abilities of perturbed models, measured with lm-eval (stage 05).

:class:`PerturbedLM` is the one lm-eval model class of the package: an ``HFLM`` around
an already loaded :class:`~rephelpers.models.Model` whose forward passes (log-likelihood
batches and every greedy decoding step) run inside an nnsight trace that applies a list
of :class:`~rephelpers.intervene.Intervention`. With no interventions it scores exactly
like lm-eval's stock ``HFLM``.

:func:`evaluate_abilities` evaluates one model under many perturbation configs and
returns one row per config × task × item. It builds the lm-eval task dict once, runs
``lm_eval.evaluator.evaluate`` per config with requests built fresh each time, and
never uses lm-eval's response cache (which is keyed by request, not by model, and
would serve the unperturbed answers to a perturbed run).

``fast=True`` shares the layers below the lowest intervention layer ``L`` among
configs: per batch, the hidden state entering layer ``L`` is computed once and every
config runs only layers ``L…`` on it (several configs stacked in one batch). It covers
log-likelihood requests (multiple choice, the bulk of the suite); generation requests
always take the per-config path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nnsight
import numpy as np
import pandas as pd
import torch
from lm_eval.models.huggingface import HFLM

from .abilities import ABILITIES, TaskInfo, build_tasks
from .errors import RephelpersError, require
from .intervene import (
    Intervention, apply_in_trace, first_identical, forward_order, interventions_to_json, needs_keys, perturb,
    validate,
)
from .models import Model, output_tensor, replace_output
from .paths import cache_subdir
from .progress import progress_bar
from .setting import BASELINE_ID, Setting  # noqa: F401 - BASELINE_ID is part of this module's API
from .tokenkeys import TokenKeys, token_keys

# lm-eval pads log-likelihood batches on the right with token id 0 (`pad_and_concat`).
_LM_EVAL_PAD_ID = 0
ROW_COLUMNS = (
    "config_id", "task", "ability", "family", "item", "metric", "higher_is_better", "chance",
    "score", "margin", "p_correct", "confidence", "prompt", "target", "response", "prompt_hash",
)


# -- the lm-eval model class ---------------------------------------------------------------
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


class PerturbedLM(HFLM):
    """lm-eval's ``HFLM`` whose forward passes apply ``interventions`` through nnsight.

    The model is passed in loaded (never reloaded). ``interventions`` can be swapped
    between evaluations (:meth:`use`), so one instance serves every config; nothing the
    model answered is kept between calls, only the tokenisations of request strings.
    ``show_request_progress`` shows lm-eval's bar per request type and call.
    """

    def __init__(
        self,
        model: Model,
        interventions: Sequence[Intervention] = (),
        batch_size: int = 8,
        max_length: int | None = None,
        show_request_progress: bool = False,
    ) -> None:
        # lm-eval warns that a loaded model skips its loading options: that is the point here.
        with _quiet_lm_eval(logging.ERROR):
            super().__init__(
                pretrained=model.hf,
                tokenizer=model.tokenizer,
                batch_size=batch_size,
                device=str(model.device),
                max_length=max_length or model.max_length,
            )
        self.rh_model = model
        self.show_request_progress = show_request_progress
        self._interventions: list[Intervention] = []
        self._pair_tokens: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self.use(interventions)

    @property
    def interventions(self) -> list[Intervention]:
        return list(self._interventions)

    def use(self, interventions: Sequence[Intervention]) -> "PerturbedLM":
        """Apply ``interventions`` (validated against the model) from the next request on."""
        self._interventions = validate(self.rh_model, interventions)
        return self

    # Request strings are tokenised once per instance: configs share their requests.
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        key = (context, continuation)
        if key not in self._pair_tokens:
            self._pair_tokens[key] = super()._encode_pair(context, continuation)
        ctx, cont = self._pair_tokens[key]
        return list(ctx), list(cont)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_request_progress)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_request_progress)

    def _model_call(
        self,
        inps: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of a right-padded batch with the interventions applied (causal LMs only)."""
        require(attn_mask is None and labels is None, "PerturbedLM supports decoder-only (causal) models only.")
        last_index = (
            right_padded_last_index(inps)
            if any(iv.positions == "last" for iv in self._interventions)
            else None
        )
        # Right padding follows every real token, so keys need no mask here.
        keys = token_keys(inps).keys if needs_keys(self._interventions) else None
        with torch.inference_mode(), self.rh_model.nn.trace({"input_ids": inps}):
            apply_in_trace(self.rh_model, self._interventions, last_index, keys)
            logits = nnsight.save(self.rh_model.nn.output.logits)
        return logits

    def _model_generate(
        self,
        context: torch.Tensor,
        max_length: int,
        stop: list[str],
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        mask = generation_kwargs.pop("attention_mask", None)
        sampling = bool(generation_kwargs.get("do_sample")) or float(generation_kwargs.get("temperature") or 0.0) > 0
        require(
            not sampling,
            "PerturbedLM decodes greedily; this task asks for sampling "
            f"({ {k: generation_kwargs[k] for k in ('do_sample', 'temperature') if k in generation_kwargs} }). "
            "Set do_sample: false in the task's generation_kwargs.",
        )
        return greedy_generate(
            self.rh_model,
            context,
            torch.ones_like(context) if mask is None else mask,
            self._interventions,
            max_new_tokens=max_length - context.shape[1],
            stop=stop,
            eos_token_id=self.eot_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )


# -- the fast path: shared lower layers --------------------------------------------------
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


class SweepLM(PerturbedLM):
    """A :class:`PerturbedLM` that answers log-likelihood requests for all configs at once.

    The first config's call computes every config's answers (:func:`sweep_loglikelihood`)
    and keeps them, keyed by the exact token requests, for the other configs' calls;
    :meth:`select` switches the config. Generation requests run per config.
    """

    def __init__(
        self,
        model: Model,
        configs: Mapping[str, Sequence[Intervention]],
        batch_size: int = 8,
        max_batch_tokens: int = 16384,
        show_request_progress: bool = False,
        pack_choices: bool = True,
    ) -> None:
        super().__init__(model, (), batch_size=batch_size, show_request_progress=show_request_progress)
        self.configs = {cid: validate(model, ivs) for cid, ivs in configs.items()}
        self.max_batch_tokens = max_batch_tokens
        self.pack_choices = pack_choices
        self.active: str | None = None
        self._answers: dict[tuple, dict[str, list[tuple[float, bool]]]] = {}

    def select(self, config_id: str) -> "SweepLM":
        require(config_id in self.configs, f"unknown config {config_id!r}")
        self.active = config_id
        self.use(self.configs[config_id])
        return self

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        require(self.active is not None, "SweepLM: select(config_id) before evaluating")
        key = tuple((tuple(ctx), tuple(cont)) for _, ctx, cont in requests)
        if key not in self._answers:
            self._answers[key] = sweep_loglikelihood(
                self.rh_model,
                [(ctx, cont) for _, ctx, cont in requests],
                self.configs,
                batch_size=self.batch_size_per_gpu,
                max_length=self.max_length,
                max_batch_tokens=self.max_batch_tokens,
                progress=self.show_request_progress,
                pack_choices=self.pack_choices,
            )
        return list(self._answers[key][self.active])


# -- tasks -----------------------------------------------------------------------------------
@dataclass
class PreparedTasks:
    """The lm-eval task dicts (plain and chat-templated) and what each leaf task measures."""

    plain: dict[str, Any]
    chat: dict[str, Any]
    ability: dict[str, str] = field(default_factory=dict)
    family: dict[str, str] = field(default_factory=dict)
    metric: dict[str, str | None] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)

    def dicts(self) -> Iterator[tuple[dict[str, Any], bool]]:
        for task_dict, chat in ((self.plain, False), (self.chat, True)):
            if task_dict["tasks"]:
                yield task_dict, chat


@contextlib.contextmanager
def _quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """Silence lm-eval's per-call chatter: INFO logs and a progress bar per task and call.

    lm-eval offers no switch for the bar drawn while building requests, so its ``tqdm``
    is swapped for a disabled one for the duration.
    """
    import lm_eval.api.task

    logger = logging.getLogger("lm_eval")
    saved_level, saved_tqdm = logger.level, lm_eval.api.task.tqdm
    logger.setLevel(level)
    lm_eval.api.task.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        logger.setLevel(saved_level)
        lm_eval.api.task.tqdm = saved_tqdm


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` fail at once instead of reaching for the network."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (
        {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")},
        datasets.config.HF_HUB_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved[0].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        datasets.config.HF_HUB_OFFLINE = saved[1]
        huggingface_hub.constants.HF_HUB_OFFLINE = saved[2]


def _empty_task_dict() -> dict[str, Any]:
    return {"tasks": {}, "groups": {}, "group_map": {}}


def _task_manager(include_paths: Sequence[str], include_defaults: bool) -> Any:
    """A ``TaskManager`` over ``include_paths``, reused while their YAML files are unchanged.

    Indexing lm-eval's own task tree takes seconds, so managers are memoised, keyed by
    the paths and modification times of every YAML file they index.
    """
    files = tuple(sorted(
        (str(f), f.stat().st_mtime_ns) for d in include_paths for f in Path(d).rglob("*.yaml")
    ))
    return _memo_task_manager(tuple(include_paths), include_defaults, files)


@functools.lru_cache(maxsize=8)
def _memo_task_manager(include_paths: tuple[str, ...], include_defaults: bool, files: tuple) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def prepare_tasks(
    tasks: Mapping[str, TaskInfo] | Sequence[str | TaskInfo],
    task_dir: str | Path | None = None,
    allow_download: bool = False,
) -> PreparedTasks:
    """Build the lm-eval task dict once: suite abilities and registered lm-eval task names.

    ``tasks`` is the output of :func:`~rephelpers.abilities.build_tasks`, or a list of
    ability names (built into ``task_dir`` with the defaults), ``TaskInfo``s and
    registered lm-eval task or group names (gsm8k, mmlu, arc_easy, …). A registered task
    whose dataset is not available offline (or, with ``allow_download``, not reachable)
    raises a :class:`RephelpersError` naming it, before any model work.
    """
    entries = list(tasks.values()) if isinstance(tasks, Mapping) else [tasks] if isinstance(tasks, str) else list(tasks)
    require(len(entries) > 0, "no tasks given: pass ability names (" + ", ".join(ABILITIES) + ") or lm-eval task names")
    suite_names = [e for e in entries if isinstance(e, str) and e in ABILITIES]
    infos = [e for e in entries if isinstance(e, TaskInfo)]
    if suite_names:
        infos += build_tasks(suite_names, task_dir or cache_subdir("tasks"), items_per_task=40, seed=0).values()
    registered = [e for e in entries if isinstance(e, str) and e not in ABILITIES]
    bad = [e for e in entries if not isinstance(e, (str, TaskInfo))]
    require(not bad, f"tasks must be ability names, lm-eval task names or TaskInfo, got {bad[:3]}")

    manager = _task_manager(sorted({str(i.yaml_path.parent) for i in infos}), bool(registered))
    prepared = PreparedTasks(plain=_empty_task_dict(), chat=_empty_task_dict())
    loads = [(i.task, i) for i in infos] + [(name, None) for name in registered]
    with _quiet_lm_eval(), _hub_offline(not allow_download):
        for name, info in loads:
            if info is None and name not in manager.all_tasks:
                raise RephelpersError(
                    f"{name!r} is neither an ability of the suite ({', '.join(ABILITIES)}) nor a "
                    "registered lm-eval task or group (see `lm_eval ls tasks`)."
                )
            try:
                loaded = manager.load([name])
            except Exception as err:  # datasets raises many types for a missing dataset
                hint = (
                    "its dataset is not in the local Hugging Face cache and downloads are off: "
                    "download it where the Hub is reachable (or pass allow_download=True)"
                    if not allow_download else "its dataset could not be loaded"
                )
                raise RephelpersError(
                    f"lm-eval task {name!r} cannot be evaluated: {hint}. ({type(err).__name__}: {err})"
                ) from err
            target = prepared.chat if info is not None and info.chat else prepared.plain
            for key in ("tasks", "groups", "group_map"):
                target[key].update(loaded.get(key, {}))
            for leaf in loaded["tasks"]:
                prepared.ability[leaf] = info.ability if info else name
                prepared.family[leaf] = info.family if info else name
                prepared.metric[leaf] = info.metric if info else None
                # A registered task's guessing rate is not known here; 0 is the safe floor.
                prepared.chance[leaf] = info.chance if info else 0.0
    return prepared


# -- one row per config × task × item ---------------------------------------------------------
def _gold_indices(target: Any, choices: Sequence[str]) -> list[int]:
    targets = target if isinstance(target, (list, tuple)) else [target]
    out = []
    for t in targets:
        if isinstance(t, str) and not t.strip().isdigit():
            require(t in choices, f"gold answer {t!r} is not among the choices {list(choices)[:4]}")
            out.append(list(choices).index(t))
        else:
            out.append(int(t))
    return out


def _choice_statistics(logliks: Sequence[float], gold: Sequence[int]) -> tuple[float, float, float]:
    """``(margin, p_correct, confidence)`` of a multiple-choice item.

    ``margin = max_{g∈gold} ℓ_g − max_{j∉gold} ℓ_j``; ``p = softmax(ℓ)`` over the choices,
    ``p_correct = Σ_{g∈gold} p_g`` and ``confidence = max_j p_j``.
    """
    ll = np.asarray(logliks, dtype=np.float64)
    is_gold = np.zeros(len(ll), dtype=bool)
    is_gold[list(gold)] = True
    margin = float(ll[is_gold].max() - ll[~is_gold].max()) if (~is_gold).any() else math.nan
    p = np.exp(ll - ll.max())
    p /= p.sum()
    return margin, float(p[is_gold].sum()), float(p.max())


def _primary_metric(sample: dict[str, Any], preferred: str | None) -> str:
    if preferred is not None:
        return preferred
    for name in sample["metrics"]:
        if isinstance(sample.get(name), (int, float, np.number, bool)):
            return name
    raise RephelpersError(
        f"no per-item numeric metric among {sample['metrics']}: the task only has corpus-level "
        "metrics (e.g. f1, bleu), which give no per-item score; choose another task."
    )


def samples_to_rows(
    samples: Mapping[str, list[dict[str, Any]]],
    prepared: PreparedTasks,
    task_objects: Mapping[str, Any],
    config_id: str,
) -> list[dict[str, Any]]:
    """Rows of :data:`ROW_COLUMNS` from lm-eval's logged samples (the first filter of each task)."""
    rows = []
    for task_name, task_samples in samples.items():
        if not task_samples:
            continue
        task = task_objects[task_name]
        primary_filter = task_samples[0]["filter"]
        multiple_choice = task.OUTPUT_TYPE == "multiple_choice"
        # The direction of each metric, as the task declares it (lm-eval's `higher_is_better`):
        # stage 06 flips lower-is-better metrics so that a positive AIS always means "worse".
        directions = task.higher_is_better() or {}
        for s in task_samples:
            if s["filter"] != primary_filter:
                continue
            metric = _primary_metric(s, prepared.metric.get(task_name))
            doc = s["doc"]
            margin = p_correct = confidence = math.nan
            response = ""
            if multiple_choice:
                choices = task.doc_to_choice(doc)
                gold = _gold_indices(s["target"], choices)
                margin, p_correct, confidence = _choice_statistics([r[0] for r in s["filtered_resps"]], gold)
                target = " | ".join(str(choices[g]) for g in gold)
            else:
                response = str(s["resps"][0][0])
                target = str(s["target"])
            rows.append({
                "config_id": config_id,
                "task": task_name,
                "ability": prepared.ability[task_name],
                "family": prepared.family[task_name],
                "item": str(doc.get("id", s["doc_id"])),
                "metric": metric,
                "higher_is_better": bool(directions.get(metric, True)),
                "chance": float(prepared.chance.get(task_name, 0.0)),
                "score": float(s[metric]),
                "margin": margin,
                "p_correct": p_correct,
                "confidence": confidence,
                "prompt": str(s["arguments"][0][0]),
                "target": target,
                "response": response,
                "prompt_hash": s["prompt_hash"],
            })
    return rows


def _check_configs(
    model: Model,
    configs: Mapping[str, Sequence[Intervention]],
    config_meta: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, list[Intervention]]:
    require(isinstance(configs, Mapping) and len(configs) > 0, "configs must be a non-empty dict {config_id: [Intervention, …]}")
    checked = {}
    for cid, ivs in configs.items():
        require(isinstance(cid, str) and cid, f"config ids must be non-empty strings, got {cid!r}")
        ivs = list(ivs)
        require(
            all(isinstance(iv, Intervention) for iv in ivs),
            f"config {cid!r} must be a list of Intervention (an empty list is the unperturbed model)",
        )
        checked[cid] = validate(model, ivs)
    if config_meta is not None:
        extra = sorted(set(config_meta) - set(configs))
        require(not extra, f"config_meta describes configs that are not evaluated: {extra[:5]}")
        clash = sorted({k for meta in config_meta.values() for k in meta} & set(ROW_COLUMNS))
        require(not clash, f"config_meta keys {clash} clash with score columns; rename them.")
    return checked


def evaluate_abilities(
    model: Model,
    tasks: Mapping[str, TaskInfo] | Sequence[str | TaskInfo],
    configs: Mapping[str, Sequence[Intervention]],
    limit: int | None = None,
    batch_size: int = 8,
    task_dir: str | Path | None = None,
    config_meta: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    fast: bool = False,
    allow_download: bool = False,
    pack_choices: bool = True,
) -> pd.DataFrame:
    """Evaluate ``model`` on ``tasks`` under every config; one row per config × task × item.

    Columns: :data:`ROW_COLUMNS` (``score`` is the item's primary metric: acc,
    exact_match, compliance or pct_stereotype; ``margin`` the log-likelihood margin of the
    gold choice over the best wrong one, ``p_correct``/``confidence`` the softmax over
    the choices' log-likelihoods, all NaN for generation), plus ``interventions`` (JSON)
    and whatever ``config_meta[config_id]`` holds. ``limit`` caps items per task.

    ``fast=True`` computes the layers below the lowest intervention layer once per batch
    for all configs (:class:`SweepLM`); scores equal the per-config path for every
    perturbation, ``Noise`` included (its draws are keyed by token, not by batch). With
    ``pack_choices`` (fast path only) a multiple-choice item's context runs once for all
    its choices (:func:`sweep_loglikelihood`).
    """
    checked = _check_configs(model, configs, config_meta)
    require(limit is None or (isinstance(limit, int) and limit >= 1), f"limit must be None or a positive int, got {limit!r}")
    prepared = prepare_tasks(tasks, task_dir, allow_download)
    lm = (SweepLM(model, checked, batch_size=batch_size, pack_choices=pack_choices) if fast
          else PerturbedLM(model, batch_size=batch_size))

    from lm_eval.evaluator import evaluate

    rows: list[dict[str, Any]] = []
    for cid in progress_bar(list(checked), desc="configs", disable=not progress):
        if fast:
            lm.select(cid)
        else:
            lm.use(checked[cid])
        for task_dict, chat in prepared.dicts():
            # Few-shot examples are drawn from the task's RNG: reseed so every config sees the same prompts.
            for task in task_dict["tasks"].values():
                task.set_fewshot_seed(seed=1234)
            with _quiet_lm_eval():
                results = evaluate(
                    lm, task_dict, limit=limit, log_samples=True, bootstrap_iters=0,
                    apply_chat_template=chat,
                )
            rows += samples_to_rows(results["samples"], prepared, task_dict["tasks"], cid)
    df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    prompts_per_item = df.groupby(["task", "item"])["prompt_hash"].nunique()
    require(
        bool((prompts_per_item <= 1).all()),
        "the prompts of some items differ between configs "
        f"({prompts_per_item[prompts_per_item > 1].index[:3].tolist()}); scores would not pair. "
        "Report this bug with the task names.",
    )
    df["interventions"] = df["config_id"].map({cid: interventions_to_json(ivs) for cid, ivs in checked.items()})
    if config_meta:
        meta = pd.DataFrame.from_dict({cid: dict(m) for cid, m in config_meta.items()}, orient="index")
        df = df.join(meta, on="config_id")
    return df


# -- configs of a run: baseline, each cluster's perturbation and its matched control ---------------


def cluster_configs(
    subspaces: Sequence[Mapping[str, Any]],
    layer: int,
    d_model: int,
    kinds: str | Sequence[str] = "ablate",
    magnitudes: float | Sequence[float] = 1.0,
    component: str = "resid",
    positions: str = "all",
    seed: int = 0,
    n_controls: int = 1,
    spectrum: dict[str, Any] | None = None,
) -> tuple[dict[str, list[Intervention]], dict[str, dict[str, Any]]]:
    """The configs stage 05 evaluates, and their descriptors for the score rows.

    For every stage-03 subspace at ``layer`` (one per cluster k), every kind and magnitude:
    ``P_{k,θ}`` from :func:`rephelpers.perturbations.build` and ``n_controls`` independent
    matched random controls from :func:`~rephelpers.perturbations.matched_controls` (draw j
    uses seed ``seed + j``), applied at ``(layer, component)``; plus the unperturbed
    baseline (``cluster = -1``, ``kind = "none"``, ``magnitude = 0``). Stage 06 averages
    the draws: ``Φ_control = mean over θ and draws``.

    One draw is the proposals' design, but a single draw is a lottery when a model has a
    few dimensions every input relies on (SmolLM2's "massive activations"): 32 random
    dimensions out of 576 include a given one with probability 32/576 ≈ 5.6%, and that one
    draw then looks as destructive as the cluster's own R_k. More draws make
    Φ_control an estimate of what a random edit of that size does rather than one sample.
    Draw j is the same random set (same seed) at every magnitude, so a draw's Φ over Θ_k
    is one sample of the control distribution that stage 06 compares Φ with.
    ``spectrum`` is the layer's token spectrum the controls are matched with
    (:func:`rephelpers.specificity.control_spectrum`, as stage 04 computes it; None: dimension
    controls from the subspace's statistics, uniform project controls).
    Returns ``(configs, config_meta)`` for :func:`evaluate_abilities`; the config ids are
    the :class:`~rephelpers.setting.Setting` ids (``k{k}:{kind}:m{m}``, ``…:control``,
    ``…:control1``, … per draw, ``baseline``) and ``config_meta`` is each setting's
    :meth:`~rephelpers.setting.Setting.meta` (``draw`` 0 for the perturbation itself).
    """
    from .perturbations import build, matched_controls

    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    magnitudes = [magnitudes] if isinstance(magnitudes, (int, float)) else list(magnitudes)
    here = [s for s in subspaces if s["layer"] == layer and s.get("component", component) == component]
    require(
        len(here) > 0,
        f"no stage-03 subspace at layer {layer} ({component}); it covered layers "
        f"{sorted({s['layer'] for s in subspaces})}. Pick one of those as intervention_layer "
        "or add the layer to notebooks 02/03.",
    )
    baseline = Setting.baseline(layer, component, positions)
    configs: dict[str, list[Intervention]] = {baseline.id: []}
    meta: dict[str, dict[str, Any]] = {baseline.id: baseline.meta()}
    for subspace in sorted(here, key=lambda s: s["cluster"]):
        for kind in kinds:
            for m in magnitudes:
                setting = Setting(int(subspace["cluster"]), kind, m, layer, component, positions)
                controls = matched_controls(kind, dict(subspace), d_model, m, seed, n_controls, spectrum)
                arms = [(setting, build(kind, dict(subspace), m, seed))]
                arms += [(setting.control_draw(draw), p) for draw, p in enumerate(controls)]
                for arm, perturbation in arms:
                    configs[arm.id] = [Intervention(perturbation, layer, component, positions)]
                    meta[arm.id] = arm.meta()
    return configs, meta


# -- summaries and charts ---------------------------------------------------------------------
def ability_summary(scores: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean item score per group of ``by`` (default: per config and ability), with its
    standard error ``s / √n`` over items.

    Rows of one item within a group (several control draws of one θ, say) are averaged
    first, so ``n`` counts items, not item × config.
    """
    if by is None:
        keys = [c for c in ("config_id", "cluster", "control", "kind", "magnitude", "ability", "metric") if c in scores.columns]
    else:
        keys = list(by)
        missing = [c for c in [*keys, "score"] if c not in scores.columns]
        require(not missing, f"ability_summary needs the columns {missing} (evaluate_abilities with config_meta=)")
    items = [c for c in ("task", "item") if c in scores.columns]
    per_item = scores.groupby(keys + items, dropna=False)["score"].mean().reset_index() if items else scores
    out = per_item.groupby(keys, dropna=False)["score"].agg(["mean", "std", "count"]).reset_index()
    out["sem"] = out["std"].fillna(0.0) / np.sqrt(out["count"])
    return out.drop(columns="std").rename(columns={"count": "n"})


def ability_chart(scores: pd.DataFrame, chance: Mapping[str, float] | None = None) -> Any:
    """Bars: mean item score under each cluster's perturbation (red) and its matched random
    control (grey), one column per ability and one row per setting θ = kind × magnitude;
    whiskers ±1 s.e.m. over items; dashed line: the unperturbed model; dotted line: chance.

    Several control draws of one θ are averaged item by item before the mean, so each
    (cluster, arm, θ) is one bar and the s.e.m. is over items, not over item × draw.
    """
    import altair as alt

    summary = ability_summary(scores, by=["cluster", "control", "kind", "magnitude", "ability"])
    summary["arm"] = np.where(summary["control"], "matched control", "cluster perturbation")
    summary["cluster_label"] = "k=" + summary["cluster"].astype(str)
    summary["theta"] = summary["kind"].astype(str) + " × " + summary["magnitude"].map("{:g}".format)
    summary["low"] = (summary["mean"] - summary["sem"]).clip(lower=0.0)
    summary["high"] = (summary["mean"] + summary["sem"]).clip(upper=1.0)
    base = summary[summary.cluster == -1].groupby("ability")["mean"].mean().rename("baseline").reset_index()
    bars = summary[summary.cluster >= 0].merge(base, on="ability", how="left")
    require(len(bars) > 0, "ability_chart: no perturbed config in scores (only the baseline).")
    if chance:
        bars["chance"] = bars["ability"].map(chance)
    color = alt.Color("arm:N", scale=alt.Scale(domain=["cluster perturbation", "matched control"],
                                                range=["#c0392b", "#95a5a6"]), title=None)
    tooltip = ["ability", "cluster_label", "arm", "theta", alt.Tooltip("mean:Q", format=".3f"),
               alt.Tooltip("baseline:Q", format=".3f"), "n"]
    layer = alt.Chart().encode(x=alt.X("cluster_label:N", title="perturbed cluster"), xOffset="arm:N")
    layers = [
        layer.mark_bar().encode(
            y=alt.Y("mean:Q", title="mean item score", scale=alt.Scale(domain=[0, 1]), stack=None),
            color=color, tooltip=tooltip,
        ),
        layer.mark_rule().encode(y="low:Q", y2="high:Q"),
        alt.Chart().mark_rule(strokeDash=[6, 3], color="black").encode(y="mean(baseline):Q"),
    ]
    if chance:
        layers.append(alt.Chart().mark_rule(strokeDash=[2, 2], color="#7f8c8d").encode(y="mean(chance):Q"))
    thetas = sorted(bars["theta"].unique(), key=lambda t: (t.split(" × ")[0], float(t.split(" × ")[1])))
    return (
        alt.layer(*layers, data=bars)
        .properties(width=alt.Step(18), height=150)
        .facet(column=alt.Column("ability:N", title=None), row=alt.Row("theta:N", title=None, sort=thetas))
        .properties(title="Abilities under each cluster's perturbation (dashed: unperturbed, dotted: chance)")
    )


# -- calibration --------------------------------------------------------------------------------
def expected_calibration_error(
    scores: pd.DataFrame,
    n_bins: int = 10,
    by: Sequence[str] = ("config_id", "task"),
) -> pd.DataFrame:
    """ECE of multiple-choice items, per group of ``by``.

    ``ECE = Σ_b (n_b / n) · |acc_b − conf_b|`` over ``n_bins`` equal-width bins of the
    confidence (the softmax probability of the chosen answer), where ``acc_b`` is the
    mean score and ``conf_b`` the mean confidence of the items in bin ``b``. Only
    multiple-choice rows scored by accuracy count (not generation, not ``bias``).
    """
    require(n_bins >= 1, f"n_bins must be ≥ 1, got {n_bins}")
    missing = [c for c in (*by, "confidence", "score") if c not in scores.columns]
    require(not missing, f"expected_calibration_error needs columns {missing}: pass evaluate_abilities output")
    # Calibration is about accuracy; a pct_stereotype "score" is no correctness.
    mc = scores.dropna(subset=["confidence"])
    if "metric" in mc.columns:
        mc = mc[mc["metric"] == "acc"]
    out = []
    for key, g in mc.groupby(list(by), sort=True):
        conf = g["confidence"].to_numpy(dtype=float)
        acc = g["score"].to_numpy(dtype=float)
        bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        ece = sum(
            (bins == b).sum() / len(conf) * abs(acc[bins == b].mean() - conf[bins == b].mean())
            for b in np.unique(bins)
        )
        key = key if isinstance(key, tuple) else (key,)
        out.append({**dict(zip(by, key)), "ece": float(ece), "n": len(conf),
                    "accuracy": float(acc.mean()), "mean_confidence": float(conf.mean())})
    return pd.DataFrame(out, columns=[*by, "ece", "n", "accuracy", "mean_confidence"])
