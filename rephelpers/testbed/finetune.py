"""Continued pre-training of the top layers on a corpus, with and without a cluster.

The ground-truth testbed fine-tunes one model ``f_all`` on the whole corpus and, for each
planted cluster ``p``, a model ``f_{−p}`` on the corpus without ``D_p``, under the same
budget. Everything here serves that comparison:

- :func:`pack_blocks` turns each group's documents into fixed blocks of ``T`` tokens (the
  documents of a group concatenated, EOS between them), so leaving a group out removes
  exactly its blocks and no padding is needed.
- Only the top ``train_layers`` decoder layers are trained; the layers below are frozen,
  so the hidden state entering the first trained layer is the same for every fine-tune.
  :func:`prefix_states` computes it once per block and caches it; a training step then
  runs only the trained layers, the final norm and the (frozen, tied) LM head.
- :func:`finetune` minimises the next-token loss (matrix products in bfloat16 autocast where
  the device does bfloat16 natively and a measured probe finds it faster, fp32 otherwise:
  ``precision="auto"``, resolved by :func:`resolve_precision`; weights, optimiser state and
  the loss stay float32)
  ``L(θ) = −(1/|B|(T−1)) Σ_{b∈B} Σ_{t<T} log p_θ(x_{b,t+1} | x_{b,≤t})`` with AdamW, a linear
  warm-up and linear decay, over ``steps`` batches of ``batch_size`` blocks drawn uniformly
  with replacement from the allowed blocks by a generator seeded with ``seed``. Every
  fine-tune of a comparison uses the same ``steps``, ``batch_size`` and ``T``: the token budget
  ``steps · batch_size · T`` is identical, and a left-out cluster's share is taken by more
  blocks of the rest.

Trained weights are stored as a small safetensors file of the trained layers, keyed by a
hash of everything that produced them, so a finished fine-tune is never redone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..artifacts import stable_hash
from ..errors import RephelpersError, require
from ..representations.models import Model, model_fingerprint

_COMPLETE = ".complete"


PRECISIONS = ("auto", "bf16", "fp32")
# The probe's matrix product has the shape of one SmolLM2 MLP projection on a batch of blocks
# (512 tokens × 576 → 1536): the product that dominates a fine-tune step.
_PROBE_SHAPE = (512, 576, 1536)
# bf16 must beat fp32 by this factor: a tie is not worth the rounding.
_PROBE_MARGIN = 1.1


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: the probe then decides alone)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 products in hardware, as torch dispatches for it.

    x86: AVX-512 BF16 or AMX-BF16 in the CPU flags *and* torch's kernels at AVX-512 level
    (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=avx2`` turns them down);
    aarch64: the ``bf16`` feature. Without native support bfloat16 autocast is emulated and
    several times slower than fp32 (measured 8.7× for a Linear of the model's shape on an
    AVX2-only CPU, issue 30).
    """
    flags = _cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.startswith("AVX512") and bool(flags & {"avx512_bf16", "amx_bf16"})


def _seconds(fn: Any, repeats: int = 3) -> float:
    fn()  # warm-up: kernel selection, allocation
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


