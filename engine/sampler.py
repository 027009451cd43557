"""Logits -> tokens (+ log-probabilities), per-row temperature / top-k / top-p / seed.

Contract:
- Greedy rows (temperature below `GREEDY_EPS`, i.e. 0) take the argmax after banning; ties go to
  the lowest token id.
- Random rows: logits / temperature, then top-k (keep the k highest), then top-p on the
  renormalised top-k distribution (keep the smallest prefix, by descending probability, whose mass
  reaches top_p; the top token is always kept), then one draw. Ties in the ordering are broken by
  token id, so `top_k=1` and a tiny `top_p` agree with greedy.
- Banned tokens (eos/stop ids while `min_tokens` is not reached) get probability 0 everywhere.
- Determinism: a row with a seed draws from a generator seeded by a hash of
  (seed, output_index), so its token depends only on (logits row, params, seed, output_index):
  not on the rest of the batch, its row position, or a preemption and recompute in between.
  Rows without a seed draw from a module-level generator (nondeterministic).
- Log-probabilities are those of the RAW model distribution (log_softmax of the logits before
  temperature, top-k, top-p and banning), as vLLM returns by default.

The draw is an exponential race, `argmax(p / q)` with `q ~ Exp(1)` i.i.d. per token, which picks
token i with probability p_i; it needs no device sync and keeps each seeded row's random stream
a function of that row alone. Everything is computed in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loraplex.scheduler.sequence import Sequence

logger = logging.getLogger(__name__)

GREEDY_EPS = 1e-5  # temperatures below this are greedy (SamplingParams allows only 0 or > 0)
MAX_TOP_LOGPROBS = 20

_MASK64 = (1 << 64) - 1
_unseeded_generators: dict[torch.device, torch.Generator] = {}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, output_index: int) -> int:
    """The generator seed of a seeded row: a stable hash of (seed, output_index), in [0, 2^63)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (output_index & _MASK64)) >> 1


def _unseeded_generator(device: torch.device) -> torch.Generator:
    gen = _unseeded_generators.get(device)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.seed()  # nondeterministic
        _unseeded_generators[device] = gen
    return gen


