"""Instructions for composed queries, parsed: what an instruction adds, replaces and removes.

Patterns understood by :func:`parse_instruction` (case-insensitive, with or without "the same but",
"this", "it"): "as a X", "into a X", "make it (a) X", "turn it into X", "change it to X", "X instead of
Y", "replace Y with X", "change Y to X", "but X", "in X" (colour, material, style), "with X", "without
X", "no X", "not X", "minus X", "remove X", and a bare word or phrase (an adjective → attribute,
anything else → a new object). :func:`rewrite_name` applies one to a category name (the caption route
of :mod:`retrieval.compose`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from retrieval.errors import InvalidQueryError

COLOURS = frozenset("""red orange yellow green blue purple violet pink brown black white grey gray silver gold golden
beige turquoise cyan magenta maroon navy cream tan khaki olive teal lavender crimson""".split())
ATTRIBUTES = COLOURS | frozenset("""striped spotted dotted plaid checked floral patterned plain colorful colourful
dark light bright pale shiny matte transparent
leather wooden wood metal metallic plastic glass paper cotton wool woollen woolen denim silk velvet fur furry
big small large little tiny huge tall short long wide narrow thick thin round square
old new vintage modern antique broken clean dirty wet dry
cartoon drawn painted sketch realistic blurry sunny snowy rainy night""".split())


def _strip_articles(text: str) -> str:
    words = text.strip().split()
    while words and words[0] in ("a", "an", "the", "some", "this", "that", "it", "one"):
        words = words[1:]
    return " ".join(words)


def _clean(text: str) -> str:
    text = str(text or "").lower().replace("’", "'")
    text = re.sub(r"[.!?;:\"“”]+", " ", text)
    return " ".join(text.split())


@dataclass
class Instruction:
    """A parsed instruction: ``kind`` is ``replace`` (new object), ``attribute`` (add/change a property),
    ``remove`` (drop something), or ``free`` (anything else)."""

    text: str
    kind: str
    target: str | None = None     # new object / attribute phrase
    old: str | None = None        # what the instruction says it replaces ("instead of Y")
    remove: str | None = None     # what to take away ("without Y", "not Y")
    preposition: str | None = None  # "in" / "with" for attribute phrases kept after the name

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _is_attribute(phrase: str) -> bool:
    words = phrase.split()
    return bool(words) and all(w in ATTRIBUTES or w.endswith("-colored") or w.endswith("-coloured") for w in words)


def _target(text: str, raw: str, *, old: str | None = None, remove: str | None = None) -> Instruction:
    had_article = bool(re.match(r"^(a|an)\s", text))
    phrase = _strip_articles(text)
    if not phrase:
        raise InvalidQueryError(f"instruction {raw!r} names nothing to change")
    kind = "attribute" if (_is_attribute(phrase) and not had_article) else "replace"
    return Instruction(raw, kind, target=phrase, old=old, remove=remove)


def parse_instruction(text: str) -> Instruction:
    """Parse an instruction into what it adds, replaces and removes (patterns in the module docstring)."""
    raw = str(text or "").strip()
    t = _clean(raw)
    if not t:
        raise InvalidQueryError("empty instruction")
    # "this shoe as a boot": drop the subject the user names the query image with
    t = re.sub(r"^(?:this|that|the|my)\s+[a-z-]+(?:\s+[a-z-]+)?\s+(?=(?:as|into|but|in|with|without|instead|not|"
               r"made|now)\b)", "", t)
    t = re.sub(r"^(the same|same|similar|like this|this|it)\s*(,\s*)?(but\s+)?", lambda m: "but " if m.group(3)
               else "", t).strip() or t
    t = re.sub(r"^(but|and|only|just|please)\s+", "", t).strip()
    t = re.sub(r"^(but|and|only|just|please)\s+", "", t).strip()  # "but please ..."
    m = re.match(r"^(.+?)\s+instead\s+of\s+(.+)$", t)
    if m:
        inner = parse_instruction(m.group(1))
        return Instruction(raw, inner.kind if inner.kind != "free" else "replace", target=inner.target,
                           old=_strip_articles(m.group(2)), preposition=inner.preposition)
    m = re.match(r"^(?:replace|swap|substitute)\s+(.+?)\s+(?:with|for|by)\s+(.+)$", t)
    if m:
        return _target(m.group(2), raw, old=_strip_articles(m.group(1)))
    m = re.match(r"^(?:change|turn)\s+(?!it\b|this\b)(.+?)\s+(?:to|into)\s+(.+)$", t)
    if m:
        return _target(m.group(2), raw, old=_strip_articles(m.group(1)))
    m = re.match(r"^(?:without|no|not|minus|remove|drop|less|except)\s+(.+)$", t)
    if m:
        return Instruction(raw, "remove", remove=_strip_articles(m.group(1)))
    m = re.match(r"^(?:as|into|becoming|to be|make it|make this|turn it into|turn this into|change it to|"
                 r"change it into|change this to|change this into|now|but as|it is|it's|is)\s+(.+)$", t)
    if m:
        return _target(m.group(1), raw)
    m = re.match(r"^(in|with|made of|on)\s+(.+)$", t)
    if m:
        phrase = _strip_articles(m.group(2))
        prep = "made of" if m.group(1) == "made of" else m.group(1)
        if prep == "in" and _is_attribute(phrase):
            return Instruction(raw, "attribute", target=phrase)
        return Instruction(raw, "attribute", target=phrase, preposition=prep)
    m = re.match(r"^(?:more|very|extra)\s+(.+)$", t)
    if m:
        return Instruction(raw, "attribute", target=_strip_articles(m.group(1)))
    phrase = _strip_articles(t)
    if len(phrase.split()) <= 3:
        return _target(t, raw)
    return Instruction(raw, "free", target=phrase)


def rewrite_name(name: str, instruction: Instruction | str) -> str:
    """Apply an instruction to a category name: ``("sandal", "as a boot") -> "boot"``,
    ``("sandal", "in red") -> "red sandal"``, ``("sandal", "with straps") -> "sandal with straps"``,
    ``("sandal", "without straps") -> "sandal"`` (the removed part is subtracted as a vector)."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    name = " ".join(str(name or "").split())
    if ins.kind == "replace":
        return ins.target or name
    if ins.kind == "attribute":
        if not name:
            return ins.target or ""
        if ins.preposition:
            return f"{name} {ins.preposition} {ins.target}"
        base = name
        if ins.old:  # "red instead of blue": drop the old attribute from the name
            base = " ".join(w for w in name.split() if w.lower() not in ins.old.split()) or name
        else:        # a new colour replaces the name's colour words
            if _is_attribute(ins.target or "") and set((ins.target or "").split()) & COLOURS:
                base = " ".join(w for w in name.split() if w.lower() not in COLOURS) or name
        return f"{ins.target} {base}"
    if ins.kind == "remove":
        return name or ""
    return f"{name} {ins.target}".strip() if name else (ins.target or "")
