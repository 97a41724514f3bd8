"""Public Python API: load a bundle, decode with any method/tree/drafter, read the target law.

A *bundle* is a target with its drafters (and, for trained bundles, the tokenizer and judge):
either a folder written by the workflow (``results/models``) or a toy spec such as
``"toy:vocab=5,len=3,seed=0"`` (toy target + randomly initialised EAGLE drafters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cascade_sd import defaults
from cascade_sd.acceptance import RULES, AcceptanceRule, RuleResources, get_rule
from cascade_sd.continuous.bundle import ContinuousBundle, decode_continuous, load_continuous_bundle
from cascade_sd.decoding.engine import SpeculativeEngine
from cascade_sd.decoding.jacobi import JacobiDrafting, JacobiSpec
from cascade_sd.decoding.processing import SamplingParams, target_law
from cascade_sd.decoding.tree import DynamicTreeSpec, StaticTree
from cascade_sd.decoding.vanilla import DecodeResult, condition_padding, vanilla_decode, with_null_condition
from cascade_sd.errors import CheckpointError, ConfigError, check_choice, check_int
from cascade_sd.metrics.drift import DriftRecorder
from cascade_sd.metrics.sequence import SequenceLogProb, check_supported as check_sequence_supported
from cascade_sd.metrics.sequence import sequence_log_prob as _sequence_log_prob
from cascade_sd.models.drafters import ARCHS, create_drafter, load_drafter
from cascade_sd.models.gpt import GPT, load_gpt
from cascade_sd.models.toy import ToySpec, toy_target

Progress = Callable[[int, int], None]  # (tokens committed so far, tokens of all images)

BUNDLE_FILES = {"target": "target.pt", "tokenizer": "tokenizer.pt", "judge": "judge.pt"}


def drafter_file(arch: str, redundancy_weight: float = 1.0) -> str:
    """File name of a drafter inside a bundle folder (``drafter-eagle.pt``, ``drafter-eagle-rw2.pt``)."""
    suffix = "" if redundancy_weight == 1.0 else f"-rw{redundancy_weight:g}"
    return f"drafter-{arch}{suffix}.pt"


@dataclass
class Bundle:
    """A target, its drafters by name, and optionally the tokenizer and judge it came with."""

    name: str
    target: GPT
    target_hash: str
    drafters: dict[str, torch.nn.Module] = field(default_factory=dict)
    tokenizer: Any = None
    judge: Any = None
    codebook: torch.Tensor | None = None
    folder: Path | None = None

    def rule_resources(self) -> RuleResources:
        """What acceptance rules may read from this bundle (codebook vectors, a cache folder)."""
        cache = str(self.folder / "cache") if self.folder is not None and os.access(self.folder, os.W_OK) else None
        return RuleResources(vocab=self.target.config.vocab_size, codebook=self.codebook, cache_dir=cache,
                             token_embeddings=self.target.tok_embeddings.weight)

    def drafter(self, name: str) -> torch.nn.Module:
        """The drafter called ``name``; a one-line error lists what the bundle has."""
        check_choice("drafter", name, self.drafters)
        return self.drafters[name]


def bundle_for(target: torch.nn.Module, name: str, drafters: dict[str, torch.nn.Module] | None = None) -> Bundle:
    """A bundle around an in-memory target (e.g. a transformers adapter); drafters must belong to it."""
    from cascade_sd.models.drafters import target_hash

    digest = target_hash(target)
    for key, drafter in (drafters or {}).items():
        if drafter.config.target_hash != digest:
            raise CheckpointError(f"drafter {key!r} was trained for another target (hash {drafter.config.target_hash[:12]} "
                                  f"!= {digest[:12]})")
    return Bundle(name=name, target=target, target_hash=digest, drafters=dict(drafters or {}),
                  codebook=getattr(target, "codebook", None))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    """Weights dtype: ``dtype`` by name, or float32 on CPU and bfloat16 on CUDA (DESIGN 10)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    check_choice("dtype", dtype, DTYPES)
    return DTYPES[dtype]


def load_bundle(spec: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str | None = None,
                model: str = "discrete") -> Any:
    """Load a bundle folder or build a toy bundle from ``toy:...``; checks drafters belong to the target.

    Target and drafters are cast to ``dtype`` (default float32 on CPU, bfloat16 on CUDA); hashes are
    checked on the stored weights first. Logits are always float32. ``model="continuous"`` loads a
    continuous bundle (``results/continuous``: autoencoder, target, draft; float32) for CSpD.
    """
    check_choice("model", model, ("discrete", "continuous"))
    device = parse_device(device)
    if model == "continuous":
        if dtype not in (None, "float32"):
            raise ConfigError(f"dtype={dtype!r} is not allowed for continuous models; allowed: 'float32'")
        return load_continuous_bundle(spec, device=device)
    bundle = _load_bundle(spec, device)
    wdtype = model_dtype(device, dtype)
    bundle.target.to(wdtype)
    for drafter in bundle.drafters.values():
        drafter.to(wdtype)
    return bundle


def _load_bundle(spec: str | os.PathLike, device: torch.device) -> Bundle:
    if str(spec).startswith("toy"):
        toy = ToySpec.parse(str(spec))
        target = toy_target(toy).to(device)
        from cascade_sd.models.drafters import target_hash

        digest = target_hash(target)
        drafters = {}
        for i, arch in enumerate(ARCHS):
            with torch.random.fork_rng():  # seeded random drafter weights, caller's RNG untouched
                torch.manual_seed(toy.seed * 1000 + i + 1)
                drafters[arch] = create_drafter(target, arch, target_hash=digest).eval()
        # Toy bundles have no tokenizer: a seeded random unit-norm codebook stands in for
        # codebook-aware rules (LANTERN, GSD).
        book = torch.nn.functional.normalize(
            torch.randn(toy.vocab, 8, generator=torch.Generator().manual_seed(toy.seed)), dim=-1)
        return Bundle(name=str(spec), target=target, target_hash=digest, drafters=drafters, codebook=book)
    folder = Path(spec)
    if not folder.is_dir():
        raise ConfigError(f"bundle={str(spec)!r} is neither a bundle folder nor a toy spec ('toy:vocab=V,len=N,seed=S')")
    target_path = folder / BUNDLE_FILES["target"]
    if not target_path.is_file():
        raise CheckpointError(f"bundle {folder}: no {BUNDLE_FILES['target']} (train the target first)")
    target, ckpt = load_gpt(target_path)
    bundle = Bundle(name=str(folder), target=target.to(device), target_hash=ckpt.hash, folder=folder)
    for path in sorted(folder.glob("drafter-*.pt")):
        drafter, _ = load_drafter(path, target_hash=ckpt.hash)
        bundle.drafters[path.stem.removeprefix("drafter-")] = drafter.to(device)
    if (folder / BUNDLE_FILES["tokenizer"]).is_file():
        from cascade_sd.jobs import load_pair

        bundle.tokenizer, _ = load_pair(folder / BUNDLE_FILES["tokenizer"], target_path)
        bundle.target = bundle.target.to(device)
        bundle.codebook = bundle.tokenizer.quantize.codebook().detach()
    if (folder / BUNDLE_FILES["judge"]).is_file():
        from cascade_sd.models.judge import load_judge

        bundle.judge, _ = load_judge(folder / BUNDLE_FILES["judge"])
    return bundle


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device, or a one-line error (also when no GPU is present)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={str(device)!r} is not allowed; choose 'cpu', 'cuda' or 'cuda:N'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but no CUDA device is available; allowed here: 'cpu'")
    return parsed


#: The drafter name of the drafter-free Jacobi draft source (DESIGN 5b), and the tree name of its window.
JACOBI, WINDOW = "jacobi", "window"
JacobiOptions = str | dict | JacobiSpec | None


