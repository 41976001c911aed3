"""Multi-hop QA in ReAct's HotpotQA setup (Yao et al. 2023), offline.

As ReAct's wikienv.py: `search[entity]` shows the first 5 sentences of the entity's page, or `Could not
find X. Similar: [...]`; `lookup[keyword]` the open page's next sentence holding the keyword, as `(Result
k / n) sentence`, then `No more results.`; `finish[answer]` ends the episode. At most 8 steps.

Departures: built-in questions run over a generated knowledge base of fictional entities' Wikipedia-style
pages (a fact past a page's first 5 sentences only `lookup` finds). Reward: HotpotQA's answer F1, not
ReAct's fuzzy 0/1 match; 1.0 exactly on exact match (success). B*/C* template questions go to train / dev /
test (80/10/10) by a hash of their text (splits share entities, never questions); test_unseen has the U*
templates. `data_file=` reads a HotpotQA distractor-format JSON, each question searching its own context.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import json
import os
import random
import re
import string
from collections import Counter

from envs import SPLITS, Task, parse_action, react_turn

SHOWN = 5  # sentences a search shows, as ReAct's get_page_obs
PERMUTED_REWARD = 0.99  # F1 == 1 without exact match (tokens reordered): kept below 1 so success == EM

# ----------------------------------------------------------------------------- HotpotQA's answer metric


def normalize_answer(s: str) -> str:
    """The official HotpotQA/SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1_score(prediction: str, gold: str) -> float:
    pred, true = normalize_answer(prediction), normalize_answer(gold)
    common = sum((Counter(pred.split()) & Counter(true.split())).values())
    # as the official eval: a yes/no/noanswer on either side scores only by being identical
    if common == 0 or ({pred, true} & {"yes", "no", "noanswer"} and pred != true):
        return 0.0
    p, r = common / len(pred.split()), common / len(true.split())
    return 2 * p * r / (p + r)


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def answer_reward(prediction: str, gold: str) -> float:
    """F1, with 1.0 kept for exact matches."""
    return 1.0 if exact_match(prediction, gold) else min(f1_score(prediction, gold), PERMUTED_REWARD)


# ----------------------------------------------------------------------------- the knowledge base

COUNTRIES = [("Feldania", "Feldanian"), ("Corvania", "Corvanian"), ("Ismerel", "Ismereli"),
             ("Dravosk", "Dravoskan"), ("Lunetia", "Lunetian"), ("Quessaria", "Quessarian"),
             ("Tavrenia", "Tavrenian"), ("Orlund", "Orlundish")]
FIRST = ("Alder Brisa Cato Delia Emrys Fenna Galen Hesper Ilse Joren Kaia Lysander Mirela Niall Odile Perrin "
         "Quilla Rowan Sabeth Tamsin Ulric Vesna Wendel Xanthe Yorick Zelie Anselm Corra Dorian Elowen Faro "
         "Gisela Hale Isolde Jasper Kestrel Linnea Marek Nerys Osric").split()
# names are made by joining a word of the first list with a word of the second
SURNAME = ("Ast Bel Cor Dun Els Far Gal Hol Ith Jar Kel Lor Mar Nor Orv Pel Quen Ros Sal Tor Vask Wen Yar Zel",
           "ane brook by dale en ford holt ick ley mere ner ow rick sen ton vale wick worth")
CITY = ("Tarrow Ashen Brim Caul Dray Eller Fen Grey Harl Ivel Kess Lind Mire Nettle Oak Pell Rave Stour "
        "Umber Vell Yew", "gate haven mouth ford bury stead port holm field minster")
ORG = ("Amber Blue Copper Crimson Golden Iron Silver Stone Red North West High Bright Green",
       "field water brook crest wood gale moor line fin hill ridge bay")
TITLE = ("Silent Iron Hollow Crimson Last Distant Broken Golden Quiet Winter Paper Glass Northern Burning "
         "Secret Velvet Empty Lonely Wild Forgotten Amber Salt Silver Restless Hidden Bitter Gentle Pale "
         "Endless Scarlet", "Harbour Lantern Orchard Meridian Tide Garden Compass Archive Shore Tower Letter "
         "Season River Mirror Bridge Crown Signal Island Valley Station Window Horizon Canyon Feather Engine "
         "Kingdom Marsh Ember Citadel Voyage")
ORG_KINDS = {"studio": ("film studio", "studio", "Pictures Films Studios"),
             "publisher": ("publishing house", "publisher", "Press Books House"),
             "label": ("record label", "label", "Records Sound Music"),
             "company": ("manufacturing company", "company", "Industries Holdings Systems Motors")}
GENRES = {"film": "drama comedy thriller mystery western musical", "book": "crime fantasy historical mystery",
          "album": "folk jazz rock pop soul"}
# No filler or name holds a fact's lookup keyword (born, founded, headquartered, population, released,
# directed, produced, written, published, recorded), so a lookup for it finds that fact first.
FILLERS = {
    "person": ["{s} studied at the University of {city}.", "{s} has received several national awards.",
               "{s} moved to {city} as a young adult.", "{s} is married and has two children.",
               "{s} served on the board of a local arts council.", "{s} has given lectures across {country}.",
               "In interviews, {s} has cited the landscapes of {country} as an influence."],
    "city": ["{s} lies on the banks of a slow river.", "The economy of {s} is based on {industry}.",
             "{s} is known for its covered markets.", "{s} is served by a regional railway line.",
             "{s} has a temperate climate.", "The old town of {s} is a protected area."],
    "org": ["{s} employs about {n}00 people.", "{s} is privately owned.", "{s} has offices in {k} countries.",
            "{s} went through a major restructuring in the 1990s.", "Its logo was redesigned several times."],
    "film": ["The film received mixed reviews from critics.", "It was shot on location in {city}.",
             "It runs for 9{k} minutes.", "It was a modest success at the box office.",
             "The score features a large string orchestra."],
    "book": ["The story is set in {city}.", "It has been translated into {k} languages.",
             "The novel won the {country} Prize for Fiction.", "A sequel followed some years later."],
    "album": ["The album contains 1{k} tracks.", "Sessions took place in {city}.",
              "Critics praised its arrangements.", "It reached the top ten in {country}."],
}


def _names(parts: tuple[str, str], fmt: str = "{}{}") -> list[str]:
    return [fmt.format(a, b) for a in parts[0].split() for b in parts[1].split()]