@dataclass
class SamplingBatch:
    """Per-row sampling inputs for one step, built once per step by the runner (host lists).

    `output_index[i]` is the number of tokens row i's sequence has generated so far, i.e. the
    index of the token being drawn. `banned[i]` holds token ids that must not be drawn (eos and
    stop ids while the sequence has fewer than `min_tokens` outputs), otherwise `()`.
    """

    temperatures: list[float]
    top_ps: list[float]
    top_ks: list[int]
    seeds: list[int | None]
    output_index: list[int]
    banned: list[tuple[int, ...]]
    num_top_logprobs: list[int]

    def __post_init__(self) -> None:
        n = len(self.temperatures)
        fields = (self.top_ps, self.top_ks, self.seeds, self.output_index, self.banned)
        if any(len(f) != n for f in (*fields, self.num_top_logprobs)):
            raise ValueError("SamplingBatch: all per-row lists must have the same length")
        if any(not 0 <= k <= MAX_TOP_LOGPROBS for k in self.num_top_logprobs):
            raise ValueError(f"num_top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    def __len__(self) -> int:
        return len(self.temperatures)

    @classmethod
    def from_seqs(cls, seqs: list[Sequence]) -> SamplingBatch:
        """One row per sequence, in order; each row draws that sequence's next token."""
        temps, top_ps, top_ks, seeds, out_idx, banned, n_top = [], [], [], [], [], [], []
        for seq in seqs:
            p = seq.params
            n_out = seq.num_output_tokens
            temps.append(float(p.temperature))
            top_ps.append(float(p.top_p))
            top_ks.append(int(p.top_k))
            seeds.append(p.seed)
            out_idx.append(n_out)
            n_top.append(int(p.logprobs))
            if n_out < p.min_tokens:
                ids = (() if p.ignore_eos else tuple(seq.eos_token_ids)) + p.stop_token_ids
                banned.append(tuple(dict.fromkeys(int(t) for t in ids)))
            else:
                banned.append(())
        return cls(temps, top_ps, top_ks, seeds, out_idx, banned, n_top)

    @property
    def all_greedy(self) -> bool:
        return all(t < GREEDY_EPS for t in self.temperatures)


@dataclass
class SamplerOutput:
    """Per row: the drawn token, its raw log-probability, and the top-n (token, raw logprob)
    alternatives sorted by descending logprob (`[]` when the row asked for none)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]


class Sampler:
    """Stateless apart from a reusable generator for seeded rows; call once per step."""

    def __init__(self) -> None:
        self._seeded_gens: dict[torch.device, torch.Generator] = {}

    def _seeded_generator(self, device: torch.device) -> torch.Generator:
        gen = self._seeded_gens.get(device)
        if gen is None:
            gen = self._seeded_gens[device] = torch.Generator(device=device)
        return gen

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """`logits` [S, V] (any float dtype, any device), one row per entry of `batch`."""
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match a batch of {len(batch)} rows"
            )
        num_rows, vocab = logits.shape
        if num_rows == 0:
            return SamplerOutput([], [], [])
        x = logits.float()
        raw_logprobs = torch.log_softmax(x, dim=-1)

        masked = self._apply_bans(x, batch.banned, vocab)
        random_rows = [i for i, t in enumerate(batch.temperatures) if t >= GREEDY_EPS]
        if not random_rows:
            tokens = masked.argmax(dim=-1)  # first maximum = lowest id on ties
        else:
            tokens = self._sample_random(masked, batch, random_rows)

        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        token_list = tokens.tolist()
        logprob_list = chosen.tolist()

        max_top = max(batch.num_top_logprobs)
        if max_top == 0:
            top_lists: list[list[tuple[int, float]]] = [[] for _ in range(num_rows)]
        else:
            top_vals, top_ids = torch.topk(raw_logprobs, min(max_top, vocab), dim=-1)
            vals, ids = top_vals.tolist(), top_ids.tolist()
            top_lists = [
                list(zip(ids[i][:n], vals[i][:n], strict=True))
                for i, n in enumerate(batch.num_top_logprobs)
            ]
        return SamplerOutput(token_list, logprob_list, top_lists)

    @staticmethod
    def _apply_bans(x: torch.Tensor, banned: list[tuple[int, ...]], vocab: int) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        for i, ids in enumerate(banned):
            for t in ids:
                if 0 <= t < vocab:
                    rows.append(i)
                    cols.append(t)
        if not rows:
            return x
        out = x.clone()
        idx_r = torch.tensor(rows, dtype=torch.long).to(x.device, non_blocking=True)
        idx_c = torch.tensor(cols, dtype=torch.long).to(x.device, non_blocking=True)
        out[idx_r, idx_c] = float("-inf")
        return out

    def _sample_random(
        self, masked: torch.Tensor, batch: SamplingBatch, random_rows: list[int]
    ) -> torch.Tensor:
        """Greedy argmax for every row, overwritten by a draw on the random rows."""
        device = masked.device
        num_rows, vocab = masked.shape
        all_random = len(random_rows) == num_rows
        ridx = None if all_random else torch.tensor(random_rows, dtype=torch.long).to(device)
        sub = masked if ridx is None else masked.index_select(0, ridx)
        temps = [batch.temperatures[i] for i in random_rows]
        temp_t = torch.tensor(temps, dtype=torch.float32).to(device).unsqueeze(1)
        scaled = sub / temp_t

        # Top-k / top-p filtering, only over the rows that use them, in one sorted pass.
        ks = [batch.top_ks[i] for i in random_rows]
        ps = [batch.top_ps[i] for i in random_rows]
        filt = [j for j in range(len(random_rows)) if 0 < ks[j] < vocab or ps[j] < 1.0]
        if filt:
            scaled = self._filter(scaled, filt, [ks[j] for j in filt], [ps[j] for j in filt])

        probs = torch.softmax(scaled, dim=-1)
        q = torch.empty_like(probs)
        q.exponential_(generator=_unseeded_generator(device))
        gen = self._seeded_generator(device)
        for j, i in enumerate(random_rows):
            seed = batch.seeds[i]
            if seed is not None:
                gen.manual_seed(row_seed(seed, batch.output_index[i]))
                q[j].exponential_(generator=gen)
        q.clamp_(min=torch.finfo(torch.float32).tiny)  # no 0/0 for zero-probability tokens
        drawn = (probs / q).argmax(dim=-1)

        if ridx is None:
            return drawn
        return masked.argmax(dim=-1).index_copy(0, ridx, drawn)

    @staticmethod
    def _filter(
        scaled: torch.Tensor, rows: list[int], ks: list[int], ps: list[float]
    ) -> torch.Tensor:
        """Set to -inf the logits outside each listed row's top-k / top-p set."""
        device = scaled.device
        vocab = scaled.shape[1]
        all_rows = len(rows) == scaled.shape[0]
        fidx = None if all_rows else torch.tensor(rows, dtype=torch.long).to(device)
        sub = scaled if fidx is None else scaled.index_select(0, fidx)

        # Stable descending sort: equal logits keep ascending token-id order.
        vals, order = torch.sort(sub, dim=-1, descending=True, stable=True)
        pos = torch.arange(vocab, device=device).unsqueeze(0)
        k_t = torch.tensor([k if 0 < k < vocab else vocab for k in ks]).to(device).unsqueeze(1)
        drop = pos >= k_t
        vals = vals.masked_fill(drop, float("-inf"))
        if any(p < 1.0 for p in ps):
            p_t = torch.tensor(ps, dtype=torch.float32).to(device).unsqueeze(1)
            sorted_probs = torch.softmax(vals, dim=-1)
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop_p = (mass_before >= p_t) & (p_t < 1.0)
            drop_p[:, 0] = False  # the top token always stays
            drop = drop | drop_p
        keep_mask = torch.ones_like(drop).scatter_(1, order, ~drop)
        sub = sub.masked_fill(~keep_mask, float("-inf"))
        if fidx is None:
            return sub
        return scaled.index_copy(0, fidx, sub)
