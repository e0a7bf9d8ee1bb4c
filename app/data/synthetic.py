"""Deterministic synthetic generator of Chinese relation-triplet (SPO) extraction samples.

The records mirror the DuIE-style instruction format of ``shared/data/duie-mixed``
(``{"context": ..., "target": ...}``) so that a LoRA run can be smoke-tested end to
end without shipping the real corpus.  All entity names are invented from small word
tables; the same seed always yields byte-identical output, and every triplet's subject
and object occur literally in the sentence, so the targets are always extractable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from app.data.synthetic_tables import (
    ALBUM_B,
    CAPITAL,
    CITIES,
    CLASSIC,
    CLIMATE,
    CO_X,
    CO_Y,
    CO_Z,
    COUNTRY,
    DYNASTY,
    ETHNIC,
    FILM_B,
    GIVEN,
    HAO_X,
    HAO_Y,
    HOSTS,
    INSECT,
    NATIONS,
    NOVEL_B,
    PLACES,
    PRESS,
    SCHOOL_SUFFIX,
    SHOW_B,
    SITE_X,
    SITE_Y,
    SONG_B,
    SPOT_X,
    SPOT_Y,
    SURNAMES,
    TITLE_A,
)

SYSTEM_PROMPT = "你现在是一个很厉害的阅读理解器，严格按照人类指令进行回答。"
# Key order of every triplet dict in the real data; json.dumps keeps insertion order.
KEY_ORDER = ("predicate", "object_type", "subject_type", "object", "subject")
FENCE_OPEN, FENCE_CLOSE = "```json\n", "\n```"

INSTRUCTIONS: tuple[str, ...] = (
    "句子中包含了哪些信息，输出json：",
    "帮我抽出SPO，用JSON回答。",
    "下面描述中包含了哪些SPO？\n返回json回答:",
    "请从下面的句子里找出所有三元组，以json列表输出：",
    "这段话里有哪些实体关系？请用JSON格式给出，不要解释。",
    "识别下列文本中的主语、谓语和宾语，结果用json返回：",
    "把下面句子里的SPO三元组全部列出来，输出json：",
    "阅读下面的句子，抽取其中的关系三元组并以JSON形式回答。",
    "下文包含哪些关系信息？\n请只输出json:",
    "从这句话中抽取全部SPO信息，按json列表返回，不要输出其他内容。",
)

# predicate -> (subject_type, object_type), following the DuIE schema.
PREDICATES: dict[str, tuple[str, str]] = {
    "主演": ("影视作品", "人物"),
    "导演": ("影视作品", "人物"),
    "编剧": ("影视作品", "人物"),
    "制片人": ("影视作品", "人物"),
    "出品公司": ("影视作品", "企业"),
    "上映时间": ("影视作品", "Date"),
    "歌手": ("歌曲", "人物"),
    "作词": ("歌曲", "人物"),
    "作曲": ("歌曲", "人物"),
    "所属专辑": ("歌曲", "音乐专辑"),
    "作者": ("图书作品", "人物"),
    "出版社": ("书籍", "出版社"),
    "连载网站": ("网络小说", "网站"),
    "主角": ("网络小说", "人物"),
    "父亲": ("人物", "人物"),
    "母亲": ("人物", "人物"),
    "妻子": ("人物", "人物"),
    "丈夫": ("人物", "人物"),
    "出生地": ("人物", "地点"),
    "出生日期": ("人物", "Date"),
    "国籍": ("人物", "国家"),
    "毕业院校": ("人物", "学校"),
    "民族": ("人物", "Text"),
    "身高": ("人物", "Number"),
    "祖籍": ("人物", "地点"),
    "成立日期": ("企业", "Date"),
    "创始人": ("企业", "人物"),
    "总部地点": ("企业", "地点"),
    "董事长": ("企业", "人物"),
    "注册资本": ("企业", "Number"),
    "首都": ("国家", "城市"),
    "面积": ("行政区", "Number"),
    "人口数量": ("行政区", "Number"),
    "气候": ("行政区", "气候"),
    "目": ("生物", "目"),
    "朝代": ("历史人物", "Text"),
    "字": ("历史人物", "Text"),
    "号": ("历史人物", "Text"),
    "主持人": ("电视综艺", "人物"),
    "嘉宾": ("电视综艺", "人物"),
    "所在城市": ("景点", "城市"),
    "海拔": ("地点", "Number"),
}
# A person has either a wife or a husband in one sentence, never both.
EXCLUSIVE: tuple[tuple[str, ...], ...] = (("妻子", "丈夫"),)

Gen = Callable[[random.Random, str], str]


def _person(r: random.Random, _s: str = "") -> str:
    return r.choice(SURNAMES) + "".join(r.choice(GIVEN) for _ in range(r.choice((1, 2, 2))))


def _date(lo: int, hi: int) -> Gen:
    def gen(r: random.Random, _s: str) -> str:
        y, m, d = r.randint(lo, hi), r.randint(1, 12), r.randint(1, 28)
        return r.choice((f"{y}年{m}月{d}日", f"{y}年{m}月", f"{y}年", f"{y}-{m:02d}-{d:02d}"))

    return gen


def _pick(*tables: list[str]) -> Gen:
    return lambda r, _s: "".join(r.choice(t) for t in tables)


def _num(lo: int, hi: int, unit: str) -> Gen:
    return lambda r, _s: f"{r.randint(lo, hi)}{unit}"


_school = _pick(CITIES, SCHOOL_SUFFIX)
_company = _pick(CO_X, CO_Y, CO_Z)
_press = _pick(CITIES + ["华夏", "新星"], PRESS)


def _area(r: random.Random, _s: str) -> str:
    return f"{r.randint(1, 99)}.{r.randint(0, 9)}万平方公里"


def _height(r: random.Random, _s: str) -> str:
    return r.choice((f"{r.randint(155, 192)}cm", f"1.{r.randint(55, 92)}米"))


def _order(r: random.Random, s: str) -> str:
    """The order (目) of the insect the subject ``s`` names, by the end of its name."""
    return next(v for k, v in INSECT.items() if s.endswith(k))


# Each domain: subject generator, intro templates ({s}), facts in natural reading order
# (predicate, object generator, max objects, clause templates with {o}), optional combo
# clauses that fuse two facts into one phrase, and fact-free tail sentences for realism.
DOMAINS: list[dict] = [
    dict(
        subj=_person,
        intros=("{s}", "演员{s}", "歌手{s}", "作家{s}"),
        facts=[
            ("国籍", _pick(NATIONS), 1, ("{o}籍", "拥有{o}国籍")),
            ("民族", _pick(ETHNIC), 1, ("{o}",)),
            ("出生日期", _date(1940, 2005), 1, ("{o}出生", "生于{o}")),
            ("出生地", _pick(PLACES), 1, ("出生于{o}", "出生在{o}")),
            ("祖籍", _pick(PLACES), 1, ("祖籍{o}",)),
            ("身高", _height, 1, ("身高{o}",)),
            ("毕业院校", _school, 1, ("毕业于{o}", "{o}毕业", "本科就读于{o}")),
            ("父亲", _person, 1, ("父亲是{o}", "其父为{o}")),
            ("母亲", _person, 1, ("母亲是{o}", "其母为{o}")),
            ("妻子", _person, 1, ("妻子是{o}", "与妻子{o}育有一子")),
            ("丈夫", _person, 1, ("丈夫是{o}", "丈夫为{o}")),
        ],
        combos={("出生日期", "出生地"): ("{0}出生于{1}", "{0}生于{1}", "于{0}出生在{1}")},
        tails=("", "代表作有多部影视剧。", "现定居北京。", "曾获多项奖项。"),
    ),
    dict(
        subj=_pick(TITLE_A, FILM_B),
        intros=("《{s}》是一部悬疑电影", "电影《{s}》", "《{s}》是一部都市爱情剧", "《{s}》是一部古装剧"),
        facts=[
            ("出品公司", _company, 1, ("由{o}出品", "{o}出品")),
            ("导演", _person, 1, ("由{o}执导", "{o}导演")),
            ("编剧", _person, 1, ("{o}编剧", "由{o}担任编剧")),
            ("制片人", _person, 1, ("{o}担任制片人", "制片人为{o}")),
            ("主演", _person, 4, ("{o}主演", "由{o}领衔主演", "{o}等人主演")),
            ("上映时间", _date(1990, 2024), 1, ("于{o}上映", "{o}在全国上映")),
        ],
        tails=("", "讲述了一段跨越时代的故事。", "该片获得多项提名。"),
    ),
    dict(
        subj=_pick(TITLE_A, SONG_B),
        intros=("《{s}》是一首流行歌曲", "歌曲《{s}》", "《{s}》是一首民谣"),
        facts=[
            ("歌手", _person, 1, ("由{o}演唱", "{o}演唱", "是{o}的代表作之一")),
            ("作词", _person, 1, ("{o}作词", "由{o}填词")),
            ("作曲", _person, 1, ("{o}作曲", "由{o}谱曲")),
            ("所属专辑", _pick(TITLE_A, ALBUM_B), 1, ("收录于专辑《{o}》中", "收录在《{o}》专辑里")),
        ],
        tails=("", "发行后广受好评。"),
    ),
    dict(
        subj=_pick(TITLE_A, NOVEL_B),
        intros=("《{s}》是一部长篇小说", "小说《{s}》", "《{s}》是一部东方玄幻小说"),
        facts=[
            ("作者", _person, 1, ("作者是{o}", "由{o}创作", "{o}著")),
            ("连载网站", _pick(SITE_X, SITE_Y), 1, ("连载于{o}", "在{o}连载")),
            ("主角", _person, 2, ("主角为{o}", "讲述了{o}的成长故事")),
            ("出版社", _press, 1, ("由{o}出版", "{o}出版发行")),
        ],
        tails=("", "小说已完结。"),
    ),
    dict(
        subj=_company,
        intros=("{s}", "{s}是一家高新技术企业"),
        facts=[
            ("成立日期", _date(1950, 2022), 1, ("成立于{o}", "于{o}成立", "{o}注册成立")),
            ("总部地点", _pick(PLACES), 1, ("总部位于{o}", "总部设在{o}")),
            ("创始人", _person, 1, ("由{o}创立", "创始人为{o}")),
            ("董事长", _person, 1, ("董事长为{o}", "现任董事长是{o}")),
            ("注册资本", _num(100, 9000, "万元"), 1, ("注册资本{o}", "注册资金{o}")),
        ],
        tails=("", "主营业务覆盖全国。"),
    ),
    dict(
        subj=_pick(COUNTRY),
        intros=("{s}", "{s}是一个内陆国家", "{s}是位于南半球的岛国"),
        facts=[
            ("首都", _pick(CAPITAL), 1, ("首都是{o}", "首都为{o}")),
            ("面积", _area, 1, ("国土面积约{o}", "面积{o}")),
            ("人口数量", _num(50, 9000, "万"), 1, ("人口约{o}", "总人口{o}")),
            ("气候", _pick(CLIMATE), 1, ("属{o}", "以{o}为主")),
        ],
        tails=("", "经济以农业为主。"),
    ),
    dict(
        subj=lambda r, _s: r.choice(HOSTS) + r.choice(list(INSECT)),
        intros=("{s}",),
        facts=[("目", _order, 1, ("属昆虫纲{o}", "是{o}的一种昆虫"))],
        tails=("", "主要危害农林作物。", "分布于我国南方各省。"),
    ),
    dict(
        subj=lambda r, _s: r.choice(SURNAMES) + "".join(r.sample(CLASSIC, r.choice((1, 2)))),
        intros=("{s}",),
        facts=[
            ("字", lambda r, _s: "".join(r.sample(CLASSIC, 2)), 1, ("字{o}",)),
            ("号", _pick(HAO_X, HAO_Y), 1, ("号{o}", "自号{o}")),
            ("朝代", _pick(DYNASTY), 1, ("{o}著名诗人", "{o}时期的文学家", "{o}名臣")),
            ("出生地", _pick(CITIES), 1, ("{o}人",)),
        ],
        tails=("", "有诗文集传世。"),
    ),
    dict(
        subj=_pick(TITLE_A, SHOW_B),
        intros=("《{s}》是一档户外真人秀节目", "综艺节目《{s}》", "《{s}》是一档音乐竞演节目"),
        facts=[
            ("主持人", _person, 2, ("由{o}主持", "主持人是{o}")),
            ("嘉宾", _person, 3, ("{o}担任嘉宾", "邀请了{o}作为嘉宾", "嘉宾包括{o}")),
        ],
        tails=("", "节目播出后收视率居同时段前列。"),
    ),
    dict(
        subj=_pick(SPOT_X, SPOT_Y),
        intros=("{s}", "{s}是国家4A级旅游景区"),
        facts=[
            ("所在城市", _pick(CITIES), 1, ("位于{o}", "坐落在{o}境内")),
            ("海拔", _num(300, 3500, "米"), 1, ("海拔{o}", "主峰海拔{o}")),
        ],
        tails=("", "是著名的避暑胜地。"),
    ),
]
# Real DuIE is dominated by 1-2 triplets; 3 and 4 are boosted so they are well covered.
COUNT_WEIGHTS = {1: 35, 2: 30, 3: 20, 4: 15}


def format_target(triplets: list[dict[str, str]]) -> str:
    """Serialise triplets exactly like the real dataset (default separators, fenced)."""
    ordered = [{k: t[k] for k in KEY_ORDER} for t in triplets]
    return FENCE_OPEN + json.dumps(ordered, ensure_ascii=False) + FENCE_CLOSE


def build_context(instruction: str, sentence: str) -> str:
    """Wrap an instruction wording and a sentence in the dataset's prompt layout."""
    return f"Instruction: {SYSTEM_PROMPT}\nInput: {instruction}\n\n{sentence}\nAnswer: "