def jacobi_spec(drafter: str, jacobi: JacobiOptions) -> JacobiSpec | None:
    """The Jacobi draft source of a setting: a variant name, a dict of ``JacobiSpec`` fields or a spec with
    ``drafter='jacobi'`` (default variant 'sjd'); None for a trained drafter (one-line errors)."""
    if drafter != JACOBI:
        if jacobi is not None:
            raise ConfigError(f"jacobi={jacobi!r} needs drafter='jacobi'; got drafter={drafter!r}")
        return None
    if jacobi is None or isinstance(jacobi, str):
        return JacobiSpec(jacobi or "sjd")
    if isinstance(jacobi, JacobiSpec):
        return jacobi
    if isinstance(jacobi, dict):
        fields = ("variant", "window", "width", "depth", "code")
        for key in jacobi:
            check_choice("jacobi option", key, fields)
        return JacobiSpec(**jacobi)
    raise ConfigError(f"jacobi={jacobi!r} is not allowed; give a variant name, a dict of options or a JacobiSpec")


def check_setting(bundle: Bundle, method: str, tree: str | StaticTree, drafter: str, *, tree_top_k: int = defaults.TREE_TOP_K,
                  depth: int = defaults.DEPTH, total_tokens: int | str = defaults.TOTAL_TOKENS,
                  jacobi: JacobiOptions = None, record_drift: bool = False, **rule_params: Any) -> AcceptanceRule:
    """Everything ``decode`` checks about a speculative setting (rule and parameters, tree, drafter or Jacobi
    source, whether its drift can be recorded), without compute, and the (unbound) rule: ``decode`` uses it,
    and benches validate all their settings with it before timing the first."""
    check_choice("method", method, RULES)
    rule = get_rule(method, **rule_params)
    spec = jacobi_spec(drafter, jacobi)
    if spec is not None:
        if tree not in (defaults.TREE, WINDOW):
            raise ConfigError(f"tree={tree!r}: drafter='jacobi' verifies its own window (set by jacobi=); "
                              f"allowed tree: {WINDOW!r} or the default")
        if rule.reads_drafter:
            raise ConfigError(f"method={method!r} reads a trained drafter's outputs, which drafter='jacobi' has not; "
                              "with cascade set breadth_source='target' or breadth=false")
        if spec.verifies_itself and method != "strict":
            raise ConfigError(f"method={method!r} is not allowed with jacobi='sjd-pac', jacobi_code='reference-code': "
                              "its code verifies the window itself with strict's test; allowed method: 'strict'")
        if record_drift and spec.verifies_itself:
            raise ConfigError("record_drift is not available with jacobi='sjd-pac', jacobi_code='reference-code': its "
                              "longest-row verification has no per-node law the recorder can compute; "
                              "analysis/exact_jacobi gives its exact law on toys (allowed: jacobi_code='exact')")
        if record_drift and spec.code == "reference-code" and method != "strict":
            raise ConfigError(f"record_drift with jacobi_code='reference-code' follows the reference code's strict "
                              f"test; got method={method!r} (allowed: 'strict')")
        return rule
    check_tree(rule, tree, tree_top_k, bundle.target.config.vocab_size)
    bundle.drafter(drafter)
    # 'auto' is resolved later by timing; the smallest legal size checks the tree's other options.
    make_tree(tree, tree_top_k=tree_top_k, depth=depth, total_tokens=2 if total_tokens == "auto" else total_tokens)
    return rule


