"""The lm-eval model interface of a perturbed masked LM (stage 05), scoring by pseudo-log-likelihood.

A masked LM (BERT, RoBERTa, ...) gives no left-to-right probability of a continuation. It is
scored the way Salazar et al. (2020) score a sentence, restricted to the continuation's
tokens ``c_1 … c_m`` after a context ``x``:

    log p(c | x) := Σ_j log p(c_j | x, c_{\\j}),

each continuation token masked in turn while the context and the other continuation tokens
stay visible. A multiple-choice item picks the choice with the largest such score, as lm-eval
does with a causal LM's log-likelihoods. ``is_greedy`` is whether every ``c_j`` is the most
likely token at its masked position.

:class:`MaskedPerturbedLM` answers lm-eval's ``loglikelihood`` requests this way, with a list
of :class:`~rephelpers.interventions.intervene.Intervention` applied in every masked copy
(:func:`rephelpers.interventions.intervene.masked_log_probs`, the function stages 03 and 04
score text with). A masked LM does not generate: ``generate_until`` and
``loglikelihood_rolling`` requests raise, and :func:`check_masked_tasks` refuses such tasks
before an evaluation starts. Why this is a class of its own and not a strategy of
:class:`~rephelpers.abilities.lm_eval_model.PerturbedLM`: see :mod:`rephelpers.abilities.lm_eval_model`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lm_eval.api.model import LM

from ..errors import RephelpersError, require
from ..interventions.intervene import Intervention, batch_keys, masked_log_probs
from ..progress import progress_bar
from ..representations.models import Model
from ..special_tokens import special_wrapping
from .lm_eval_model import UsesInterventions

SCORABLE_OUTPUT_TYPES = ("multiple_choice", "loglikelihood")
"""The lm-eval output types a masked LM can answer (by pseudo-log-likelihood)."""


def check_masked_tasks(model: Model, task_types: dict[str, str]) -> None:
    """Refuse, naming them, the tasks ``{name: output_type}`` a masked LM cannot answer.

    Generation (``generate_until``, e.g. the ``reasoning`` and ``instruction`` abilities)
    needs a model that writes text left to right, and ``loglikelihood_rolling`` a
    left-to-right perplexity; a masked LM has neither.
    """
    bad = {name: kind for name, kind in task_types.items() if kind not in SCORABLE_OUTPUT_TYPES}
    require(
        not bad,
        f"{model.name} is a masked LM: it cannot generate text or give a left-to-right perplexity, so "
        + ", ".join(f"{name} ({kind})" for name, kind in sorted(bad.items()))
        + " cannot be evaluated on it. Drop them from the abilities (or lm_eval_tasks): a masked LM answers "
        f"{' and '.join(SCORABLE_OUTPUT_TYPES)} tasks, scored by pseudo-log-likelihood.",
    )


class MaskedPerturbedLM(UsesInterventions, LM):
    """lm-eval model of a loaded masked LM whose every forward pass applies ``interventions``.

    The counterpart of :class:`~rephelpers.abilities.lm_eval_model.PerturbedLM` for masked
    LMs, with the same :meth:`use` to switch interventions between configs. Requests are
    tokenised without special tokens, ``context + continuation`` is wrapped in the
    tokenizer's own ([CLS] … [SEP]) and cut from the left of the context where it exceeds
    ``max_length``. ``batch_size`` rows are scored together, ``batch_size`` masked copies
    per forward pass.
    """

    def __init__(
        self,
        model: Model,
        interventions: Sequence[Intervention] = (),
        batch_size: int = 8,
        max_length: int | None = None,
        show_request_progress: bool = False,
    ) -> None:
        require(model.masked, f"MaskedPerturbedLM needs a masked LM; {model.name} is causal: use PerturbedLM.")
        require(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be a positive int, got {batch_size!r}")
        super().__init__()
        self.rh_model = model
        self.tokenizer = model.tokenizer
        self.batch_size = batch_size
        self.max_length = int(max_length or model.max_length)
        self._prefix, self._suffix = special_wrapping(self.tokenizer)
        n_special = len(self._prefix) + len(self._suffix)
        require(self.max_length > n_special + 1, f"max_length {self.max_length} leaves no room for tokens.")
        self.show_request_progress = show_request_progress
        self._interventions: list[Intervention] = []
        self.use(interventions)

    # -- tokenisation ---------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, split as lm-eval splits them for a causal LM: the
        context's trailing spaces move to the continuation, ``context + continuation`` is
        tokenised whole and the continuation is what follows the context's own tokens."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = self.tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        return whole[: len(ctx)], whole[len(ctx):]

    def _sequence(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """``(input ids with special tokens, positions of the continuation's tokens)``."""
        budget = self.max_length - len(self._prefix) - len(self._suffix)
        tokens = (ctx + cont)[-budget:]
        n_cont = min(len(cont), len(tokens))
        end = len(self._prefix) + len(tokens)
        return self._prefix + tokens + self._suffix, list(range(end - n_cont, end))

    # -- lm-eval's interface ----------------------------------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(Σ_j log p(c_j | ctx, c_{\\j}), every c_j the argmax)`` per ``(context, continuation)`` request."""
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self.score_pairs(pairs, progress=self.show_request_progress and not disable_tqdm)

    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]], progress: bool = False) -> list[tuple[float, bool]]:
        """Pseudo-log-likelihood of each token continuation given its token context (no special tokens)."""
        sequences = [self._sequence(list(ctx), list(cont)) for ctx, cont in pairs]
        # Longest first: rows of a batch have similar lengths, so little padding is computed.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
        device = self.rh_model.device
        pad = self.tokenizer.pad_token_id
        starts = range(0, len(order), self.batch_size)
        for start in progress_bar(starts, desc="pseudo-log-likelihood", disable=not progress, leave=False):
            rows = order[start : start + self.batch_size]
            width = max(len(sequences[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            targets = torch.zeros((len(rows), width), dtype=torch.bool)
            for row, i in enumerate(rows):
                tokens, positions = sequences[i]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                targets[row, positions] = True
            batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            logp, greedy = masked_log_probs(
                self.rh_model, batch["input_ids"], batch["attention_mask"], targets.to(device), self._interventions,
                batch_keys(self._interventions, batch), copies_per_pass=self.batch_size,
            )
            for row, i in enumerate(rows):
                scored = targets[row].to(device)
                results[i] = (float(logp[row].double().sum()), bool(greedy[row][scored].all()))
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise RephelpersError(
            f"{self.rh_model.name} is a masked LM: it has no left-to-right perplexity for loglikelihood_rolling "
            "tasks; evaluate multiple-choice or loglikelihood tasks instead."
        )

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise RephelpersError(
            f"{self.rh_model.name} is a masked LM: it cannot generate text for generate_until tasks; "
            "evaluate multiple-choice or loglikelihood tasks instead."
        )

    def get_model_info(self) -> dict[str, Any]:
        return {"model": self.rh_model.name, "scoring": "pseudo-log-likelihood"}
