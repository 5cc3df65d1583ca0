"""Text as a person reads it: escapes decoded, every script's digits in ASCII, invisible
characters dropped. The masking and the credential finder read text so, so that a value written
in another form (``alice%40example.com``, full-width digits, ``pass\u200bword``) is found."""

from __future__ import annotations

import bisect
import html
import re
import unicodedata
import urllib.parse
from collections.abc import Callable

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
    """The character of a "\\u" escape; a lone surrogate stays escaped, a quote and a backslash
    are written escaped as JSON writes them (the text written normalised, a value found, holds
    JSON still; ``escape_controls`` for the control characters)."""
    code = int(m.group(2), 16)
    if 0xD800 <= code <= 0xDFFF:
        return m.group(0)
    return m.group(1) + ("\\" if code in (0x22, 0x5C) else "") + chr(code)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str, came: str) -> str:
    """``text`` (``came`` normalised, its values masked) with each control character that
    ``came`` did not hold raw as a JSON "\\u" escape again: a JSON line's "\\u001b[31m",
    "\\u000a" decoded to be read was a raw ESC or line end in its string when written
    normalised, the line no JSON."""
    if not _CONTROL.search(text):
        return text
    raw = set(_CONTROL.findall(came))
    return _CONTROL.sub(lambda m: m.group(0) if m.group(0) in raw else f"\\u{ord(m.group(0)):04x}", text)


def normalise(text: str) -> str:
    """The text as a reader would see it: percent-encoding, JSON \\u and HTML character escapes
    decoded (twice-encoded too, three rounds at most), NFKC, every digit and dash in ASCII,
    invisible format characters dropped. Linear in the text (NFKC expands a character 18-fold at most)."""
    for _ in range(3):
        decoded = _decoded(text)
        if decoded == text:
            break
        text = decoded
    return unicodedata.normalize("NFKC", text).translate(_FOLD)


def _decoded(text: str) -> str:
    return html.unescape(_JSON_ESCAPE.sub(_unescape_json, urllib.parse.unquote(text, errors="replace")))


# A quote's or a backslash's encoding of a URL or of HTML ("%22", "&quot;", "&#92;"): read
# decoded and, where the text is written normalised, written encoded (decoded in a JSON string, a
# quote ended the string and a backslash escaped what followed: the JSON line was broken). Each
# is held by a private-use character while the rest is decoded, one of the same length as the
# character it is read as: a span read is the same span written.
_ENCODED_QUOTE = re.compile(
    r"(%22)|(%5[cC])|(&(?:quot|QUOT);?|&#0*34(?:;|(?![0-9]))|&#[xX]0*22(?:;|(?![0-9A-Fa-f])))"
    r"|(&bsol;|&#0*92(?:;|(?![0-9]))|&#[xX]0*5[cC](?:;|(?![0-9A-Fa-f])))"
)
_HOLDERS = "\ue000\ue001\ue002\ue003"  # (by the group of ``_ENCODED_QUOTE`` it holds)
_READ_HELD = str.maketrans(dict(zip(_HOLDERS, '"\\"\\', strict=True)))
_WRITE_HELD = str.maketrans(dict(zip(_HOLDERS, ("%22", "%5C", "&quot;", "&#92;"), strict=True)))


def _held_quotes(text: str) -> tuple[str, str] | None:
    """``text`` normalised as it is read (its encoded quotes and backslashes decoded too) and as
    it is written (each of them held: ``_WRITE_HELD`` writes it encoded), of the same length;
    None where it holds none (twice-encoded too: "%2522"), or holds a holder (none could be told
    apart)."""
    if ("%" not in text and "&" not in text) or any(h in text for h in _HOLDERS):
        return None
    held = 0
    for _ in range(3):
        text, count = _ENCODED_QUOTE.subn(lambda m: _HOLDERS[(m.lastindex or 1) - 1], text)
        decoded = _decoded(text)
        held += count
        if sum(map(decoded.count, _HOLDERS)) != held:  # (one decoded from an escape)
            return None
        if decoded == text:
            break
        text = decoded
    if not held:
        return None
    written = unicodedata.normalize("NFKC", text).translate(_FOLD)
    return written.translate(_READ_HELD), written


def write_normalised(
    came: str, folded: str, mask: Callable[[str, str], str], finds: Callable[[str], bool] | None = None
) -> str:
    """``came`` (``folded``: it normalised, where a value is found) written normalised, its values
    masked (``mask``: the text as read and as written, of one length, to the text written with
    the spans of its values masked): its encoded quotes and backslashes written encoded where
    that, read normalised, is ``folded`` masked and, read as it is, holds no value ``finds``
    finds, where given (scrubbed again, it stays as it is); else as ``folded`` writes them. Each control
    character it did not hold raw escaped again (``escape_controls``). Known limit: an encoded
    quote or backslash two JSON strings deep or more, decoded beside the escape that ends its
    string, reads that string's end as a value's character (the line may break, as where it
    is written decoded)."""
    masked = mask(folded, folded)
    if (held := _held_quotes(came)) is not None:
        kept = mask(*held).translate(_WRITE_HELD)
        if normalise(kept) == masked and not (finds and finds(kept)):
            masked = kept
    return escape_controls(masked, came)


# A terminal's control sequence (ECMA-48's CSI: ESC and "[", or the one byte 0x9B; parameter
# bytes 0x30-0x3F, intermediate bytes 0x20-0x2F, then its final byte 0x40-0x7E), its introducer
# raw or written escaped ("\\x1b[", "\\033[", "\\u001b[", "\\e[", "\\x9b"): a reader never sees
# it. Each run possessive, starting only at an introducer: linear in the text. An escaped
# introducer with its whole run of backslashes (up to 16; one more each string deeper: a JSON line's
# "\\u001b[33m" in another's string is "\\\\u001b[33m"), never from inside one: a sequence's
# span after a backslash of its run split the escape (the arrow between two, after a backslash,
# was no arrow: the new value was left in clear).
# Any other escape sequence (ECMA-35: ESC, intermediate bytes 0x20-0x2F, a final byte; a
# character set's choice "\x1b(B", which ``tput sgr0`` writes, a DCS's or an OSC's introducer
# "\x1bP", "\x1b]" and its end "\x1b\\"), its ESC raw or written escaped: its final byte too
# ends the word before it. Without intermediates, a final byte of a digit only where one is a
# sequence ("\x1b7", "\x1b8": a cursor's save and restore), so "\x1b4155552671" keeps its digits.
_ESCAPED = r"(?<!\\)\\{1,16}+"
_CSI = re.compile(
    rf"(?P<s>(?:(?:\x1b|{_ESCAPED}(?:x1[bB]|033|u001[bB]|e))\[|\x9b|{_ESCAPED}(?:x9[bB]|u009[bB]))[0-?]*+[ -/]*+)[@-~]"
    rf"|(?:(?:\x1b|{_ESCAPED}(?:x1[bB]|033|u001[bB]))(?:[ -/]++(?=[0-~])|(?=[78=>@-~])))."
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