class KB:
    """The generated knowledge base: entity tables, pages[title] -> sentences, and
    fact[(title, key)] -> (sentence id, lookup keyword) for every fact a question can ask about."""

    def __init__(self, seed: int = 2411):
        rng = self.rng = random.Random(seed)
        self.pages, self.fact = {}, {}
        self.demonym = dict(COUNTRIES)
        cities = rng.sample(_names(CITY), 100)
        self.city = {c: dict(country=COUNTRIES[i % 8][0], pop=f"{rng.randrange(20, 2000) * 1000 + i:,}")
                     for i, c in enumerate(cities)}
        people, self.person = rng.sample([f"{f} {s}" for f in FIRST for s in _names(SURNAME)], 430), {}
        roles = ["film director"] * 70 + ["novelist"] * 70 + ["singer"] * 70 + ["businessperson"] * 150
        for p, occ in zip(people, roles + ["painter"] * 70):
            city = rng.choice(cities)  # nationality usually, not always, the birthplace's country
            nat = self.city[city]["country"] if rng.random() < 0.6 else rng.choice(COUNTRIES)[0]
            self.person[p] = dict(occ=occ, year=rng.randrange(1900, 1985), city=city, nat=nat, works=[])
        by_role = {r: [p for p, d in self.person.items() if d["occ"] == r] for r in set(roles)}
        founders, stems, self.org = iter(by_role["businessperson"]), iter(rng.sample(_names(ORG), 150)), {}
        for kind, count in (("studio", 30), ("publisher", 30), ("label", 30), ("company", 50)):
            for _ in range(count):  # one organisation per founder: "the company founded by X" is unique
                name, founder = f"{next(stems)} {rng.choice(ORG_KINDS[kind][2].split())}", next(founders)
                self.org[name] = dict(kind=kind, founder=founder, city=rng.choice(cities),
                                      year=self.person[founder]["year"] + rng.randrange(22, 40))
                self.person[founder]["founded"] = name
        titles, self.work = iter(rng.sample(_names(TITLE, "The {} {}"), 800)), {}
        for kind, count, maker, org in (("film", 320, "film director", "studio"),
                                        ("book", 260, "novelist", "publisher"),
                                        ("album", 220, "singer", "label")):
            orgs = [o for o, d in self.org.items() if d["kind"] == org]
            for _ in range(count):
                t, who = next(titles), rng.choice(by_role[maker])
                self.work[t] = dict(kind=kind, by=who, org=rng.choice(orgs),
                                    year=min(2023, self.person[who]["year"] + rng.randrange(22, 55)))
                self.person[who]["works"].append(t)
        for c, d in self.city.items():  # the pages
            self._page(c, "city", f"{c} is a city in {d['country']}.", {
                "population": (f"As of the 2020 census, {c} had a population of {d['pop']}.", "population"),
                "founded": (f"{c} was founded in {rng.randrange(1100, 1850)}.", "founded")},
                industry=rng.choice(["fishing", "textiles", "tourism", "trade"]))
        for country, dem in COUNTRIES:
            capital = next(c for c, d in self.city.items() if d["country"] == country)
            self.pages[country] = [f"{country} is a sovereign state.", f"Its capital is {capital}.",
                                   f"The people of {country} are called {dem}s."]
        for p, d in self.person.items():
            s, dem = p.split()[1], self.demonym[d["nat"]]  # later sentences use the surname, as Wikipedia
            facts = {"born": (f"{s} was born in {d['year']} in {d['city']}.", "born")}
            if org := d.get("founded"):
                facts["founded"] = (f"In {self.org[org]['year']}, {s} founded {org}.", "founded")
            if d["works"]:
                what = {"film director": "films", "novelist": "novels", "singer": "albums"}[d["occ"]]
                facts["works"] = (f"{s}'s {what} include {' and '.join(d['works'][:2])}.", "")
            article = "an" if dem[0] in "AEIOU" else "a"
            self._page(p, "person", f"{p} is {article} {dem} {d['occ']}.", facts, s=s)
        for o, d in self.org.items():
            kind, short, _ = ORG_KINDS[d["kind"]]
            self._page(o, "org", f"{o} is a {kind}.", {
                "founded": (f"{o} was founded in {d['year']} by {d['founder']}.", "founded"),
                "hq": (f"The {short} is headquartered in {d['city']}.", "headquartered")})
        for t, d in self.work.items():
            by, org, year = d["by"], d["org"], d["year"]
            facts = {"film": {"released": (f"The film was released in {year}.", "released"),
                              "by": (f"It was directed by {by}.", "directed"),
                              "org": (f"It was produced by {org}.", "produced")},
                     "book": {"by": (f"It was written by {by}.", "written"),
                              "org": (f"The novel was first published in {year} by {org}.", "published")},
                     "album": {"by": (f"It was recorded by {by}.", "recorded"),
                               "org": (f"It was released in {year} on {org}.", "released")}}[d["kind"]]
            genre, noun = rng.choice(GENRES[d["kind"]].split()), "novel" if d["kind"] == "book" else d["kind"]
            self._page(t, d["kind"], f"{t} is a {genre} {noun}.", facts)

    def _page(self, title: str, kind: str, opener: str, facts: dict, **fmt) -> None:
        """Opener, then facts and fillers shuffled into 6-9 sentences: a fact may lie past the first 5."""
        rng, n = self.rng, self.rng.randrange(6, 10)
        fmt = dict(s=fmt.pop("s", title), city=rng.choice(list(self.city)), country=rng.choice(COUNTRIES)[0],
                   n=rng.randrange(2, 40), k=rng.randrange(2, 9), **fmt)
        pool = FILLERS[kind]
        body = [(k, s) for k, (s, _) in facts.items()]
        body += [("", f.format(**fmt)) for f in rng.sample(pool, min(len(pool), max(1, n - 1 - len(facts))))]
        rng.shuffle(body)
        self.pages[title] = [opener] + [s for _, s in body]
        self.fact[(title, "opener")] = (0, "")
        self.fact.update({(title, k): (i, facts[k][1]) for i, (k, _) in enumerate(body, 1) if k})


# ----------------------------------------------------------------------------- the built-in questions

