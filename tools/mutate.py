#!/usr/bin/env python3
"""Mutation testing: which tests catch each deliberate one-line bug (a reproducible "catch table").

The working tree (git's tracked and untracked-but-not-ignored files) is copied once into a
temporary folder. The unmutated copy first runs the union of the selected test files: what fails
there is a *baseline failure*, left out of every count. Then, per mutation, one file of the copy is
patched, the mutation's own test files run there and the file is restored. Runs use cwd=<copy> and
PYTHONPATH=<copy>/src:<copy>, which wins over the virtualenv's editable install (checked at start),
one torch thread, a fixed Hypothesis seed and no Hypothesis example database, so a rerun gives the
same table.

    python tools/mutate.py --list
    python tools/mutate.py [--only ID,...] [--jobs 1] [--out FILE.md] [--hypothesis-seed 0]
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Wall-clock limit of one pytest run; a run past it counts as caught ("<timeout>").
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: replace ``old`` (exactly one occurrence) by ``new`` in ``file``."""

    id: str
    file: str  # relative to the repository root
    old: str
    new: str
    description: str
    tests: tuple[str, ...]  # test files under tests/ that could plausibly catch it


ACC, DEC, MET = "src/cascade_sd/acceptance/", "src/cascade_sd/decoding/", "src/cascade_sd/metrics/"
MUTATIONS = [
    Mutation("drift-late", DEC + "engine.py", "m + ctx.depth - 1", "m + ctx.depth",
             "drift recorded one position late (engine._record_drift)",
             ("test_exact_toy.py", "test_rule_engine.py", "test_audit.py")),
    Mutation("coolsd-bound-x2", ACC + "coolsd.py", "return chain_bound(first, accept, ctx.n_candidates, extra)",
             "return 2 * chain_bound(first, accept, ctx.n_candidates, extra)",
             "COOL-SD declared per-node TV bound doubled (tv_bound)", ("test_bounds.py", "test_rules.py")),
    Mutation("cfg-c-plus", DEC + "processing.py", "return torch.lerp(uncond_logits, cond_logits, scale)",
             "return cond_logits + scale * (cond_logits - uncond_logits)",
             "CFG computes c + s(c - u) instead of u + s(c - u) (apply_cfg)",
             ("test_processing.py", "test_vanilla.py", "test_engine.py")),
    Mutation("coolsd-depth", ACC + "coolsd.py", "math.exp(-nu * depth - mu)", "math.exp(-nu * (depth + 1) - mu)",
             "COOL-SD annealing index off by one: omega_i uses i + 1 (omega_1 != delta)",
             ("test_rules.py", "test_bounds.py")),
    Mutation("cspd-residual", "src/cascade_sd/continuous/step.py", "torch.clamp(log_q - log_p, max=0.0)",
             "torch.clamp(log_p - log_q, max=0.0)",
             "CSpD residual keeps y ~ p with (1 - p/q)+ instead of (1 - q/p)+ (residual_keep_probability)",
             ("test_cspd_step.py", "test_cspd_decode.py")),
    Mutation("cascade-cap-x2", ACC + "cascade.py", 'cap = (strict_ratio(state, x) + self.params["eps"] / n)',
             'cap = (strict_ratio(state, x) + 2 * self.params["eps"] / n)',
             "bounded CASCADE caps extra acceptance at 2 eps/n instead of eps/n",
             ("test_rules.py", "test_bounds.py")),
    Mutation("walk-bonus-from-p", DEC + "verify.py",
             "drawn = sample_from_law(rule.bonus_after_reject(sub, sub_x, sub_ctx), generator)",
             "drawn = sample_from_law(sub.p, generator)",
             "tree walk draws the bonus after the last rejection from p_j, not the residual (walk_tree)",
             ("test_walk_exact.py", "test_rule_engine.py", "test_strict_exactness.py", "test_engine.py")),
    Mutation("shared-coin", DEC + "verify.py", "coins[(depth - 1) * width + k]", "coins[(depth - 1) * width]",
             "one acceptance coin shared by all siblings at a depth (walk_tree)",
             ("test_walk_exact.py", "test_rule_engine.py", "test_strict_exactness.py", "test_engine.py")),
    Mutation("strict-residual-p", ACC + "strict.py", "return normalise((state.p - state.q).clamp_min_(0.0), state.p)",
             "return state.p", "strict residual after a sampled rejection is p instead of norm((p - q)+)",
             ("test_walk_exact.py", "test_strict_exactness.py", "test_tree_law.py", "test_rules.py")),
    Mutation("strict-ratio-1.02", ACC + "strict.py", "torch.minimum(px, qx).div_(",
             "torch.minimum(1.02 * px, qx).div_(",
             "strict acceptance min(1, 1.02 p/q) instead of min(1, p/q)",
             ("test_walk_exact.py", "test_strict_exactness.py", "test_tree_law.py", "test_rules.py")),
    Mutation("topk-plus-one", DEC + "processing.py", "torch.topk(out, top_k, dim=-1)",
             "torch.topk(out, top_k + 1, dim=-1)",
             "top-k keeps one token too many (filter_logits)", ("test_processing.py", "test_vanilla.py")),
    Mutation("topp-boundary", DEC + "processing.py", "remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()",
             "remove_sorted[..., 1:] = remove_sorted[..., 1:].clone()",
             "top-p drops the token that crosses the threshold (filter_logits)",
             ("test_processing.py", "test_vanilla.py")),
    Mutation("temperature-ignored", DEC + "processing.py",
             "scaled = logits.to(dtype) / params.temperature if params.temperature != 1.0 else logits.to(dtype)",
             "scaled = logits.to(dtype)", "temperature ignored unless greedy (law_from_logits)",
             ("test_processing.py", "test_vanilla.py")),
    Mutation("draft-with-replacement", DEC + "processing.py", "keys, tokens = neg_keys.topk(k, dim=-1, largest=False)",
             "tokens = torch.multinomial(q.reshape(-1, vocab), k, replacement=True, generator=generator)"
             ".view(*q.shape[:-1], k); keys = -q.gather(-1, tokens)",
             "draft siblings drawn with replacement (draw_without_replacement)",
             ("test_processing.py", "test_drafting.py", "test_engine.py")),
    Mutation("lantern-k-plus-one", ACC + "lantern.py", 'return self._table(x.device)[x, : self.params["k"]]',
             'return self._table(x.device)[x, : self.params["k"] + 1]',
             "LANTERN pools from k + 1 neighbours instead of k (_nbrs)", ("test_rules.py", "test_bounds.py")),
    Mutation("lantern-delta-pa", ACC + "lantern.py", 'return torch.full_like(px, self.params["delta"])',
             'return self.params["delta"] - px',
             "LANTERN compares p(A) = p(x) + c with delta, not the neighbour mass c (threshold)",
             ("test_rules.py", "test_bounds.py")),
    Mutation("lantern-pp-lambda", ACC + "lantern.py", 'return (self.params["lam"] - 1.0) * px',
             'return self.params["lam"] * px', "LANTERN++ neighbour mass bound lambda p(x), not (lambda - 1) p(x)",
             ("test_rules.py", "test_bounds.py")),
    Mutation("gsd-window", ACC + "gsd.py", "torch.arange(-w, w, device=p.device)",
             "torch.arange(-w, w + 1, device=p.device)", "GSD window 7 below and 7 above x, not 6 above",
             ("test_rules.py", "test_rule_engine.py")),
    Mutation("seq-bonus-part", MET + "sequence.py", "reach * max(float(law[y]) - float(accept.sum()), 0.0)",
             "reach * float(law[y])", "sequence law's bonus part keeps the accept parts (metrics/sequence._blocks)",
             ("test_sequence_law.py",)),
    Mutation("law-bonus-before-reject", ACC + "law.py",
             "law += (weight.unsqueeze(-1) * rule.bonus_after_reject(state, x, sub)).sum(0)",
             "law += (weight.unsqueeze(-1) * rule.bonus_law(state, sub)).sum(0)",
             "sequence_law's bonus ignores the last sibling's rejection (acceptance/law)",
             ("test_sequence_law.py", "test_rules.py", "test_exact_toy.py")),
    Mutation("drift-node-law-n1", MET + "drift.py", "induced_law(rule, p, q, n_candidates=n_candidates,",
             "induced_law(rule, p, q, n_candidates=1,", "drift recorder's node law ignores siblings (node_law)",
             ("test_exact_toy.py", "test_rule_engine.py", "test_audit.py")),
    Mutation("commit-no-shift", DEC + "engine.py", "walk.bonus[:, None], path_tok.roll(-1, 1))",
             "walk.bonus[:, None], path_tok)", "engine commits the path from the root, one token early (_commit)",
             ("test_engine.py", "test_drafting.py")),
    Mutation("scd-kept-old-q", DEC + "jacobi.py", "        return tok, p_s\n",
             "        return tok, torch.where(keep[..., None], q_old, p_s)\n",
             "SCD-MC records the old q for a kept token, as its repository does (JacobiDrafting._redraft)",
             ("test_jacobi.py",)),
    Mutation("gumbel-no-shift", DEC + "jacobi.py", "idx = torch.arange(cols, device=self.device)[None] + shift[:, None]",
             "idx = torch.arange(cols, device=self.device)[None] + 0 * shift[:, None]",
             "SCD's Gumbel table follows window slots, not absolute positions (JacobiDrafting._redraft)",
             ("test_jacobi.py",)),
    Mutation("pac-ref-tie-high", DEC + "pac_reference.py", "self.depth[None] * n1 + (n1 - 1 - index)[None]",
             "self.depth[None] * n1 + index[None]",
             "SJD-PAC's reference code breaks longest-row ties to the highest row (PacReference.verify)",
             ("test_jacobi_reference.py",)),
    Mutation("keep-mixture-point-kept", DEC + "keep_mixture.py", "kept_point = point * p_s\n",
             "kept_point = point\n",
             "the reference SCD-MC's drift keeps every fresh token (KeepMixture.advance)",
             ("test_jacobi_reference.py",)),
    Mutation("exact-jacobi-later-columns", "analysis/exact_jacobi.py", "key = (prefix, node, window[:c], window[c][2])",
             "key = (prefix, node, window[:c] + window[c + 1:], window[c][2])",
             "exact_jacobi's node law conditions on the next column, whose SCD-MC redraft read this one",
             ("test_jacobi.py",)),
    Mutation("exact-toy-reach", "analysis/exact_toy.py", "emitted + (x,), prob * weight * a)",
             "emitted + (x,), prob * a)",
             "exact_toy's joint law forgets the earlier siblings' rejections (enumerated_walk)",
             ("test_walk_exact.py", "test_exact_toy.py", "test_sequence_law.py", "test_engine.py")),
]


