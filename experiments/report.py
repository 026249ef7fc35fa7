"""Tables, statistics, plots and the Markdown report, all computed from results files.

For every group of a suite: each setting's test metric at the best-validation
epoch (early stopping) and at the final epoch, as mean +- sample std over
seeds, with a two-sided paired t-test against the group's baseline (pairs
share the seed, hence the data order, initialization and subset) and the
Holm-Bonferroni adjusted p-value over the settings of that group.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .config import RL_TASKS, TOKEN_TASKS, RunConfig, run_id
from .results import Run, load_runs

__all__ = ["GroupStats", "collect", "console_tables", "write_report", "holm", "paired_test"]


def paired_test(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p-value of ``a`` vs ``b`` (nan with fewer than 2 pairs or zero spread)."""
    from scipy import stats

    if len(a) < 2:
        return float("nan")
    d = np.asarray(a) - np.asarray(b)
    if np.allclose(d, d[0]):
        return 1.0 if d[0] == 0 else float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def tost(d, margin: float) -> float:
    """Two one-sided paired t-tests (TOST) p-value for equivalence: H0 is ``|mean(d)| >= margin``.

    ``d`` are the paired differences; a p below 0.05 means the 90% t-interval of the mean
    difference lies inside ``(-margin, margin)``: the two settings are equivalent within the margin.
    """
    from scipy import stats

    d = np.asarray(list(d), dtype=float)
    if len(d) < 2 or not margin > 0:
        return float("nan")
    se = np.std(d, ddof=1) / math.sqrt(len(d))
    if se == 0:
        return 0.0 if abs(d.mean()) < margin else 1.0
    df = len(d) - 1
    p_low = 1.0 - stats.t.cdf((d.mean() + margin) / se, df)  # H0: mean <= -margin
    p_high = stats.t.cdf((d.mean() - margin) / se, df)  # H0: mean >= +margin
    return float(max(p_low, p_high))


# Equivalence margins (the smallest difference that would matter to a user), per metric:
#   acc    0.5 percentage points: about one seed-to-seed standard deviation in these
#          regimes, and the size of the largest effect reported for DropGrad (issue 15);
#   ppl    1% of the baseline's perplexity;  nelbo 1 nat per image (~0.4% of a Fashion-MNIST
#          VAE's -ELBO, the size of differences papers report between VAE variants);
#   return 10% of the baseline's mean return (RL returns vary far more between seeds).
def equivalence_margin(metric: str, baseline_mean: float) -> float:
    """The TOST margin for ``metric`` (see the comment above for the reasons)."""
    if metric == "acc":
        return 0.5
    if metric == "nelbo":
        return 1.0
    if metric == "return":
        return 0.1 * abs(baseline_mean) if baseline_mean else float("nan")
    return 0.01 * abs(baseline_mean)


def holm(pvals: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan entries stay nan and are not counted)."""
    idx = [i for i, p in enumerate(pvals) if not math.isnan(p)]
    m = len(idx)
    out = [float("nan")] * len(pvals)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvals[i])):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        out[i] = running
    return out


@dataclass
class Setting:
    name: str
    configs: list[RunConfig]
    runs: dict[int, Run] = field(default_factory=dict)  # seed -> run

    def values(self, key: str) -> dict[int, float]:
        return {s: r.summary[key] for s, r in self.runs.items() if key in r.summary}


@dataclass
class GroupStats:
    suite: str
    group: str
    baseline: str
    metric: str  # "acc" or "ppl"
    higher: bool
    settings: OrderedDict[str, Setting]

    @property
    def expected(self) -> int:
        return sum(len(s.configs) for s in self.settings.values())

    @property
    def finished(self) -> int:
        return sum(len(s.runs) for s in self.settings.values())

    def rows(self, when: str = "best") -> list[dict]:
        """One dict per setting: n, mean, std, delta vs baseline, p, Holm-adjusted p."""
        key = f"test_{self.metric}_{when}"
        base = self.settings.get(self.baseline)
        bvals = base.values(key) if base else {}
        rows = []
        for s in self.settings.values():
            v = s.values(key)
            xs = [_scale(x, self.metric) for x in v.values()]
            row = {"setting": s.name, "n": len(xs), "expected": len(s.configs)}
            row["mean"] = float(np.mean(xs)) if xs else float("nan")
            row["std"] = float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")
            seeds = sorted(set(v) & set(bvals))
            if s.name != self.baseline and seeds:
                a = [_scale(v[k], self.metric) for k in seeds]
                b = [_scale(bvals[k], self.metric) for k in seeds]
                row["delta"] = float(np.mean(a) - np.mean(b))
                row["pairs"] = len(seeds)
                row["p"] = paired_test(a, b)
                row["ci"] = _ci95(np.asarray(a) - np.asarray(b))
                row["margin"] = equivalence_margin(self.metric, float(np.mean(b)))
                row["p_tost"] = tost(np.asarray(a) - np.asarray(b), row["margin"])
            else:
                row["delta"], row["pairs"], row["p"], row["ci"] = float("nan"), 0, float("nan"), float("nan")
                row["margin"], row["p_tost"] = float("nan"), float("nan")
            rows.append(row)
        adj = holm([r["p"] for r in rows])
        for r, a in zip(rows, adj):
            r["p_holm"] = a
        return rows


def _ci95(d: np.ndarray) -> float:
    """Half-width of the 95% t-interval of the mean of the paired differences ``d``."""
    from scipy import stats

    if len(d) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d)))


def _scale(x: float, metric: str) -> float:
    return 100.0 * x if metric == "acc" else x  # accuracies in percent


def collect(configs: list[RunConfig], runs: dict[str, Run]) -> list[GroupStats]:
    from .train import primary_metric

    groups: OrderedDict[tuple[str, str], GroupStats] = OrderedDict()
    for c in configs:
        key = (c.suite, c.group)
        if key not in groups:
            metric, higher = primary_metric(c)
            groups[key] = GroupStats(c.suite, c.group, c.baseline, metric, higher, OrderedDict())
        g = groups[key]
        s = g.settings.setdefault(c.name, Setting(c.name, []))
        rid = run_id(c)
        if any(run_id(other) == rid for other in s.configs):
            continue  # a suite may list one run twice (the rl suite's p=0 under the grid and the controls)
        s.configs.append(c)
        r = runs.get(rid)
        if r is not None:
            s.runs[c.seed] = r
    return list(groups.values())


def _load(results_dir: str) -> dict[str, Run]:
    return {r.id: r for r in load_runs(sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))))}


def _fmt(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


_UNITS = {"acc": "test acc %", "ppl": "test ppl", "nelbo": "test -ELBO (nats)", "return": "eval return"}


def _unit(g: GroupStats) -> str:
    return _UNITS.get(g.metric, g.metric)


_WORDS = {"dg": "DropGrad", "ls": "label smoothing", "wd": "weight decay", "fud": "full-update drop"}


def pretty(name: str) -> str:
    """A setting's label with the abbreviations spelled out, for figure legends ("dg+wd" -> "DropGrad + weight decay")."""
    parts = re.split(r"(\+| )", name)
    text = "".join(_WORDS.get(x, x) for x in parts).replace("+", " + ")
    return text.replace("gauss noise", "Gaussian gradient noise").replace("lr x ", "lr × ")


