"""One set of decoding defaults for the CLI, the Python API, the benches and the workflow.

Read from the workflow's config schema, so ``cascade-sd decode`` with no flags decodes what the
workflow's first grid group decodes: the sampling of ``sample.*`` (CFG 3, as LlamaGen and the
papers sample), the first ``decode.groups`` entry's tree and drafter (chain-4, EAGLE) and the
grid's dynamic-tree options (``decode.tree_top_k``, ``depth``, ``total_tokens``); CSpD's CFG is
``continuous.decode.cfg_scale``.
"""

from __future__ import annotations

from typing import Any

from cascade_sd.config import load_schema


def _defaults() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], float]:
    props = load_schema()["properties"]
    sample = props["sample"]["properties"]
    decode = props["decode"]["properties"]
    group = decode["groups"]["default"][0]
    sampling = {k: sample[k]["default"] for k in ("temperature", "top_k", "top_p", "cfg_scale")}
    dynamic = {k: decode[k]["default"] for k in ("tree_top_k", "depth", "total_tokens")}
    continuous = props["continuous"]["properties"]["decode"]["properties"]["cfg_scale"]["default"]
    return sampling, {"tree": group["tree"], "drafter": group["drafter"]}, dynamic, continuous


SAMPLING, _DRAFT, DYNAMIC, CONTINUOUS_CFG_SCALE = _defaults()
TEMPERATURE: float = SAMPLING["temperature"]
TOP_K: int = SAMPLING["top_k"]
TOP_P: float = SAMPLING["top_p"]
CFG_SCALE: float = SAMPLING["cfg_scale"]
TREE: str = _DRAFT["tree"]
DRAFTER: str = _DRAFT["drafter"]
TREE_TOP_K: int = DYNAMIC["tree_top_k"]
DEPTH: int = DYNAMIC["depth"]
TOTAL_TOKENS: int = DYNAMIC["total_tokens"]
