"""The prose quality filters (datatrove's Gopher, C4 and FineWeb, on prose only, reasons prefixed), the URL
blocklist (offline), the harmful-word filter and the language filter from a model file: each reason by a
document made to break that rule, code passing untouched, and every drop counted under its reason."""

import json.decoder
import pickle
import socket
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import get_filter_result

from lmforge.common import LmforgeError
from lmforge.dataprep import filters
from lmforge.dataprep.filters import (
    CodeFilter,
    ProseOnly,
    UrlBlocklist,
    WordListFilter,
    language_filter,
    prose_filters,
)

GOOD = """The river town grew slowly during the nineteenth century, and its history is recorded in the parish books \
that survive in the county archive. Farmers brought grain to the mill by the bridge, and the miller kept careful \
accounts of what he paid them.
When the railway arrived in 1871, the station was built on the far side of the valley, which surprised many of the \
older residents. They had expected the line to follow the river, as the canal had done a generation before.
Over the following decades the population doubled. New houses were built along the road to the station, and a \
school opened in a converted chapel. The teacher, who had trained in the city, wrote letters that describe the \
children, their games and the long walks they made each morning.
Today the mill is a museum, and visitors can still see the wooden gears that turned for more than a century."""

TOPICS = ["the harvest", "a storm", "the new bridge", "her brother", "an old map", "the school", "a letter",
          "the market", "his garden", "the winter"]
# each document breaks one rule of one filter and passes the filters before it in prose_filters()'s order
BAD = {
    "gopher_repetition": ("\n".join([f"We talked about {t} for a while, and then went home." for t in TOPICS]
                                    + ["Click here to buy cheap watches now!"] * 6),  # 6 of 16 lines: over 30%
                          "gopher_rep_dup_line_frac"),
    "gopher_quality": ("""- the harvest of that year was good, and the mill was busy
- a storm broke the roof of the chapel in the spring
- the new bridge was opened by the mayor with a speech
- her brother went to sea and sent letters from distant ports
- an old map of the parish hangs in the library today
- the school had only one teacher and forty children
- the market moved to the square after the fire""", "gopher_too_many_bullets"),  # every line a bullet: over 90%
    "c4": ("""The first settlers arrived in the valley in the spring of 1820 and built houses close to the river. \
Within ten years they had cleared the forest on the southern slope and planted orchards of apples and pears. \
A small church followed, paid for by a collection among the families who had come from the coast. \
By the middle of the century the village had a school, a smithy and an inn that served travellers on the road \
north.""", "c4_too_few_sentences"),  # 4 sentences: C4 wants 5
    "fineweb": ("""Notes on the harvest and the price of grain in the autumn
Why the new bridge was built so far from the old mill
A letter from her brother about his voyage to the southern ports
How the school managed with a single teacher for forty children
The winter when the river froze and the carts crossed on the ice
Memories of the market before it moved to the square
What the parish books tell us about births and marriages
The election of a mayor who promised a railway station""", "fineweb_line_punct_ratio"),  # none ends in . ! ?
}
# datatrove's URLFilter reads tldextract's registered_domain, deprecated in tldextract 5.3 (pyproject pins < 6)
pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated:DeprecationWarning")
STDLIB_CODE = Path(json.decoder.__file__).read_text()  # real source, with "{" (C4 drops any prose that has one)


def prose(text, **metadata):
    return Document(text=text, id="p", metadata={"format": "text", **metadata})


def by_name():
    return dict(zip(filters.PROSE_FILTERS, prose_filters()))


@pytest.mark.parametrize("name", list(filters.PROSE_FILTERS))
def test_each_prose_filter_drops_its_bad_document_and_keeps_good_prose(name):
    step = by_name()[name]
    text, reason = BAD[name]
    assert step.filter(prose(text)) == (False, reason)
    good = prose(GOOD)
    assert step.filter(good) is True
    assert good.text == GOOD  # C4 rewrites what it keeps; here every line passes its line rules


def test_prose_filters_settings():
    assert len(prose_filters(c4=False)) == 3 and "⛰ C4 Quality" not in [s.name for s in prose_filters(c4=False)]
    lenient = dict(zip(filters.PROSE_FILTERS, prose_filters(gopher_quality={"max_bullet_lines_ratio": None})))
    assert lenient["gopher_quality"].filter(prose(BAD["gopher_quality"][0])) is True
    with pytest.raises(ValueError, match="gopher_repetition"):
        prose_filters(gopher=False)


def test_c4_rewrites_prose_lines_and_drops_curly_brackets():
    step = by_name()["c4"]
    doc = prose(GOOD + "\nok then\nThis site uses cookies to improve your experience of it.")
    assert step.filter(doc) is True and doc.text == GOOD  # the 2-word line and the cookie line are gone
    curly = prose(GOOD + "\nThe template puts {name} in the middle of the text.")
    assert step.filter(curly) == (False, "c4_curly_bracket")


def test_code_and_unextracted_html_pass_every_prose_filter_untouched():
    assert "{" in STDLIB_CODE
    steps = prose_filters() + [WordListFilter(), UrlBlocklist()]
    for fmt in ("code", "html"):
        doc = Document(text=STDLIB_CODE, id="json/decoder.py", metadata={"format": fmt})
        assert all(step.filter(doc) is True for step in steps)
        assert doc.text == STDLIB_CODE
    # the same text as prose is dropped: the pass above is the format check, not a lenient filter
    assert by_name()["c4"].filter(prose(STDLIB_CODE)) == (False, "c4_curly_bracket")


def test_documents_without_a_format_are_prose():
    assert by_name()["gopher_quality"].filter(Document(text="Too short.", id="j")) == (False, "gopher_short_doc")
    assert by_name()["gopher_quality"].filter(Document(text=GOOD, id="j")) is True


def test_plain_false_from_an_inner_filter_gets_a_reason():
    class Refuse(CodeFilter):
        def filter(self, doc):
            return False

    assert ProseOnly(Refuse(), "refuse_").filter(prose(GOOD)) == (False, "refuse_rejected")


def test_reasons_are_distinct_across_filters(tmp_path):
    steps = dict(by_name(), url=UrlBlocklist(), words=WordListFilter(), code=CodeFilter())
    docs = [prose(text) for text, _ in BAD.values()] + [
        prose(GOOD + "\nThe template puts {name} here, and lorem ipsum there, in this line."),
        prose("\n".join(["Buy now"] * 40)), prose(""), prose(GOOD, url="https://www.pornhub.com/view"),
        prose(GOOD + " Free porn and live sex cams, porn every day."),
        Document(text="x = '" + "a" * 1200 + "'\n", id="c", metadata={"format": "code"}),
    ]
    reasons = {name: set() for name in steps}
    for doc in docs:
        for name, step in steps.items():
            keep, reason = get_filter_result(step.filter(Document(text=doc.text, id=doc.id,
                                                                  metadata=dict(doc.metadata))))
            reasons[name].update([reason] if not keep else [])
    assert all(reasons.values()), reasons  # every filter named at least one reason
    everything = [r for rs in reasons.values() for r in rs]
    assert len(everything) == len(set(everything)) >= 12, reasons
    assert "c4_lorem_ipsum" in reasons["c4"] and "url_domain" in reasons["url"]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def url_doc(url):
    return prose(GOOD, url=url) if url else prose(GOOD)


def test_url_blocklist_default_list_offline(no_network):
    step = UrlBlocklist()
    assert step.filter(url_doc("https://www.pornhub.com/view_video?id=1")) == (False, "url_domain")
    assert step.filter(url_doc("http://de.xhamster.com/")) == (False, "url_domain")
    assert step.filter(url_doc("https://en.wikipedia.org/wiki/Mill")) is True
    assert step.filter(url_doc("https://notpornhub.com/")) is True
    assert step.filter(url_doc(None)) is True  # datatrove's URLFilter asserts a url


def test_url_blocklist_user_file_uses_the_public_suffix_list(tmp_path, no_network):
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("# spam farms\nexample.co.uk\n\nads.example.org\nhttps://example.net/bad/page\n")
    step = UrlBlocklist([blocklist], default_list=False)
    assert step.filter(url_doc("https://shop.example.co.uk/x")) == (False, "url_domain")  # co.uk is a suffix
    assert step.filter(url_doc("https://other.co.uk/")) is True
    assert step.filter(url_doc("https://ads.example.org/banner")) == (False, "url_subdomain")
    assert step.filter(url_doc("https://www.example.org/")) is True
    assert step.filter(url_doc("https://example.net/bad/page")) == (False, "url_listed")
    assert step.filter(url_doc("https://example.net/good/page")) is True
    assert step.filter(url_doc("https://www.pornhub.com/")) is True  # default_list=False


def test_word_list_needs_two_hits_whole_words(tmp_path):
    step = WordListFilter()
    assert step.filter(prose(GOOD + " Free PORN videos and live\nsex cams.")) == (False, "harmful_words")
    assert step.filter(prose(GOOD + " The law on porn was debated in parliament.")) is True  # one incidental hit
    assert step.filter(prose(GOOD + " Pornography and sextants; camgirlish milfoil.")) is True  # not whole words
    assert step.filter(Document(text="porn = porn + 1", id="c", metadata={"format": "code"})) is True
    words = tmp_path / "words.txt"
    words.write_text("# ours\nbad phrase\nworse\n")
    mine = WordListFilter([words], default_list=False)
    assert mine.filter(prose(GOOD + " A bad  phrase, then WORSE.")) == (False, "harmful_words")
    assert mine.filter(prose(GOOD + " Porn and porn again, and a bad idea.")) is True  # default list off
    with pytest.raises(ValueError, match="no words"):
        WordListFilter(default_list=False)


def test_pipeline_stats_account_for_every_document(no_network):
    steps = [CodeFilter(), *prose_filters(), UrlBlocklist(), WordListFilter()]
    docs = [prose(GOOD, url=f"https://town.example/{i}") for i in range(3)] + [
        prose(text) for text, _ in BAD.values()] + [
        prose(GOOD, url="https://www.xvideos.com/v/1"),
        prose(GOOD + " Free porn and live sex cams, porn every day."),
        Document(text=STDLIB_CODE, id="decoder.py", metadata={"format": "code"}),
        Document(text="x = '" + "a" * 1200 + "'\n", id="long.py", metadata={"format": "code"}),
    ]
    stream = iter(docs)
    for step in steps:
        stream = step.run(stream)
    kept = list(stream)
    assert [d.id for d in kept] == ["p"] * 3 + ["decoder.py"]
    dropped = {}
    for step in steps:
        stats = {k: v.total for k, v in step.stats.stats.items()}
        reasons = {k: v for k, v in stats.items() if k.startswith("dropped_")}
        assert stats.get("dropped", 0) == sum(reasons.values())  # no drop without a reason
        assert stats["total"] == stats.get("forwarded", 0) + stats.get("dropped", 0)
        dropped.update(reasons)
    assert len(docs) == len(kept) + sum(dropped.values())
    assert dropped == {"dropped_code_long_line": 1, "dropped_gopher_rep_dup_line_frac": 1,
                       "dropped_gopher_too_many_bullets": 1, "dropped_c4_too_few_sentences": 1,
                       "dropped_fineweb_line_punct_ratio": 1, "dropped_url_domain": 1, "dropped_harmful_words": 1}


def test_filters_pickle_for_workers(no_network):
    for step in [*prose_filters(), UrlBlocklist(), WordListFilter()]:
        copy = pickle.loads(pickle.dumps(step))
        for doc in [prose(GOOD, url="https://www.redtube.com/"), prose(GOOD + " porn, porn.")] + [
                prose(text) for text, _ in BAD.values()]:
            assert copy.filter(prose(doc.text, **doc.metadata)) == step.filter(prose(doc.text, **doc.metadata))


def test_no_language_model_means_no_language_filter():
    assert language_filter(None) is None


def test_language_filter_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(LmforgeError, match="no such file"):
        language_filter(tmp_path / "lid.bin")
    (tmp_path / "lid.bin").write_bytes(b"")
    real = filters.importlib.util.find_spec
    monkeypatch.setattr(filters.importlib.util, "find_spec", lambda name: None if name == "fasttext" else real(name))
    with pytest.raises(LmforgeError, match="pip install fasttext-numpy2"):
        language_filter(tmp_path / "lid.bin")


ENGLISH = ("the house is near the river and we walk there every morning with the children",
           "she said that the weather would be better tomorrow so they stayed at home",
           "this book tells the story of a small town and the people who lived in it",
           "we have not seen our friends since the summer when they moved to the city",
           "the train was late again and nobody knew why it had stopped in the field")
GERMAN = ("das haus ist nicht weit vom fluss und wir gehen jeden morgen mit den kindern",
          "sie sagte dass das wetter morgen besser wird also blieben sie zu hause",
          "dieses buch erzählt die geschichte einer kleinen stadt und ihrer leute",
          "wir haben unsere freunde seit dem sommer nicht gesehen als sie umzogen",
          "der zug war wieder zu spät und niemand wusste warum er im feld hielt")


def test_language_filter_with_a_model_file(tmp_path):
    fasttext = pytest.importorskip("fasttext")
    train = tmp_path / "train.txt"
    lines = [f"__label__{lang} {line}" for lang, corpus in (("en", ENGLISH), ("de", GERMAN)) for line in corpus]
    train.write_text("\n".join(lines * 20) + "\n")
    # 10 threads and dim 10 on purpose: fastText initialises its input matrix in 10 blocks of m*n // 10, one
    # run per thread, so with fewer threads (or m*n not a multiple of 10) the rest is left as whatever the
    # allocator hands back: 30% of single-thread runs here ended in "Encountered NaN."
    model = fasttext.train_supervised(str(train), epoch=25, lr=0.1, dim=10, minn=2, maxn=4, bucket=20000,
                                      thread=10, verbose=0)
    model.save_model(str(tmp_path / "lid.bin"))
    step = language_filter(tmp_path / "lid.bin", languages=("en",))
    english = prose("the children walk to the river with their friends every summer morning")
    german = prose("die kinder gehen jeden morgen im sommer mit ihren freunden zum fluss")
    assert step.filter(english) is True and english.metadata["language"] == "en"
    assert step.filter(german) == (False, "language_de") and german.metadata["language_score"] > 0.65
    code = Document(text=STDLIB_CODE, id="c", metadata={"format": "code"})
    assert step.filter(code) is True and "language" not in code.metadata  # prose only
    strict = language_filter(tmp_path / "lid.bin", languages=("en",), threshold=1.0)
    assert strict.filter(prose(english.text)) == (False, "language_uncertain")
    assert pickle.loads(pickle.dumps(step)).filter(prose(german.text)) == (False, "language_de")
