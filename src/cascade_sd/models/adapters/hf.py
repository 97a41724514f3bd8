"""transformers adapters (DESIGN 10): Chameleon-family models (Lumina-mGPT, Anole) and Janus as targets.

``HFImageTarget`` gives a transformers decoder the engine's target interface (``step`` over cache
slots under a tree mask, ``copy_cache``, ``embed_cond`` / ``embed_tokens``, a head over image codes),
so every rule, tree and drafter runs on it unchanged. The engine's vocabulary is the image codebook;
the model's own ids are mapped inside the adapter:
- Chameleon family: image code i is BPE id ``img2bpe[i]`` (the model's vocabulary map); the head is the
  LM head restricted to those rows. Lumina-mGPT ends every image row with a newline token: the
  adapter appends it as one extra engine token whose law is a point mass at each row end (and zero
  elsewhere), so acceptance stays exact and the image is read back by dropping those columns.
- Janus: image codes have their own embedding (``generation_embeddings`` → ``generation_aligner``)
  and two-layer head (``generation_head``); CFG's unconditional prompt keeps BOS and BOI and pads the
  rest, as Janus's own sampler does.
The condition is a prompt of model token ids, left-padded to a fixed length with the padding hidden
(the same mechanism as LlamaGen's caption padding). Positions are 1-D (the models' own RoPE).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from cascade_sd.errors import ConfigError
from cascade_sd.models.gpt import (
    GPTConfig,
    GPTOutput,
    at_least_float32,
    check_rows,
    check_step_inputs,
    copy_slots,
    hide_condition_padding,
    keep_rows,
    require_cache,
    write_slots,
)

_FORBIDDEN = -1e9  # finite, so CFG's u + s·(c − u) stays finite where both streams forbid a token


@dataclass(frozen=True)
class Prompts:
    """Prompt token ids [B, L] left-padded to the target's prompt length, and which columns are real."""

    ids: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_lists(cls, prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> "Prompts":
        """Left-pad each prompt (a list of model token ids) to ``length``."""
        if not prompts or any(not 1 <= len(p) <= length for p in prompts):
            raise ConfigError(f"prompts: each needs 1..{length} token ids (the target's prompt_length); "
                              f"got lengths {[len(p) for p in prompts]}")
        ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, p in enumerate(prompts):
            ids[row, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            valid[row, length - len(p):] = True
        return cls(ids=ids, valid=valid)


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's view of the shared slot storage (transformers' per-layer cache protocol).

    The storage is allocated up front and written at engine-chosen slots, so the lazy-init and
    length hooks of the protocol are trivial: the adapter always passes positions and an explicit mask.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, store: "SlotCache", layer_idx: int) -> None:
        super().__init__()
        self.store, self.layer_idx = store, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the storage exists from ``SlotCache``'s construction on."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H, T, hd] at the store's ``slots`` ([T] or [B, T]) of cache rows ``rows`` (None:
        the leading B rows); return this layer's cache rows in use. Extra arguments (``cache_kwargs``,
        ``kwargs=``: they differ across transformers releases) carry nothing this cache needs."""
        kv, slots, rows = self.store.kv, self.store.slots, self.store.rows
        if rows is not None:
            kc, vc = kv[self.layer_idx, 0], kv[self.layer_idx, 1]
            write_slots(kc, vc, key_states, value_states, slots, rows)
            return kc[rows], vc[rows]
        bsz = key_states.shape[0]
        kc, vc = kv[self.layer_idx, 0, :bsz], kv[self.layer_idx, 1, :bsz]
        write_slots(kc, vc, key_states, value_states, slots)
        return kc, vc

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        """Never consulted (the adapter always passes positions)."""
        return 0

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """(kv length, offset): every slot, from 0 (the adapter passes its own mask)."""
        return self.store.kv.shape[4], 0

    def get_max_cache_shape(self) -> int:
        """The slot count (the protocol's name up to transformers 5.x's rename)."""
        return self.store.kv.shape[4]

    def get_max_length(self) -> int:
        """The slot count."""
        return self.store.kv.shape[4]


class SlotCache(Cache):
    """k/v storage written at engine-chosen slots, as a transformers ``Cache`` of ``_SlotLayer`` layers:
    the attention layers call ``update`` on it through the library's own cache protocol."""

    def __init__(self, layers: int, batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.kv = torch.zeros(layers, 2, batch, heads, seq, head_dim, dtype=dtype, device=device)
        self.slots: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        super().__init__(layers=[_SlotLayer(self, i) for i in range(layers)])


def _cache_argument(layer: nn.Module) -> str:
    """The decoder layer's keyword for the cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


class HFImageTarget(nn.Module):
    """A transformers decoder LM behind the engine's target interface (see the module docstring)."""

    def __init__(self, lm: nn.Module, *, prompt_embedding: nn.Module, tok_embeddings: nn.Embedding,
                 head: nn.Module, head_hidden: int, grid: tuple[int, int], prompt_length: int, pad_id: int,
                 null_prompt: Callable[[torch.Tensor], torch.Tensor], row_token: bool, family: str,
                 codebook: torch.Tensor | None = None) -> None:
        super().__init__()
        text = lm.config
        rows, cols = grid
        width = cols + int(row_token)
        self.lm, self.prompt_embedding, self.tok_embeddings, self.output = lm, prompt_embedding, tok_embeddings, head
        self.head_hidden, self.family, self.pad_id, self.row_token = head_hidden, family, pad_id, row_token
        self.image_grid = (rows, cols)
        self._null_prompt = null_prompt
        # VQ code vectors for codebook-aware rules (LANTERN, GSD); the row token gets a zero vector.
        self.codebook = None if codebook is None else torch.cat(
            [codebook.detach().float(), codebook.new_zeros(int(row_token), codebook.shape[1]).float()])
        # The engine's view of the model in the GPT config's vocabulary (drafters read widths from it).
        self.config = GPTConfig(
            dim=text.hidden_size, n_layer=text.num_hidden_layers, n_head=text.num_attention_heads,
            n_kv_head=getattr(text, "num_key_value_heads", None), norm_eps=getattr(text, "rms_norm_eps", 1e-5),
            rope_base=float(getattr(text, "rope_theta", 10000.0)), vocab_size=tok_embeddings.num_embeddings,
            block_size=rows * width, grid_width=width, cls_token_num=prompt_length, model_type="t2i",
            caption_dim=1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0,
        )
        self._cache: SlotCache | None = None
        self._cache_kw = _cache_argument(lm.layers[0])
        self._cond_valid: torch.Tensor | None = None

    # ---- conditions
    def prepare_condition(self, cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts (``Prompts`` or lists of model token ids) → left-padded ids [B, L] and their mask."""
        if not isinstance(cond, Prompts):
            if isinstance(cond, torch.Tensor) or not all(isinstance(p, (list, tuple)) for p in cond):
                raise ConfigError(f"prompts: {self.family} targets take lists of token ids per image (or Prompts)")
            cond = Prompts.from_lists(cond, self.config.cls_token_num, self.pad_id)
        if cond.ids.shape[1] != self.config.cls_token_num:
            raise ConfigError(f"prompts: length {cond.ids.shape[1]} != the target's prompt_length {self.config.cls_token_num}")
        return cond.ids, cond.valid

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional prompt for each row of ``cond`` (family-specific, see the module docstring)."""
        return self._null_prompt(cond)

    def null_cond(self, batch: int) -> torch.Tensor:
        """A condition for timing runs: ``batch`` prompts made of padding only."""
        return torch.full((batch, self.config.cls_token_num), self.pad_id, dtype=torch.long,
                          device=self.tok_embeddings.weight.device)

    def set_condition_mask(self, valid: torch.Tensor | None) -> None:
        """Left padding of the prompts [B, L] (False = padding) for every stream row, or None."""
        self._cond_valid = valid

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Prompt ids [B, L] → the LM's input embeddings."""
        return self.prompt_embedding(cond)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Engine tokens (image codes, and the row token where there is one) → input embeddings."""
        return self.tok_embeddings(tokens)

    # ---- cache
    def setup_cache(self, max_batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Allocate zeroed k/v storage for every layer at ``max_seq_len`` slots."""
        c, w = self.config, self.tok_embeddings.weight
        self._cache = SlotCache(c.n_layer, max_batch_size, c.kv_heads, max_seq_len, c.head_dim, dtype or w.dtype,
                                torch.device(device) if device is not None else w.device)

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(max_batch_size, max_seq_len) of the allocated cache, or None."""
        return None if self._cache is None else (self._cache.kv.shape[2], self._cache.kv.shape[4])

    def copy_cache(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """For each row b, copy every layer's k/v from ``src_slots[b]`` to ``dst_slots[b]`` (both [B, K])."""
        require_cache(self.cache_shape, src_slots.shape[0], "HFImageTarget")
        copy_slots(self._cache.kv, src_slots, dst_slots)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (and their prompt padding), in this order, as rows 0..len−1:
        the engine drops images that finished decoding from the batch."""
        require_cache(self.cache_shape, rows.numel(), "HFImageTarget")
        keep_rows(self._cache.kv, rows, dim=2)
        if self._cond_valid is not None:
            self._cond_valid = self._cond_valid[rows]

    # ---- forward passes
    def _run(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotCache | None,
             return_layers: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The LM's decoder layers under an explicit mask [B|1, T, S]; returns the final-normed hidden states."""
        pos = positions if positions.dim() == 2 else positions[None].expand(x.shape[0], -1)
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, torch.finfo(x.dtype).min)
        rope = self.lm.rotary_emb(x, position_ids=pos)
        h, layers = x, []
        for layer in self.lm.layers:
            out = layer(h, attention_mask=bias[:, None], position_ids=pos, use_cache=cache is not None,
                        position_embeddings=rope, **{self._cache_kw: cache})
            h = out[0] if isinstance(out, tuple) else out
            if return_layers:
                layers.append(h)
        return self.lm.norm(h), layers

    def _logits(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float32 logits over engine tokens; with a row token, its law is a point mass exactly at row ends."""
        logits = at_least_float32(self.output(h))
        if self.row_token:
            width = self.config.grid_width
            predicts = positions - self.config.cls_token_num + 1  # the output at position p predicts token p-cls+1
            at_end = (predicts % width == width - 1)
            at_end = at_end if at_end.dim() == 2 else at_end[None].expand(h.shape[0], -1)
            vocab = logits.shape[-1]
            is_row = torch.arange(vocab, device=h.device) == vocab - 1
            logits = logits.masked_fill(at_end[..., None] != is_row, _FORBIDDEN)
        return logits

    def _padding(self, mask: torch.Tensor, slots: torch.Tensor, batch: int,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hide padded prompt columns from every query but their own slot (as GPT does for captions)."""
        if self._cond_valid is None:
            return mask
        valid = self._cond_valid.to(mask.device)
        return hide_condition_padding(mask, slots, valid if rows is None else valid[rows], batch)

    def step(self, x: torch.Tensor, *, positions: torch.Tensor, slots: torch.Tensor, attn_mask: torch.Tensor,
             return_hidden: bool = True, return_layers: bool = False, rows: torch.Tensor | None = None) -> GPTOutput:
        """Cached pass over embedded inputs (GPT.step's contract: write k/v at ``slots`` of cache ``rows``,
        attend where allowed)."""
        bsz, T, _ = x.shape
        max_rows, S = require_cache(self.cache_shape, bsz, "HFImageTarget")
        check_step_inputs(bsz, T, S, positions, slots, attn_mask)
        check_rows(rows, bsz, max_rows)
        self._cache.slots, self._cache.rows = slots, rows
        h, layers = self._run(x, positions, self._padding(attn_mask, slots, bsz, rows), self._cache, return_layers)
        return GPTOutput(logits=self._logits(h, positions), hidden=h if return_hidden else None,
                         layers=layers if return_layers else None)

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, *, return_hidden: bool = False,
                return_layers: bool = False) -> GPTOutput:
        """Uncached causal pass over [prompt, tokens]; output i predicts image token i (as GPT.forward)."""
        x = torch.cat([self.embed_cond(cond), self.embed_tokens(tokens)], dim=1)
        seq = torch.arange(x.shape[1], device=x.device)
        causal = (seq[None, :] <= seq[:, None])[None]
        h, layers = self._run(x, seq, self._padding(causal, seq, x.shape[0]), None, return_layers)
        start = self.config.cls_token_num - 1
        return GPTOutput(logits=self._logits(h[:, start:], seq[start:]), hidden=h[:, start:] if return_hidden else None,
                         layers=[t[:, start:] for t in layers] if return_layers else None)

    def image_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Engine tokens [B, block_size] → the image's codebook indices [B, rows·cols] (row tokens dropped)."""
        rows, cols = self.image_grid
        return tokens.reshape(tokens.shape[0], rows, self.config.grid_width)[..., :cols].reshape(tokens.shape[0], -1)


def _rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return weight.detach()[ids].clone()


@torch.no_grad()
def chameleon_target(model: nn.Module, *, grid: tuple[int, int], prompt_length: int, null_prompt: Sequence[int],
                     row_token_id: int | None = None, pad_id: int | None = None) -> HFImageTarget:
    """A ``ChameleonForConditionalGeneration`` (Chameleon, Anole, Lumina-mGPT weights) as a target.

    ``null_prompt``: the unconditional prompt's ids for CFG (e.g. Lumina-mGPT's template without the
    caption); ``row_token_id``: the id ending each image row (Lumina-mGPT's newline), None for Anole.
    """
    mapping = model.model.vocabulary_mapping
    codes = sorted(mapping.img2bpe)
    if codes != list(range(len(codes))):
        raise ConfigError("vocabulary_map: image codes must be 0..N-1 (IMGIMG tokens of the Chameleon vocabulary)")
    ids = torch.tensor([mapping.img2bpe[c] for c in codes] + ([row_token_id] if row_token_id is not None else []))
    lm = model.model
    pad = model.config.pad_token_id if pad_id is None else pad_id
    if pad is None:
        raise ConfigError("pad_id: the model config has no pad_token_id; pass one")
    null = torch.tensor(list(null_prompt), dtype=torch.long)
    if not 1 <= len(null) <= prompt_length:
        raise ConfigError(f"null_prompt: needs 1..{prompt_length} ids; got {len(null)}")
    head = nn.Linear(lm.config.hidden_size, len(ids), bias=False)
    head.weight.copy_(_rows(model.lm_head.weight, ids))
    table = nn.Embedding(len(ids), lm.config.hidden_size)
    table.weight.copy_(_rows(lm.embed_tokens.weight, ids))

    def null_prompt_fn(cond: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(cond, pad)
        out[:, prompt_length - len(null):] = null.to(cond.device)
        return out

    return HFImageTarget(lm, prompt_embedding=lm.embed_tokens, tok_embeddings=table, head=head, head_hidden=0,
                         grid=grid, prompt_length=prompt_length, pad_id=pad, null_prompt=null_prompt_fn,
                         row_token=row_token_id is not None, family="chameleon",
                         codebook=lm.vqmodel.quantize.embedding.weight[: len(codes)]).eval()


@torch.no_grad()
def janus_target(model: nn.Module, *, prompt_length: int, bos_id: int, boi_id: int, pad_id: int,
                 grid: tuple[int, int] | None = None) -> HFImageTarget:
    """A ``JanusForConditionalGeneration`` as a target (image generation through its generation head)."""
    janus = model.model
    head = janus.generation_head
    if type(head.activation_fn).__name__ not in ("GELUActivation", "GELU"):
        raise ConfigError(f"generation_head activation {type(head.activation_fn).__name__} is not supported; allowed: gelu")
    vocab = janus.generation_embeddings.num_embeddings
    side = int(round(janus.vision_model.config.num_image_tokens ** 0.5)) if grid is None else None
    grid = grid or (side, side)
    table = nn.Embedding(vocab, janus.language_model.config.hidden_size)
    table.weight.copy_(janus.generation_aligner(janus.generation_embeddings.weight))
    mlp_head = nn.Sequential(head.proj_out, nn.GELU(), head.vision_head)

    def null_prompt_fn(cond: torch.Tensor) -> torch.Tensor:
        keep = (cond == bos_id) | (cond == boi_id)
        return torch.where(keep, cond, torch.full_like(cond, pad_id))

    return HFImageTarget(janus.language_model, prompt_embedding=janus.language_model.embed_tokens,
                         tok_embeddings=table, head=mlp_head, head_hidden=head.proj_out.out_features, grid=grid,
                         prompt_length=prompt_length, pad_id=pad_id, null_prompt=null_prompt_fn, row_token=False,
                         family="janus", codebook=janus.vqmodel.quantize.embedding.weight).eval()