@functools.lru_cache(maxsize=None)
def probe_bf16_speedup(device_type: str = "cpu", threads: int | None = None) -> float:
    """fp32 time / bf16-autocast time of one forward+backward of a Linear of the model's shape.

    Measured once per process, device and thread count (about 0.1-1 s on a CPU). > 1: bf16 is faster.
    """
    del threads  # part of the cache key only: the ratio depends on how many threads share the work
    n, d_in, d_out = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=gen).to(device_type)
    layer = torch.nn.Linear(d_in, d_out).to(device_type)

    def step(bf16: bool) -> None:
        layer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            out = layer(x)
        out.float().square().mean().backward()
        if device_type == "cuda":
            torch.cuda.synchronize()

    return _seconds(lambda: step(False)) / _seconds(lambda: step(True))


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"bf16"`` or ``"fp32"`` for a fine-tune on ``device``.

    An explicit ``"bf16"``/``"fp32"`` is kept. ``"auto"``: on a GPU, bf16 where the device
    supports it; on a CPU, bf16 only where the CPU does bfloat16 natively
    (:func:`native_cpu_bf16`) *and* :func:`probe_bf16_speedup` measures it at least
    ``1.1×`` faster than fp32 here; fp32 everywhere else (other devices included). The
    result is part of every fine-tune's cache key, so a fine-tune made at one precision is
    never reused as if it were the other.
    """
    require(precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu" and native_cpu_bf16():
        return "bf16" if probe_bf16_speedup("cpu", torch.get_num_threads()) >= _PROBE_MARGIN else "fp32"
    return "fp32"


def precision_record(config: "FineTuneConfig", device: torch.device | str) -> dict[str, Any]:
    """What a run records about its fine-tunes' precision: asked, resolved, and why."""
    resolved = resolve_precision(config.precision, device)
    record: dict[str, Any] = {"asked": config.precision, "resolved": resolved, "device": str(device)}
    if torch.device(device).type == "cpu":
        record["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        record["native_bf16"] = native_cpu_bf16()
        if config.precision == "auto" and record["native_bf16"]:
            record["bf16_speedup"] = round(probe_bf16_speedup("cpu", torch.get_num_threads()), 2)
    return record


@dataclass(frozen=True)
class FineTuneConfig:
    """The budget and optimiser of one fine-tune (identical across a leave-out comparison)."""

    steps: int = 240
    batch_size: int = 8
    block_tokens: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: int = 10
    train_layers: int = 8
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_tokens", "train_layers"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"FineTuneConfig.{name} must be a positive int, got {value!r}")
        require(self.block_tokens >= 8, f"block_tokens={self.block_tokens} is too short: use at least 8")
        require(self.lr > 0, f"lr must be positive, got {self.lr!r}")
        require(self.precision in PRECISIONS,
                f"precision must be one of {PRECISIONS} ('auto': what the device does fastest), got {self.precision!r}")

    @property
    def tokens(self) -> int:
        """The token budget ``steps · batch_size · block_tokens``."""
        return self.steps * self.batch_size * self.block_tokens

    def resolved(self, device: torch.device | str) -> "FineTuneConfig":
        """This config with ``precision`` resolved for ``device`` (``"auto"`` → ``"bf16"``/``"fp32"``)."""
        return replace(self, precision=resolve_precision(self.precision, device))


@dataclass
class Blocks:
    """Fixed-length token blocks and the group each comes from."""

    ids: torch.Tensor  # [n_blocks, T] int64
    group: np.ndarray  # [n_blocks] str

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def tokens_per_group(self) -> dict[str, int]:
        names, counts = np.unique(self.group, return_counts=True)
        return {str(n): int(c) * int(self.ids.shape[1]) for n, c in zip(names, counts)}


def pack_blocks(texts: Sequence[str], groups: Sequence[str], tokenizer: Any, block_tokens: int) -> Blocks:
    """Pack each group's texts into blocks of ``block_tokens`` tokens.

    Within a group, texts are tokenised (no special tokens), joined with the EOS token and
    cut into consecutive blocks; a last partial block is dropped. Groups never share a
    block. Deterministic: groups in sorted order, texts in the given order.
    """
    require(len(texts) == len(groups) and len(texts) > 0, "pack_blocks: give one group per text, and at least one text")
    eos = tokenizer.eos_token_id
    require(eos is not None, "the tokenizer has no EOS token to separate documents")
    by_group: dict[str, list[int]] = {}
    for text, group in zip(texts, groups):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        by_group.setdefault(str(group), []).extend(ids + [eos])
    rows, labels = [], []
    for group in sorted(by_group):
        stream = by_group[group]
        n = len(stream) // block_tokens
        require(n >= 1, f"group {group!r} has {len(stream)} tokens, fewer than one block of {block_tokens}")
        rows.append(torch.tensor(stream[: n * block_tokens], dtype=torch.long).view(n, block_tokens))
        labels += [group] * n
    return Blocks(ids=torch.cat(rows), group=np.asarray(labels))


def first_trained_layer(model: Model, train_layers: int) -> int:
    require(
        not model.masked,
        f"{model.name} is a masked LM: the testbed continues pre-training with the next-token loss, which a masked "
        "LM is not trained with. Use a causal base_model for notebook 07 (stages 01-06 take masked LMs).",
    )
    require(
        1 <= train_layers <= model.n_layers,
        f"train_layers={train_layers} must lie in 1..{model.n_layers} for {model.name}",
    )
    return model.n_layers - train_layers


def _layers(model: Model) -> torch.nn.ModuleList:
    node = model.hf
    for part in model.layers_path.split("."):
        node = getattr(node, part)
    return node


@contextlib.contextmanager
def _only_layers(model: Model, start: int) -> Iterator[None]:
    """Temporarily make the decoder run only layers ``start..`` (inputs_embeds = their input)."""
    parent_path, _, attr = model.layers_path.rpartition(".")
    parent = model.hf
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    full = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def _top_logits(model: Model, states: torch.Tensor, start: int) -> torch.Tensor:
    with _only_layers(model, start):
        return model.hf(inputs_embeds=states, use_cache=False).logits


class _Stop(Exception):
    pass


def _states_below(model: Model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """``hidden_states[start]`` of ``ids``, running only the layers below ``start``."""
    if start == 0:
        return model.hf.get_input_embeddings()(ids)
    captured: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = _layers(model)[start - 1].register_forward_hook(hook)
    try:
        model.hf(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    require(len(captured) == 1, f"decoder layer {start - 1} was not reached in the forward pass")
    return captured[0]


def prefix_states(model: Model, blocks: Blocks, start: int, batch_size: int = 16, cache: Path | None = None) -> torch.Tensor:
    """The hidden state entering decoder layer ``start`` for every block: ``[n_blocks, T, d]``.

    HF numbering: ``hidden_states[start]`` (the embeddings when ``start = 0``). Cached in
    ``cache`` (a ``.pt`` file) when given. On first use the shortcut is checked: running the
    layers ``start..`` on these states must give the full model's logits, else the model's
    architecture transforms ``inputs_embeds`` and top-layer training cannot use it.
    """
    if cache is not None and cache.exists():
        states = torch.load(cache)
        if states.shape[:2] == blocks.ids.shape:
            return states
    out = []
    model.hf.eval()
    with torch.inference_mode():
        for i in range(0, len(blocks), batch_size):
            out.append(_states_below(model, blocks.ids[i : i + batch_size].to(model.device), start).float().cpu())
        states = torch.cat(out)
        probe = blocks.ids[:2].to(model.device)
        full = model.hf(probe, use_cache=False).logits
        short = _top_logits(model, states[:2].to(model.device), start)
        if not torch.allclose(full, short, atol=1e-3, rtol=1e-3):
            raise RephelpersError(
                f"{model.name}: running only decoder layers {start}.. on cached hidden states does not "
                "reproduce the full forward pass (the architecture transforms inputs_embeds). Use "
                f"train_layers={model.n_layers} (full fine-tune) for this model."
            )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(states, tmp)
        tmp.replace(cache)
    return states


def trained_parameters(model: Model, train_layers: int) -> dict[str, torch.nn.Parameter]:
    """The parameters a fine-tune changes: every parameter of the top ``train_layers`` layers."""
    start = first_trained_layer(model, train_layers)
    prefix = model.layers_path + "."
    params = {}
    for name, p in model.hf.named_parameters():
        if name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) >= start:
            params[name] = p
    return params


def snapshot(model: Model, train_layers: int) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters :func:`trained_parameters` names."""
    return {k: p.detach().clone() for k, p in trained_parameters(model, train_layers).items()}


@contextlib.contextmanager
def using_weights(model: Model, state: Mapping[str, torch.Tensor]) -> Iterator[Model]:
    """Evaluate ``model`` with ``state`` loaded into its parameters; restore them afterwards."""
    params = dict(model.hf.named_parameters())
    missing = [k for k in state if k not in params]
    require(not missing, f"weights for parameters the model lacks: {missing[:3]}")
    saved = {k: params[k].detach().clone() for k in state}
    try:
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


def block_schedule(allowed: np.ndarray, config: FineTuneConfig) -> np.ndarray:
    """Block indices of every step, ``[steps, batch_size]``: uniform with replacement over ``allowed``."""
    require(len(allowed) > 0, "no blocks left to train on")
    rng = np.random.default_rng(config.seed)
    return np.asarray(allowed)[rng.integers(0, len(allowed), size=(config.steps, config.batch_size))]


def lr_at(step: int, config: FineTuneConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 10% of ``lr``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    frac = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (1.0 - 0.9 * frac)


def finetune(
    model: Model,
    blocks: Blocks,
    states: torch.Tensor,
    config: FineTuneConfig,
    exclude: Sequence[str] = (),
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the top ``config.train_layers`` layers on the blocks whose group is not in ``exclude``.

    ``states`` are :func:`prefix_states` of ``blocks`` at the first trained layer. Returns the
    trained parameters (CPU tensors) and the loss of every step; the model's own weights
    are left as they were.
    """
    config = config.resolved(model.device)
    start = first_trained_layer(model, config.train_layers)
    require(states.shape[:2] == blocks.ids.shape, "states do not belong to these blocks: recompute prefix_states")
    unknown = sorted(set(exclude) - set(blocks.group.tolist()))
    require(not unknown, f"exclude names groups the blocks do not have: {unknown}; groups: {sorted(set(blocks.group))}")
    allowed = np.flatnonzero(~np.isin(blocks.group, list(exclude)))
    schedule = block_schedule(allowed, config)
    params = trained_parameters(model, config.train_layers)
    original = {k: p.detach().clone() for k, p in params.items()}
    requires = {k: p.requires_grad for k, p in model.hf.named_parameters()}
    for p in model.hf.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    model.hf.train()
    started = time.time()
    try:
        for step, idx in enumerate(schedule):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            ids = blocks.ids[idx].to(model.device)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                logits = _top_logits(model, states[idx].to(model.device), start)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress and (step + 1) % max(1, config.steps // 10) == 0:
                print(f"  step {step + 1}/{config.steps}: loss {np.mean(losses[-10:]):.3f} "
                      f"({time.time() - started:.0f}s)", flush=True)
        trained = {k: p.detach().cpu().clone() for k, p in params.items()}
    finally:
        model.hf.eval()
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(original[k])
        for k, p in model.hf.named_parameters():
            p.requires_grad_(requires[k])
    return trained, losses


def block_loss(model: Model, blocks: Blocks, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss of the model on each group's blocks (nats per token)."""
    totals: dict[str, list[float]] = {}
    model.hf.eval()
    with torch.inference_mode():
        for i in range(0, len(blocks), batch_size):
            ids = blocks.ids[i : i + batch_size].to(model.device)
            logits = model.hf(ids, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
            ).mean(dim=1)
            for g, v in zip(blocks.group[i : i + batch_size], nll.tolist()):
                totals.setdefault(str(g), []).append(v)
    return {g: float(np.mean(v)) for g, v in sorted(totals.items())}


# -- cached fine-tunes ---------------------------------------------------------------------------
def finetune_key(model: Model, blocks: Blocks, config: FineTuneConfig, exclude: Sequence[str]) -> str:
    """Hash of everything a fine-tune depends on: base model, blocks, budget, optimiser (precision
    resolved for the model's device, never ``"auto"``), left-out groups."""
    ids = blocks.ids.numpy()
    config = config.resolved(model.device)
    return stable_hash("finetune-v1", model_fingerprint(model), ids, blocks.group.astype(str), asdict(config), sorted(exclude))


def cached_finetune(
    model: Model,
    blocks: Blocks,
    states: torch.Tensor,
    config: FineTuneConfig,
    exclude: Sequence[str],
    cache: Path,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`finetune`, stored in ``cache/<key>/`` (trained layers + ``meta.json``) and reused.

    A directory without its ``.complete`` marker (an interrupted run) is redone.
    """
    config = config.resolved(model.device)
    key = finetune_key(model, blocks, config, exclude)
    folder = Path(cache) / key
    if (folder / _COMPLETE).exists():
        return load_file(str(folder / "trained.safetensors")), json.loads((folder / "meta.json").read_text())
    started = time.time()
    trained, losses = finetune(model, blocks, states, config, exclude, progress=progress)
    meta = {
        "key": key, "exclude": sorted(exclude), "config": asdict(config), "tokens": config.tokens,
        "precision": config.precision,
        "seconds": round(time.time() - started, 1), "losses": losses,
        "first_loss": float(np.mean(losses[: max(1, len(losses) // 10)])),
        "last_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
    }
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp / "trained.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta))
    (tmp / _COMPLETE).write_text(key)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return trained, meta


def save_model_folder(model: Model, state: Mapping[str, torch.Tensor], folder: Path) -> Path:
    """Write the model with ``state`` loaded as a ``save_pretrained`` folder (+ tokenizer); reused when complete."""
    folder = Path(folder)
    if (folder / _COMPLETE).exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    with using_weights(model, state):
        model.hf.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    (tmp / _COMPLETE).write_text("complete\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder

