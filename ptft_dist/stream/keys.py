"""Counter-based randomness: every random choice of the stream is a hash, not a generator draw.

A value is ``hash(seed, epoch, sample id or shard, purpose, position)`` (splitmix64 finaliser), so
there is no generator state to carry, save or replay: a sample comes out the same whatever
process, rank, worker or batch builds it (docs/design.md, guarantee 1), and a whole micro-batch
draws its numbers with a handful of vectorised numpy operations (no per-token Python).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

_U64 = np.uint64
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1

# One stream constant per purpose, so different decisions never share random numbers.
S_TARGET, S_TARGET_LEN, S_SPLIT, S_IS_NEXT, S_PARTNER, S_PARTNER_START = 1, 2, 3, 4, 5, 6
S_TRUNC_A, S_TRUNC_B, S_TRUNC_A2, S_TRUNC_B2 = 7, 8, 9, 10
S_MASK_SCORE, S_MASK_ACTION, S_MASK_RANDOM, S_WORD_SCORE = 11, 12, 13, 14
S_SHARD, S_SAMPLE, S_PART = 15, 16, 17


# --------------------------------------------------------------------------- counter-based RNG


def mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64 finaliser: a bijective uint64 → uint64 hash with full avalanche (elementwise)."""
    x = np.array(x, dtype=_U64)  # a copy: updated in place below
    if x.ndim == 0:  # numpy scalars warn on (intended) wrap-around; arrays do not
        with np.errstate(over="ignore"):
            x = x ^ (x >> _U64(30))
            x = x * _M1
            x = x ^ (x >> _U64(27))
            x = x * _M2
            return np.asarray(x ^ (x >> _U64(31)))
    x ^= x >> _U64(30)
    x *= _M1
    x ^= x >> _U64(27)
    x *= _M2
    x ^= x >> _U64(31)
    return x


def _u64(v: int | np.ndarray) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v.astype(np.int64, copy=False).view(_U64) if v.dtype.kind == "i" else v.astype(_U64, copy=False)
    return np.asarray(int(v) & _MASK64, dtype=_U64)


def derive_key(*parts: int | np.ndarray) -> np.ndarray:
    """Hash a tuple of integers (scalars or broadcastable arrays) into a uint64 key."""
    h = np.asarray(0x6A09E667F3BCC908, dtype=_U64)
    with np.errstate(over="ignore"):
        for p in parts:
            h = mix64(h ^ mix64(_u64(p) + _GOLDEN))
    return h


_PREFIX: dict[tuple[int, int], np.ndarray] = {}


def sample_keys(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """The random key of each sample: a function of (seed, epoch, sample id) only.

    Equal to ``derive_key(seed, epoch, S_SAMPLE, ids)``; the scalar prefix is memoised.
    """
    prefix = _PREFIX.get((seed, epoch))
    if prefix is None:
        if len(_PREFIX) > 64:
            _PREFIX.clear()
        prefix = _PREFIX[(seed, epoch)] = derive_key(seed, epoch, S_SAMPLE)
    with np.errstate(over="ignore"):
        return mix64(prefix ^ mix64(_u64(np.asarray(ids, dtype=np.int64)) + _GOLDEN))


def shard_key(seed: int, epoch: int, shard: int) -> np.ndarray:
    return derive_key(seed, epoch, S_SHARD, shard)


_SALTS: dict[int, np.uint64] = {}


def _salt(stream: int) -> np.uint64:
    s = _SALTS.get(stream)
    if s is None:
        with np.errstate(over="ignore"):
            s = _SALTS[stream] = _U64(mix64(np.asarray(stream, dtype=_U64) * _GOLDEN + _U64(0x632BE59BD9B4E019)))
    return s


def hash_streams(keys: np.ndarray, stream: int, counters: Optional[np.ndarray] = None) -> np.ndarray:
    """uint64 hashes of (key, stream) or, with ``counters`` (broadcast against ``keys``), (key, stream, counter)."""
    salt = _salt(stream)
    if counters is None:
        return mix64(keys ^ salt)
    c = _u64(np.asarray(counters))
    if c.ndim == 0:
        with np.errstate(over="ignore"):
            c = mix64(c * _GOLDEN + salt)
    else:
        c = c * _GOLDEN
        c += salt
        c = mix64(c)
    return mix64(keys ^ c)


_COUNTERS: dict[int, np.ndarray] = {}


def counter_hashes(stream: int, n: int) -> np.ndarray:
    """The counter half of ``hash_streams(keys, stream, arange(n))`` (memoised, read-only):
    ``mix64(keys[:, None] ^ counter_hashes(stream, n)[None, :])`` equals it."""
    c = _COUNTERS.get(stream)
    if c is None or len(c) < n:
        c = _u64(np.arange(max(n, 512), dtype=np.int64)) * _GOLDEN
        c += _salt(stream)
        c = mix64(c)
        c.flags.writeable = False
        _COUNTERS[stream] = c
    return c[:n]


_SALT_ROWS: dict[tuple[int, ...], np.ndarray] = {}


def hash_many(keys: np.ndarray, streams: tuple[int, ...], counters: Optional[np.ndarray] = None) -> np.ndarray:
    """``hash_streams(keys, s, counters)`` for several streams at once, as columns: shape
    ``(len(keys), len(streams))``, the same values in one vectorised pass instead of one per stream
    (a micro-batch draws all its per-sample numbers this way). ``keys``, ``counters``: 1-D."""
    salts = _SALT_ROWS.get(streams)
    if salts is None:
        salts = _SALT_ROWS[streams] = np.array([_salt(s) for s in streams], dtype=_U64)[None, :]
    k = np.asarray(keys, dtype=_U64)[:, None]
    if counters is None:
        return mix64(k ^ salts)
    c = _u64(np.asarray(counters))[:, None] * _GOLDEN
    c = c + salts
    return mix64(k ^ mix64(c))


def to_unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes → float64 uniforms in [0, 1)."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform(keys: np.ndarray, stream: int, counters: Optional[np.ndarray] = None) -> np.ndarray:
    return to_unit(hash_streams(keys, stream, counters))


try:  # numpy >= 2.0
    _bitcount = np.bitwise_count

    def popcount64(x: np.ndarray) -> np.ndarray:
        return _bitcount(x).astype(np.int64)

except AttributeError:  # pragma: no cover - numpy 1.x
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)

    def popcount64(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=_U64)
        return _POP8[x.view(np.uint8).reshape(*x.shape, 8)].sum(-1)


def binomial_half(n: np.ndarray, keys: np.ndarray, stream: int, stream2: int,
                  h: Optional[np.ndarray] = None) -> np.ndarray:
    """Binomial(n, 1/2) per element: exact (popcount of n random bits) for n <= 64, normal beyond.
    ``h``: ``hash_streams(keys, stream)`` when the caller already has it (:func:`hash_many`)."""
    n = np.asarray(n, dtype=np.int64)
    out = np.zeros(n.shape, dtype=np.int64)
    if not n.any():
        return out
    if h is None:
        h = hash_streams(keys, stream)
    small = n <= 64
    shift = np.minimum(n, 63).astype(_U64)
    bits = np.where(n >= 64, _U64(_MASK64), (_U64(1) << shift) - _U64(1))
    out = np.where(small, popcount64(h & bits), 0)
    if not small.all():
        u1 = np.maximum(to_unit(h), 1e-300)
        u2 = uniform(keys, stream2)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        approx = np.clip(np.rint(n / 2.0 + 0.5 * np.sqrt(n) * z), 0, n).astype(np.int64)
        out = np.where(small, out, approx)
    return out

