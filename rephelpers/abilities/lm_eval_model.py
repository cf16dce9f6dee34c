"""The lm-eval model interface of a perturbed causal LM (stage 05): three classes, and why.

Stage 05 scores abilities through lm-eval, which asks a model object for ``loglikelihood``,
``loglikelihood_rolling`` and ``generate_until``. Three classes answer it, one per way of
answering, all sharing :class:`UsesInterventions` (the interventions and :meth:`~UsesInterventions.use`,
which swaps them between configs so one instance serves every config):

- :class:`PerturbedLM`: an ``HFLM`` around an already loaded causal
  :class:`~rephelpers.representations.models.Model` whose forward passes (log-likelihood
  batches and every greedy decoding step) run inside an nnsight trace that applies a list of
  :class:`~rephelpers.interventions.intervene.Intervention`; config by config. With no
  interventions it scores exactly like lm-eval's stock ``HFLM``. It is the reference path.
- :class:`SweepLM`: a :class:`PerturbedLM` whose first config's call answers every config
  at once (:func:`rephelpers.abilities.forward.sweep_loglikelihood`,
  :func:`~rephelpers.abilities.forward.sweep_generate`) and serves the others from what it
  kept. A subclass, not an option of :class:`PerturbedLM`, because it holds state across
  configs (the config set, the kept answers, the active config) that the per-config class
  must not have; its scores equal :class:`PerturbedLM`'s, which the tests check.
- :class:`~rephelpers.abilities.masked_lm.MaskedPerturbedLM` (its own module): a masked LM
  has no left-to-right likelihood, so it is scored by pseudo-log-likelihood with lm-eval's
  bare ``LM`` as base, not ``HFLM``, whose tokenisation, batching and generation assume a
  causal LM; it refuses generation.

Merging them into one class with the sweep and the masked scoring as strategies was weighed
(issue 29) and left: the three differ in their base class (``HFLM`` or ``LM``) and in the
state they keep, so a merged class would branch on the model's kind in every method lm-eval
calls, and :mod:`rephelpers.abilities.evaluation` picks one of the three in one place.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Self, Sequence

import nnsight
import torch
from lm_eval.models.huggingface import HFLM

from ..errors import require
from ..interventions.intervene import Intervention, apply_placed, needs_keys, place, validate
from ..interventions.tokenkeys import token_keys
from ..progress import progress_bar
from ..representations.models import Model
from .forward import greedy_generate, right_padded_last_index, sweep_generate, sweep_loglikelihood
from .lm_tasks import _quiet_lm_eval


class UsesInterventions:
    """What an lm-eval model class of this package shares: the interventions it applies to
    ``rh_model``'s forward passes, swapped between evaluations so one instance serves every config."""

    rh_model: Model
    _interventions: list[Intervention]

    @property
    def interventions(self) -> list[Intervention]:
        return list(self._interventions)

    def use(self, interventions: Sequence[Intervention]) -> Self:
        """Apply ``interventions`` (validated against the model) from the next request on."""
        self._interventions = validate(self.rh_model, interventions)
        return self


