"""PNG plots of `prefuse bench` records: extra peak memory and time against vocabulary size and token count."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _series(records: list[dict], x_key: str, fixed_key: str):
    """{fixed value: {path: [(x, memory, time)]}} for records with both measurements."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if "time_median_s" in r and "peak_extra_mib" in r:
            out[r[fixed_key]][r["path"]].append((r[x_key], r["peak_extra_mib"], r["time_median_s"]))
    return out


def plot_records(records: list[dict], prefix: str) -> list[str]:
    """Writes `{prefix}_vs_vocab.png` and `{prefix}_vs_tokens.png` (one panel pair per fixed value) for the axes
    the records vary along; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_key, fixed_key, label in (("v", "n", "vocabulary size V"), ("n", "v", "tokens N")):
        groups = {k: v for k, v in _series(records, x_key, fixed_key).items()
                  if any(len({p[0] for p in pts}) > 1 for pts in v.values())}
        if not groups:
            continue
        fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
        for row, (fixed, by_path) in enumerate(sorted(groups.items())):
            for path, points in sorted(by_path.items()):
                points.sort()
                xs = [p[0] for p in points]
                axes[row][0].plot(xs, [p[1] for p in points], marker="o", label=path)
                axes[row][1].plot(xs, [p[2] for p in points], marker="o", label=path)
            other = "N" if fixed_key == "n" else "V"
            axes[row][0].set(xlabel=label, ylabel="extra peak memory (MiB)", title=f"{other} = {fixed}")
            axes[row][1].set(xlabel=label, ylabel="time per forward+backward (s)", title=f"{other} = {fixed}")
            for ax in axes[row]:
                ax.grid(alpha=0.3)
        axes[0][1].legend(fontsize=8)
        fig.tight_layout()
        out = Path(f"{prefix}_vs_{'vocab' if x_key == 'v' else 'tokens'}.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(str(out))
    return written
