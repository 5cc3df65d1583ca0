"""Text as a person reads it: escapes decoded, every script's digits in ASCII, invisible
characters dropped. The masking and the credential finder read text so, so that a value written
in another form (``alice%40example.com``, full-width digits, ``pass\u200bword``) is found."""

from __future__ import annotations

import bisect
import functools
import html
import re
import unicodedata
import urllib.parse
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.entities import html5
from typing import final

# Every Unicode decimal digit to its ASCII digit (Arabic-Indic, Devanagari, full-width, ...),
# every dash to "-": after NFKC, which takes full-width forms (U+FF20, U+FF10) to ASCII. The
# invisible format characters (zero-width space and joiners, soft hyphen, word joiner, BOM,
# direction marks, tags) are dropped, as a reader never sees them: a phone number with them
# between its digits is read as the number it shows. (A tab stays: ``as_seen`` reads it.)
_FOLD: dict[int, str | None] = dict.fromkeys(range(0xE0000, 0xE0080))
for _c in range(0x80, 0x20000):
    if unicodedata.decimal(chr(_c), None) is not None:
        _FOLD[_c] = str(unicodedata.decimal(chr(_c)))
    elif unicodedata.category(chr(_c)) == "Pd" or _c == 0x2212:  # dashes, the minus sign
        _FOLD[_c] = "-"
    elif unicodedata.category(chr(_c)) == "Cf":
        _FOLD[_c] = None
# A "\\u" escape: its backslash after an even run of backslashes (none, or escaped ones), never
# after an odd one ('\\\\u00e9': a backslash written escaped, then "u"; one JSON string deeper, an
# escape its own reader decodes: decoded here, it left a lone backslash, the JSON held broken).
_JSON_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u([0-9a-fA-F]{4})")


def _unescape_json(m: re.Match[str]) -> str:
    code = int(m.group(2), 16)
    return m.group(0) if 0xD800 <= code <= 0xDFFF else m.group(1) + chr(code)  # a lone surrogate stays escaped


def normalise(text: str) -> str:
    """The text as a reader would see it: percent-encoding, JSON \\u and HTML character escapes
    decoded (twice-encoded too, three rounds at most), NFKC, every digit and dash in ASCII,
    invisible format characters dropped. Linear in the text (NFKC expands a character 18-fold at most)."""
    for _ in range(3):
        decoded = html.unescape(_JSON_ESCAPE.sub(_unescape_json, urllib.parse.unquote(text, errors="replace")))
        if decoded == text:
            break
        text = decoded
    return unicodedata.normalize("NFKC", text).translate(_FOLD)


# ``normalise``'s reading, step by step, with where each character it reads comes from in the
# text (``folding``): a percent escape (a run of them that is one UTF-8 character's bytes, each
# character of a run with a byte UTF-8 refuses all of the run, as ``unquote`` decodes it), a
# character reference (``html.unescape``'s pattern; of a name without ";" only its longest known
# prefix), and a run of characters that NFKC reads together (``_nfkc_runs``).
_PERCENT = re.compile(r"%[0-7][0-9a-fA-F]|(?:%[89a-fA-F][0-9a-fA-F])+")
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_DROPPED = re.compile("[" + "".join(re.escape(chr(c)) for c, to in _FOLD.items() if to is None) + "]+")
# A change of one step: a span of its text, and what it reads as (each of its characters from all of the span).
_Change = tuple[int, int, str]


def _percent_changes(text: str) -> Iterator[_Change]:
    for m in _PERCENT.finditer(text):
        a, b = m.span()
        if b - a == 3 and m.group(0)[1] < "8":
            yield a, b, chr(int(m.group(0)[1:], 16))
            continue
        decoded = bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8", "replace")
        if "\ufffd" in decoded:
            yield a, b, decoded
            continue
        for c in decoded:
            yield a, a + 3 * len(c.encode("utf-8")), c
            a += 3 * len(c.encode("utf-8"))


def _json_changes(text: str) -> Iterator[_Change]:
    for m in _JSON_ESCAPE.finditer(text):
        code = int(m.group(2), 16)
        if not 0xD800 <= code <= 0xDFFF:
            yield m.end(1), m.end(), chr(code)


def _html_changes(text: str) -> Iterator[_Change]:
    for m in _CHARREF.finditer(text):
        (a, b), name = m.span(), m.group(1)
        read = html.unescape(m.group(0))
        if read == m.group(0):
            continue
        if not name.startswith("#") and name not in html5:  # (a known name, then text: "&ampx" is "&" and "x")
            x = next((x for x in range(len(name) - 1, 1, -1) if name[:x] in html5), 0)
            if x and read == html5[name[:x]] + name[x:]:
                b, read = a + 1 + x, html5[name[:x]]
        yield a, b, read


