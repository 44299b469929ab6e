"""Write the sample task files of data/eval_samples (run: `python -m llmkit.eval.make_samples`).

Nothing here is copied from a benchmark. Arithmetic, unit conversions and the GSM8K-layout word problems
are generated from templates with random numbers (seeded), their answers computed, so they are correct by
construction; the factual questions come from small tables of simple, checkable facts (capitals, provincial
capitals, animal classes) and a few hand-written science / general-knowledge items. Distractors are drawn
from the same tables, so exactly one choice is right. Deterministic: the same files every run.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[3] / "data" / "eval_samples"

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("China", "Beijing"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
            ("Russia", "Moscow"), ("India", "New Delhi"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"),
            ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
            ("Peru", "Lima"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Turkey", "Ankara"),
            ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Cuba", "Havana"), ("Brazil", "Brasilia"),
            ("Chile", "Santiago")]

PROVINCES = [("广东", "广州"), ("四川", "成都"), ("湖北", "武汉"), ("湖南", "长沙"), ("浙江", "杭州"), ("江苏", "南京"),
             ("山东", "济南"), ("河南", "郑州"), ("河北", "石家庄"), ("山西", "太原"), ("陕西", "西安"), ("甘肃", "兰州"),
             ("辽宁", "沈阳"), ("吉林", "长春"), ("黑龙江", "哈尔滨"), ("安徽", "合肥"), ("福建", "福州"), ("江西", "南昌"),
             ("云南", "昆明"), ("贵州", "贵阳"), ("海南", "海口"), ("青海", "西宁"), ("广西", "南宁"), ("西藏", "拉萨"),
             ("新疆", "乌鲁木齐"), ("宁夏", "银川"), ("内蒙古", "呼和浩特")]

# (question, right answer, three wrong answers)
SCIENCE_EN = [
    ("What is the chemical formula of water?", "H2O", ["CO2", "O2", "NaCl"]),
    ("At sea level, water boils at what temperature?", "100 degrees Celsius", ["0 degrees Celsius", "50 degrees Celsius", "212 degrees Celsius"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Earth", "Mars"]),
    ("Which is the largest planet in the Solar System?", "Jupiter", ["Saturn", "Earth", "Mars"]),
    ("Which gas do plants take in from the air for photosynthesis?", "carbon dioxide", ["oxygen", "helium", "neon"]),
    ("What is the center of an atom called?", "the nucleus", ["the electron", "the shell", "the orbit"]),
    ("Which organ pumps blood through the human body?", "the heart", ["the lungs", "the liver", "the stomach"]),
    ("How many legs does an insect have?", "6", ["4", "8", "10"]),
    ("Water freezes at what temperature at sea level?", "0 degrees Celsius", ["10 degrees Celsius", "-20 degrees Celsius", "100 degrees Celsius"]),
    ("What force pulls objects toward the Earth?", "gravity", ["magnetism", "friction", "buoyancy"]),
    ("What is the chemical symbol of gold?", "Au", ["Ag", "Go", "Gd"]),
    ("What is the chemical symbol of sodium?", "Na", ["So", "Sd", "S"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Neptune"]),
    ("What is the main gas in the air we breathe?", "nitrogen", ["oxygen", "carbon dioxide", "argon"]),
    ("How many bones does an adult human usually have?", "206", ["106", "306", "150"]),
    ("What do bees make from nectar?", "honey", ["milk", "silk", "wax paper"]),
    ("Which part of a plant absorbs water from the soil?", "the roots", ["the flowers", "the leaves", "the seeds"]),
    ("Light from the Sun reaches the Earth in about how long?", "8 minutes", ["8 seconds", "8 hours", "8 days"]),
    ("Which of these is a renewable energy source?", "wind", ["coal", "oil", "natural gas"]),
    ("What is the freezing point of water in degrees Fahrenheit?", "32", ["0", "100", "212"]),
    ("Which blood cells carry oxygen?", "red blood cells", ["white blood cells", "platelets", "plasma cells"]),
    ("What is the hardest natural material?", "diamond", ["gold", "iron", "quartz"]),
]

COMMON_ZH = [
    ("水的化学式是什么？", "H2O", ["CO2", "O2", "NaCl"]),
    ("一年有几个月？", "12", ["10", "11", "13"]),
    ("一个星期有几天？", "7", ["5", "6", "8"]),
    ("中华人民共和国的首都是哪座城市？", "北京", ["上海", "广州", "南京"]),
    ("太阳从哪个方向升起？", "东方", ["西方", "南方", "北方"]),
    ("在标准大气压下，水的沸点是多少摄氏度？", "100", ["0", "50", "80"]),
    ("在标准大气压下，水的冰点是多少摄氏度？", "0", ["10", "-10", "100"]),
    ("太阳系中最大的行星是哪一颗？", "木星", ["土星", "地球", "火星"]),
    ("离太阳最近的行星是哪一颗？", "水星", ["金星", "地球", "火星"]),
    ("人体中负责泵血的器官是什么？", "心脏", ["肺", "肝", "胃"]),
    ("昆虫有几条腿？", "6", ["4", "8", "10"]),
    ("植物进行光合作用时从空气中吸收哪种气体？", "二氧化碳", ["氧气", "氦气", "氖气"]),
    ("空气中含量最多的气体是什么？", "氮气", ["氧气", "二氧化碳", "氩气"]),
    ("蜜蜂用花蜜酿造的是什么？", "蜂蜜", ["牛奶", "蚕丝", "食盐"]),
    ("被称为“红色星球”的行星是哪一颗？", "火星", ["金星", "木星", "海王星"]),
    ("一天有多少小时？", "24", ["12", "20", "36"]),
    ("一小时有多少分钟？", "60", ["30", "100", "24"]),
    ("中国最长的河流是哪一条？", "长江", ["黄河", "珠江", "淮河"]),
    ("三角形的内角和是多少度？", "180", ["90", "270", "360"]),
    ("正方形有几条边？", "4", ["3", "5", "6"]),
    ("地球绕太阳公转一周大约需要多长时间？", "一年", ["一天", "一个月", "一周"]),
    ("下列哪一种是可再生能源？", "风能", ["煤炭", "石油", "天然气"]),
    ("金的化学元素符号是什么？", "Au", ["Ag", "Fe", "Cu"]),
    ("植物从土壤中吸收水分主要靠哪个部分？", "根", ["花", "叶", "种子"]),
    ("一个世纪是多少年？", "100", ["10", "50", "1000"]),
]

ANIMALS = {"mammal": ["dog", "whale", "bat", "horse", "cow", "dolphin", "elephant", "mouse"],
           "bird": ["eagle", "sparrow", "penguin", "owl", "parrot"],
           "reptile": ["snake", "lizard", "crocodile", "turtle"],
           "fish": ["salmon", "shark", "trout", "tuna"],
           "insect": ["ant", "bee", "butterfly", "beetle"]}

STATES = [("ice", "solid"), ("steam", "gas"), ("liquid water", "liquid"), ("a rock", "solid"),
          ("milk", "liquid"), ("the air in a balloon", "gas"), ("an iron nail", "solid"), ("orange juice", "liquid")]


def _mc(rng: random.Random, right: str, wrong: list[str]) -> tuple[list[str], str]:
    """Four options (right + 3 wrong, shuffled) and the right letter."""
    opts = [right] + list(wrong[:3])
    assert len(set(opts)) == 4, opts
    rng.shuffle(opts)
    return opts, "ABCD"[opts.index(right)]


def _distractors(rng: random.Random, right: int, spread: int) -> list[str]:
    pool = [right + d for d in range(-spread, spread + 1) if d != 0 and right + d >= 0]
    return [str(x) for x in rng.sample(pool, 3)]


def arithmetic(rng: random.Random, zh: bool) -> tuple[str, str, list[str]]:
    op = rng.choice("+-*/")
    a, b = rng.randint(12, 99), rng.randint(2, 30)
    if op == "+":
        q, ans = (f"{a} + {b}", a + b)
    elif op == "-":
        q, ans = (f"{a + b} - {b}", a)
    elif op == "*":
        q, ans = (f"{a} × {b}" if zh else f"{a} * {b}", a * b)
    else:
        q, ans = (f"{a * b} ÷ {b}" if zh else f"{a * b} / {b}", a)
    text = f"计算：{q} = ？" if zh else f"What is {q}?"
    return text, str(ans), _distractors(rng, ans, 10)


def conversion(rng: random.Random, zh: bool) -> tuple[str, str, list[str]]:
    kind = rng.randrange(5)
    n = rng.randint(2, 19)
    if kind == 0:
        q, ans = (f"{n} 千米等于多少米？" if zh else f"How many meters are in {n} kilometers?"), n * 1000
    elif kind == 1:
        q, ans = (f"{n} 小时等于多少分钟？" if zh else f"How many minutes are in {n} hours?"), n * 60
    elif kind == 2:
        q, ans = (f"{n} 千克等于多少克？" if zh else f"How many grams are in {n} kilograms?"), n * 1000
    elif kind == 3:
        q, ans = (f"{n} 个星期等于多少天？" if zh else f"How many days are in {n} weeks?"), n * 7
    else:
        q, ans = (f"{n} 米等于多少厘米？" if zh else f"How many centimeters are in {n} meters?"), n * 100
    unit = {0: 1000, 1: 60, 2: 1000, 3: 7, 4: 100}[kind]
    wrong = sorted({ans + unit, ans - unit, n * (10 if unit != 10 else 100), ans * 10, ans // 10} - {ans, 0})
    return q, str(ans), [str(w) for w in rng.sample(wrong, 3)]


def _subject_rows(rng, items, n_dev):
    rows = []
    for q, right, wrong in items:
        opts, letter = _mc(rng, right, wrong)
        rows.append([q, *opts, letter])
    return rows[:n_dev], rows[n_dev:]


def mmlu_sets(rng: random.Random) -> dict[str, list[list[list[str]]]]:
    caps = [c for _, c in CAPITALS]
    geo = [(f"What is the capital of {country}?", cap, rng.sample([c for c in caps if c != cap], 3))
           for country, cap in CAPITALS]
    return {
        "elementary_mathematics": _subject_rows(rng, [arithmetic(rng, False) for _ in range(35)], 5),
        "world_geography": _subject_rows(rng, geo, 5),
        "units_of_measurement": _subject_rows(rng, [conversion(rng, False) for _ in range(32)], 5),
        "basic_science": _subject_rows(rng, SCIENCE_EN, 5),
    }


def ceval_sets(rng: random.Random):
    caps = [c for _, c in PROVINCES]
    geo = [(f"{p}的省会（或首府）是哪座城市？", cap, rng.sample([c for c in caps if c != cap], 3))
           for p, cap in PROVINCES]
    return {
        "小学数学": _subject_rows(rng, [arithmetic(rng, True) for _ in range(35)], 5),
        "中国地理": _subject_rows(rng, geo, 5),
        "单位换算": _subject_rows(rng, [conversion(rng, True) for _ in range(32)], 5),
        "生活常识": _subject_rows(rng, COMMON_ZH, 5),
    }


def arc_items(rng: random.Random) -> list[dict]:
    items = []
    classes = list(ANIMALS)
    for cls in classes:
        for animal in ANIMALS[cls][:{"mammal": 6, "bird": 5}.get(cls, 4)]:
            others = [a for c in classes if c != cls for a in ANIMALS[c]]
            items.append((f"Which of these animals is a {cls}?", animal, rng.sample(others, 3)))
    for thing, state in STATES:
        items.append((f"At room temperature, {thing} is in which state of matter?" if "ice" not in thing
                      and "steam" not in thing else f"In which state of matter is {thing}?", state,
                      [s for s in ("solid", "liquid", "gas", "plasma") if s != state]))
    items += list(SCIENCE_EN)
    rows = []
    for i, (q, right, wrong) in enumerate(items):
        opts, letter = _mc(rng, right, wrong)
        rows.append({"id": f"sample-arc-{i:03d}", "question": {"stem": q, "choices": [
            {"text": t, "label": "ABCD"[j]} for j, t in enumerate(opts)]}, "answerKey": letter})
    return rows


# -- GSM8K layout: word problems with worked answers, computed -------------------------------------------

NAMES = ["Ava", "Ben", "Chen", "Dina", "Eli", "Fatima", "Grace", "Hiro", "Ines", "Jamal", "Kai", "Lena", "Mia",
         "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]


def _money(rng, name):
    price, n, paid_extra = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
    total = price * n
    paid = total + paid_extra
    q = (f"{name} buys {n} notebooks that cost ${price} each. {name} pays with ${paid}. "
         f"How much change does {name} get, in dollars?")
    a = (f"The notebooks cost {n} * {price} = <<{n}*{price}={total}>>{total} dollars.\n"
         f"The change is {paid} - {total} = <<{paid}-{total}={paid - total}>>{paid - total} dollars.\n"
         f"#### {paid - total}")
    return q, a, paid - total


def _baking(rng, name):
    trays, per, eaten = rng.randint(2, 8), rng.randint(6, 24), rng.randint(1, 10)
    total = trays * per
    left = total - eaten
    q = (f"{name} bakes {trays} trays of cookies with {per} cookies on each tray. "
         f"{name}'s friends eat {eaten} cookies. How many cookies are left?")
    a = (f"{name} bakes {trays} * {per} = <<{trays}*{per}={total}>>{total} cookies.\n"
         f"After {eaten} are eaten, {total} - {eaten} = <<{total}-{eaten}={left}>>{left} cookies are left.\n"
         f"#### {left}")
    return q, a, left


def _share(rng, name):
    friends, each = rng.randint(2, 9), rng.randint(3, 15)
    kept = rng.randint(1, 9)
    total = friends * each + kept
    q = (f"{name} has {total} marbles. {name} keeps {kept} and shares the rest equally among {friends} friends. "
         f"How many marbles does each friend get?")
    rest = total - kept
    a = (f"{name} shares {total} - {kept} = <<{total}-{kept}={rest}>>{rest} marbles.\n"
         f"Each friend gets {rest} / {friends} = <<{rest}/{friends}={each}>>{each} marbles.\n#### {each}")
    return q, a, each


def _speed(rng, name):
    speed, hours, extra = rng.randint(30, 70), rng.randint(2, 6), rng.randint(5, 40)
    d1 = speed * hours
    total = d1 + extra
    q = (f"{name} drives at {speed} miles per hour for {hours} hours, then drives {extra} more miles. "
         f"How many miles does {name} drive in total?")
    a = (f"In {hours} hours {name} drives {speed} * {hours} = <<{speed}*{hours}={d1}>>{d1} miles.\n"
         f"In total {d1} + {extra} = <<{d1}+{extra}={total}>>{total} miles.\n#### {total}")
    return q, a, total


def _savings(rng, name):
    weekly, weeks, cost = rng.randint(5, 25), rng.randint(3, 10), rng.randint(10, 60)
    saved = weekly * weeks
    left = saved - cost
    if left < 0:
        return _savings(rng, name)
    q = (f"{name} saves ${weekly} every week for {weeks} weeks and then spends ${cost} on a game. "
         f"How many dollars does {name} have left?")
    a = (f"{name} saves {weekly} * {weeks} = <<{weekly}*{weeks}={saved}>>{saved} dollars.\n"
         f"After the game, {saved} - {cost} = <<{saved}-{cost}={left}>>{left} dollars are left.\n#### {left}")
    return q, a, left


def _garden(rng, name):
    rows, per, dead = rng.randint(3, 12), rng.randint(4, 15), rng.randint(2, 5)
    total = rows * per
    if total % dead:
        return _garden(rng, name)
    lost = total // dead
    alive = total - lost
    q = (f"{name} plants {rows} rows of tomato plants with {per} plants in each row. "
         f"One out of every {dead} plants does not grow. How many plants grow?")
    a = (f"{name} plants {rows} * {per} = <<{rows}*{per}={total}>>{total} plants.\n"
         f"{total} / {dead} = <<{total}/{dead}={lost}>>{lost} plants do not grow.\n"
         f"So {total} - {lost} = <<{total}-{lost}={alive}>>{alive} plants grow.\n#### {alive}")
    return q, a, alive


def _pages(rng, name):
    per_day, days, total_extra = rng.randint(8, 40), rng.randint(3, 9), rng.randint(10, 120)
    read = per_day * days
    book = read + total_extra
    q = (f"A book has {book} pages. {name} reads {per_day} pages a day for {days} days. "
         f"How many pages are left to read?")
    a = (f"{name} reads {per_day} * {days} = <<{per_day}*{days}={read}>>{read} pages.\n"
         f"{book} - {read} = <<{book}-{read}={total_extra}>>{total_extra} pages are left.\n#### {total_extra}")
    return q, a, total_extra


def _tickets(rng, name):
    adults, kids, pa, pk = rng.randint(1, 4), rng.randint(1, 6), rng.randint(8, 20), rng.randint(3, 9)
    ta, tk = adults * pa, kids * pk
    total = ta + tk
    q = (f"Adult tickets cost ${pa} and child tickets cost ${pk}. {name} buys {adults} adult tickets and "
         f"{kids} child tickets. How much does {name} pay in total, in dollars?")
    a = (f"Adult tickets cost {adults} * {pa} = <<{adults}*{pa}={ta}>>{ta} dollars.\n"
         f"Child tickets cost {kids} * {pk} = <<{kids}*{pk}={tk}>>{tk} dollars.\n"
         f"In total {ta} + {tk} = <<{ta}+{tk}={total}>>{total} dollars.\n#### {total}")
    return q, a, total


TEMPLATES = [_money, _baking, _share, _speed, _savings, _garden, _pages, _tickets]


def check_worked_answer(answer: str) -> int:
    """Re-check every <<expr=value>> annotation of a worked answer and return the final number: a generated
    problem whose arithmetic does not hold fails here."""
    import re

    for expr, value in re.findall(r"<<([^=]+)=([^>]+)>>", answer):
        if not re.fullmatch(r"[\d+\-*/ ]+", expr):
            raise ValueError(f"unexpected expression {expr!r}")
        got = eval(expr, {"__builtins__": {}})  # digits and + - * / only (checked above)
        if abs(got - float(value)) > 1e-9:
            raise ValueError(f"{expr} = {got}, the answer says {value}")
    return int(answer.rsplit("#### ", 1)[1])


def gsm8k_items(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        q, a, ans = TEMPLATES[i % len(TEMPLATES)](rng, rng.choice(NAMES))
        assert check_worked_answer(a) == ans
        out.append({"question": q, "answer": a})
    return out


PPL_EN = """The water cycle moves water between the land, the oceans and the air. The Sun warms water in seas
and lakes, and some of it rises as vapour. High in the sky the vapour cools and forms clouds. When the drops in a
cloud grow heavy they fall as rain or snow. Rivers carry the water back to the sea, and the cycle starts again.
Plants take water from the soil through their roots and give some of it back to the air through their leaves.
"""

PPL_ZH = """水循环让水在陆地、海洋和空气之间不断流动。太阳把海洋和湖泊里的水晒热，一部分水变成水蒸气升到空中。
水蒸气在高空遇冷，凝结成云。云中的水滴变大变重以后，就变成雨或雪落下来。河流把水带回大海，循环又重新开始。
"""


def write_all(out: Path = OUT) -> dict[str, int]:
    rng = random.Random(20261204)
    counts = {}
    mm = out / "mmlu"
    for split in ("dev", "test"):
        (mm / split).mkdir(parents=True, exist_ok=True)
    n = 0
    for subject, (dev, test) in mmlu_sets(rng).items():
        for split, rows in (("dev", dev), ("test", test)):
            with open(mm / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows(rows)
        n += len(test)
    counts["mmlu_test"] = n
    ce = out / "ceval"
    for split in ("dev", "val"):
        (ce / split).mkdir(parents=True, exist_ok=True)
    n = 0
    for subject, (dev, test) in ceval_sets(rng).items():
        for split, rows in (("dev", dev), ("val", test)):
            with open(ce / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                w.writerows([[i, *r] for i, r in enumerate(rows)])
        n += len(test)
    counts["ceval_val"] = n
    arc = arc_items(rng)
    (out / "arc").mkdir(parents=True, exist_ok=True)
    (out / "arc" / "ARC-Sample-Train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc[:5]))
    (out / "arc" / "ARC-Sample-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc[5:]))
    counts["arc_test"] = len(arc) - 5
    (out / "gsm8k").mkdir(parents=True, exist_ok=True)
    items = gsm8k_items(rng, 58)
    (out / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items[:8]))
    (out / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items[8:]))
    counts["gsm8k_test"] = len(items) - 8
    (out / "ppl").mkdir(parents=True, exist_ok=True)
    (out / "ppl" / "en.txt").write_text(PPL_EN, encoding="utf-8")
    (out / "ppl" / "zh.txt").write_text(PPL_ZH, encoding="utf-8")
    return counts


if __name__ == "__main__":
    print(json.dumps(write_all()))
