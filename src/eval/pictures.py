"""The pictures of the clustering analysis: t-SNE scatter plots, one colour a class."""
import math

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)
from matplotlib.lines import Line2D  # noqa: E402

MAX_LEGEND = 100  # more classes than this get no legend: it could not be read


def class_colours(n):
    """One colour per class: the qualitative tables when they suffice, else hues."""
    if n <= 10:
        return plt.get_cmap("tab10")(np.arange(n))
    if n <= 20:
        return plt.get_cmap("tab20")(np.arange(n))
    return plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False))


def draw_tsne(path, points, rows):
    """Save a grid of t-SNE scatter plots: one column per feature (`points`: {title:
    n x 2 array}), one row per labelling (`rows`: [(labels, class names, heading)])."""
    fig, axes = plt.subplots(len(rows), len(points), figsize=(5 * len(points), 5 * len(rows)),
                             squeeze=False)
    for row, (labels, names, heading) in zip(axes, rows):
        colours = class_colours(len(names))
        for ax, (title, xy) in zip(row, points.items()):
            size = min(30.0, max(3.0, 12000 / len(xy)))  # visible dots, few or many
            ax.scatter(xy[:, 0], xy[:, 1], c=colours[labels], s=size, linewidths=0)
            ax.set_title(f"{title}, {heading}")
            ax.set_xticks([])
            ax.set_yticks([])
        if len(names) <= MAX_LEGEND:
            handles = [Line2D([], [], marker="o", linestyle="", color=colour, label=name)
                       for name, colour in zip(names, colours)]
            row[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1),
                           frameon=False, fontsize=8 if len(names) <= 20 else 6,
                           ncol=math.ceil(len(names) / 25))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