@functools.cache
def _nfkc_runs() -> re.Pattern[str]:
    """A run of characters NFKC reads together: one it may change, or one before which NFKC may
    not start again (that composes with the character before it, a combining mark, or whose
    decomposition starts with one), with those after it that it may not start again before."""
    backward = {*range(0x1161, 0x1176), *range(0x11A8, 0x11C3)}  # (Hangul vowels and trailing consonants)
    decomposed = []
    for c in (*range(0x80, 0x40000), *range(0xE0000, 0xE1000)):  # (beyond them none is assigned)
        mapping = unicodedata.decomposition(chr(c))
        if mapping or unicodedata.combining(chr(c)):
            decomposed.append(c)
        if mapping and not mapping.startswith("<") and len(mapping.split()) == 2:
            backward.add(int(mapping.split()[1], 16))
    after = sorted(
        c
        for c in {*decomposed, *backward}
        if unicodedata.combining(chr(c))
        or unicodedata.combining(unicodedata.normalize("NFKD", chr(c))[0])
        or ord(unicodedata.normalize("NFKD", chr(c))[0]) in backward
    )
    changing, joined = _class(sorted({*decomposed, *backward})), _class(after)
    return re.compile(f"[^{changing}][{joined}]+|[{changing}][{joined}]*")


def _class(codes: list[int]) -> str:
    """A character class's body of ``codes`` (in order)."""
    ranges: list[list[int]] = []
    for c in codes:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


def _nfkc_changes(text: str) -> Iterator[_Change]:
    for m in _nfkc_runs().finditer(text):
        read = unicodedata.normalize("NFKC", m.group(0))
        if read != m.group(0):
            yield m.start(), m.end(), read


def _changed(
    text: str, starts: array[int], ends: array[int], changes: Iterable[_Change]
) -> tuple[str, array[int], array[int]]:
    """``text`` with ``changes`` (in order, none overlapping) made, and where each of its
    characters comes from: a kept one from where it did, a changed one's from all its span's."""
    pieces: list[str] = []
    to_starts, to_ends, end = array("q"), array("q"), 0
    for a, b, read in changes:
        pieces += (text[end:a], read)
        to_starts += starts[end:a]
        to_starts += array("q", [starts[a]]) * len(read)
        to_ends += ends[end:a]
        to_ends += array("q", [ends[b - 1]]) * len(read)
        end = b
    if not pieces:
        return text, starts, ends
    to_starts += starts[end:]
    to_ends += ends[end:]
    return "".join(pieces) + text[end:], to_starts, to_ends


def folding(text: str, folded: str) -> Folding | None:
    """``text`` read as ``normalise`` reads it (``folded``), and where each character of the
    reading comes from in ``text``; None where the reading step by step is not ``folded`` (the
    caller then reads the text whole). Linear in the text."""
    read, starts, ends = text, array("q", range(len(text))), array("q", range(1, len(text) + 1))
    for _ in range(3):
        step = read, starts, ends
        if "%" in read:
            step = _changed(*step, _percent_changes(step[0]))
        if "\\" in step[0]:
            step = _changed(*step, _json_changes(step[0]))
        if "&" in step[0]:
            step = _changed(*step, _html_changes(step[0]))
        if step[0] == read:
            break
        read, starts, ends = step
    if not unicodedata.is_normalized("NFKC", read):
        read, starts, ends = _changed(read, starts, ends, _nfkc_changes(read))
    read, starts, ends = _changed(read, starts, ends, ((m.start(), m.end(), "") for m in _DROPPED.finditer(read)))
    read = read.translate(_FOLD)
    return Folding(text, read, starts, ends) if read == folded else None