def parse_target(target: str) -> list[dict]:
    """Strip the ```json fence from a target and decode the triplet list."""
    text = target.strip()
    if not (text.startswith("```json") and text.endswith("```")):
        raise ValueError(f"target is not a ```json fenced block: {target[:60]!r}")
    data = json.loads(text[len("```json") : -len("```")])
    if not isinstance(data, list):
        raise ValueError("fenced target does not hold a JSON list")
    return data


def _allocate(r: random.Random, facts: list[tuple], k: int) -> list[int]:
    """Spread k triplets over facts, respecting per-fact maxima and exclusive groups."""
    counts = [0] * len(facts)
    for _ in range(k):
        used = {facts[i][0] for i, c in enumerate(counts) if c}
        blocked = {p for g in EXCLUSIVE if used & set(g) for p in g} - used
        open_ = [i for i, f in enumerate(facts) if counts[i] < f[2] and f[0] not in blocked]
        counts[r.choice(open_)] += 1
    return counts


def _capacity(facts: list[tuple]) -> int:
    """Most triplets a domain can express once exclusive groups allow only one member."""
    total = sum(f[2] for f in facts)
    for group in EXCLUSIVE:
        maxima = [f[2] for f in facts if f[0] in group]
        total -= sum(maxima) - max(maxima, default=0)
    return total


