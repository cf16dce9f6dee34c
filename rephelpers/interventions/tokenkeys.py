"""Per-token keys and counter-based Gaussian draws, identical on every machine and batch.

A perturbation that draws random numbers (``Noise``) must give a token the same draw
whichever batch, row, padding or decoding step it is processed in, and a fresh draw for
every other token. Seeding a generator per call does neither: the draw then depends on
the tensor's shape and a row's place in it, and every KV-cache decoding step (one new
token per row) gets the same vector. Here each token instead gets a key that is a
function of its row's real tokens up to and including it, and the draws are a hash of
``(seed, key, dimension)``:

- ``term_s = mix(p_s, x_s)`` for the real token ``x_s`` at real position ``p_s`` (counted
  from the row's first real token, padding left out);
- ``key_t = fmix32(Σ_{s ≤ t} term_s mod 2³²)``, so the key depends on the prefix
  ``x_{≤t}`` exactly as the hidden state ``h_t`` of a causal LM does;
- ``z = √(−2 ln u₁) · cos(2π u₂)`` (Box–Muller) with ``u_j = (c_j + 1) / 2³²`` and
  ``c_j = mix(mix(mix(salt, seed), key_t), 2i + j)`` for dimension ``i``.

``mix(h, v) = fmix32(h ⊕ fmix32(v + 0x9E3779B9))`` with MurmurHash3's 32-bit finaliser
``fmix32``. All integer arithmetic stays below 2⁶³ in int64 tensors (32-bit products are
split into 16-bit halves), so no step relies on overflow behaviour, and the integers are
bit-identical on every device; only the final ``log``/``cos`` are floating point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_NOISE_SALT = 0x6E6F6973  # "nois": keeps noise draws apart from the key hashes


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x · c mod 2³²`` for ``x`` in [0, 2³²), without an int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser, elementwise on int64 values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def mix(h: torch.Tensor, v: torch.Tensor | int) -> torch.Tensor:
    """Hash ``v`` into ``h`` (both in [0, 2³²), broadcast)."""
    return fmix32(h ^ fmix32((torch.as_tensor(v, device=h.device) + _GOLDEN) & M32))


@dataclass(frozen=True)
class TokenKeys:
    """Keys of a batch's tokens, and what is needed to continue each row.

    ``keys [b, s]``: int64 in [0, 2³²), a function of the row's real tokens up to each
    position (padding positions get a key too; nothing reads their states).
    ``prefix [b]``/``length [b]``: the running sum and the number of real tokens, so that
    the next decoding step's tokens get the keys a full forward pass would give them.
    """

    keys: torch.Tensor
    prefix: torch.Tensor
    length: torch.Tensor


def token_keys(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    previous: TokenKeys | None = None,
) -> TokenKeys:
    """Keys of ``input_ids [b, s]`` (see the module docstring).

    ``attention_mask`` marks real tokens (left or right padding alike; ``None``: all real,
    as in lm-eval's right-padded batches, where padding follows every real token and so
    never enters a real token's key). ``previous`` continues rows whose earlier tokens are
    in the KV cache.
    """
    ids = input_ids.long() & M32
    real = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device).long()
    rows = ids.shape[0]
    start = torch.zeros(rows, dtype=torch.long, device=ids.device) if previous is None else previous.length
    carried = torch.zeros(rows, dtype=torch.long, device=ids.device) if previous is None else previous.prefix
    positions = (start[:, None] + real.cumsum(-1) - 1).clamp(min=0)
    terms = mix(positions & M32, ids) * real
    # Each term is < 2³², so the running sum stays far below 2⁶³ for any sequence length.
    prefix = (carried[:, None] + terms.cumsum(-1)) & M32
    return TokenKeys(keys=fmix32(prefix), prefix=prefix[:, -1], length=start + real.sum(-1))


def row_keys(shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Keys for tensors without tokens (pooled vectors): the flat index of each row."""
    return torch.arange(math.prod(shape), dtype=torch.long, device=device).reshape(tuple(shape))


def standard_normal(seed: int, keys: torch.Tensor, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``z [..., len(dims)]``: standard normal draws for ``keys [...]`` and dimensions ``dims``."""
    seed = int(seed) % (1 << 64)
    device = keys.device
    base = mix(mix(torch.tensor(_NOISE_SALT, device=device), seed & M32), seed >> 32)
    keyed = mix(base, keys.long() & M32)[..., None]
    index = torch.as_tensor([int(i) for i in dims], dtype=torch.long, device=device)
    c1, c2 = mix(keyed, 2 * index), mix(keyed, 2 * index + 1)
    u1 = (c1.to(dtype) + 1.0) / 2.0**32  # in (0, 1]: log is finite
    u2 = c2.to(dtype) / 2.0**32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
