"""Learning-curve plots for the trainer benchmarks (bench_lm, bench_nmt).

Each row is one model's result: `row["model"]` (the line's name, unless the
row has a `label`) and `row["learning_curve"]`, a list of evaluations, each
with `trained_tokens` and the plotted metrics (a panel leaves out the points
that lack its metric).
"""


def plot_learning_curves(rows, path, panels, title, is_moe):
    """Writes a PNG to `path`: one panel per metric, one line per model.

    Args:
        rows: the models' result dicts (see the module docstring).
        path: the PNG file.
        panels: `(metric key, y-axis label, log scale)` per panel.
        title: the figure's title.
        is_moe: `is_moe(model name)`; MoE models are drawn as solid lines
            with dots, dense baselines dotted with squares.

    Returns:
        The matplotlib figure. Each model keeps its colour in every panel,
        also where an earlier row has no points in a panel.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(panels), squeeze=False,
                                figsize=(6 * len(panels), 4))
    for axis, (metric, label, log_scale) in zip(axes[0], panels):
        for index, row in enumerate(rows):
            curve = [point for point in row["learning_curve"]
                     if metric in point]  # Older rows lack newer metrics.
            if not curve:
                continue
            axis.plot([point["trained_tokens"] / 1e6 for point in curve],
                      [point[metric] for point in curve],
                      "o-" if is_moe(row["model"]) else "s:",
                      markersize=3, color=f"C{index % 10}",
                      label=row.get("label", row["model"]))
        if log_scale:
            axis.set_yscale("log")
        axis.set_xlabel("training tokens (millions)")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure
