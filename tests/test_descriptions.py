"""Sanity checks for the shipped text corpora (LaFTer stage-1 descriptions and templates)."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

CLASSES = {
    "mikels8": ["amusement", "contentment", "awe", "excitement", "fear", "sadness", "disgust", "anger"],
    "ekman6": ["anger", "disgust", "fear", "sadness", "surprise", "joy"],
}
# Template sets also exist for the 2-class space, whose descriptions are pooled from Mikels-8.
TEMPLATE_CLASSES = {**CLASSES, "polarity2": ["positive", "negative"]}
MIN_DESCRIPTIONS = 50
CONTEXT_LENGTH = 77

def _read_resource(*parts: str) -> str:
    return files("hclafter").joinpath("resources", *parts).read_text(encoding="utf-8")


def _load_descriptions(name: str) -> dict[str, list[str]]:
    return json.loads(_read_resource("descriptions", f"{name}.json"))


def _load_templates() -> dict[str, list[str]]:
    return json.loads(_read_resource("templates.json"))


@pytest.fixture(scope="module")
def tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _n_tokens(tok, text: str) -> int:
    return len(tok.encode(text)) + 2  # start-of-text and end-of-text tokens


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_keys_exact_and_ordered(name):
    data = _load_descriptions(name)
    assert list(data.keys()) == CLASSES[name]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_enough_distinct_descriptions(name):
    data = _load_descriptions(name)
    for cls, sentences in data.items():
        assert isinstance(sentences, list)
        assert all(isinstance(s, str) and s.strip() for s in sentences), cls
        distinct = {s.strip() for s in sentences}
        assert len(distinct) >= MIN_DESCRIPTIONS, f"{name}/{cls}: only {len(distinct)} descriptions"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_no_duplicates_within_class(name):
    data = _load_descriptions(name)
    for cls, sentences in data.items():
        normed = [s.strip().lower() for s in sentences]
        dupes = sorted({s for s in normed if normed.count(s) > 1})
        assert not dupes, f"{name}/{cls} has duplicates: {dupes}"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_no_sentence_shared_between_classes(name):
    data = _load_descriptions(name)
    owner: dict[str, str] = {}
    clashes = []
    for cls, sentences in data.items():
        for s in {s.strip().lower() for s in sentences}:
            if s in owner and owner[s] != cls:
                clashes.append((owner[s], cls, s))
            owner.setdefault(s, cls)
    assert not clashes, f"{name}: sentences in several classes: {clashes}"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_descriptions_fit_clip_context(name, tokenizer):
    data = _load_descriptions(name)
    too_long = [
        (cls, s)
        for cls, sentences in data.items()
        for s in sentences
        if _n_tokens(tokenizer, s) > CONTEXT_LENGTH
    ]
    assert not too_long, f"{name}: descriptions exceed {CONTEXT_LENGTH} tokens: {too_long}"


def test_templates_keys():
    templates = _load_templates()
    assert set(templates) == set(TEMPLATE_CLASSES)


@pytest.mark.parametrize("name", sorted(TEMPLATE_CLASSES))
def test_templates_have_single_placeholder(name):
    templates = _load_templates()[name]
    assert 20 <= len(templates) <= 30
    assert len({t.strip().lower() for t in templates}) == len(templates), "duplicate templates"
    for t in templates:
        assert t.count("{}") == 1, t
        assert t.count("{") == 1 and t.count("}") == 1, t
        t.format("x")  # must be a valid format string


@pytest.mark.parametrize("name", sorted(TEMPLATE_CLASSES))
def test_templates_fit_clip_context(name, tokenizer):
    templates = _load_templates()[name]
    longest = max(TEMPLATE_CLASSES[name], key=len)
    for t in templates:
        text = t.format(longest)
        assert _n_tokens(tokenizer, text) <= CONTEXT_LENGTH, text