# Bridge templates: (id, subjects, question, the chain of facts walked; each fact's value is the next page)
BRIDGE = [("B1", "film", "What year was the director of {x} born?", "director born"),
          ("B2", "founder", "In which city is the headquarters of the company founded by {x}?", "company hq"),
          ("B3", "book", "What is the nationality of the author of {x}?", "author nationality"),
          ("B4", "album", "In which country was the performer of the album {x} born?",
           "performer birthplace country"),
          ("B5", "film", "Who founded the studio that produced {x}?", "studio founder"),
          ("B6", "book", "In which country is the publisher of {x} headquartered?", "publisher hq country"),
          ("U1", "person", "What is the population of the city where {x} was born?", "birthplace population"),
          ("U2", "org", "In what year was the founder of {x} born?", "founder born"),
          ("U3", "album", "In what year was the record label that released {x} founded?", "label founded")]
# Comparison templates: (id, subjects, question, fact, how the two values decide: earlier / larger / same)
COMPARE = [("C1", "org", "Which was founded first, {a} or {b}?", "founded", "earlier"),
           ("C2", "person", "Are {a} and {b} of the same nationality?", "nationality", "same"),
           ("C3", "person", "Who was born first, {a} or {b}?", "born", "earlier"),
           ("C4", "film", "Which film was released first, {a} or {b}?", "released", "earlier"),
           ("U4", "film", "Were {a} and {b} directed by the same person?", "director", "same"),
           ("U5", "city", "Which city has a larger population, {a} or {b}?", "population", "larger")]
UNSEEN = {"U1", "U2", "U3", "U4", "U5"}  # held-out templates: test_unseen only
# a fact as a later step of a bridge question's plan, before the entity it is about is known
THEN = {"born": "when that person was born", "birthplace": "where that person was born",
        "nationality": "that person's nationality", "founder": "who founded it",
        "founded": "when it was founded", "hq": "where it is headquartered",
        "country": "which country that city is in", "population": "the population of that city"}


def _facts(k: KB) -> dict:
    """fact -> f(x) = (page, fact key, what the expert needs, the value, verb as in "<x> <verb> <value>")."""
    P, O, W, C = k.person, k.org, k.work, k.city
    return {
        "director": lambda f: (f, "by", f"who directed {f}", W[f]["by"], "was directed by"),
        "studio": lambda f: (f, "org", f"which studio produced {f}", W[f]["org"], "was produced by"),
        "released": lambda f: (f, "released", f"when {f} was released", str(W[f]["year"]), "came out in"),
        "author": lambda b: (b, "by", f"who wrote {b}", W[b]["by"], "was written by"),
        "publisher": lambda b: (b, "org", f"who published {b}", W[b]["org"], "was published by"),
        "performer": lambda a: (a, "by", f"who recorded {a}", W[a]["by"], "was recorded by"),
        "label": lambda a: (a, "org", f"which label released {a}", W[a]["org"], "was released on"),
        "born": lambda p: (p, "born", f"when {p} was born", str(P[p]["year"]), "was born in"),
        "birthplace": lambda p: (p, "born", f"where {p} was born", P[p]["city"], "was born in"),
        "nationality": lambda p: (p, "opener", f"what nationality {p} is", k.demonym[P[p]["nat"]], "is"),
        "company": lambda p: (p, "founded", f"which company {p} founded", P[p]["founded"], "founded"),
        "founder": lambda o: (o, "founded", f"who founded {o}", O[o]["founder"], "was founded by"),
        "founded": lambda o: (o, "founded", f"when {o} was founded", str(O[o]["year"]), "was founded in"),
        "hq": lambda o: (o, "hq", f"where {o} is headquartered", O[o]["city"], "is headquartered in"),
        "country": lambda c: (c, "opener", f"which country {c} is in", C[c]["country"], "is in"),
        "population": lambda c: (c, "population", f"how many live in {c}", C[c]["pop"], "has a population of"),
    }


