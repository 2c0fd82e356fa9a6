"""Draw the README's pipeline picture: ``python docs/pipeline_figure.py`` writes docs/pipeline.svg."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script, not a library: it owns its backend
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("pipeline.svg")
# (x, y, title, what it does, what it adds / writes); boxes are W x H, y is the box centre.
W, H = 2.05, 1.25
STAGES = {
    "source": (0.0, 2.2, "source", "hub dataset, image folder\nor the offline demo", "image, category, rationale"),
    "instruct": (2.45, 2.2, "instruct", "VLM told the policy, or a\ntemplate: replace only the\nviolating element", "+ instruction"),
    "edit": (4.9, 2.2, "edit", "diffusers editor or OCR\ninpainting; + an artifact\ncontrol of the original", "+ edited_image, control"),
    "validate": (7.35, 2.2, "validate", "change mask, LPIPS / SSIM\noutside it, a judge says\nunsafe -> safe", "+ edit_mask, accepted"),
    "review": (9.8, 2.2, "review", "people accept or reject\neach pair (optional)", "review.jsonl, kappa"),
    "release": (9.8, 0.0, "release", "hub layout: card + parquet\nconfigs pairs / images /\nrejected; push, gated", "load_dataset(repo)"),
    "evaluate": (7.35, 0.0, "evaluate", "guards and VLMs on every\nimage; pair accuracy,\nnatural vs pairs", "results.json, report.html"),
    "train": (4.9, 0.0, "embed + probe", "embeddings, linear probes,\nsample efficiency:\n+ k pairs vs + k images", "curve.png"),
}
ARROWS = [("source", "instruct"), ("instruct", "edit"), ("edit", "validate"), ("validate", "review"),
          ("review", "release"), ("release", "evaluate"), ("release", "train")]
COLOURS = {"source": "#e8eef7", "release": "#e7f4ea", "evaluate": "#fdf1e3", "train": "#fdf1e3", "review": "#f3ecf8"}


def box(ax, name):
    x, y, title, body, adds = STAGES[name]
    ax.add_patch(FancyBboxPatch((x, y - H / 2), W, H, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=COLOURS.get(name, "#f4f4f4"), edgecolor="#555555", linewidth=1.2))
    ax.text(x + W / 2, y + H / 2 - 0.18, title, ha="center", va="center", fontsize=11, fontweight="bold")
    ax.text(x + W / 2, y + 0.02, body, ha="center", va="center", fontsize=7.2, linespacing=1.25)
    ax.text(x + W / 2, y - H / 2 + 0.14, adds, ha="center", va="center", fontsize=7, family="monospace",
            color="#1f4e8c")


def arrow(ax, a, b):
    xa, ya = STAGES[a][:2]
    xb, yb = STAGES[b][:2]
    style = "arc3"
    if ya != yb:  # down the right-hand column
        start, end = (xa + W / 2, ya - H / 2), (xb + W / 2, yb + H / 2)
    elif abs(xb - xa) > W + 0.5:  # same row, not neighbours: under the boxes between them
        start, end = (xa + W / 2, ya - H / 2), (xb + W / 2, yb - H / 2)
        style = "arc,angleA=-90,angleB=-90,armA=16,armB=16,rad=6"
    else:  # neighbours: edge to edge, left to right or right to left
        start, end = ((xa + W, ya), (xb, yb)) if xb > xa else ((xa, ya), (xb + W, yb))
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle="-|>", color="#333333", lw=1.4, connectionstyle=style))


def main():
    plt.rcParams["svg.fonttype"] = "none"  # real text in the SVG: small and searchable
    plt.rcParams["svg.hashsalt"] = "safetypairs"  # stable ids, so a redraw gives the same file
    fig, ax = plt.subplots(figsize=(11.2, 4.2))
    for name in STAGES:
        box(ax, name)
    for a, b in ARROWS:
        arrow(ax, a, b)
    ax.text(0.0, 0.35, "one row per candidate;\nbad rows get a status, not a crash;\n"
            "every stage is a datasets.map\ntransform that shards over GPUs", fontsize=8, color="#555555", va="center")
    ax.set_xlim(-0.1, 11.95)
    ax.set_ylim(-1.05, 2.95)
    ax.axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(OUT, metadata={"Date": None})
    plt.close(fig)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