def parse_total_tokens(text: str) -> int | str:
    """``--total-tokens``: an integer (nodes including the root) or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"total_tokens={text!r} is not allowed; give an integer >= 2 or 'auto'") from None


def make_tree(tree: str | StaticTree, *, tree_top_k: int = defaults.TREE_TOP_K, depth: int = defaults.DEPTH,
              total_tokens: int | str = defaults.TOTAL_TOKENS) -> StaticTree | DynamicTreeSpec:
    """A static preset (``chain-N``, ``tree-25``, ``tree-57``), a ``StaticTree`` of your own, or ``dynamic``
    with its settings."""
    if isinstance(tree, StaticTree):
        return tree
    if tree == "dynamic":
        if total_tokens == "auto":
            raise ConfigError("total_tokens='auto' must be resolved with cascade_sd.api.auto_total_tokens first")
        return DynamicTreeSpec(top_k=tree_top_k, depth=depth, total_tokens=int(total_tokens))
    return StaticTree.preset(tree)


def check_tree(rule: AcceptanceRule, tree: str, tree_top_k: int, vocab: int) -> None:
    """Rule/tree pairs and dynamic-tree widths the engine cannot run: one-line errors before compute."""
    if tree == "dynamic" and rule.static_tree_only:
        raise ConfigError(f"method={rule.name!r} needs a static tree (chain-N, tree-25, tree-57); got tree='dynamic'")
    if tree == "dynamic" and isinstance(tree_top_k, int) and tree_top_k > vocab:
        raise ConfigError(f"tree_top_k={tree_top_k} is out of range; allowed [1, {vocab}] (the target's vocabulary)")


def decode(
    bundle: Bundle,
    labels: Any,
    *,
    method: str = "strict",
    tree: str | StaticTree = defaults.TREE,
    drafter: str = defaults.DRAFTER,
    seed: int = 0,
    temperature: float = defaults.TEMPERATURE,
    top_k: int = defaults.TOP_K,
    top_p: float = defaults.TOP_P,
    cfg_scale: float = defaults.CFG_SCALE,
    tree_top_k: int = defaults.TREE_TOP_K,
    depth: int = defaults.DEPTH,
    total_tokens: int | str = defaults.TOTAL_TOKENS,
    profile: bool = False,
    record_drift: bool = False,
    drift_draws: int = 256,
    drift_rows: int | None = None,
    max_batch: int | None = None,
    progress: Progress | None = None,
    jacobi: JacobiOptions = None,
    **rule_params: Any,
) -> DecodeResult:
    """Decode one image per condition; ``method="vanilla"`` is plain AR decoding, otherwise a rule name
    (with a continuous bundle: ``"vanilla"`` or ``"cspd"``, whose parameters come as ``rule_params``).

    ``max_batch`` caps the images decoded at once (default: all): vanilla decodes consecutive
    batches of that size; speculative methods keep that many rows busy, an image that finishes
    handing its row to the next (continuous batching).

    ``drafter="jacobi"`` drafts without a trained drafter (DESIGN 5b): ``jacobi`` names the variant
    ('sjd', 'scd-mc', 'scd-gumbel', 'sjd-pac') or gives a dict of ``JacobiSpec`` fields (variant, window,
    width, depth, code); the window replaces ``tree``.

    ``labels`` are what ``bundle.target.prepare_condition`` takes: class labels (c2i), ``Captions`` or
    caption features [B, n, 2048] (LlamaGen t2i), or prompts as lists of token ids (transformers adapters).

    ``record_drift`` computes, at every verified node, TV(law the node emits, p) through the
    rule's own methods (``result.arrays["drift"]`` [rows, N], summaries in ``stats``) for the
    first ``drift_rows`` images (default all); it uses its own random stream, so the decoded
    tokens do not change. ``progress(tokens_done, tokens_total)`` is called as tokens are committed
    (the CLI's progress line). Everything is validated (one-line errors) before any compute starts.
    """
    if max_batch is not None:
        check_int("max_batch", max_batch, 1)
    if isinstance(bundle, ContinuousBundle):
        if top_k != 0 or top_p != 1.0 or record_drift or max_batch is not None:
            raise ConfigError("top_k, top_p, record_drift and max_batch do not apply to continuous models; "
                              "CSpD takes gamma, prefill, ratio_temperature and max_tries")
        return decode_continuous(bundle, labels, method=method, seed=seed, temperature=temperature,
                                 cfg_scale=cfg_scale, **rule_params)
    check_choice("method", method, ["vanilla", *RULES])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    cond, valid = bundle.target.prepare_condition(labels)
    cond = cond.to(next(bundle.target.parameters()).device)
    gen = torch.Generator(device=cond.device).manual_seed(seed)
    if method == "vanilla":
        if rule_params:
            raise ConfigError(f"parameter {next(iter(rule_params))!r} does not belong to method 'vanilla'")
        return _vanilla_batches(bundle.target, cond, valid, params, gen, max_batch or cond.shape[0], progress)
    spec = jacobi_spec(drafter, jacobi)
    rule, shape, total_tokens = _rule_and_tree(bundle, method, tree, drafter, params, tree_top_k, depth, total_tokens,
                                               rule_params, spec, record_drift)
    check_int("drift_draws", drift_draws, 1)
    keeps = record_drift and spec is not None and spec.code == "reference-code"
    if drift_rows is not None:
        check_int("drift_rows", drift_rows, 1)
    recorder = None
    if record_drift:
        rows = cond.shape[0] if drift_rows is None else min(drift_rows, cond.shape[0])
        recorder = DriftRecorder(rule, rows, bundle.target.config.block_size, mc_draws=drift_draws,
                                 generator=torch.Generator().manual_seed(seed + 1))
    source = (bundle.drafter(drafter) if spec is None
              else JacobiDrafting(spec, bundle.target.config.vocab_size, cond.device, track_keeps=keeps))
    engine = SpeculativeEngine(bundle.target, source, rule, shape, params, profile=profile, drift=recorder)
    result = engine.decode(cond, gen, max_rows=max_batch, valid=valid, progress=progress)
    result.stats |= {"method": method, "tree": tree, "drafter": drafter, "rule_params": dict(rule.params),
                     "total_tokens": total_tokens if tree == "dynamic" else shape.size + 1,
                     "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale}}
    if tree == "dynamic":
        result.stats |= {"tree_top_k": tree_top_k, "depth": depth}
    if spec is not None:
        result.stats |= {"tree": WINDOW, "jacobi": spec.to_dict()}
    if isinstance(tree, StaticTree):
        result.stats["tree"] = f"static:{list(tree.paths)}"
    return result


def _rule_and_tree(bundle: Bundle, method: str, tree: str | StaticTree, drafter: str, params: SamplingParams,
                   tree_top_k: int, depth: int, total_tokens: int | str, rule_params: dict[str, Any],
                   jacobi: JacobiOptions = None, record_drift: bool = False
                   ) -> tuple[AcceptanceRule, StaticTree | DynamicTreeSpec, int | str]:
    """The validated rule (bound to the bundle), the tree and its resolved size (one-line errors first)."""
    spec = jacobi_spec(drafter, jacobi)
    rule = check_setting(bundle, method, tree, drafter, tree_top_k=tree_top_k, depth=depth, total_tokens=total_tokens,
                         jacobi=spec, record_drift=record_drift, **rule_params)
    rule.bind(bundle.rule_resources())
    if spec is not None:
        return rule, spec.tree(), spec.window
    if tree == "dynamic" and total_tokens == "auto":
        total_tokens = auto_total_tokens(bundle, drafter=drafter, tree_top_k=tree_top_k, depth=depth, params=params)
    return rule, make_tree(tree, tree_top_k=tree_top_k, depth=depth, total_tokens=total_tokens), total_tokens


@torch.no_grad()
def sequence_log_prob(
    bundle: Bundle,
    labels: Any,
    tokens: Any,
    *,
    method: str = "strict",
    tree: str | StaticTree = defaults.TREE,
    drafter: str = defaults.DRAFTER,
    temperature: float = defaults.TEMPERATURE,
    top_k: int = defaults.TOP_K,
    top_p: float = defaults.TOP_P,
    cfg_scale: float = defaults.CFG_SCALE,
    tree_top_k: int = defaults.TREE_TOP_K,
    depth: int = defaults.DEPTH,
    total_tokens: int | str = defaults.TOTAL_TOKENS,
    mc_draws: int = 256,
    seed: int = 0,
    max_rows: int = 256,
    **rule_params: Any,
) -> SequenceLogProb:
    """Exact log-probability that the speculative sampler (``method`` with its tree, drafter and sampling
    parameters, as ``decode`` takes them, with its defaults) emits each token sequence ``tokens`` [B, N], with
    the target's own log P(x) under the same processing (``cascade_sd.metrics.sequence``; analysis/README.md).

    Static trees with several sampled siblings are enumerated while small, else ``mc_draws`` sibling draws
    are sampled (``result.exact`` is then False). ``max_rows`` caps the rounds rebuilt per engine call (each
    holds a cache row per CFG stream: lower it for large models). Run the bundle in float64 for exact agreement.
    """
    check_int("mc_draws", mc_draws, 1)
    check_int("max_rows", max_rows, 1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    cond, valid = bundle.target.prepare_condition(labels)
    if valid is not None and not bool(valid.all()):
        raise ConfigError("sequence_log_prob takes class labels or unpadded conditions; got padded conditions")
    n, vocab = bundle.target.config.block_size, bundle.target.config.vocab_size
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape != (cond.shape[0], n):
        raise ConfigError(f"tokens has shape {tuple(tokens.shape)}; expected ({cond.shape[0]}, {n}): one row of "
                          f"{n} tokens per condition")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ConfigError(f"tokens hold ids outside [0, {vocab - 1}] (the target's vocabulary)")
    if drafter == JACOBI:
        raise ConfigError("sequence_log_prob does not cover drafter='jacobi': its window carries state across "
                          "rounds that the prefix does not determine; analysis/exact_jacobi gives exact laws on toys")
    rule, shape, _ = _rule_and_tree(bundle, method, tree, drafter, params, tree_top_k, depth, total_tokens, rule_params)
    engine = SpeculativeEngine(bundle.target, bundle.drafter(drafter), rule, shape, params)
    check_sequence_supported(engine)
    return _sequence_log_prob(engine, cond, tokens, mc_draws=mc_draws, generator=torch.Generator().manual_seed(seed),
                              rows_per_call=max_rows)


def _vanilla_batches(target: GPT, cond: torch.Tensor, valid: torch.Tensor | None, params: SamplingParams,
                     gen: torch.Generator, size: int, progress: Progress | None = None) -> DecodeResult:
    """Vanilla decoding of ``cond`` in consecutive batches of ``size`` images; totals over the batches."""
    parts = []
    n, total = target.config.block_size, cond.shape[0] * target.config.block_size
    for lo in range(0, cond.shape[0], size):
        step = None if progress is None else (lambda done, before=lo * n: progress(before + done, total))
        with condition_padding(target, None if valid is None else valid[lo : lo + size], params):
            parts.append(vanilla_decode(target, cond[lo : lo + size], params, generator=gen, progress=step))
    if len(parts) == 1:
        return parts[0]
    tokens = torch.cat([r.tokens for r in parts])
    seconds = sum(r.stats["seconds"] for r in parts)
    return DecodeResult(tokens=tokens, stats={"target_forwards": sum(r.stats["target_forwards"] for r in parts),
                                              "seconds": seconds, "tokens_per_second": tokens.numel() / seconds})


@torch.no_grad()
def next_token_law(
    bundle: Bundle, labels: Any, prefix: Any, *, temperature: float = defaults.TEMPERATURE, top_k: int = defaults.TOP_K,
    top_p: float = defaults.TOP_P, cfg_scale: float = defaults.CFG_SCALE,
) -> torch.Tensor:
    """The target law p (DESIGN 3) of the next token after ``prefix`` [B, m] for each row, float64 [B, V]."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    target = bundle.target
    cond, valid = target.prepare_condition(labels)
    prefix = torch.as_tensor(prefix, dtype=torch.long).reshape(cond.shape[0], -1)
    streams = with_null_condition(target, cond, params)
    with condition_padding(target, valid, params):
        logits = target(streams, torch.cat([prefix] * (streams.shape[0] // cond.shape[0]))).logits[:, -1]
    return target_law(logits.double(), params)


def auto_total_tokens(
    bundle: Bundle, *, drafter: str, tree_top_k: int, depth: int, params: SamplingParams,
    candidates: tuple[int, ...] = (8, 16, 24, 32, 48, 60), batch: int = 1, seed: int = 0,
) -> int:
    """EAGLE's auto-tuning idea: the dynamic-tree size with the best measured throughput here."""
    labels = bundle.target.null_cond(batch)  # any condition works for timing; the null one fits c2i and t2i
    best, best_rate = candidates[0], 0.0
    limit = tree_top_k + (depth - 1) * tree_top_k**2 + 1
    for total in (c for c in candidates if c <= limit):
        engine = SpeculativeEngine(bundle.target, bundle.drafter(drafter), get_rule("strict"),
                                   DynamicTreeSpec(tree_top_k, depth, total), params)
        gen = torch.Generator(device=labels.device)
        engine.decode(labels, gen.manual_seed(seed))  # warm-up
        rate = engine.decode(labels, gen.manual_seed(seed)).stats["tokens_per_second"]
        if rate > best_rate:
            best, best_rate = total, rate
    return best
