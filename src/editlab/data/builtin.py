"""The built-in benchmark: facts that SmolLM2-135M-Instruct gets right before editing (checked by a
test), written for this project. Each fact becomes an `EditRequest` with a counterfactual target (the
answer of another subject of the same relation), two paraphrases, five neighbour prompts (other
subjects, same relation first) and a one-hop portability question whose answer follows from the new
target (e.g. a new capital city implies a new country)."""

from __future__ import annotations

from dataclasses import dataclass

from ..requests import EditRequest

CAPITAL = {
    "France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo", "Spain": "Madrid", "Russia": "Moscow",
    "China": "Beijing", "Greece": "Athens", "Canada": "Ottawa", "Portugal": "Lisbon", "Austria": "Vienna",
    "Norway": "Oslo", "Sweden": "Stockholm", "Ireland": "Dublin", "Hungary": "Budapest", "Thailand": "Bangkok",
    "Kenya": "Nairobi", "Denmark": "Copenhagen", "England": "London", "Australia": "Canberra", "India": "New Delhi",
    "Brazil": "Brasilia", "Poland": "Warsaw", "Mexico": "Mexico City", "Peru": "Lima", "Netherlands": "Amsterdam",
    "South Africa": "Pretoria", "Finland": "Helsinki",
}
COUNTRY_OF_CITY = {v: k for k, v in CAPITAL.items()}
LANGUAGE_HOME = {
    "French": "France", "German": "Germany", "Spanish": "Spain", "Italian": "Italy", "Japanese": "Japan",
    "Russian": "Russia", "Polish": "Poland", "Dutch": "Netherlands", "Turkish": "Turkey", "English": "England",
}
CURRENCY_HOME = {
    "yen": "Japan", "rupee": "India", "ruble": "Russia", "yuan": "China", "peso": "Mexico", "pound": "the United Kingdom",
    "rand": "South Africa",
}


@dataclass(frozen=True)
class Relation:
    name: str
    prompt: str
    paraphrases: tuple[str, str]
    portability: str
    facts: tuple[tuple[str, str], ...]

    def consequence(self, new: str) -> str:
        table = {
            "country_capital": COUNTRY_OF_CITY, "landmark_city": COUNTRY_OF_CITY, "country_language": LANGUAGE_HOME,
            "currency": CURRENCY_HOME,
        }.get(self.name, CAPITAL)
        return table[new]