@dataclass
class Run:
    """One pytest run: failing node ids, the summary line and its wall time."""

    failed: set[str]
    summary: str
    seconds: float


def check_mutations(mutations: list[Mutation], root: Path) -> None:
    """Exit loudly unless every mutation's ``old`` occurs exactly once and its test files exist."""
    problems = []
    for m in mutations:
        count = (root / m.file).read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.id}: {m.old!r} occurs {count} times in {m.file} (expected exactly once)")
        problems += [f"{m.id}: no test file tests/{t}" for t in m.tests if not (root / "tests" / t).is_file()]
    if len({m.id for m in mutations}) != len(mutations):
        problems.append("mutation ids are not unique")
    if problems:
        sys.exit("mutate.py: " + "\n  ".join(["bad mutation table:", *problems]))


def copy_tree(dest: Path) -> Path:
    """Copy the working tree's tracked and untracked-but-not-ignored files into ``dest``."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is listed but absent
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


def environment(copy: Path) -> dict[str, str]:
    """The environment of every run in ``copy``: its sources first on the import path, and one torch
    thread (toy-sized ops run fastest on one; with two, a busy core slows a run several-fold)."""
    return {**os.environ, "PYTHONPATH": f"{copy / 'src'}:{copy}", "OMP_NUM_THREADS": "1"}


def check_imports(copy: Path) -> None:
    """Exit unless ``cascade_sd`` and ``analysis`` are imported from ``copy`` (not the editable install)."""
    code = "import cascade_sd, analysis; print(cascade_sd.__file__); print(analysis.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=environment(copy), capture_output=True, text=True)
    paths = out.stdout.split()
    print(f"imports in {copy}: " + ", ".join(paths or [out.stderr.strip()]))
    if out.returncode or len(paths) != 2 or not all(Path(p).is_relative_to(copy) for p in paths):
        sys.exit("mutate.py: the copy does not import its own cascade_sd/analysis")


def run_pytest(copy: Path, tests: list[str], seed: int) -> Run:
    """Run ``tests`` (files under tests/) in ``copy``; failing and erroring node ids from the -rfE summary."""
    shutil.rmtree(copy / ".hypothesis", ignore_errors=True)  # no examples replayed from an earlier run
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "--tb=no", "-rfE",
           "--continue-on-collection-errors", f"--hypothesis-seed={seed}", *(f"tests/{t}" for t in tests)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=environment(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and whatever it started, nothing else
        proc.communicate()
        return Run({"<timeout>"}, f"killed after {TIMEOUT_S}s", time.monotonic() - start)
    seconds = time.monotonic() - start
    lines = output.splitlines()
    failed = {line.split(" ", 1)[1].split(" - ", 1)[0].strip()
              for line in lines if line.startswith(("FAILED ", "ERROR "))}
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r" in [\d.]+s", line)), "")
    if proc.returncode not in (0, 1) and not failed:
        raise RuntimeError(f"pytest exited {proc.returncode} in {copy}:\n" + "\n".join(lines[-30:]))
    return Run(failed, summary, seconds)


def run_mutation(m: Mutation, copy: Path, seed: int) -> Run:
    """Patch ``m.file`` in ``copy``, run its tests, restore the file (and drop stale bytecode both times)."""
    path = copy / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        raise RuntimeError(f"{m.id}: {m.old!r} does not occur exactly once in {path}")

    def write(text: str) -> None:
        path.write_text(text)
        for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            pyc.unlink()

    write(original.replace(m.old, m.new, 1))
    try:
        return run_pytest(copy, list(m.tests), seed)
    finally:
        write(original)


def tests_run(summary: str) -> int:
    """Tests that ran (passed, failed, errored, xfailed, xpassed) according to pytest's summary line."""
    return sum(int(n) for n, kind in re.findall(r"(\d+) (\w+)", summary)
               if kind in ("passed", "failed", "error", "errors", "xfailed", "xpassed"))