def _questions(k: KB) -> list[dict]:
    """Every built-in question: template, text, answer, and the hops (pages, sentences) the expert walks."""
    rng, out, fact = random.Random(7), [], _facts(k)
    subjects = {"person": list(k.person), "org": list(k.org), "city": list(k.city),
                "founder": [p for p, d in k.person.items() if "founded" in d]}
    subjects.update({w: [t for t, d in k.work.items() if d["kind"] == w] for w in ("film", "book", "album")})

    def hop(name: str, x: str) -> tuple[dict, str]:
        title, key, need, value, verb = fact[name](x)
        sent, keyword = k.fact[(title, key)]
        return dict(title=title, sent=sent, keyword=keyword, need=need, found=f"{x} {verb} {value}"), value

    def add(tpl, kind, question, answer, plan, hops, conclusion):
        out.append(dict(template=tpl, type=kind, question=question, answer=answer, plan=plan, hops=hops,
                        conclusion=conclusion, supporting_facts=[[h["title"], h["sent"]] for h in hops]))

    for tpl, subject, text, chain in BRIDGE:
        then = ", then ".join(THEN[n] for n in chain.split()[1:])  # the plan's later steps
        for x in subjects[subject]:
            hops, value = [], x
            for name in chain.split():
                h, value = hop(name, value)
                hops.append(h)
            plan = f"I need to find {hops[0]['need']}, then {then}."
            add(tpl, "bridge", text.format(x=x), value, plan, hops, f"So the answer is {value}.")

    for tpl, subject, text, name, rule in COMPARE:
        items, seen, want_same = subjects[subject], set(), True
        values = {x: fact[name](x)[3] for x in items}
        while len(seen) < (300 if tpl in UNSEEN else 420):
            a = rng.choice(items)
            # "same" questions alternate pairs that share the value and pairs that do not: yes/no balanced
            pool = [b for b in items if (values[b] == values[a]) == want_same] if rule == "same" else items
            b = rng.choice(pool) if pool else a
            if a == b or frozenset((a, b)) in seen:
                continue
            seen.add(frozenset((a, b)))
            (ha, va), (hb, vb) = hop(name, a), hop(name, b)
            plan = f"I need to find {ha['need']} and {hb['need']}, then compare."
            if rule == "same":
                want_same, answer = not want_same, "yes" if va == vb else "no"
                end = (f"That is the same as for {a}, so the answer is yes." if va == vb else
                       f"That differs from {a} ({va}), so the answer is no.")
            elif (na := int(va.replace(",", ""))) == (nb := int(vb.replace(",", ""))):
                continue  # a tie has no answer
            else:
                answer, lose = (a, b) if (na < nb) == (rule == "earlier") else (b, a)
                end = f"{values[answer]} is {rule} than {values[lose]}, so the answer is {answer}."
            add(tpl, "comparison", text.format(a=a, b=b), answer, plan, [ha, hb], end)
    return out


kb = functools.cache(KB)  # the built-in knowledge base, built once per process


@functools.cache
def builtin_questions() -> dict[str, list[dict]]:
    """split -> built-in question records (built once): U* templates in test_unseen, the rest by text hash."""
    by, count = {s: [] for s in SPLITS}, Counter()
    for rec in _questions(kb()):  # each question text is made once (pairs are not repeated)
        rec["key"] = f"{rec['template']}-{count[rec['template']]:04d}"
        count[rec["template"]] += 1
        h = int(hashlib.md5(rec["question"].encode()).hexdigest()[:8], 16) % 10
        by["test_unseen" if rec["template"] in UNSEEN else {0: "dev", 1: "test"}.get(h, "train")].append(rec)
    return by


# ----------------------------------------------------------------------------- real HotpotQA files

_FILES: dict[str, dict[str, dict]] = {}  # absolute path -> qid -> validated record
_FIELDS = (("_id", str), ("question", str), ("answer", str), ("supporting_facts", list), ("context", list))


