"""The target law p (DESIGN 3): CFG on logits, then temperature, top-k and top-p.

Every decoding method, acceptance rule and drift computation obtains p and the drafter's q from
this one module, so "exact" always means exact w.r.t. the same processed law.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from cascade_sd.errors import check_range

# LlamaGen divides logits by max(T, 1e-5); below this temperature we treat sampling as greedy.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Processing applied to raw logits; temperature 0 means greedy (a point mass at argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0.0)
        check_range("top_k", self.top_k, 0)
        check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("cfg_scale", self.cfg_scale, 0.0)

    @property
    def greedy(self) -> bool:
        """True when the law is a point mass at the argmax."""
        return self.temperature < GREEDY_EPS

    @property
    def uses_cfg(self) -> bool:
        """True when an unconditional stream is needed (scale != 1)."""
        return self.cfg_scale != 1.0

    def to_dict(self) -> dict:
        """Plain dict for logging."""
        return asdict(self)


def apply_cfg(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: u + s·(c − u) (LlamaGen's sampling), as one ``lerp`` op."""
    return torch.lerp(uncond_logits, cond_logits, scale)


def split_cfg(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Combine a batch laid out as [cond rows; uncond rows] into guided logits (no-op without CFG)."""
    if not params.uses_cfg:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return apply_cfg(cond, uncond, params.cfg_scale)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering along the last dim; removed entries become -inf.

    Top-p keeps the smallest set of highest-probability tokens whose cumulative mass reaches
    ``top_p`` (the token that crosses the threshold is kept), as in LlamaGen/HF.
    """
    out = logits
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


def law_from_logits(logits: torch.Tensor, params: SamplingParams, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Next-token law from already-guided logits: temperature, top-k, top-p, softmax.

    Greedy parameters give a one-hot law at the argmax (first index on ties).
    """
    dtype = dtype or logits.dtype
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(dtype)
    if params.temperature == 1.0 and not 0 < params.top_k < logits.shape[-1] and params.top_p == 1.0:
        return logits.softmax(dim=-1, dtype=dtype)  # casts first: the same values as below, one op fewer
    scaled = logits.to(dtype) / params.temperature if params.temperature != 1.0 else logits.to(dtype)
    return filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)


def target_law(logits: torch.Tensor, params: SamplingParams, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The law p from raw model logits laid out as [cond; uncond] when CFG is on (DESIGN 3)."""
    return law_from_logits(split_cfg(logits, params), params, dtype)


def draw_without_replacement(q: torch.Tensor, k: int, generator: torch.Generator | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` tokens drawn without replacement from each row of ``q`` [..., V] (unnormalised is fine), in
    draw order, and whether each was drawn ([..., k] bool; false once a row's support is exhausted).

    Exponential race (Gumbel top-k in ratio form): token x gets the key q(x)/E_x, E_x ~ Exp(1) i.i.d.,
    and the k largest keys are the draws. With E = −log U, U ~ U[0, 1), the code ranks q(x)/log U_x
    = −key in increasing order: one log and one division per entry; q = 0 gives −0, never drawn.
    """
    vocab = q.shape[-1]
    neg_keys = q / torch.rand(q.shape, dtype=torch.float64, device=q.device, generator=generator).log_()
    if k > vocab:  # more draws than tokens: the surplus never exists
        neg_keys = torch.cat([neg_keys, neg_keys.new_zeros((*q.shape[:-1], k - vocab))], -1)
    keys, tokens = neg_keys.topk(k, dim=-1, largest=False)
    return (tokens.clamp_(max=vocab - 1) if k > vocab else tokens), keys < 0


class NodeLaws:
    """Target laws p [B, T+1, V] of a verified tree, computed only where read: ``laws[rows, nodes]``.

    A walk reads at most depth + 1 of a tree's T + 1 nodes per row, so on wide trees this skips
    most of the float64 CFG/softmax work; each read equals the same entries of ``target_law``.
    """

    def __init__(self, logits: torch.Tensor, params: SamplingParams, dtype: torch.dtype = torch.float64) -> None:
        reps = 2 if params.uses_cfg else 1  # [cond; uncond] stream blocks
        rows, nodes, vocab = logits.shape[0] // reps, logits.shape[1], logits.shape[2]
        # Node (r, n) of every stream at flat index r·nodes + n: one index_select per read, a
        # fraction of the cost of indexing with two index tensors.
        self.flat = logits.reshape(reps, rows * nodes, vocab)
        self.params, self.dtype = params, dtype
        self.shape = torch.Size((rows, nodes, vocab))
        self.device = logits.device

    def __getitem__(self, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, nodes = index
        return self.at(rows * self.shape[1] + nodes)

    def at(self, flat: torch.Tensor) -> torch.Tensor:
        """The laws at flat (row, node) indices row·(T+1) + node [K] → [K, V]."""
        picked = self.flat.index_select(1, flat)
        guided = apply_cfg(picked[0], picked[1], self.params.cfg_scale) if self.params.uses_cfg else picked[0]
        return law_from_logits(guided, self.params, self.dtype)


def sample_from_law(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of ``probs`` [..., V] (unnormalised is fine) → LongTensor [...].

    Inverse CDF: the first token whose cumulative mass exceeds u·total, u ~ U[0, 1); a token of
    zero mass never has a cumulative mass above its predecessor's, so it is never drawn.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    u = torch.rand(flat.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=flat.shape[-1] - 1)
    return pick.reshape(probs.shape[:-1])