def _table(g: GroupStats, markdown: bool) -> str:
    best, final = g.rows("best"), g.rows("final")
    head = [
        "setting", "n", f"{_unit(g)} (best val)", "Δ", "p", "p Holm", "p TOST (±margin)", f"{_unit(g)} (final)", "Δ", "p", "p Holm",
    ]
    lines = []
    for b, f in zip(best, final):
        n = f"{b['n']}" if b["n"] == b["expected"] else f"{b['n']}/{b['expected']}"
        lines.append(
            [
                b["setting"] + (" (baseline)" if b["setting"] == g.baseline else ""),
                n,
                f"{_fmt(b['mean'])} ± {_fmt(b['std'])}",
                _signed(b["delta"]),
                _fmt_p(b["p"]),
                _fmt_p(b["p_holm"]),
                "–" if math.isnan(b["p_tost"]) else f"{_fmt_p(b['p_tost'])} (±{b['margin']:.3g})",
                f"{_fmt(f['mean'])} ± {_fmt(f['std'])}",
                _signed(f["delta"]),
                _fmt_p(f["p"]),
                _fmt_p(f["p_holm"]),
            ]
        )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def _iqm_table(g: GroupStats) -> str:
    """RL: per setting, the interquartile mean across seeds of the last-evaluations return."""
    from .rl import iqm

    lines = ["| setting | n | IQM of return across seeds (last 3 evals) | median | min | max |", "|---|--:|--:|--:|--:|--:|"]
    for s in g.settings.values():
        v = list(s.values("test_return_final").values())
        if v:
            lines.append(f"| {s.name} | {len(v)} | {iqm(v):.1f} | {np.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    return "\n".join(lines)


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.2f}"


def console_tables(configs: list[RunConfig], results_dir: str) -> str:
    """Plain-text tables of the given runs (what ``python -m experiments quick`` prints)."""
    groups = collect(configs, _load(results_dir))
    out = []
    for g in groups:
        better = "higher" if g.higher else "lower"
        out.append(f"\n[{g.suite}] {g.group}: {_unit(g)} ({better} is better), mean ± std over seeds; "
                   f"Δ and paired t-test vs '{g.baseline}'")
        out.append(_table(g, markdown=False))
    return "\n".join(out)


# ------------------------------------------------------------------ plots


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")



def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported lazily: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Lay out, write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def _curves(g: GroupStats, path: str) -> str | None:
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    val_key = f"val_{g.metric}"
    any_data = False
    for i, s in enumerate(g.settings.values()):
        if not s.runs:
            continue
        n_ep = min(len(r.epochs) for r in s.runs.values())
        if n_ep == 0:
            continue
        any_data = True
        ep = np.arange(1, n_ep + 1)
        color = plt.cm.tab20(i % 20) if len(g.settings) > 10 else f"C{i}"
        for ax, key, style in ((axes[0], "train_loss", "-"), (axes[0], "val_loss", "--"), (axes[1], val_key, "-")):
            ys = np.array([[e[key] for e in r.epochs[:n_ep]] for r in s.runs.values()])
            if key == val_key:
                ys = np.vectorize(lambda x: _scale(x, g.metric))(ys)
            m = ys.mean(0)
            label = f"{pretty(s.name)} (n={len(s.runs)})" if (ax is axes[1] or key == "train_loss") else None
            ax.plot(ep, m, style, color=color, label=label, lw=1.4)
            if len(ys) > 1 and ax is axes[1]:
                sd = ys.std(0, ddof=1)
                ax.fill_between(ep, m - sd, m + sd, color=color, alpha=0.12)
    if not any_data:
        plt.close(fig)
        return None
    axes[0].set_title("loss: train (solid), validation (dashed)")
    axes[0].set_xlabel("epoch")
    axes[1].set_title({"acc": "validation accuracy %", "ppl": "validation perplexity", "nelbo": "validation -ELBO (nats)",
                       "return": "evaluation return"}.get(g.metric, g.metric) + " (mean ± std over seeds)")
    axes[1].set_xlabel("epoch" if g.metric != "return" else "evaluation point")
    if g.metric == "ppl":
        axes[1].set_yscale("log")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{g.group}: learning curves", fontsize=10)
    _save(fig, path)
    return path