def table(mutations: list[Mutation], runs: dict[str, Run], baseline: set[str]) -> str:
    """The Markdown catch table (baseline failures excluded from the counts)."""
    rows = ["| id | description | tests run | failing tests (count) | caught? |", "|---|---|---|---|---|"]
    for m in mutations:
        run = runs[m.id]
        caught = sorted(run.failed - baseline)
        shown = ", ".join(f"`{t.removeprefix('tests/')}`" for t in caught[:3])
        shown += f", +{len(caught) - 3} more" if len(caught) > 3 else ""
        files = ", ".join(t.removesuffix(".py") for t in m.tests)
        rows.append(f"| {m.id} | {m.description} | {files} ({tests_run(run.summary)}) | {len(caught)}"
                    f"{': ' + shown if caught else ''} | {'yes' if caught else '**NO**'} |")
    return "\n".join(rows)


def describe_tree() -> str:
    """The working tree being copied: its commit, whether it has uncommitted changes, and when."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
    dirty = " + uncommitted changes" if git("status", "--porcelain") else ""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"commit {git('rev-parse', '--short', 'HEAD')}{dirty}, copied {stamp}"


def report(mutations: list[Mutation], runs: dict[str, Run], baseline: Run, seed: int, source: str) -> str:
    """The Markdown report: setup, baseline failures, the table and every mutation's failing tests."""
    lines = ["# Mutation catch table\n", f"Working tree: {source}; "
             f"`pytest -m 'not slow' --hypothesis-seed={seed}` per mutation on its listed test files.\n",
             f"Baseline (unmutated copy, union of the selected files): {baseline.summary}; "
             f"{len(baseline.failed)} baseline failure(s), excluded from the counts"
             + (":\n" + "\n".join(f"- `{t}`" for t in sorted(baseline.failed)) if baseline.failed else "."), "",
             table(mutations, runs, baseline.failed), "", "## Failing tests per mutation", ""]
    for m in mutations:
        caught = sorted(runs[m.id].failed - baseline.failed)
        lines.append(f"- **{m.id}** (`{m.file}`; {runs[m.id].seconds:.0f}s; {runs[m.id].summary}): "
                     + (", ".join(f"`{t}`" for t in caught) if caught else "none"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: list the mutations, or run them and print (and write) the catch table."""
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and their test files, run nothing")
    parser.add_argument("--only", help="comma-separated mutation ids (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at once, each in its own copy (default 1)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--hypothesis-seed", type=int, default=0, help="Hypothesis seed of every run (default 0)")
    args = parser.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.id for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutation id(s) {', '.join(unknown)}; --list shows them")
        chosen = [m for m in MUTATIONS if m.id in wanted]
    check_mutations(chosen, ROOT)
    if args.list:
        for m in chosen:
            print(f"{m.id:26} {m.file}: {m.description}\n{'':26} tests: {', '.join(m.tests)}")
        return 0
    union = sorted({t for m in chosen for t in m.tests})
    source = describe_tree()
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copies = [copy_tree(Path(tmp) / f"copy{i}") for i in range(max(1, args.jobs))]
        check_imports(copies[0])
        print(f"baseline: {len(union)} test files: {', '.join(union)}", flush=True)
        baseline = run_pytest(copies[0], union, args.hypothesis_seed)
        print(f"baseline: {baseline.summary} ({baseline.seconds:.0f}s); {len(baseline.failed)} baseline failures",
              flush=True)
        for t in sorted(baseline.failed):
            print(f"    baseline failure: {t}")
        free: queue.Queue[Path] = queue.Queue()
        for c in copies:
            free.put(c)

        def work(m: Mutation) -> Run:
            """Run one mutation in whichever copy is free; print its catch line."""
            copy = free.get()
            try:
                run = run_mutation(m, copy, args.hypothesis_seed)
            finally:
                free.put(copy)
            caught = sorted(run.failed - baseline.failed)
            print(f"{m.id}: caught by {len(caught)} tests ({run.summary}; {run.seconds:.0f}s)"
                  + "".join(f"\n    {t}" for t in caught), flush=True)
            return run

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            runs = dict(zip((m.id for m in chosen), pool.map(work, chosen)))
    print("\n" + table(chosen, runs, baseline.failed))
    print(f"\n{len(chosen)} mutations in {(time.monotonic() - start) / 60:.1f} min")
    if args.out:
        args.out.write_text(report(chosen, runs, baseline, args.hypothesis_seed, source))
        print(f"\nreport: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