def load_hotpotqa(path: str) -> dict[str, dict]:
    """Read a HotpotQA distractor-format JSON (cached); one-line errors name the file and the field."""
    key = os.path.abspath(path)
    if key in _FILES:
        return _FILES[key]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: HotpotQA data file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of HotpotQA questions")
    out = {}
    for i, r in enumerate(data):
        where = f"{path}: question {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object with fields {', '.join(f for f, _ in _FIELDS)}")
        for name, typ in _FIELDS:
            if name not in r:
                raise ValueError(f"{where}: missing field {name!r}")
            if not isinstance(r[name], typ):
                raise ValueError(f"{where}: field {name!r} should be a {typ.__name__}")
        where = f"{path}: question {i} (_id {r['_id']})"
        if empty := [name for name in ("context", "supporting_facts") if not r[name]]:
            raise ValueError(f"{where}: field {empty[0]!r} is empty: the expert has no supporting fact to walk")
        pages: dict[str, list[str]] = {}
        for c in r["context"]:
            if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], list)
                    and all(isinstance(s, str) for s in c[1])):
                raise ValueError(f"{where}: field 'context' should hold [title, [sentence, ...]] pairs")
            pages.setdefault(c[0], [s.strip() for s in c[1]])  # empty ones kept: sentence ids index this list
        for sf in r["supporting_facts"]:
            if not (isinstance(sf, list) and len(sf) == 2 and isinstance(sf[0], str)
                    and isinstance(sf[1], int)):
                raise ValueError(f"{where}: field 'supporting_facts' should hold [title, sentence id] pairs")
            if sf[0] not in pages:
                raise ValueError(f"{where}: field 'supporting_facts' names {sf[0]!r}, not a 'context' title")
            if not sf[0].strip():
                raise ValueError(f"{where}: field 'supporting_facts' names a blank title, which no search opens")
        if r["_id"] in out:
            raise ValueError(f"{where}: duplicate '_id'")
        out[r["_id"]] = dict(question=r["question"], answer=r["answer"], pages=pages,
                             supporting_facts=r["supporting_facts"], type=r.get("type", ""),
                             level=r.get("level", ""))
    _FILES[key] = out
    return out


def _real_hops(rec: dict) -> list[dict]:
    """Supporting facts grouped by title in order of appearance. Sentence ids past the paragraph's end
    (a known quirk of some HotpotQA records) are dropped; the title is still searched."""
    hops = []
    for title in dict.fromkeys(t for t, _ in rec["supporting_facts"]):
        n = len(rec["pages"][title])
        ids = sorted({s for t, s in rec["supporting_facts"] if t == title and 0 <= s < n}) or [0]
        hops += [dict(title=title, sent=s) for s in ids]
    return hops


# ----------------------------------------------------------------------------- search over a corpus


def _key(title: str) -> str:
    return " ".join(title.lower().strip().strip("\"'").split())


def _grams(text: str) -> set[str]:
    t = f" {_key(text)} "
    return {t[i:i + 3] for i in range(len(t) - 2)}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", text.lower())


class Corpus:
    """Pages by title: an exact (case-insensitive) title match, else the titles sharing the most character
    trigrams for the 'Similar:' list (standing in for Wikipedia's search results)."""

    def __init__(self, pages: dict[str, list[str]]):
        self.pages = pages
        self.by_key = {_key(t): t for t in pages}
        self.grams = {t: _grams(t) for t in pages}
        self.index: dict[str, list[str]] = {}  # trigram -> titles containing it
        for t, grams in self.grams.items():
            for g in grams:
                self.index.setdefault(g, []).append(t)

    def find(self, entity: str) -> str | None:  # an exact title first: titles may differ only in case
        return entity if entity in self.pages else self.by_key.get(_key(entity))

    def similar(self, entity: str, k: int = 5) -> list[str]:
        q = _grams(entity)
        shared = Counter(t for g in q for t in self.index.get(g, ()))
        # Jaccard similarity of the trigram sets, best first, ties by title
        score = lambda t: (-shared[t] / (len(q) + len(self.grams[t]) - shared[t]), t)  # noqa: E731
        return heapq.nsmallest(k, shared if len(shared) >= k else self.pages, key=score)


# ----------------------------------------------------------------------------- the environment

_ACTION_RE = re.compile(r"(\w+)\s*\[(.*)\]", re.S)
_VALID = "Valid actions: search[entity], lookup[keyword], finish[answer]."
_STOP = set("a an the of in on at to and or is was were be by for with as from that this which who what when "
            "where how its it his her their are has had have".split())
_kb_corpus = functools.cache(lambda: Corpus(kb().pages))  # the built-in questions' corpus, built once