def _bars(g: GroupStats, path: str) -> str | None:
    plt = _pyplot()

    rows_b, rows_f = g.rows("best"), g.rows("final")
    rows_b = [r for r in rows_b if r["n"]]
    if not rows_b:
        return None
    names = [r["setting"] for r in rows_b]
    final = {r["setting"]: r for r in rows_f}
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.6))
    ax.errorbar(x - 0.1, [r["mean"] for r in rows_b], yerr=[0 if math.isnan(r["std"]) else r["std"] for r in rows_b], fmt="o", capsize=3, label="best-val epoch")
    ax.errorbar(x + 0.1, [final[n]["mean"] for n in names], yerr=[0 if math.isnan(final[n]["std"]) else final[n]["std"] for n in names], fmt="s", capsize=3, label="final epoch", alpha=0.7)
    base = next((r for r in rows_b if r["setting"] == g.baseline), None)
    if base is not None:
        ax.axhline(base["mean"], color="gray", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{pretty(n)} (n={r['n']})" for n, r in zip(names, rows_b)], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(_unit(g) + " (mean ± std)")
    ax.set_title(g.group, fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)
    return path


def _vs_rate(g: GroupStats, path: str) -> str | None:
    """Test metric against the (constant, global) drop rate, when a group varies only that."""
    plt = _pyplot()

    import dataclasses

    def others(c: RunConfig) -> dict:
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in ("name", "seed", "drop_rate")}

    base = g.settings.get(g.baseline)
    if base is None:
        return None
    ref = others(base.configs[0])
    pts: dict[float, dict[str, list[float]]] = {}
    for s in g.settings.values():
        c = s.configs[0]
        if others(c) != ref:  # only settings that differ from the baseline in the constant drop rate alone
            continue
        for when in ("best", "final"):
            vals = [_scale(v, g.metric) for v in s.values(f"test_{g.metric}_{when}").values()]
            if vals:
                pts.setdefault(c.drop_rate, {}).setdefault(when, []).extend(vals)
    if len(pts) < 3:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for when, mk in (("best", "o-"), ("final", "s--")):
        ps = sorted(p for p in pts if when in pts[p])
        m = [np.mean(pts[p][when]) for p in ps]
        sd = [np.std(pts[p][when], ddof=1) if len(pts[p][when]) > 1 else 0 for p in ps]
        ax.errorbar(ps, m, yerr=sd, fmt=mk, capsize=3, label="best-val epoch" if when == "best" else "final epoch")
    ax.set_xlabel("drop rate p")
    ax.set_ylabel(_unit(g) + " (mean ± std)")
    ax.set_title(f"{g.group}: metric vs drop rate", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)
    return path


def _robust(g: GroupStats, path: str) -> str | None:
    plt = _pyplot()

    if g.metric != "acc":
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    drawn = False
    for i, s in enumerate(g.settings.values()):
        if not s.runs:
            continue
        sigmas = sorted(s.configs[0].input_noise)
        if not sigmas:
            continue
        xs, ms, sds = [0.0], [], []
        clean = [100 * v for v in s.values("test_acc_best").values()]
        ms.append(np.mean(clean))
        sds.append(np.std(clean, ddof=1) if len(clean) > 1 else 0)
        for sg in sigmas:
            v = [100 * x for x in s.values(f"robust_acc_{sg:g}_best").values()]
            if v:
                xs.append(sg)
                ms.append(np.mean(v))
                sds.append(np.std(v, ddof=1) if len(v) > 1 else 0)
        ax.errorbar(np.array(xs) + 0.003 * i, ms, yerr=sds, fmt="o-", ms=3, capsize=2, label=f"{pretty(s.name)} (n={len(s.runs)})", lw=1)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("Gaussian input noise std (pixels in [0, 1])")
    ax.set_ylabel("test accuracy % (best-val model)")
    ax.set_title(f"{g.group}: robustness", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)
    return path


def _robust_table(g: GroupStats) -> str:
    sigmas = sorted({sg for s in g.settings.values() for sg in s.configs[0].input_noise})
    if g.metric != "acc" or not sigmas:
        return ""
    head = ["setting"] + [f"σ={sg:g}" for sg in sigmas]
    rows = ["| " + " | ".join(head) + " |", "|---" + "|--:" * len(sigmas) + "|"]
    base = g.settings.get(g.baseline)
    for s in g.settings.values():
        row = [s.name]
        for sg in sigmas:
            key = f"robust_acc_{sg:g}_best"
            v = s.values(key)
            xs = [100 * x for x in v.values()]
            txt = f"{_fmt(np.mean(xs)) if xs else '–'} ± {_fmt(np.std(xs, ddof=1)) if len(xs) > 1 else '–'}"
            if base is not None and s.name != g.baseline:
                bv = base.values(key)
                seeds = sorted(set(v) & set(bv))
                p = paired_test([v[k] for k in seeds], [bv[k] for k in seeds]) if seeds else float("nan")
                txt += f" (p {_fmt_p(p)})"
            row.append(txt)
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------ findings and the document


MIN_PAIRS = 2
"""Fewest seed pairs a comparison needs: below it neither the paired t-test nor TOST exists, and
findings(), the control comparisons and summary_rows() all say "not tested" (or leave it out)."""


def findings(g: GroupStats, alpha: float = 0.05) -> list[str]:
    """Sentences generated from the numbers: which settings differ from the baseline, and how reliably."""
    out = []
    unit = {"acc": "points", "ppl": "perplexity", "nelbo": "nats of -ELBO", "return": "return"}.get(g.metric, g.metric)
    for when, label in (("best", "early-stopped"), ("final", "final-epoch")):
        for r in g.rows(when):
            if r["setting"] == g.baseline or not r["pairs"]:
                continue
            good = (r["delta"] > 0) == g.higher
            if r["pairs"] < MIN_PAIRS:  # no paired test exists, so "no significant difference" would claim one
                verdict = f"not tested ({_pairs(r['pairs'])}; a paired test needs {MIN_PAIRS} or more seeds)"
            elif not math.isnan(r["p_holm"]) and r["p_holm"] < alpha:
                verdict = "significantly " + ("better" if good else "worse")
            elif not math.isnan(r["p"]) and r["p"] < alpha:
                verdict = ("better" if good else "worse") + " before, but not after, the Holm correction"
            else:
                verdict = "no significant difference"
            if when == "final" and ("no significant" in verdict or r["pairs"] < MIN_PAIRS):
                continue  # keep the list short: final-epoch entries only when something happens
            out.append(
                f"{label} `{r['setting']}`: {_signed(r['delta'])} {unit} vs `{g.baseline}` "
                f"({_n_pairs(r['pairs'])}, p={_fmt_p(r['p'])}, Holm p={_fmt_p(r['p_holm'])}): {verdict}"
            )
    # controls: does DropGrad differ from the controls that mimic one of its effects?
    dgs = [s for s in g.settings.values() if s.configs[0].uses_dropgrad]
    controls = [s for s in g.settings.values() if s.configs[0].grad_noise > 0 or s.configs[0].lr_scale != 1.0]
    key = f"test_{g.metric}_best"
    for d in dgs:
        for c in controls:
            dc, cc = d.configs[0], c.configs[0]
            matched = cc.grad_noise == dc.drop_rate or abs(cc.lr_scale - math.sqrt(1 - dc.drop_rate)) < 1e-9
            if not matched or dc.dropout != cc.dropout or dc.weight_decay != cc.weight_decay or dc.label_smoothing != cc.label_smoothing:
                continue
            a, b = d.values(key), c.values(key)
            seeds = sorted(set(a) & set(b))
            if len(seeds) < MIN_PAIRS:
                continue
            x = [_scale(a[k], g.metric) for k in seeds]
            y = [_scale(b[k], g.metric) for k in seeds]
            out.append(f"early-stopped `{d.name}` vs control `{c.name}`: {_signed(float(np.mean(x) - np.mean(y)))} {unit} "
                       f"({_n_pairs(len(seeds))}, p={_fmt_p(paired_test(x, y))}, uncorrected)")
    return out


