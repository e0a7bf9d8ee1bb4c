"""The plots people look at are readable: Chinese predicate labels get a CJK font (or one WARNING
that says so and how to fix it), and a short run's loss curve shows its points on whole steps.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from app.core import plots
from app.evaluation.reports import write_reports
from app.evaluation.scoring import score

PREDICATES = ("主演", "导演", "出生地")


def triplet(subject: str, predicate: str, obj: str) -> str:
    return json.dumps([{"subject": subject, "predicate": predicate, "object": obj}], ensure_ascii=False)


def report_of(*predicates: str):
    return score([(triplet("星河往事", p, "林远"), triplet("星河往事", p, "林远")) for p in predicates])


def font_entry(name: str, fname: str):
    from matplotlib import font_manager

    return font_manager.FontEntry(fname=fname, name=name)


@pytest.fixture
def fonts(monkeypatch):
    """Make matplotlib know exactly the given fonts (besides its own non-CJK ones); no files on disk."""
    from matplotlib import font_manager

    real = [f for f in font_manager.fontManager.ttflist if f.name not in plots.CJK_FAMILIES]
    monkeypatch.setattr(plots, "_warned", False)
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **k: [])

    def install(*entries):
        monkeypatch.setattr(font_manager.fontManager, "ttflist", real + list(entries))

    return install


def test_chooser_picks_a_known_cjk_family(fonts, caplog):
    # The Noto CJK collection registers under its first face, "Noto Sans CJK JP", on Debian.
    fonts(font_entry("Noto Sans CJK JP", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"))
    assert plots.cjk_family() == "Noto Sans CJK JP"
    fonts(font_entry("WenQuanYi Micro Hei", "/x/wqy-microhei.ttc"), font_entry("Noto Sans CJK SC", "/x/n.otf"))
    assert plots.cjk_family() == "Noto Sans CJK SC"  # the preference order, not the list's
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_cjk_font_warns_once_with_the_fix(fonts, tmp_path, caplog):
    fonts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(2):  # two reports in one process: one WARNING, not one per plot or per glyph
            write_reports(report_of(*PREDICATES), tmp_path / str(n), title="评测")
    said = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "app.core.plots"]
    assert len(said) == 1, [r.getMessage() for r in said]
    msg = said[0].getMessage()
    assert "empty boxes" in msg and "apt-get install fonts-" in msg and "font cache" in msg
    assert not [w for w in caught if "missing from font" in str(w.message)]  # said once, above
    assert (tmp_path / "1" / "per_predicate_f1.png").stat().st_size > 0  # the chart is still written


def test_all_ascii_plot_never_looks_for_a_cjk_font(fonts, caplog):
    fonts()
    with plots.text_context("train loss", "lora-adapter") as family:
        assert family is None
    assert not caplog.records


def test_font_installed_after_the_cache_was_built_is_found(fonts, monkeypatch):
    """matplotlib never refreshes its font cache: a font installed later is found on disk."""
    from matplotlib import font_manager

    fonts()
    added = []
    # not real paths: a real one may be in the cache already, under another face of the file
    on_disk = ["/new/fonts/truetype/dejavu/DejaVuSans.ttf", "/new/fonts/truetype/wqy/wqy-microhei.ttc"]
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **k: on_disk)
    monkeypatch.setattr(
        font_manager.fontManager,
        "addfont",
        lambda path: (
            added.append(path),
            font_manager.fontManager.ttflist.append(font_entry("WenQuanYi Micro Hei", path)),
        ),
    )
    assert plots.cjk_family() == "WenQuanYi Micro Hei"
    assert added == on_disk[1:]  # only the CJK file is loaded


def test_per_predicate_chart_renders_chinese_glyphs(tmp_path):
    """With a real CJK font, no Chinese glyph is missing. The absence of matplotlib's "Glyph ...
    missing" warning only means something when such warnings get through, so one predicate
    carries a private-use character no font has, and its warning must be seen."""
    family = plots.cjk_family()
    if family is None:
        pytest.skip("no CJK font installed: sudo apt-get install fonts-wqy-microhei (or fonts-noto-cjk)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_reports(report_of(*PREDICATES, "\ue000主演"), tmp_path, title="每个关系的 F1")
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing and all("57344" in m for m in missing), missing  # U+E000 only: every CJK glyph drawn
    assert family in missing[0]  # the CJK family was among the fonts tried
    assert (tmp_path / "per_predicate_f1.png").read_bytes()[:4] == b"\x89PNG"


def metrics(tmp_path, rows):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def visible_xticks(ax) -> list[float]:
    lo, hi = sorted(ax.get_xlim())
    return [t for t in ax.get_xticks() if lo <= t <= hi]


@pytest.mark.parametrize(
    "rows",
    [
        [{"step": 1, "loss": 2.3}],
        [{"step": 1, "loss": 2.3}, {"step": 2, "loss": 2.1}, {"step": 3, "loss": 1.9}, {"step": 3, "eval_loss": 2.0}],
    ],
    ids=["1-step", "3-step"],
)
def test_short_run_loss_curve_marks_points_on_whole_steps(tmp_path, rows):
    from app.training.metrics_file import loss_figure

    fig = loss_figure(metrics(tmp_path, rows))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.lines and all(line.get_marker() not in (None, "None", "", " ") for line in ax.lines)
    ticks = visible_xticks(ax)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert {r["step"] for r in rows} <= set(ticks)  # each step of a short run is labelled


def test_long_run_loss_curve_is_a_plain_line_on_whole_steps(tmp_path):
    from app.training.metrics_file import MARKERS_BELOW, loss_figure

    fig = loss_figure(metrics(tmp_path, [{"step": s, "loss": 1 / s} for s in range(1, MARKERS_BELOW + 1)]))
    fig.canvas.draw()
    (line,) = fig.axes[0].lines
    assert line.get_marker() in (None, "None", "")
    assert all(float(t).is_integer() for t in visible_xticks(fig.axes[0]))


def test_loss_curve_of_a_chinese_run_goes_through_the_font_chooser(fonts, tmp_path, caplog):
    """plot_losses titles the curve with the run (OUTPUT_DIR's name), which may be Chinese: it uses
    the same font logic as the F1 chart, so a missing CJK font is said, once, here too."""
    from app.training.callbacks import plot_losses

    fonts()
    run = tmp_path / "关系抽取"
    run.mkdir()
    assert plot_losses(metrics(run, [{"step": 1, "loss": 2.3}]), run / "loss_curve.png")
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # the tool's own warnings (importing the callbacks may let bitsandbytes warn about its optional kernels)
    assert [r.name for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("app.")] == [
        "app.core.plots"
    ]
    assert not plot_losses(metrics(run, [{"step": 1, "learning_rate": 1e-4}]), run / "none.png")
    assert not (run / "none.png").exists()


def marker_boxes(fig):
    """(label, display-space box) of every plotted point's marker, after drawing."""
    from matplotlib.transforms import Bbox

    boxes = []
    for ax in fig.axes:
        for line in ax.lines:
            r = line.get_markersize() * fig.dpi / 72 / 2 + line.get_markeredgewidth() * fig.dpi / 72 / 2
            for x, y in ax.transData.transform(line.get_xydata()):
                boxes.append((line.get_label(), Bbox.from_extents(x - r, y - r, x + r, y + r)))
    return boxes


# The quick start's run (`make train MODEL_NAME=tiny MAX_SAMPLES=50 NUM_EPOCHS=1`): 3 steps, LOGGING_STEPS=5
# logs the first step's train loss (the highest point) and the evaluation at step 3 (the lowest).
QUICK_START = [{"step": 1, "loss": 7.576070785522461}, {"step": 3, "eval_loss": 7.570350646972656}]


@pytest.mark.parametrize(
    "rows",
    [
        QUICK_START,
        [{"step": 1, "loss": 2.3}, {"step": 2, "loss": 2.1}, {"step": 3, "loss": 1.9}, {"step": 3, "eval_loss": 2.0}],
        [*QUICK_START, {"step": 3, "eval_f1": 0.0}, {"step": 1, "eval_f1": 1.0}],
    ],
    ids=["quick-start", "3-step", "with-f1"],
)
def test_short_run_loss_curve_shows_every_point_whole(tmp_path, rows):
    """Every point's marker lies wholly inside the axes, and no legend covers it (the quick start's only
    train point sat in the top left corner, under the legend)."""
    from app.training.metrics_file import loss_figure

    fig = loss_figure(metrics(tmp_path, rows))
    fig.savefig(tmp_path / "loss_curve.png", dpi=100)  # as plot_losses saves it: the layout is made here
    frame = fig.axes[0].get_window_extent()
    legends = [leg.get_window_extent() for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if leg]
    points = marker_boxes(fig)
    assert len(points) == len(rows)
    for label, box in points:
        assert frame.x0 < box.x0 and box.x1 < frame.x1 and frame.y0 < box.y0 and box.y1 < frame.y1, (label, box)
        assert not any(box.overlaps(legend) for legend in legends), (label, box)