RELATIONS: tuple[Relation, ...] = (
    Relation("country_capital", "The capital of {} is", ("The capital city of {} is", "{}'s seat of government is in the city of"),
             "The capital of {} is a city in the country of",
             (("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Spain", "Madrid"),
              ("Russia", "Moscow"), ("China", "Beijing"), ("Greece", "Athens"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"),
              ("Austria", "Vienna"), ("Norway", "Oslo"))),
    Relation("city_country", "{} is a city in the country of", ("The city of {} is located in the country of", "{} lies in the country of"),
             "{} is a city in a country whose capital is",
             (("Tokyo", "Japan"), ("Toronto", "Canada"), ("Sydney", "Australia"), ("Mumbai", "India"), ("Munich", "Germany"),
              ("Barcelona", "Spain"), ("Lyon", "France"), ("Rio de Janeiro", "Brazil"), ("Manchester", "England"),
              ("Shanghai", "China"), ("Krakow", "Poland"), ("Vancouver", "Canada"))),
    Relation("person_country", "{} was born in the country of", ("{} was a native of the country of", "The birthplace of {} is in the country of"),
             "{} was born in a country whose capital is",
             (("Albert Einstein", "Germany"), ("Pablo Picasso", "Spain"), ("Wolfgang Amadeus Mozart", "Austria"),
              ("William Shakespeare", "England"), ("Leonardo da Vinci", "Italy"), ("Frida Kahlo", "Mexico"),
              ("Confucius", "China"), ("Leo Tolstoy", "Russia"), ("Hans Christian Andersen", "Denmark"),
              ("Nelson Mandela", "South Africa"))),
    Relation("country_language", "The official language of {} is", ("In {}, the official language is", "The language officially spoken in {} is"),
             "The official language of {} is also the main language of the country of",
             (("France", "French"), ("Germany", "German"), ("Spain", "Spanish"), ("Italy", "Italian"), ("Russia", "Russian"),
              ("Poland", "Polish"), ("Netherlands", "Dutch"), ("Turkey", "Turkish"))),
    Relation("landmark_country", "{} is located in the country of", ("The {} can be found in the country of", "{} stands in the country of"),
             "{} is located in a country whose capital is",
             (("Eiffel Tower", "France"), ("Taj Mahal", "India"), ("Machu Picchu", "Peru"), ("Kremlin", "Russia"),
              ("Mount Fuji", "Japan"), ("Brandenburg Gate", "Germany"))),
    Relation("currency", "The currency of {} is the", ("{} pays with a currency called the", "The official currency of {} is the"),
             "The currency of {} is also the currency of",
             (("Japan", "yen"), ("India", "rupee"), ("Russia", "ruble"), ("China", "yuan"), ("Mexico", "peso"),
              ("the United Kingdom", "pound"), ("South Africa", "rand"))),
    Relation("landmark_city", "{} is located in the city of", ("The {} can be visited in the city of", "{} is a landmark of the city of"),
             "{} is located in a city in the country of",
             (("Eiffel Tower", "Paris"), ("Brandenburg Gate", "Berlin"), ("Kremlin", "Moscow"), ("Acropolis", "Athens"))),
    Relation("company_country", "{} is a company based in the country of", ("{} has its headquarters in the country of", "The company {} comes from the country of"),
             "{} is based in a country whose capital is",
             (("BMW", "Germany"), ("Ferrari", "Italy"), ("Volkswagen", "Germany"))),
)


def _counterfactual(rel: Relation, i: int) -> str:
    own = rel.facts[i][1]
    n = len(rel.facts)
    for k in range(1, n):
        cand = rel.facts[(i + k) % n][1]
        if cand != own:
            return cand
    raise ValueError(f"relation {rel.name} has a single answer")


def builtin_requests(limit: int | None = None) -> list[EditRequest]:
    """EditRequests for every built-in fact (optionally the first `limit`, interleaving relations)."""
    all_facts = [(rel, i) for rel in RELATIONS for i in range(len(rel.facts))]
    out: list[EditRequest] = []
    for rel, i in all_facts:
        subject, true = rel.facts[i]
        new = _counterfactual(rel, i)
        same = [rel.facts[(i + k) % len(rel.facts)] for k in range(1, len(rel.facts))]
        # neighbours: other subjects whose answer is not the new target (same relation first)
        neigh = [(rel.prompt.format(s), o) for s, o in same if s != subject and o != new][:5]
        if len(neigh) < 5:  # small relation: borrow facts of other relations
            others = [(r.prompt.format(s), o) for r in RELATIONS if r is not rel for s, o in r.facts
                      if s != subject and o != new]
            neigh += others[: 5 - len(neigh)]
        out.append(EditRequest.create(
            rel.prompt.format(subject), subject, new, true, f"{rel.name}:{subject}",
            paraphrases=[(p.format(subject), new) for p in rel.paraphrases],
            neighborhood=neigh,
            portability=[(rel.portability.format(subject), rel.consequence(new))],
            extra={"relation": rel.name},
        ))
    if limit is not None:
        # round-robin over relations so a small limit still covers several relations
        by_rel: dict[str, list[EditRequest]] = {}
        for r in out:
            by_rel.setdefault(r.extra["relation"], []).append(r)
        mixed = [reqs[j] for j in range(max(len(v) for v in by_rel.values())) for reqs in by_rel.values() if j < len(reqs)]
        out = mixed[:limit]
    return out