@final
@dataclass(frozen=True)
class Folding:
    """A text (``raw``) as ``normalise`` reads it (``text``), where each of its characters comes
    from in ``raw`` (``starts``, ``ends``: that of the escape, or the run of characters, it was
    read from), and the spans of ``raw`` written otherwise (``edits``, in order: ``written``)."""

    raw: str
    text: str
    starts: array[int]
    ends: array[int]
    edits: tuple[tuple[int, int, str], ...] = ()

    def extents(self, spans: Iterable[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
        """Each of ``spans`` (of ``text``, in order; an empty one is none) as a span of ``text`` and one of
        ``raw`` (``a``, ``b``, ``raw_a``, ``raw_b``), grown to every character read from the
        characters of ``raw`` it was read from (an escape half in it, all of its reading), those
        that overlap then merged."""
        found: list[tuple[int, int, int, int]] = []
        for a, b in spans:
            if a >= b:
                continue
            raw_a, raw_b = self.starts[a], self.ends[b - 1]
            while True:  # (the characters read from any of raw_a-raw_b)
                a, b = bisect.bisect_right(self.ends, raw_a), bisect.bisect_left(self.starts, raw_b)
                if (self.starts[a], self.ends[b - 1]) == (raw_a, raw_b):
                    break
                raw_a, raw_b = min(raw_a, self.starts[a]), max(raw_b, self.ends[b - 1])
            if found and (a < found[-1][1] or raw_a < found[-1][3]):
                a, raw_a = found[-1][0], found.pop()[2]
            found.append((a, b, raw_a, raw_b))
        return found

    def replaced(self, spans: Iterable[tuple[int, int]], by: Callable[[str], str]) -> Folding:
        """This text with each of ``spans`` (``extents``) as ``by`` of its text, in ``text`` and
        in ``raw`` alike (each character of it read from all of its span of ``raw``)."""
        made = [(a, b, raw_a, raw_b, by(self.text[a:b])) for a, b, raw_a, raw_b in self.extents(spans)]
        if not made:
            return self
        text, starts, ends = _changed(self.text, self.starts, self.ends, ((a, b, out) for a, b, _, _, out in made))
        edits = [(raw_a, raw_b, out) for _, _, raw_a, raw_b, out in made]
        i = 0
        for edit in self.edits:  # (an earlier one inside one of these is gone: one is inside the other, or apart)
            while i < len(made) and made[i][3] <= edit[0]:
                i += 1
            if i == len(made) or not made[i][2] <= edit[0] < edit[1] <= made[i][3]:
                edits.append(edit)
        return Folding(self.raw, text, starts, ends, tuple(sorted(edits)))

    def written(self) -> str:
        """``raw`` with its ``edits`` made."""
        pieces: list[str] = []
        end = 0
        for raw_a, raw_b, out in self.edits:
            pieces += (self.raw[end:raw_a], out)
            end = raw_b
        return "".join(pieces) + self.raw[end:]


# A terminal's control sequence (ECMA-48's CSI: ESC and "[", or the one byte 0x9B; parameter
# bytes 0x30-0x3F, intermediate bytes 0x20-0x2F, then its final byte 0x40-0x7E), its introducer
# raw or written escaped ("\\x1b[", "\\033[", "\\u001b[", "\\e[", "\\x9b"): a reader never sees
# it. Each run possessive, starting only at an introducer: linear in the text.
# Any other escape sequence (ECMA-35: ESC, intermediate bytes 0x20-0x2F, a final byte; a
# character set's choice "\x1b(B", which ``tput sgr0`` writes, a DCS's or an OSC's introducer
# "\x1bP", "\x1b]" and its end "\x1b\\"), its ESC raw or written escaped: its final byte too
# ends the word before it. Without intermediates, a final byte of a digit only where one is a
# sequence ("\x1b7", "\x1b8": a cursor's save and restore), so "\x1b4155552671" keeps its digits.
_CSI = re.compile(
    r"(?P<s>(?:(?:\x1b|\\(?:x1[bB]|033|u001[bB]|e))\[|\x9b|\\(?:x9[bB]|u009[bB]))[0-?]*+[ -/]*+)[@-~]"
    r"|(?:(?:\x1b|\\(?:x1[bB]|033|u001[bB]))(?:[ -/]++(?=[0-~])|(?=[78=>@-~])))."
)


def as_seen(text: str) -> str:
    """``text`` as a reader sees it, character for character: a tab as a space (a phone number,
    a spelt address apart by tabs is the one it shows), each control sequence's final byte (a
    letter most often: "\\x1b[2K") as ESC, which ends the word before it (a value right after
    the sequence is read as the value it shows, "\\x1b[2K4155552671", a key as its key). Its
    length and every other character kept, so that a span of it is the same span of ``text``
    (the text as it came is written, its tabs and sequences whole)."""
    if "\t" in text:
        text = text.replace("\t", " ")
    if "\x1b" not in text and "\\" not in text and "\x9b" not in text:
        return text
    return _CSI.sub(lambda m: m.group(0)[:-1] + "\x1b", text)


def shown(text: str) -> tuple[str, list[int]] | None:
    """``text`` as a terminal shows it, its control sequences left out and a tab as a space (a
    key and its value with a sequence between them, "\\x1b[1mpassword:\\x1b[0m hunter2", read as
    "password: hunter2"), and where each of its characters, and its end, is in ``text``; None
    where ``text`` holds no sequence. Linear in the text."""
    if "\x1b" not in text and "\\" not in text and "\x9b" not in text:
        return None
    pieces: list[str] = []
    where: list[int] = []
    end = 0
    for m in _CSI.finditer(text):
        pieces.append(text[end : m.start()])
        where += range(end, m.start())
        end = m.end()
    if not pieces:
        return None
    pieces.append(text[end:])
    where += range(end, len(text) + 1)
    return "".join(pieces).replace("\t", " "), where


def shown_back(where: list[int], a: int, b: int) -> tuple[int, int]:
    """The span of the text that a span ``a``-``b`` (not empty) of its ``shown`` view is, the
    sequences inside it too."""
    return where[a], where[b - 1] + 1


_FOUR_DIGITS = re.compile(r"[0-9]{4}")


def holds_value(text: str, where: list[int], a: int, b: int) -> bool:
    """Whether the span ``a``-``b`` of ``text`` holds a value: a character of its ``shown`` view
    (``where`` its characters are), or four digits in a row that a sequence's parameters hide from
    a terminal ("call \x1b[4155552671m now": still in the log file). A span of sequences alone,
    "\x1b[0m", "\x1b[38;5;196m", holds none."""
    i = bisect.bisect_left(where, a, 0, len(where) - 1)
    return (i < len(where) - 1 and where[i] < b) or _FOUR_DIGITS.search(text, a, b) is not None
