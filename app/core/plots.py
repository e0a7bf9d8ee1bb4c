"""Fonts for the plots people look at (per_predicate_f1.png, loss_curve.png).

Why this module: matplotlib's default font, DejaVu Sans, has no Chinese glyphs, so Chinese
predicate labels render as rows of empty boxes, and matplotlib only says so in one UserWarning
per glyph. Every plot goes through :func:`text_context`, which

* adds a CJK family as a fallback behind the default font when any text shown is Chinese, so
  Latin text and digits look as before and Chinese text gets real glyphs;
* finds a CJK font file that was installed after matplotlib built its font cache (the cache is
  never refreshed on its own, so a fresh ``apt-get install`` would otherwise go unseen);
* when there is no CJK font at all, says so once per process, as a logging WARNING with the
  fix, instead of a flood of per-glyph warnings.

The Docker images install fonts-wqy-microhei (5 MB, the smallest CJK font Debian and Ubuntu
ship) before they build matplotlib's font cache, so the images always find one.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Preference order. A .ttc collection may register under its first face only (the Noto CJK
# collection as "Noto Sans CJK JP"), so the JP/TC/KR faces are listed too: every one of them
# covers the simplified Chinese characters of the labels.
CJK_FAMILIES: tuple[str, ...] = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "Source Han Sans",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
    "Heiti TC",
    "STHeiti",
    "Hiragino Sans GB",
    "AR PL UMing CN",
    "AR PL UKai CN",
    "Droid Sans Fallback",
)
# File names of the fonts above, for the fonts installed after matplotlib's cache was built.
_CJK_FILE = re.compile(
    r"cjk|wqy|sourcehan|simhei|msyh|pingfang|heiti|hiragino|uming|ukai|"
    r"droidsansfallback|notosanssc",
    re.IGNORECASE,
)
_CJK_CHAR = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
# matplotlib's per-glyph warning, replaced by the one WARNING below when no CJK font exists
_MISSING_GLYPH = r"Glyph \d+ .*missing from font"
INSTALL_HINT = "sudo apt-get install fonts-wqy-microhei (or fonts-noto-cjk; macOS and Windows ship one)"

_warned = False  # the missing font is said once per process, not once per plot


def has_cjk(*texts: str) -> bool:
    """True when any of ``texts`` has a Chinese, Japanese or Korean (or full-width) character."""
    return any(_CJK_CHAR.search(t) for t in texts)


def _known_family(font_manager: Any) -> str | None:
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FAMILIES if name in installed), None)


def _add_uncached_cjk_files(font_manager: Any) -> int:
    """Register CJK font files on disk that matplotlib's (stale) font cache does not list."""
    cached = {f.fname for f in font_manager.fontManager.ttflist}
    added = 0
    for path in font_manager.findSystemFonts():
        if path in cached or not _CJK_FILE.search(Path(path).name):
            continue
        try:
            font_manager.fontManager.addfont(path)
            added += 1
        except (OSError, RuntimeError, ValueError) as e:  # an unreadable font file: try the next one
            log.debug("cannot load font %s: %s", path, e)
    return added


def cjk_family() -> str | None:
    """The first of :data:`CJK_FAMILIES` matplotlib can use, else None (with one WARNING per process)."""
    global _warned
    from matplotlib import font_manager

    family = _known_family(font_manager)
    if family is None and _add_uncached_cjk_files(font_manager):
        family = _known_family(font_manager)
    if family is None and not _warned:
        _warned = True
        import matplotlib

        log.warning(
            "no CJK font found for matplotlib: Chinese labels in the plots render as empty boxes "
            "(the numbers in report.md/report.json are unaffected). Fix: %s; if it is still not "
            "found, delete matplotlib's font cache %s/fontlist-*.json",
            INSTALL_HINT,
            matplotlib.get_cachedir(),
        )
    return family


@contextmanager
def text_context(*texts: str) -> Iterator[str | None]:
    """matplotlib settings for a figure showing ``texts``: build *and save* the figure inside it
    (tick labels are created while saving). Yields the CJK family in use, or None.

    The CJK font is looked for only when a text is Chinese: an all-ASCII plot never warns.
    """
    import matplotlib

    family = cjk_family() if has_cjk(*texts) else None
    # Fallback, not replacement: DejaVu Sans first keeps Latin text and the minus sign (which
    # some CJK fonts lack) as in every other plot; the CJK family draws what DejaVu cannot.
    with matplotlib.rc_context({"font.family": ["sans-serif", family]} if family else None), warnings.catch_warnings():
        if family is None and has_cjk(*texts):  # already said once, with the fix, by cjk_family
            warnings.filterwarnings("ignore", message=_MISSING_GLYPH, category=UserWarning)
        yield family