class HotpotQAEnv:
    INVALID = re.compile(r"Invalid action|No page is open")
    prompt = ("Answer the question using an offline Wikipedia. Actions:\n"
              "search[entity]: shows the first sentences of the entity's page, or similar titles if none.\n"
              "lookup[keyword]: shows the next sentence containing keyword in the current page.\n"
              "finish[answer]: gives the answer (a short phrase, or yes/no) and ends the episode.")

    def __init__(self, data_file: str | None = None, max_steps: int = 8):
        self.data_file, self.max_steps, self.task = data_file, max_steps, None
        if data_file:
            load_hotpotqa(data_file)  # fail early on a bad file

    @classmethod
    def make_tasks(cls, split: str, n: int | None = None, seed: int = 0,
                   data_file: str | None = None) -> list[Task]:
        """Built-in questions, or with `data_file` every question of that HotpotQA file, as `split`.
        The seed only shuffles the split before the first n are taken."""
        if split not in SPLITS:
            raise ValueError(f"hotpotqa has no split {split!r}; choose from {', '.join(SPLITS)}")
        if data_file:
            recs = [(qid, dict(source="hotpotqa", data_file=os.path.abspath(data_file), qid=qid,
                               question=r["question"], answer=r["answer"], type=r["type"], level=r["level"],
                               supporting_facts=r["supporting_facts"], hops=_real_hops(r)))
                    for qid, r in load_hotpotqa(data_file).items()]
        else:
            recs = [(r["key"], dict(source="kb", **r)) for r in builtin_questions()[split]]
        random.Random(seed).shuffle(recs)
        # data is a deep copy (via JSON): a caller editing a task must not edit the cached questions
        return [Task(f"hotpotqa-{split}-{key}", "hotpotqa", split, d["question"], json.loads(json.dumps(d)))
                for key, d in recs[:n]]

    def _corpus(self, task: Task) -> Corpus:
        d = task.data
        if d.get("source") != "hotpotqa":
            return _kb_corpus()
        for path in (self.data_file, d["data_file"]):  # the env's own file first: task files may have moved
            rec = load_hotpotqa(path).get(d["qid"]) if path else None
            if rec is not None:
                if "corpus" not in rec:
                    rec["corpus"] = Corpus(rec["pages"])
                return rec["corpus"]
        raise ValueError(f"{d['data_file']}: no question with _id {d['qid']!r}")

    @staticmethod
    def _check_task(task: Task) -> dict:
        """The task's data; a one-line ValueError naming the task when it cannot be a hotpotqa task."""
        real = isinstance(task.data, dict) and task.data.get("source") == "hotpotqa"
        return task.fields("hotpotqa", ("question", "answer", "hops") + (("data_file", "qid") if real else ()))

    def reset(self, task: Task) -> str:
        self._check_task(task)
        self.task, self.corpus = task, self._corpus(task)
        self.page = self.kw = None  # the open page's title; the lookup keyword (lowercase)
        self.hits, self.cnt = [], 0  # ids of the page's sentences containing the keyword; how many shown
        self.steps, self.done, self.reward = 0, False, 0.0
        return f"Question: {task.data['question']}"

    def step(self, turn: str) -> tuple[str, float, bool]:
        if self.task is None:
            raise RuntimeError("call reset(task) before step()")
        if self.done:
            return "The episode is over.", self.reward, True
        self.steps += 1
        obs = self._act(parse_action(str(turn)))  # str(): as the other families, a non-str turn is text
        if not self.done and self.steps >= self.max_steps:
            self.done, self.reward = True, 0.0
            obs += f"\nStep limit ({self.max_steps}) reached without finish[answer]; the episode is over."
        return obs, (self.reward if self.done else 0.0), self.done

    def _act(self, action: str | None) -> str:
        if action is None:
            return f"Invalid action: no 'Action:' found in your turn. {_VALID}"
        m = _ACTION_RE.fullmatch(action)
        name = m.group(1).lower() if m else ""  # ReAct's few-shot prompts write Search[...]: accept either
        if name not in ("search", "lookup", "finish"):
            return f"Invalid action: {action}. {_VALID}"
        arg = m.group(2).strip()
        if name == "finish":
            self.done, self.reward = True, answer_reward(arg, self.task.data["answer"])
            return f"Episode finished, reward = {round(self.reward, 3):g}"
        if not arg:
            what = "entity" if name == "search" else "keyword"
            return f"Invalid action: {action}. Put the {what} inside the brackets: {name}[{what}]."
        if name == "search":
            title = self.corpus.find(arg)
            if title is None:  # as ReAct, a failed search keeps the open page
                return f"Could not find {arg}. Similar: {self.corpus.similar(arg)}."
            self.page, self.kw = title, None
            return " ".join(s for s in self.corpus.pages[title][:SHOWN] if s)
        if self.page is None:
            return "No page is open: search[entity] first, then lookup[keyword] in that page."
        if arg.lower() != self.kw:  # a new keyword restarts the results, as ReAct
            self.kw, self.cnt = arg.lower(), 0
            self.hits = [i for i, s in enumerate(self.corpus.pages[self.page]) if self.kw in s.lower()]
        if self.cnt >= len(self.hits):
            return "No more results."
        self.cnt += 1
        sentence = self.corpus.pages[self.page][self.hits[self.cnt - 1]]
        return f"(Result {self.cnt} / {len(self.hits)}) {sentence}"

    # ------------------------------------------------------------------------- the expert

    def expert(self, task: Task) -> list[str]:
        """Walk the supporting facts: search each page, look up facts beyond its first sentences, finish.
        Lookups are dropped from the last hop backwards if the walk would not fit the step limit."""
        allowed = {i for i, h in enumerate(self._check_task(task)["hops"]) if h["sent"] >= SHOWN}
        while True:
            turns = self._walk(task, allowed)
            if len(turns) <= self.max_steps:
                return turns
            if not allowed:  # more pages than steps: keep the first searches and the answer
                return turns[: self.max_steps - 1] + turns[-1:]
            allowed.discard(max(allowed))

    def _walk(self, task: Task, allowed: set[int]) -> list[str]:
        """The expert's turns, played on a scratch env so that each lookup is known to land."""
        d, hops = task.data, task.data["hops"]
        sim, turns = HotpotQAEnv(data_file=self.data_file, max_steps=100), []
        sim.reset(task)

        def act(thought: str, action: str) -> None:
            turns.append(react_turn(thought, action))
            sim.step(action)

        for i, h in enumerate(hops):
            title = h["title"]
            if sim.page != title:
                if i == 0:
                    thought = d.get("plan") or f"I should start by searching {title}."
                elif "found" in h:  # built-in: say what the last page told, and what is needed next
                    thought = f"{hops[i - 1]['found']}. Now I need to find {h['need']}."
                else:
                    thought = f"{hops[i - 1]['title']} gives part of it. Next I need to search {title}."
                act(thought, f"search[{title}]")
            if i in allowed:
                kw, times = self._keyword(sim, h, d)
                why = f"say {h['need']}" if "need" in h else "show the supporting fact"
                for j in range(times):
                    act(f"The first sentences of {title} do not {why}, so I will look up \"{kw}\"." if j == 0
                        else f"That is not the sentence I need; I will look up \"{kw}\" again.",
                        f"lookup[{kw}]")
        if "found" in hops[-1]:
            thought = f"{hops[-1]['found']}. {d['conclusion']}"
        else:
            titles = " and ".join(dict.fromkeys(h["title"] for h in hops))
            how = "Comparing" if d.get("type") == "comparison" and " and " in titles else "From"
            thought = f"{how} {titles}, the answer is {d['answer']}."
        act(thought, f"finish[{d['answer']}]")
        return turns

    @staticmethod
    def _keyword(sim: "HotpotQAEnv", hop: dict, d: dict) -> tuple[str, int]:
        """The keyword whose lookups reach the hop's sentence soonest from the sim's lookup state
        (the hop's own keyword first, then answer, question and sentence words), and how many lookups."""
        sents, target, own = sim.corpus.pages[hop["title"]], hop["sent"], hop.get("keyword", "")
        text = sents[target].lower()
        cands = [own] + _words(d["answer"]) + _words(d["question"])
        cands += sorted(_words(text), key=len, reverse=True)
        best = ("", 0)
        for c in dict.fromkeys(c for c in cands if c and c in text and (c == own or c not in _STOP)):
            hits = [i for i, s in enumerate(sents) if c in s.lower()]
            start = sim.cnt if c == sim.kw else 0  # the same keyword again continues where it stopped
            if target in hits[start:]:
                need = hits.index(target, start) - start + 1
                if not best[0] or need < best[1]:
                    best = (c, need)
        return best