class PerturbedLM(UsesInterventions, HFLM):
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
        if model.remote is True:
            # A hosted model's local copy has no weights (device "meta"): inputs are sent from the CPU.
            self._device = model.device
        self.show_request_progress = show_request_progress
        self._interventions: list[Intervention] = []
        self._pair_tokens: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self.use(interventions)

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
        placed, nn = place(self.rh_model, self._interventions), self.rh_model.nn
        with torch.inference_mode(), self.rh_model.trace({"input_ids": inps}):
            apply_placed(placed, last_index, keys)
            logits = nnsight.save(nn.output.logits)
        return logits

    def _model_generate(
        self,
        context: torch.Tensor,
        max_length: int,
        stop: list[str],
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        return greedy_generate(
            self.rh_model,
            context,
            _greedy_mask(context, generation_kwargs),
            self._interventions,
            max_new_tokens=max_length - context.shape[1],
            stop=stop,
            eos_token_id=self.eot_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )


def _greedy_mask(context: torch.Tensor, generation_kwargs: dict[str, Any]) -> torch.Tensor:
    """The attention mask lm-eval passes with a generation batch (all ones if none), after
    refusing sampling: perturbed models decode greedily, so configs' answers pair."""
    mask = generation_kwargs.pop("attention_mask", None)
    sampling = bool(generation_kwargs.get("do_sample")) or float(generation_kwargs.get("temperature") or 0.0) > 0
    require(
        not sampling,
        "PerturbedLM decodes greedily; this task asks for sampling "
        f"({ {k: generation_kwargs[k] for k in ('do_sample', 'temperature') if k in generation_kwargs} }). "
        "Set do_sample: false in the task's generation_kwargs.",
    )
    return torch.ones_like(context) if mask is None else mask


class SweepLM(PerturbedLM):
    """A :class:`PerturbedLM` that answers every config's requests at once.

    Log-likelihood requests: the first config's call computes every config's answers
    (:func:`sweep_loglikelihood`) and keeps them, keyed by the exact token requests, for the
    other configs' calls. Generation: lm-eval hands the same batches to every config, so
    the first config's call of a batch decodes it under every config together
    (:func:`sweep_generate`) and keeps each config's tokens, keyed by the batch's tokens and
    decoding settings. :meth:`select` switches the config.

    So the first config's turn does nearly all the work: ``sweep_progress`` shows it (the
    log-likelihood batches, the generation requests decoded), since a bar over configs would
    stand still until it ends.
    """

    def __init__(
        self,
        model: Model,
        configs: Mapping[str, Sequence[Intervention]],
        batch_size: int = 8,
        max_batch_tokens: int = 16384,
        show_request_progress: bool = False,
        pack_choices: bool = True,
        sweep_progress: bool = False,
    ) -> None:
        super().__init__(model, (), batch_size=batch_size, show_request_progress=show_request_progress)
        self.sweep_progress = sweep_progress
        self._decoding: progress_bar | None = None
        self.configs = {cid: validate(model, ivs) for cid, ivs in configs.items()}
        self.max_batch_tokens = max_batch_tokens
        self.pack_choices = pack_choices
        self.active: str | None = None
        self._answers: dict[tuple, dict[str, list[tuple[float, bool]]]] = {}
        self._generated: dict[tuple, dict[str, torch.Tensor]] = {}
        self._decoded: set[str] = set()

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
                progress=self.show_request_progress or self.sweep_progress,
                pack_choices=self.pack_choices,
            )
        return list(self._answers[key][self.active])

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        fresh = self.sweep_progress and any(self._generation_key(r) not in self._decoded for r in requests)
        if not fresh:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._decoding = progress_bar(total=len(requests), desc=f"{len(self.configs)} configs together: decoded",
                                      unit="requests", leave=False)
        try:
            answers = super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self._decoding.close()
            self._decoding = None
        self._decoded.update(self._generation_key(r) for r in requests)
        return answers

    @staticmethod
    def _generation_key(request: Any) -> str:
        return repr(request.args)

    def _model_generate(
        self,
        context: torch.Tensor,
        max_length: int,
        stop: list[str],
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        require(self.active is not None, "SweepLM: select(config_id) before evaluating")
        mask = _greedy_mask(context, generation_kwargs)
        key = (tuple(context.shape), context.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes(),
               int(max_length), tuple(stop))
        if key not in self._generated:
            self._generated[key] = sweep_generate(
                self.rh_model,
                context,
                mask,
                self.configs,
                max_new_tokens=max_length - context.shape[1],
                stop=stop,
                eos_token_id=self.eot_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                max_batch_tokens=self.max_batch_tokens,
            )
            if self._decoding is not None:
                self._decoding.update(int(context.shape[0]))
        return self._generated[key][self.active]