def _pairs(n: int) -> str:
    return f"{n} pair" + ("" if n == 1 else "s")


def _n_pairs(n: int) -> str:
    return "n=" + _pairs(n)


def _reproduce(g: GroupStats, suite: str) -> str:
    return f"python -m experiments suite {suite} --group '{g.group}' --results-dir experiments/results"


STRICT_PROVENANCE = ("overfit", "rl", "generative", "lm-full", "gpu-short")


def write_report(
    results_dir: str,
    out: str,
    figures: str | None = None,
    suites: list[str] | None = None,
    configs: dict[str, list[RunConfig]] | None = None,
) -> str:
    """Write the Markdown report (and PNGs) from ``results_dir``.

    Args:
        results_dir: folder of the JSONL results files.
        out: path of the Markdown file.
        figures: folder for the PNGs (default ``figures/results`` beside ``out``).
        suites: names of the suites to report (default: the published ones).
        configs: suite name -> its configs, instead of the named suites (for custom suites and tests).
    """
    from .suites import DESCRIPTIONS, PUBLISHED, get_suite

    if configs is None:
        configs = {name: get_suite(name) for name in (suites or PUBLISHED)}
    suites = list(configs)
    out_dir = os.path.dirname(os.path.abspath(out))
    figures = figures or os.path.join(out_dir, "figures", "results")
    os.makedirs(figures, exist_ok=True)
    runs = _load(results_dir)
    # suites started after provenance was enforced: a run from an uncommitted tree is left out
    dirty = {i for i, r in runs.items() if r.env.get("git_dirty") and r.config.get("suite") in STRICT_PROVENANCE}
    runs = {i: r for i, r in runs.items() if i not in dirty}
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731

    envs = {}
    for r in runs.values():
        e = r.env
        envs[(e.get("cpu"), e.get("cpu_count"), e.get("torch"), e.get("cuda"))] = e
    commits = sorted({(r.env.get("git_commit") or "?")[:10] + ("+dirty" if r.env.get("git_dirty") else "") for r in runs.values()})

    doc = [
        "# Results",
        "",
        "<!-- Generated by `python -m experiments report`; do not edit by hand: edit experiments/notes.md or the code. -->",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the results files in "
        f"`{os.path.relpath(results_dir)}/` ({len(runs)} finished runs). Every number below is computed from those "
        "files by `python -m experiments report`; the code version of each run is recorded with it.",
        "",
    ]
    notes = os.path.join(os.path.dirname(__file__), "notes.md")
    if os.path.exists(notes):
        with open(notes, encoding="utf-8") as f:
            doc += [f.read().strip(), ""]

    doc += ["## How the numbers are made", "",
            "* Each table row is one setting; **n** is the number of seeds finished (`k/N` while a suite is incomplete).",
            "* **best val**: the test metric at the epoch with the best validation metric (early stopping); "
            "**final**: at the last epoch.",
            "* **Δ**: mean paired difference to the group's baseline (accuracy in percentage points, perplexity in "
            "perplexity units); **p**: two-sided paired t-test over seeds (`scipy.stats.ttest_rel`; a pair shares "
            "the seed, hence initialization, data order and data subset); **p Holm**: Holm-Bonferroni adjusted over "
            "all settings of the same table (family = one table, one column); the summary corrects once more across all "
            "of its rows (one family for the whole report). **p TOST**: two one-sided paired t-tests for equivalence "
            "with the baseline within the margin shown (0.5 accuracy points; 1% of the baseline perplexity; 1 nat of "
            "-ELBO; 10% of the baseline RL return), uncorrected in the tables, Holm-corrected in the summary.",
            "* Label noise flips exactly the stated share of training labels, each to a different class drawn "
            "uniformly; validation labels are clean.",
            "* Image accuracies are in %, on the untouched test set; validation is held out of the training set.",
            "",
            "## Machine and running time", ""]
    for e in envs.values():
        threads = sorted({r.config.get("threads") for r in runs.values() if r.env is e or r.env.get("cpu") == e.get("cpu")})
        doc.append(f"* {e.get('cpu')} ({e.get('cpu_count')} cores), torch {e.get('torch')}, python {e.get('python')}, "
                   f"{'/'.join(map(str, threads))} thread(s) per run (`threads` in the config), GPU: {e.get('cuda') or 'none'}")
    doc.append(f"* code versions of the runs: {', '.join(commits) if commits else '–'} (`+dirty`: the checkout had "
               "uncommitted changes under `dropgrad/` or `experiments/` when the suite started; each run's exact "
               "commit and flag are in its `start` record)")
    doc.append(f"* provenance: since the suites {', '.join(f'`{x}`' for x in STRICT_PROVENANCE)} were added, "
               "`python -m experiments suite` refuses to write into `experiments/results` from an uncommitted tree "
               f"(`--allow-dirty` overrides); dirty runs of those suites are left out of this report ({len(dirty)} left out). "
               "The older suites (`quick`, `image`, `ablations`, `lm`) were run before that rule and most of their runs "
               "are marked `+dirty` above: read them as not reproducible from a single commit.")
    for cpu in sorted({r.env.get("cpu") or "?" for r in runs.values()}):
        flags = sorted({" ".join(r.env.get("cpu_flags") or []) for r in runs.values() if r.env.get("cpu") == cpu} - {""})
        if flags:
            sets = f" ({len(flags)} different sets: machines of one model name differ)" if len(flags) > 1 else ""
            doc.append(f"* SIMD flags recorded on {cpu}{sets}: " + "; ".join(flags))
    doc.append("* A seed's run is bitwise reproducible on the same CPU model, torch build and thread count; another CPU "
               "model takes other floating-point paths in torch's kernels, so its runs differ slightly and only their "
               "statistics reproduce (`python -m experiments compare RERUN_DIR --suite S` checks that; the column "
               "*ran on* below counts each suite's runs by CPU model, or GPU for runs on CUDA).")
    threads_used = sorted({_recorded_threads(r) for r in runs.values()} - {None})
    if threads_used:
        doc.append(f"* torch threads in effect (recorded per run, newer suites): {', '.join(map(str, threads_used))}")
    from .results import ResultsFile

    errors = [r for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))) for r in ResultsFile(path).records()
              if r.get("type") == "error" and r["run"] not in runs]
    doc.append(f"* failed runs (recorded as errors, excluded from the tables): {len(errors)}"
               + "".join(f"\n  * `{e['run']}`: {e.get('error', '?')}" for e in errors))
    doc += ["", "| suite | runs finished | of | measured (min) | estimated left (min) | ran on (runs) | command |",
            "|---|--:|--:|--:|--:|---|---|"]
    all_groups: dict[str, list[GroupStats]] = {}
    total_s = left_s = 0.0
    seen: set[str] = set()
    any_unknown = False
    for suite in suites:
        unknown = False
        groups = collect(configs[suite], runs)
        all_groups[suite] = groups
        ids = {run_id(c) for c in configs[suite]}
        fin = [runs[i] for i in ids if i in runs]
        secs = sum(r.wall_s for r in fin)
        # estimate what is left from the mean time of finished runs of the same group
        est = 0.0
        for g in groups:
            done = [r.wall_s for s in g.settings.values() for r in s.runs.values()]
            todo = {run_id(c) for s in g.settings.values() for c in s.configs if run_id(c) not in runs} - seen
            seen |= todo
            if todo and not done:
                unknown = True
            est += len(todo) * (float(np.mean(done)) if done else 0.0)
        total_s += sum(r.wall_s for r in fin if r.id not in seen)
        seen |= {r.id for r in fin}
        left_s += est
        any_unknown |= unknown
        cpus = Counter(_machine(r) for r in fin)
        doc.append(f"| {suite} | {len(fin)} | {len(ids)} | {secs / 60:.0f} | {est / 60:.0f}{'+' if unknown else ''} | "
                   f"{', '.join(f'{c} {n}' for c, n in sorted(cpus.items())) or '–'} | "
                   f"`python -m experiments suite {suite} --results-dir experiments/results` |")
    doc += ["", f"Measured so far: {total_s / 60:.0f} min of run time (each run counted once, although a run shared by "
            f"two suites is listed under both); estimated left: {left_s / 60:.0f} min{' plus groups with no finished run yet (+)' if any_unknown else ''}. "
            f"Times are wall-clock per run ({_time_basis(runs.values())}), on machines shared with other work, so they vary. "
            "`python -m experiments suite all --results-dir experiments/results` runs (or resumes) everything, three "
            "seeds of every setting first.", ""]

    incomplete = [f"`{g.suite}` / {g.group} ({g.finished}/{g.expected} runs)" if g.finished
                  else f"`{g.suite}` / {g.group} (none of {g.expected} runs finished)"
                  for gs in all_groups.values() for g in gs if g.finished < g.expected]
    doc += ["Incomplete groups (their rows below are partial, or absent): " + ("; ".join(incomplete) if incomplete else "none") + ".", ""]
    doc += _summary(all_groups)
    for suite, groups in all_groups.items():
        doc += [f"## Suite `{suite}`", "", DESCRIPTIONS.get(suite, ""), ""]
        for g in groups:
            doc += [f"### {g.group}", ""]
            c0 = next(iter(g.settings.values())).configs[0]
            doc += [f"{_describe(c0)}. Reproduce: `{_reproduce(g, suite)}`", ""]
            if g.finished == 0:
                doc += ["*No finished runs yet.*", ""]
                continue
            doc += [_table(g, markdown=True), ""]
            if g.metric == "return":
                doc += [_iqm_table(g), ""]
            rt = _robust_table(g)
            if rt and suite != "ablations":
                doc += ["Robustness: test accuracy % of the best-validation model under Gaussian input noise "
                        "(p: paired t-test vs baseline, uncorrected).", "", rt, ""]
            f = findings(g)
            if f:
                doc += ["Findings (generated):", ""] + [f"* {x}" for x in f] + [""]
            slug = _slug(f"{suite}-{g.group}")
            for maker, suffix in ((_curves, "curves"), (_vs_rate, "vs-rate"), (_bars, "bars"), (_robust, "robust")):
                if suffix == "robust" and suite == "ablations":
                    continue
                p = maker(g, os.path.join(figures, f"{slug}-{suffix}.png"))
                if p:
                    doc.append(f"![{g.group} {suffix}]({rel(p)})")
            doc.append("")
    doc += _gpu_section()
    os.makedirs(out_dir, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(doc).rstrip() + "\n")
    return out