def _make_sentence(r: random.Random, k: int) -> tuple[str, list[dict[str, str]]]:
    dom = r.choice([d for d in DOMAINS if _capacity(d["facts"]) >= k])
    subject = dom["subj"](r, "")
    used, clauses, triplets = {subject}, [], []
    picked: dict[str, str] = {}
    for fact, n in zip(dom["facts"], _allocate(r, dom["facts"], k), strict=True):
        pred, gen, _, templates = fact
        objs: list[str] = []
        for _ in range(n):
            obj = gen(r, subject)
            for _retry in range(50):  # distinct objects keep triplets unambiguous
                if obj not in used:
                    break
                obj = gen(r, subject)
            if obj in used:
                continue
            used.add(obj)
            objs.append(obj)
        if not objs:
            continue
        s_type, o_type = PREDICATES[pred]
        triplets += [dict(zip(KEY_ORDER, (pred, o_type, s_type, o, subject), strict=True)) for o in objs]
        picked[pred] = "、".join(objs)
        clauses.append((pred, r.choice(templates).format(o=picked[pred])))
    for (a, b), templates in dom.get("combos", {}).items():
        if a in picked and b in picked:  # fuse e.g. date + place into "1970年出生于长沙"
            fused = r.choice(templates).format(picked[a], picked[b])
            clauses = [(p, fused if p == a else c) for p, c in clauses if p != b]
    sentence = r.choice(dom["intros"]).format(s=subject)
    sentence += "，" + "，".join(c for _, c in clauses) + "。" + r.choice(dom["tails"])
    return sentence, triplets


def generate_samples(n: int, seed: int = 42) -> list[dict[str, str]]:
    """Return n unique {"context", "target"} records; identical for identical seeds."""
    if n < 0:
        raise ValueError("n must be >= 0")
    r = random.Random(seed)
    ks, weights = list(COUNT_WEIGHTS), list(COUNT_WEIGHTS.values())
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 100:  # the tables are finite; fail loudly, never hang
            raise RuntimeError(f"could only generate {len(out)} unique samples out of {n}")
        sentence, triplets = _make_sentence(r, r.choices(ks, weights)[0])
        context = build_context(r.choice(INSTRUCTIONS), sentence)
        if context in seen or not triplets:
            continue
        seen.add(context)
        out.append({"context": context, "target": format_target(triplets)})
    return out
