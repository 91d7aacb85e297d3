"""Plots for ``scalewatch fit --plot`` (matplotlib is an optional extra: ``scalewatch[plot]``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def plot_fit(runs: Any, law: Any, path: str, power: Any = None) -> None:
    """Loss against compute for each model size, the fitted law, IsoFLOP curves and N_opt(C)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalewatch.laws import optimal_allocation

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    C = 6 * runs.N * runs.D
    sc = ax1.scatter(C, runs.L, c=np.log10(runs.N), cmap="viridis", s=18, label="runs")
    fig.colorbar(sc, ax=ax1, label="log10 N")
    ax1.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss",
            title="runs and fitted law")
    if law is not None:
        for n in np.unique(np.round(runs.N, -3)):
            d = np.logspace(np.log10(runs.D.min()), np.log10(runs.D.max()), 50)
            ax1.plot(6 * n * d, law.predict(n, d), lw=0.8, color="gray")
        cs = np.logspace(np.log10(C.min()), np.log10(C.max()), 6)
        for c in cs:  # IsoFLOP curves: loss against N at fixed compute
            n = np.logspace(np.log10(runs.N.min()) - 0.5, np.log10(runs.N.max()) + 0.5, 60)
            ax2.plot(n, law.predict(n, c / (6 * n)), label=f"C={c:.1e}")
            n_opt, _ = optimal_allocation(law, c)
            ax2.plot(n_opt, law.predict(n_opt, c / (6 * n_opt)), "k.", ms=8)
        ax2.set(xscale="log", yscale="log", xlabel="N (parameters)", ylabel="predicted loss",
                title="IsoFLOP curves (dots: N_opt)", ylim=(0.9 * runs.L.min(), 1.2 * runs.L.max()))
        ax2.legend(fontsize=7)
    if power is not None:
        pts = np.array(power.points)
        ax2.loglog(pts[:, 0], pts[:, 1], "o", label="N_opt(C) estimates")
        c = np.logspace(np.log10(pts[:, 0].min()), np.log10(pts[:, 0].max()), 20)
        ax2.loglog(c, power.coefficient * c**power.exponent, "-", label=f"N_opt ∝ C^{power.exponent:.3f}")
        ax2.set(xlabel="compute C (FLOPs)", ylabel="N_opt", title=power.method)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