def _short_cpu(cpu: str | None) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'Intel Xeon' (for a table cell)."""
    text = re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b", "", cpu or "?")
    return " ".join(text.split()) or "?"


def _time_basis(runs) -> str:
    """What the run times were measured on: runs counted by GPU, or by the torch thread count of a CPU run.

    The count in effect is recorded per run for the :data:`STRICT_PROVENANCE` suites; the older
    suites recorded it before the run set its own (``threads`` in the config), so theirs is read
    from the config.
    """
    on = Counter("a GPU" if _on_cuda(r) else f"{_recorded_threads(r) or r.config.get('threads', 1)} CPU thread(s)" for r in runs)
    return ", ".join(f"{n} on {k}" for k, n in on.most_common())


def _recorded_threads(r: Run) -> int | None:
    """The torch thread count a run recorded, where the record is the count in effect (the
    :data:`STRICT_PROVENANCE` suites); None for the older suites, which recorded it too early."""
    return r.env.get("torch_threads") if r.config.get("suite") in STRICT_PROVENANCE else None


def _on_cuda(r: Run) -> bool:
    return str(r.config.get("device", "cpu")).startswith("cuda")


def _machine(r: Run) -> str:
    """What a run computed on: its GPU for a CUDA run, else its CPU model (short)."""
    if _on_cuda(r) and r.env.get("cuda"):
        return _short_cpu(r.env["cuda"])
    return _short_cpu(r.env.get("cpu"))


def _epochs(c: RunConfig) -> str:
    if c.patience:
        return f"at most {c.epochs} epochs (stopped after {c.patience} without a better validation score)"
    return f"{c.epochs} epochs"


def _describe(c: RunConfig) -> str:
    if c.task in TOKEN_TASKS:
        arch = f"{c.model} emb {c.emb} hidden {c.hidden} x{c.layers}" if c.model == "lstm" else f"{c.model} d {c.emb} x{c.layers} heads {c.heads}"
        data = f"first {c.train_subset} training tokens" if c.train_subset else "all training tokens"
        return (f"{c.task}, {arch}, {data}, {_epochs(c)}, batch {c.batch_size}x{c.bptt}, {c.optimizer} lr {c.lr:g}, "
                f"clip {c.clip_grad:g}, eval on {c.eval_tokens or 'all'} tokens")
    arch = f"{c.model} {c.hidden}x{c.layers}" if c.model == "mlp" else f"{c.model} width {c.width}"
    data = f"{c.train_subset} training images" if c.train_subset else "all training images"
    if c.task in RL_TASKS:
        return (f"{c.task} ({c.model.upper()}, stable-baselines3), MLP {c.hidden}x{c.layers}, {c.env_steps} env steps, "
                f"{c.epochs} evaluations of {c.eval_episodes} deterministic episodes, adam lr {c.lr:g}; headline: mean "
                "return of the last 3 evaluations")
    if c.model == "vae":
        data = f"{c.train_subset} training images" if c.train_subset else "all training images"
        return (f"{c.task}, VAE {c.hidden}-{c.latent}, {data}, {_epochs(c)}, batch {c.batch_size}, {c.optimizer} "
                f"lr {c.lr:g}, validation {c.val_size}; test -ELBO in nats per image")
    extra = (f", {int(c.label_noise * 100)}% of training labels flipped to a different class (validation labels clean)"
             if c.label_noise else "")
    return (f"{c.task}, {arch}, {data}{extra}, {_epochs(c)}, batch {c.batch_size}, {c.optimizer} lr {c.lr:g}, "
            f"validation {c.val_size}")


def _gpu_section() -> list[str]:
    from .suites import DESCRIPTIONS, GPU_SUITES

    out = ["## Larger configurations (GPU)", "",
           "Not run on the CPU machine above; defined in `experiments/suites.py` so that a user with a GPU runs them "
           "with one command each and gets the same tables from `python -m experiments report --results-dir DIR --suites NAME`.", ""]
    for name, make in GPU_SUITES.items():
        configs = make()
        out += [f"### `{name}`", "", DESCRIPTIONS.get(name, ""), ""]
        groups: OrderedDict[str, list[RunConfig]] = OrderedDict()
        for c in configs:
            groups.setdefault(c.group, []).append(c)
        for group, cs in groups.items():
            names = list(OrderedDict.fromkeys(c.name for c in cs))
            out.append(f"* {group}: {_describe(cs[0])}; settings {', '.join(f'`{n}`' for n in names)}; "
                       f"{len({c.seed for c in cs})} seeds")
        data = " --set data_dir=/path/to/data" if any(c.task == "cifar10" for c in configs) else ""
        out += ["", f"    python -m experiments suite {name} --results-dir experiments/results-gpu{data}",
                f"    python -m experiments report --results-dir experiments/results-gpu --suites {name} --out docs/results-{name}.md", ""]
    return out


def headline(metric: str) -> str:
    """The column a domain is judged by: the early-stopped test metric, except RL (mean of the last evaluations)."""
    return "final" if metric == "return" else "best"


def _controls_of(g: GroupStats, name: str, when: str) -> list[tuple[str, float, float]]:
    """The controls matched to a plain DropGrad setting (lr x sqrt(1-p), Gaussian noise at p): (name, Δ, p)."""
    import dataclasses

    me = g.settings[name]
    c = me.configs[0]
    if c.layer_rates or c.full_update_drop or c.schedule != "constant" or c.drop_rate <= 0:
        return []

    def rest(x: RunConfig) -> dict:
        return {k: v for k, v in dataclasses.asdict(x).items() if k not in ("name", "seed", "drop_rate", "lr_scale", "grad_noise")}

    out = []
    for other in g.settings.values():
        o = other.configs[0]
        if o.uses_dropgrad or rest(o) != rest(c):
            continue
        if not (o.grad_noise == c.drop_rate or (o.grad_noise == 0 and o.lr_scale != 1.0 and abs(o.lr_scale - math.sqrt(1 - c.drop_rate)) < 1e-9)):
            continue
        key = f"test_{g.metric}_{when}"
        a, b = me.values(key), other.values(key)
        seeds = sorted(set(a) & set(b))
        if len(seeds) < MIN_PAIRS:
            continue
        x = [_scale(a[k], g.metric) for k in seeds]
        y = [_scale(b[k], g.metric) for k in seeds]
        out.append((other.name, float(np.mean(x) - np.mean(y)), paired_test(x, y)))
    return out


def summary_rows(all_groups: dict[str, list[GroupStats]], alpha: float = 0.05) -> list[dict]:
    """Every DropGrad setting against its baseline, with one Holm correction across the whole list.

    The family is every DropGrad-vs-baseline comparison of the report (each in its domain's
    headline column, see :func:`headline`); equivalence (TOST) p-values are Holm-corrected
    across the same list. The verdict:

    * **better**/**worse**: Holm p < alpha; a "better" is qualified when the same regularizer
      without DropGrad (the partner of a combination) or a matched control is not
      distinguishable from it (uncorrected p >= alpha), since then that partner or control
      explains the gain;
    * **equivalent within ±margin**: the Holm-corrected TOST p < alpha (when the difference is
      also significant, it is called better/worse "by less than the margin");
    * **inconclusive**: neither a difference nor equivalence is shown;
    * **not tested**: fewer than :data:`MIN_PAIRS` pairs (seeds), for which no paired test exists.
    """
    rows = []
    seen: dict = {}  # a comparison shared by two groups (same runs) enters the family once
    for suite, groups in all_groups.items():
        for g in groups:
            when = headline(g.metric)
            other = "final" if when == "best" else "best"
            alt = {r["setting"]: r for r in g.rows(other)}
            for r in g.rows(when):
                c = g.settings[r["setting"]].configs[0]
                if r["setting"] == g.baseline or not c.uses_dropgrad or not r["pairs"]:
                    continue
                ident = (frozenset(map(run_id, g.settings[r["setting"]].configs)), frozenset(map(run_id, g.settings[g.baseline].configs)))
                partner, pd, pp = _versus_partner(g, r["setting"], when)
                if ident in seen:  # keep one row, with the controls/partner of whichever group has them
                    first = seen[ident]
                    if not first["controls"]:
                        first["controls"] = _controls_of(g, r["setting"], when)
                    if not first["partner"] and partner:
                        first.update(partner=partner, partner_delta=pd, partner_p=pp)
                    continue
                rows.append({**r, "suite": suite, "group": g.group, "metric": g.metric, "higher": g.higher, "when": when,
                             "other": alt[r["setting"]], "partner": partner, "partner_delta": pd, "partner_p": pp,
                             "controls": _controls_of(g, r["setting"], when)})
                seen[ident] = rows[-1]
    for key, out in (("p", "p_all"), ("p_tost", "p_tost_all")):
        for r, a in zip(rows, holm([r[key] for r in rows])):
            r[out] = a
    for r in rows:
        good = (r["delta"] > 0) == r["higher"]
        equivalent = not math.isnan(r["p_tost_all"]) and r["p_tost_all"] < alpha
        if r["pairs"] < MIN_PAIRS:  # as in findings(): neither test exists
            verdict = f"not tested ({_pairs(r['pairs'])})"
        elif not math.isnan(r["p_all"]) and r["p_all"] < alpha and equivalent:
            verdict = f"{'better' if good else 'worse'} by less than the margin: equivalent within ±{r['margin']:.3g}"
        elif not math.isnan(r["p_all"]) and r["p_all"] < alpha:
            verdict = "**better**" if good else "**worse**"
            if good:
                explained = []
                if r["partner"] and not (r["partner_p"] < alpha and (r["partner_delta"] > 0) == r["higher"]):
                    explained.append(f"`{r['partner']}` alone")
                explained += [f"control `{n}`" for n, d, p in r["controls"] if not (p < alpha and (d > 0) == r["higher"])]
                if explained:
                    verdict = "better than baseline, but not than " + " / ".join(explained) + " (which explains it)"
                elif r["controls"]:
                    verdict = "**better**, also than both controls"
        elif equivalent:
            verdict = f"equivalent within ±{r['margin']:.3g}"
        else:
            verdict = "inconclusive"
        r["verdict"] = verdict
    return rows


def _summary(all_groups: dict[str, list[GroupStats]]) -> list[str]:
    """The headline table: every DropGrad setting against its baseline."""
    rows = summary_rows(all_groups)
    out = ["## Summary: every DropGrad setting against its baseline", "",
           f"One family: all {len(rows)} DropGrad-vs-baseline comparisons below, Holm-corrected together (**Holm p (all)**); "
           "the per-table Holm p in the sections further down corrects within one table only. Δ is the paired mean "
           "difference to the group's baseline with the half-width of its 95% t-interval, in the domain's headline "
           "column: the test metric at the best-validation epoch (early stopping), except RL, judged by the mean return "
           "of the last three evaluations (**col**). **TOST p**: equivalence test (two one-sided paired t-tests) against "
           "the margin shown, Holm-corrected across the same list: margins are 0.5 accuracy points, 1% of the baseline "
           "perplexity, 1 nat of -ELBO, 10% of the baseline RL return (`experiments/report.py`, `equivalence_margin`, "
           "says why). Accuracy in percentage points (higher is better), perplexity and -ELBO lower is better, return "
           "higher is better.", "",
           "**vs controls** compares DropGrad at rate p with Adam at lr x sqrt(1-p) and with Gaussian gradient noise of "
           "DropGrad's variance at the same p; **vs partner** compares a combination (`dg+dropout`, say) with the same "
           "regularizer without DropGrad. Both are paired, uncorrected. A *better* is qualified when a control or the "
           "partner alone is not distinguishable from DropGrad.", "",
           "| suite | group | setting | n | col | Δ | p | Holm p (all) | TOST p (margin) | Δ other col | vs controls (Δ, p) | vs partner (Δ, p) | verdict |",
           "|---|---|---|--:|---|--:|--:|--:|--:|--:|---|---|---|"]
    for r in rows:
        ctl = "; ".join(f"{n}: {_signed(d)}, {_fmt_p(p)}" for n, d, p in r["controls"]) or "–"
        par = f"{r['partner']}: {_signed(r['partner_delta'])}, {_fmt_p(r['partner_p'])}" if r["partner"] else "–"
        o = r["other"]
        tost_txt = "–" if math.isnan(r["p_tost_all"]) else f"{_fmt_p(r['p_tost_all'])} (±{r['margin']:.3g})"
        out.append(f"| {r['suite']} | {r['group']} | {r['setting']} | {r['pairs']} | {'best val' if r['when'] == 'best' else 'final'} | "
                   f"{_signed(r['delta'])} ± {_fmt(r['ci'])} | {_fmt_p(r['p'])} | {_fmt_p(r['p_all'])} | {tost_txt} | "
                   f"{_signed(o['delta'])} ± {_fmt(o['ci'])} | {ctl} | {par} | {r['verdict']} |")
    return out + [""]


def _versus_partner(g: GroupStats, name: str, when: str = "best") -> tuple[str | None, float, float]:
    """The setting of ``g`` equal to ``name`` without DropGrad, if it is not the baseline, and the paired Δ, p."""
    import dataclasses

    def strip(c: RunConfig) -> dict:
        c = c.replace(drop_rate=0.0, layer_rates="", full_update_drop=0.0, schedule="constant", schedule_final=0.0)
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in ("name", "seed")}

    me = g.settings[name]
    ref = strip(me.configs[0])
    for other in g.settings.values():
        if other.name in (name, g.baseline) or other.configs[0].uses_dropgrad or strip(other.configs[0]) != ref:
            continue
        key = f"test_{g.metric}_{when}"
        a, b = me.values(key), other.values(key)
        seeds = sorted(set(a) & set(b))
        if not seeds:
            return other.name, float("nan"), float("nan")
        x = [_scale(a[k], g.metric) for k in seeds]
        y = [_scale(b[k], g.metric) for k in seeds]
        return other.name, float(np.mean(x) - np.mean(y)), paired_test(x, y)
    return None, float("nan"), float("nan")


# ------------------------------------------------------------------ reproduction check


def compare_results(
    rerun_dir: str, published_dir: str, configs: list[RunConfig], sigmas: float = 3.0, group: str | None = None,
) -> tuple[str, bool]:
    """Compare a rerun's runs with the published ones of the same run ids, group by group.

    Runs are paired by run id (the same seed: the same initialization, data
    order and subset). For every setting and both epochs read (best validation
    and final), it gives the published and rerun means over the seeds present
    in both, the mean of the per-seed differences with its standard error, and
    how many runs came out bitwise identical. A setting *reproduces* when its
    mean difference is within ``sigmas`` standard errors of zero (a rerun on
    another CPU model takes other floating-point paths, so single runs differ
    while their means may not); a group reproduces when every setting does and
    so does every setting's effect (its difference to the baseline).

    Returns:
        (the text of the tables, whether everything compared reproduced).
    """
    rerun, published = _load(rerun_dir), _load(published_dir)
    lines: list[str] = []
    counts: dict[bool | None, int] = {True: 0, False: 0, None: 0}
    for g in collect(configs, published):
        if group is not None and group not in g.group:
            continue
        mine = {s.name: {seed: rerun[run_id(c)] for c in s.configs for seed in [c.seed] if run_id(c) in rerun}
                for s in g.settings.values()}
        if not any(mine.values()):
            continue
        lines += [f"[{g.suite}] {g.group}: {_unit(g)}, published vs rerun over the seeds in both "
                  f"(reproduced: |diff| <= {sigmas:g} standard errors)", ""]
        header = ["setting", "when", "n", "identical", "published", "rerun", "diff ± se", "effect pub", "effect rerun",
                  "verdict"]
        rows = []
        base = g.settings.get(g.baseline)
        for when in ("best", "final"):
            key = f"test_{g.metric}_{when}"
            vals = functools.partial(_seed_values, key=key, metric=g.metric)
            for s in g.settings.values():
                seeds = sorted(set(mine[s.name]) & set(s.runs))
                if not seeds:
                    continue
                pub, new = vals(s.runs, seeds), vals(mine[s.name], seeds)
                same = sum(s.runs[k].summary == mine[s.name][k].summary for k in seeds)
                d = new - pub
                se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
                verdict = _within(d, sigmas)
                eff_pub = eff_new = float("nan")
                if base is not None and s.name != g.baseline:
                    both = [k for k in seeds if k in base.runs and k in mine[g.baseline]]
                    if both:
                        effect_pub = vals(s.runs, both) - vals(base.runs, both)
                        effect_new = vals(mine[s.name], both) - vals(mine[g.baseline], both)
                        eff_pub, eff_new = float(np.mean(effect_pub)), float(np.mean(effect_new))
                        effect = _within(effect_new - effect_pub, sigmas)
                        verdict = None if None in (verdict, effect) else verdict and effect
                counts[verdict] += 1
                rows.append([s.name, when, str(len(seeds)), f"{same}/{len(seeds)}", _fmt(float(np.mean(pub))),
                             _fmt(float(np.mean(new))), f"{_signed(float(np.mean(d)))} ± {_fmt(se)}",
                             _signed(eff_pub), _signed(eff_new),
                             {True: "reproduced", False: "NOT reproduced", None: "undecided (1 seed)"}[verdict]])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append("")
    if not sum(counts.values()):
        return f"no run of {rerun_dir} is among the published runs of {published_dir}", False
    lines.append(f"{counts[True]} reproduced, {counts[False]} not reproduced, {counts[None]} undecided (one seed "
                 f"and not identical) of {sum(counts.values())} comparisons (setting x epoch), at {sigmas:g} standard errors")
    return "\n".join(lines), counts[False] == 0 and counts[True] > 0


def _seed_values(runs: dict[int, Run], seeds: list[int], key: str, metric: str) -> np.ndarray:
    """``runs[k].summary[key]`` for each seed k, scaled as the tables show it."""
    return np.array([_scale(runs[k].summary[key], metric) for k in seeds])


def _within(d: np.ndarray, sigmas: float) -> bool | None:
    """Whether the mean of the paired differences ``d`` is within ``sigmas`` standard errors of 0 (None: one nonzero pair)."""
    if np.all(d == 0):
        return True
    if len(d) < 2:
        return None
    return bool(abs(float(np.mean(d))) <= sigmas * float(np.std(d, ddof=1)) / math.sqrt(len(d)))
