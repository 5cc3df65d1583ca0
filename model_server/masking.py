"""Masking of sensitive values before anything reaches the shadow log.

Every detector costs time linear in the text (each starts only at a boundary and every
repetition is bounded), so no header value can hold the server.

Detectors find national ID numbers (18-digit PRC resident IDs), phone numbers (international,
NANP, PRC and India mobiles, national formats with a trunk 0), e-mail addresses (also with
"at" and "dot" spelt out), bank card numbers and US SSNs in free text, each as a whole (never
digits cut out of a longer number or word, so hex ids stay intact), and the value after a key
that names it (``passport_no=E1234567``); configured header names, and fields named for an
identity number (``X-Meta-Passport``), are masked whole. Credentials (a URL's password, tokens,
keyed secrets) are found by ``model_server.credentials``, as the Slack reports find them.
Each value becomes a token ``tok_<kid>_<payload>``: AES-GCM-SIV (RFC 8452, the
nonce-misuse-resistant AES-GCM) under the tenant's key, deterministic so that equal values
give equal tokens (joins and counts still work) without revealing the value. Tokens contain
no digits and no ``@``, so no detector ever matches a token.

Keys come from a JSON key file, ``{"default": "<base64 32 bytes>", "tenants": {"<tenant>":
"<base64>"}}``; a tenant not listed uses the default key. A key that cannot be loaded raises
``MaskingUnavailable``: the caller drops the record, never writes plaintext.

Reveal a token (an auditor holding the key file): ``python -m model_server.masking reveal
--keys FILE TOKEN ...``
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import re2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from model_server import credentials
from model_server.credentials import (
    BLANK,
    BRACKETED,
    CLOSED_BRACKETED,
    DATE_OR_TIME,
    KEY_QUOTE,
    LIST_MARK,
    NO_VALUE,
    NOT_ESCAPE_LETTER,
    NOT_MASKED,
    OPEN_QUOTE,
    PLACEHOLDER,
    SECRET_KEY,
    VALUE_ESCAPE,
    after_boundary,
    quoted,
)
from model_server.errors import MaskingUnavailable, json_refusal
from model_server.reading import as_seen, holds_value, normalise, shown, shown_back, write_normalised

log = logging.getLogger(__name__)

# A value's start: after no letter or digit, or after an escaped line end ("\\n5552344567"), a
# byte written escaped ("b'\\x0b4155552671'") or a terminal's colour code ("\x1b[31m4155552671",
# its escape character raw or written escaped), whose last hex digit or "m" is no piece of it.
# (Any control sequence after its introducer, raw or escaped, ends a word where the detectors read
# it: ``as_seen``; this reads a colour code whose escape character was dropped too.)
_COLOUR_END = "|".join(rf"(?<=\[[0-9;]{{{n}}}m)" for n in range(17))
_NOT_ALNUM_BEFORE = rf"(?:{after_boundary('0-9A-Za-z')}|(?<=\\x[0-9A-Fa-f]{{2}})|(?<=m)(?:{_COLOUR_END}))"
_NOT_ALNUM_AFTER = r"(?![0-9A-Za-z])"
_SEP = "[ ./_-]"  # a separator between digit groups: space, dot, slash, underscore or hyphen
# Letters beyond ASCII, of every script (RFC 6531 addresses: josé@, иван@, 张三@, たなか@, محمد@):
# all but the blocks of spaces, punctuation and symbols, which end an address. A script written
# without spaces between words has an address's neighbouring words masked with it, never left.
_LETTERS = (
    "\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u1fff\u2c00-\u2dff\u2e80-\u2fff\u3040-\ud7ff"
    "\uf900-\ufdff\ufe70-\ufefe\uff10-\uffef\U00010000-\U0010ffff"
)
_LOCAL = f"[A-Za-z0-9._%+{_LETTERS}-]"  # an e-mail address's local part
# Where an address starts: after no character of its local part, or after a line end or tab
# written escaped ("\\nli.wei@example.com"), never at the escape's letter (the token took the
# "n" of "\\n" with the address, and the line end was gone from the log).
_LOCAL_START = NOT_ESCAPE_LETTER + after_boundary(_LOCAL[1:-1])
# An address's start: there, or at an even run of backslashes before such a letter, which is a
# backslash written escaped ("CORP\\\\nancy@example.com": its "n" the address's) or, one JSON
# string deeper, an escape ('\\\\n' in json.dumps twice): masked with the address, the run whole,
# no letter of it is left readable and no escape is cut in half.
_ADDRESS_START = rf"(?:(?<!\\)(?:\\\\){{1,4}}(?=[nrtbf])|{_LOCAL_START})"
# Names that say what their value is: a passport, SSN, national id or licence number looks like
# any other id, so it is masked where a key or field names it ("passport_no=E1234567", a JSON
# field "ssn", a header X-Meta-Passport), never by its shape.
_KEY_NAMES = (
    r"passport|ssn|social[ \t_.-]?security|national[ \t_.-]?(?:id|identity|insurance)|nino|id[ \t_.-]?card"
    r"|identity[ \t_.-]?(?:card|number|no)|resident[ \t_.-]?id|citizen[ \t_.-]?id|aadhaar|tax[ \t_.-]?id"
    r"|driver'?s?[ \t_.-]?licen[cs]e"
)
_KEY_SUFFIX = r"(?:[ _.-]?(?:no|number|num|nr|id)\.?)?"
SENSITIVE_KEY = re.compile(rf"(?i:(?:x-(?:meta-)?)?(?:{_KEY_NAMES}){_KEY_SUFFIX})")  # a whole field name

# Phone before bank card, so that a spaced phone number is masked whole, prefix included.
# A key that names its value, ":" or "=" (and up to 64 blanks each side, a tab, form feed or backspace
# written escaped too, "\\t", "\\f", "\\b", no piece of the value: ``credentials.BLANK``; or blanks,
# "#" or "-", before a value holding a digit, as in "passport number E1234567", up to 64 blanks each; or spaces before a dict or a list closed), then the value, a
# token already there being none, nor a placeholder not in quotes ("passport: none", "n/a", "-":
# ``credentials.NO_VALUE``, as after a secret's key): a dict's or a list's repr, whole, over lines too, as the
# secrets' keyed rule takes one ("passport: {'number': 'E1234567', 'country': 'DE'}"); a quoted
# one to its closing quote, its escapes in it (64 characters at most; the key's and the value's
# quotes may be written escaped, '{"body": "{\\"passport\\": \\"X1234567\\"}"}', its value then
# to the escaped quote, which stays: ``credentials.quoted``), else its characters up to a
# delimiter (space, quote, bracket, , ; & |, an escape's backslash: "\\n", "\\f", "\\b", "\\"", not
# another: "X12\\34567"), ending in a letter or digit of any script, and the pieces after it
# one or two spaces apart that hold a digit or are one or two capitals ("QQ 12 34 56 C"), a
# date or a time never ("ssn: 123456789 2026-12-03": the date is the line's, not the value's).
_VALUE_CHAR = rf"(?:[^\s,;&|\"'`<>()\[\]{{}}\\]|{VALUE_ESCAPE})"
_PIECE = rf"{credentials.NOT_MASKED}{_VALUE_CHAR}{{0,31}}[^\W_]"
_UNQUOTED = rf"{_PIECE}(?:[ ]{{1,2}}(?!{DATE_OR_TIME})(?={_VALUE_CHAR}{{0,31}}[0-9]|[A-Z]{{1,2}}(?!{_VALUE_CHAR})){_PIECE}){{0,7}}"
# A name with more words after the key's (``w``: "ssn_code", "passportValue", "SSNCode",
# "SSN code", "national_id_ts", up to three, each possessive) names an identity number too where
# its value has an id's shape (``_ID_VALUE``: "ssn_code: 123456789", "passport_value: E1234567",
# "ssn_code: 123 456 789"; "passport_count: 2", "ssn_status: active", "ssn_code: n/a" stay), after
# ":", "=", "->" or "=>", or after blanks alone where it is a number (``n``, ``_ID_NUMBER``:
# "ssn_code      123456789"), as a phone's or a card's word wins over a measure's after it
# (``_measure``). The key's word ends at a word's end and each word starts at a separator (up to
# three spaces too) or at a camel-case capital (``_WORD_START``: "idCard_no" has one), or joined
# to a key that starts no common word ("passports", "SSNCODE", "ssnvalue", "nationalidvalue":
# "id_cardinality" and "taxidermy" hold only the letters of "id_card" and "taxid", whose joined
# word starts a name only where it names the id: "taxidvalue", "idcardnumber"; elsewhere a word of
# three letters or more, or of one or two that end the name, a suffix's or a country's: "ssnum",
# "passportuk"; "passportal_build" and "passportal build" are none); a measure's word among them
# ("passport_scan_bytes", "ssn_lookup_latency_us") names no identity number (``_KeyedValues``). One
# or two capitals spaced before a number are the value's first piece, no word of the name
# ("passport AB 1234567": masked whole).
_WORD_START = (
    r"(?:[_.-]|[ ]{1,3}+(?![A-Z]{1,2}[ ]{1,2}[0-9])|(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])"
    r"|(?<=[A-Za-z])(?<![Tt][Aa][Xx][Ii][Dd])(?<![Cc][Aa][Rr][Dd])(?=[A-Za-z]{3}|[A-Za-z]{1,2}+(?![A-Za-z_.-]|[ ]{1,3}+[A-Za-z]))"
    r"|(?:(?<=[Tt][Aa][Xx][Ii][Dd])|(?<=[Cc][Aa][Rr][Dd]))(?=(?i:value|number|num|no|nr)))"
)
_MORE_WORDS = (  # (a plural's "s" too, ``p``, more words after it or not: "SSNs", "taxids", "passports_list")
    rf"(?P<w>(?P<p>(?i:s))(?![a-z])(?:{_WORD_START}[A-Za-z]{{1,32}}+){{0,3}}+|(?:{_WORD_START}[A-Za-z]{{1,32}}+){{1,3}}+)?"
)
# An identity number: six digits or more, a run of them or in groups of up to eight apart by a
# space, a dot or a hyphen ("123 456 789", "912-78-1234", "123.456.789-09"; a date or a time
# after a space is the line's, not the number's); or six letters and digits or more, five of them
# digits (a passport's: "E1234567", "C01X00T47"). Whole: no letter, digit, "_", "-" or a
# fraction's ".5" after it; a fraction alone ("0.98765432", two groups apart by a dot) is none.
_ID_END = r"(?![0-9A-Za-z_-]|\.[0-9])"
_FRACTION = r"[0-9]{1,64}+\.[0-9]{1,64}+(?![ .-][0-9])"
_ID_NUMBER = (
    rf"(?:(?!{DATE_OR_TIME}|{_FRACTION})(?=[0-9](?:[ .-]?[0-9]){{5}})[0-9]{{1,8}}+(?:(?:[.-]|[ ](?!{DATE_OR_TIME}))[0-9]{{1,8}}+){{1,7}}"
    rf"|[0-9]{{6,64}}+){_ID_END}"
)
# A key's name from a camel-case capital too, after its prefix's small letter ("userSsnCode",
# "userPassport": a field's name, as a JSON log line or a repr writes it).
_CAMEL_START = r"(?<=[a-z])(?=[A-Z])"
_UUID = r"[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}(?![0-9A-Za-z_-])"  # (an id, no identity number)
_ID_VALUE = (  # (its letters and digits in up to eight runs joined by hyphens too: "AB-123456")
    rf"(?:{_ID_NUMBER}|(?!{DATE_OR_TIME}|{_UUID})(?=(?:[A-Za-z-]{{0,63}}+[0-9]){{5}})(?=(?:-?[A-Za-z0-9]){{6}})"
    rf"[A-Za-z0-9]{{1,64}}+(?:-[A-Za-z0-9]{{1,64}}+){{0,7}}+{_ID_END})"
)
# One or two capitals spaced before an identity number under a name of more words, its piece
# ("ssn code AB 1234567", "ssn_code: AB 1234567": masked whole); "OK" is a status before it
# (``_STATUS``), no piece ("ssn_lookup: OK 1234567": its number masked, "OK" kept).
_CAPITALS = rf"(?:(?!OK[ ])[A-Z]{{1,2}}[ ]{{1,2}}(?!{DATE_OR_TIME})(?=[0-9]))?"
_STATUS = rf"(?:OK[ ]{{1,2}}(?!{DATE_OR_TIME})(?=[0-9]))?"
# After a key's ":" with nothing else on its line, a YAML value on the next line ("passport:\n
# E1234567", "passport:\n  - E1234567"): one line end, written escaped too (``_BREAK``), and the
# next line's indentation (up to 64 spaces or tabs) or a list item's "-" at its start, where an
# identity number follows them ("passport:\n  country: DE" is a mapping's key, no value), blank
# lines between too (``_BLANK_LINES``: "passport:\n\n  E1234567"); a YAML list's mark and blanks
# before that line end too, its item on the next line ("passport: -\n  E1234567": the mark stays).
_BREAK = r"(?:\r?\n|(?:\\{1,8}r)?\\{1,8}n)"
# Blank lines after a line end, each of blanks only: YAML and JSON allow them inside a list and
# before a value on the next line ("ssn: -\n\n  123456789"), any number of them. Possessive, each
# line's blanks bounded: read once, after one key or list item, never given back (linear).
_BLANK_LINES = rf"(?:{BLANK}{{0,64}}+{_BREAK})*+"
_NEXT_LINE_ID = rf"(?:(?:-{BLANK}{{0,64}}+)?{_BREAK}{_BLANK_LINES}(?:[ \t]{{1,64}}+|(?=-{BLANK}))(?={LIST_MARK}{_CAPITALS}{_ID_VALUE}))?+"
# (an arrow too: "passport->E1234567", before no name of letters, "_" and "." alone that ends the
# value: "column ssn -> ssn_hash" is a column's, and no identity number is letters alone; a piece
# after such a word, as ``_UNQUOTED`` reads one, makes it the value's: "passport -> DE E1234567",
# "nino -> QQ 12 34 56 C"; a count of up to five digits and a word in small letters after it, what
# it counts, is none: "column ssn -> ssn_hash 3 rows"; a placeholder first in a list, a "," or ";"
# after it, is no name: "ssn -> null, 123456789")
_NEXT_PIECE = rf"[ ]{{1,2}}(?!{DATE_OR_TIME})(?:{_VALUE_CHAR}{{0,31}}[0-9]|[A-Z]{{1,2}}(?!{_VALUE_CHAR}))"
_COUNT_OF = r"[ ]{1,2}[0-9]{1,5}+[ ]{1,2}[a-z]{1,32}+(?![0-9A-Za-z_-])"
_KEY_COLON = (
    rf"{BLANK}{{0,64}}+(?::{BLANK}{{0,64}}+{_NEXT_LINE_ID}|=|(?:->|=>){BLANK}{{0,64}}+"
    rf"(?!(?!{PLACEHOLDER}{BLANK}{{0,64}}+[,;])[A-Za-z_.]{{1,64}}+(?!{_VALUE_CHAR})(?!(?!{_COUNT_OF}){_NEXT_PIECE})))"
    rf"{BLANK}{{0,64}}+{LIST_MARK}"
)
_WORDS_COLON = rf"(?:{BLANK}{{0,64}}+(?:->|=>|=|:{BLANK}{{0,64}}+{_NEXT_LINE_ID}){BLANK}{{0,64}}+{LIST_MARK}|(?P<n>{BLANK}{{1,64}}+))"
# A list's item of no id's shape: up to 64 of a value's characters, whole, none a ":" or "=" (a
# pair after a list, "ssn: 123456789, status: ok", ends it; so no key in the list's items is
# passed over: a key's ":" or blanks after it end the item that holds it, the list's last); or a
# placeholder ("(not set)" too, ``credentials.PLACEHOLDER``).
_NO_ID_ITEM = rf"(?:(?:(?![:=]){_VALUE_CHAR}){{1,64}}+|{PLACEHOLDER})(?![:=])"
# A placeholder then an identity number, as a name of more words reads one (``_CAPITALS``,
# ``_ID_VALUE``: "passport: none E1234567", "ssn: null 12345678", "nino: none QQ 12 34 56 C"): the
# placeholder is kept, the value read after it; a placeholder alone, or before a date or a word no
# identity number is (a shape, "224x224" too, a count, a version: "passport: none 3x4", "ssn: null
# 123 rows"), is no value (``credentials.NO_VALUE``: "passport: none", "passport: none 2026-12-05").
_SHAPE = r"[0-9]{1,5}(?:[xX][0-9]{1,5}){1,3}(?![0-9A-Za-z_-])"
_PLACEHOLDER_BEFORE = rf"(?:{PLACEHOLDER}[ ]{{1,2}}+(?!{DATE_OR_TIME}|{_SHAPE})(?={_CAPITALS}{_ID_VALUE}))?+"
# A placeholder in quotes first in a list ('"ssn": "null", "123456789"'): its closing quote, then a
# "," or ";", make it an item of no id, passed over as one not in quotes is ("ssn: null, 123456789"),
# never the key's value.
_NO_QUOTED_ITEM = rf"(?!{PLACEHOLDER}(?(e)(?P=e))(?P=q){BLANK}{{0,64}}+[,;])"
_KEYED = re.compile(
    rf"(?:{_NOT_ALNUM_BEFORE}|{_CAMEL_START})(?i:(?:{_KEY_NAMES}){_KEY_SUFFIX}){_MORE_WORDS}{KEY_QUOTE}"
    rf"(?(w){_WORDS_COLON}|(?:{_KEY_COLON}|(?P<b>{BLANK}{{1,64}}+(?=[{{\[]))"
    rf"|{BLANK}{{1,64}}+(?:[#-]{BLANK}{{0,64}}+)?(?:(?={_VALUE_CHAR}{{3}})(?={_VALUE_CHAR}{{0,31}}[0-9])"
    rf"|(?=[A-Z]{{1,2}}[ ]{{1,2}}(?!{DATE_OR_TIME}){_VALUE_CHAR}{{0,31}}[0-9]))))"
    rf"(?(w)(?:(?(n)(?(p)|(?!)))(?P<l>\[{BLANK}{{0,64}}+(?:{_BREAK}{_BLANK_LINES}{BLANK}{{0,64}}+)?+))?+){OPEN_QUOTE}(?(w){_STATUS})(?:(?(q){_NO_QUOTED_ITEM}|{_PLACEHOLDER_BEFORE}{NO_VALUE})(?P<v>(?(w){_CAPITALS}(?(n){_ID_NUMBER}|{_ID_VALUE})"
    rf"|(?:(?(q){NOT_MASKED}{quoted(64)}|(?(b){CLOSED_BRACKETED}|(?:{BRACKETED}|{_UNQUOTED})))|{_UNQUOTED})))"
    rf"|(?(p)|(?(l)|(?(n)(?!)|(?={PLACEHOLDER}{KEY_QUOTE}{BLANK}{{0,64}}+[,;])))){_NO_ID_ITEM}(?={KEY_QUOTE}{BLANK}{{0,64}}+[,;]))"
)


# A count of counted things as a list's item: plain digits, seven at most, and a noun of a closed
# list of them ("1234567 orders", "42 rows"), whole; more digits ("12345678 orders"), digits with
# separators (an SSN's, an EIN's, a CPF's: "123-456-789 rows") or another word ("1234567 from bob")
# make an identity number still.
_COUNTED_NOUNS = (
    "orders|rows|items|requests|records|entries|lines|files|users|accounts|customers|results|matches|events"
    "|documents|messages|calls|errors|retries|attempts|hits|misses|pages|batches|jobs|tasks|times"
)
_COUNTED = rf"[0-9]{{1,7}}+[ ]{{1,2}}(?:{_COUNTED_NOUNS})(?![0-9A-Za-z_-])"


# A list after a key (a plural's, ``p``: "ssns: [123456789, 987654321]", "PASSPORTS=E1234567,X7654321";
# in brackets under any name of more words, ``w``, after its ":", "=" or arrow: "ssn_list: [123456789]";
# a line end and its indentation after the "[" too, as JSON pretty-printed writes one: '"ssns": [\n  "1..."';
# a singular's too: "ssn: 123456789, 987654321"): after its first item, each next one after ","
# or ";" and blanks, in quotes or not, escaped too (``KEY_QUOTE``: '[\\"123456789\\", \\"987654321\\"]'
# in JSON held in a JSON string, at any depth); an item of an id's shape is its value, another ("n/a",
# "null", ``_NO_ID_ITEM``, a plural's first item too, or one in brackets: "ssns: [none, 123456789]",
# "ssn_list: [n/a, 123456789]"; a placeholder under a name of more words or a singular's after its
# ":", "=" or arrow: "ssn_list: n/a, 123456789", "ssn: (not set), 123456789", no other word under a
# name of more words: "ssn_status: ok, 1234567 rows") is passed over, as many as there are, each bounded (one scan of the list). An item of an id's shape is one
# after blanks alone too ("ssns: 123456789 987654321"), or on the next line as a YAML list's
# ("ssns:\n  - 123456789\n  - 987654321", blank lines between too: ``_BLANK_LINES``); a word there
# ends the list (prose after a value). A count
# of counted things (``_COUNTED``: "ssn: 123456789, 1234567 orders") is an item of no id. In a
# list opened by "[" (``l``), an item after its separator is one on the next line too, one line end
# and its indentation, each bounded as the blanks are ("passports: [E1234567,\n  X7654321]"), and a
# separator is one there too, its comma leading ("passports: [E1234567\n, X7654321]"): every
# item up to the closing bracket; a list not in brackets ends at its line's end.
def _list_item(bracketed: bool) -> re.Pattern[str]:
    over_line = rf"(?:{_BREAK}{_BLANK_LINES}{BLANK}{{0,64}}+)?+" if bracketed else ""
    return re.compile(
        rf"{KEY_QUOTE}(?:{BLANK}{{0,64}}+{over_line}[,;]{BLANK}{{0,64}}+{over_line}{KEY_QUOTE}"
        rf"|(?:{BLANK}{{1,64}}+|{BLANK}{{0,64}}+{_BREAK}{_BLANK_LINES}[ \t]{{0,64}}+-{BLANK}{{1,64}}+){KEY_QUOTE}(?={_CAPITALS}{_ID_VALUE}))"
        rf"(?:{_COUNTED}|(?P<v>{_CAPITALS}{_ID_VALUE})|{_NO_ID_ITEM})"
    )


_LIST_ITEM, _BRACKETED_ITEM = _list_item(bracketed=False), _list_item(bracketed=True)
# An address with "@" spelt "(at)", "[at]", "{at}" or "<at>" and its dots "." or spelt alike;
# or with both spelt as words ("li.wei at example dot com"), and then only before a common
# top-level domain: "look at this dot product" is a sentence. Up to three spaces around each
# spelt word ("jane  at  example  dot  com"; a tab reads as a space: ``as_seen``), or a line end
# with up to 64 spaces before it and the indentation of the line it wraps onto after it, up to
# 64 spaces, tabs or tabs written escaped (a message wrapped: "jane at\n    example dot com"), one
# written escaped too (``_BREAK``: "jane at\\nexample dot com" in a JSON string or a repr). The
# indentation is read possessively: no spelt word or label starts with a blank.
_GAP = rf"(?:[ ]{{1,3}}|[ ]{{0,64}}+{_BREAK}(?:[ ]|\\{{1,8}}t){{0,64}}+)"
# Around a bracketed "(at)" or "(dot)": up to three spaces, or a line end as ``_GAP`` reads one.
_NEAR = rf"(?:[ ]{{0,3}}+(?![ ]|{_BREAK})|{_GAP})"
_AT, _DOT = r"[(\[{<](?i:at)[)\]}>]", rf"(?:\.|{_NEAR}[(\[{{<](?i:dot)[)\]}}>]{_NEAR})"
# Around a spaced "@": up to 64 spaces (columns aligned: "jane    @ example.com"), a line end and
# its indentation too (``_GAP``), each run possessive.
_AT_GAP = rf"(?:[ ]{{0,64}}+(?:{_BREAK}(?:[ ]|\\{{1,8}}t){{0,64}}+)?)"
_TLDS = (
    "com|net|org|edu|gov|mil|info|biz|io|co|us|me|ai|dev|app|cloud|eu|uk|de|fr|it|pl|se|no|jp|cn|in|ru|br|au|es"
    "|nl|ch|kr|tw|hk|sg|ca"
)
# The first label after a spelt "at" is no article: "look at the dot com boom" is a sentence; nor
# an article or a demonstrative before a top-level domain that is an English word too ("in", "it",
# "no", "me", "us"): "look at each dot in the grid", "look at this dot it drew" are sentences.
# Before another domain such a word is a label ("info at each dot com" is an address).
_WORD_TLDS = "in|it|no|me|us"
_NOT_PROSE_LABEL = (
    r"(?!(?i:the)(?![A-Za-z0-9-]))"
    rf"(?!(?i:this|that|these|those|an?|each|every){_GAP}(?i:dot){_GAP}(?i:{_WORD_TLDS})(?![A-Za-z0-9-]))"
)
# Nor is a spelt "at" after a verb of looking or aiming, before an article or a demonstrative, an
# address's under any domain: "look at this dot com boom", "aim at that dot org" are sentences;
# after a name such a word is a label ("jane at this dot io", "info at each dot com").
_LOOK_VERB = (
    r"(?i:(?:look|aim|point|peek|peer|click|laugh|glare)(?:s|ed|ing)?"
    r"|(?:stare|glance|gaze|smile|wave)[sd]?|(?:star|glanc|gaz|smil|wav)ing|nod(?:s|ded|ding)?)"
)
# Where such a verb starts a field's value it is a local part, and the word after "at" a label,
# "the" too ("mail: look at this dot io", "to: stare at the dot org"; ``f``): after the key of an
# address (mail, e-mail, contact, to, from, cc, bcc, reply-to, ``_ADDRESS_KEYS``; "user_email",
# "X-Original-To" too), up to 2 quotes or blanks, its ":" or "=" and up to 8 quotes, blanks or a
# list's "[" ('"email": "look at ...', "to: [jane at the dot org, ..."). A fixed look behind each,
# guarded by the separator's place: read only where the prose is, at a cost bounded there
# (``_NOT_PROSE_AT`` atomic: never tried again at a start the rest of the pattern refused).
_ADDRESS_KEYS = ("to", "cc", "bcc", "mail", "from", "email", "contact")
_VALUE_QUOTES = r"[\\\"' \t]"
_VALUE_OPEN = r"[\\\"' \t\[]"  # (after the ":" or "=", a list's "[" too: "to: [jane at the dot org, ...]")
_AFTER_ADDRESS_KEY = "|".join(
    rf"(?<=[:=]{_VALUE_OPEN}{{{after}}})(?:"
    + "|".join(
        rf"(?<=(?<![A-Za-z0-9])(?i:{'|'.join(k for k in _ADDRESS_KEYS if len(k) == width)})"
        rf"{_VALUE_QUOTES}{{{before}}}[:=]{_VALUE_OPEN}{{{after}}})"
        for width in sorted({len(k) for k in _ADDRESS_KEYS})
        for before in range(3)
    )
    + ")"
    for after in range(9)
)
# So is "the" after a spelt "at" where the local part starts such a value ("mail: jane at the dot
# org"; ``_AT_THE``), as after such a verb; in prose it stays a sentence ("jane at the dot org").
_LOOK_PROSE = rf"{_LOOK_VERB}{_GAP}(?i:at){_GAP}(?i:the|this|that|these|those|an?|each|every){_GAP}(?i:dot){_GAP}"
_AT_THE = rf"{_LOCAL}{{1,64}}+{_GAP}(?i:at){_GAP}(?i:the)(?![A-Za-z0-9-])"
_NOT_PROSE_AT = rf"(?>(?:(?={_LOOK_PROSE})|(?={_AT_THE}))(?:{_AFTER_ADDRESS_KEY})(?P<f>)|(?!{_LOOK_PROSE}))"


def _spelt_email(start: str) -> re.Pattern[str]:
    """A spelt address, its local part after ``start`` (where it sets ``f``: a field's value)."""
    return re.compile(
        rf"{_ADDRESS_START}{start}{_LOCAL}{{1,64}}"
        rf"(?:{_NEAR}{_AT}{_NEAR}[A-Za-z0-9-]{{1,63}}(?:{_DOT}[A-Za-z0-9-]{{1,63}}){{0,7}}{_DOT}[A-Za-z]{{2,63}}"
        rf"|{_GAP}(?i:at){_GAP}(?(f)|{_NOT_PROSE_LABEL})[A-Za-z0-9-]{{1,63}}(?:{_GAP}(?i:dot){_GAP}[A-Za-z0-9-]{{1,63}}){{0,7}}"
        rf"{_GAP}(?i:dot){_GAP}(?i:{_TLDS})(?:\.[A-Za-z0-9-]{{1,63}}){{0,7}}+)"  # (its last labels dotted too: "co.uk")
        r"(?![A-Za-z0-9-])"
    )


_SPELT_EMAIL = _spelt_email(_NOT_PROSE_AT)
# A list of spelt addresses as a field's value ("to: jane at the dot org, bob at the dot com"):
# after an address that starts the value of an address's key (``_AFTER_ADDRESS_KEY``), or such an
# item, an item after a "," or ";" (up to 64 blanks around it, quotes, a line end and its
# indentation after it), or on the next line indented, is read as the first is (``_SPELT_ITEM``:
# a field's value, "the" and a looking verb there an address's); up to eight closing brackets
# before the separator and eight opening ones after it, a list's nested in the field's ("to: [jane
# at example dot org, [bob at the dot com]]" left bob's in clear). Each separator bounded, each
# item read once after its separator (linear).
_IN_ADDRESS_FIELD = re.compile(f"(?:{_AFTER_ADDRESS_KEY})")
_ITEM_SEP = re.compile(
    rf"{KEY_QUOTE}(?:[ \t]{{0,64}}+\]){{0,8}}+"
    rf"(?:[ \t]{{0,64}}+[,;][ \t]{{0,64}}+(?:{_BREAK}[ \t]{{0,64}}+)?+|[ \t]{{0,64}}+{_BREAK}[ \t]{{1,64}}+)"
    rf"(?:\[[ \t]{{0,64}}+){{0,8}}+{KEY_QUOTE}"
)
_SPELT_ITEM = _spelt_email("(?P<f>)")
# A local part before an "@" with blanks around it: none of what annotates a host in a log line
# with "@" ("GET /v1/models 200 @ api.example.com"): a number of up to five digits (a status, a
# count: a mailbox of digits alone is longer, "2851234567 @ qq.com", a QQ number or a student's),
# one with a unit of one or two letters ("200ms", the "13Z" a time stamp ends in after its ":"), a
# version ("v1.2.3", "1.2.3-rc1"; "v1.jane" is a name), a hash (seven hex digits or more, a letter after a digit:
# "3f9a2c1"), a UUID, a time stamp without separators ("20261205T084013Z"). A name with digits
# ("ada1985"), a word of hex letters ("deadbeef") and a user before a host in a shell prompt are
# still addresses ("[deploy @ build-01.example.com ~]$": it is one without the spaces too). Nor a
# date ("2026-12-05 @ api.example.com"), a time zone's abbreviation after a time ("08:40:13 UTC @";
# "12:30 SCOTT @" is an address), a number of up to seven digits after a word in small letters that
# names a run or a process ("job 123456 @", "build #1234567 @": without such a word "mail 123456 @
# qq.com" is a mailbox, so is "JOB 123456 @ qq.com", "job 2851234567 @ qq.com" (eight digits or
# more, a QQ number's), and "123456@qq.com" whatever the word), and a word that says where something is
# (``_WHERE``: "pinned @ requirements.in", "deployed @ api.example.com"). Each shape is read at
# most 64 characters, possessively, each word before it a fixed look behind: linear in the text.
_RUN_WORDS = ("job", "run", "pid", "task", "build", "batch", "step", "attempt", "request", "worker")
_AFTER_RUN_WORD = "|".join(rf"(?<=(?<![A-Za-z0-9_]){w}{sep})" for w in _RUN_WORDS for sep in (" ", " #", "#"))
_AFTER_TIME = "|".join(rf"(?<=[0-9]:[0-9]{{2}}{frac} )" for frac in ("", r"\.[0-9]{3}", r"\.[0-9]{6}"))
_TIME_ZONES = r"UTC|GMT|UT|Z|[ECMP][SD]T|CES?T|EES?T|WES?T|BST|IST|JST|KST|HKT|SGT|AE[SD]T|NZ[SD]T|MSK"
_WHERE = r"(?i:pinned|deployed|built|tagged|pushed|pulled|hosted|served|running|listening)"
_NOT_A_NAME = (
    rf"(?:{_AFTER_RUN_WORD})[0-9]{{1,7}}+|(?:{_AFTER_TIME})(?:{_TIME_ZONES})|[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}"
    rf"|{_WHERE}|"
    r"[0-9]{1,5}+|[0-9]++(?:[._][0-9]++)*+[A-Za-z]{1,2}+"
    r"|[vV][0-9]++(?:\.[0-9]++)*+(?:[-+][0-9A-Za-z.]++)?+|[0-9]++(?:\.[0-9]++)++(?:[-+][0-9A-Za-z.]++)?+"
    r"|(?=[0-9A-Fa-f]{7})[A-Fa-f]*+[0-9]++[A-Fa-f][0-9A-Fa-f]*+"
    r"|[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"
    r"|[0-9]{8}T[0-9]{4,6}(?:\.[0-9]{1,9})?Z?"
)
_SPACED_LOCAL = rf"(?!(?:{_NOT_A_NAME})(?!{_LOCAL}))"

# Secrets: ``model_server.credentials`` finds them, for the Slack reports too.

# A NANP number's area code and exchange: 2 to 9, then two digits not "11" (N11 are service
# codes), so an id or epoch seconds (2000000000, 123-456-7890) is no US phone number.
_NXX = r"[2-9](?!11)\d{2}"

Span = tuple[int, int]


@dataclass(frozen=True)
class Detector:
    """A pattern, and the values in its matches: a match's group "v" where the pattern has one
    (the key before it stays), else the whole match; only the matches ``accept`` takes, where
    given (a resident ID's date, which a pattern cannot check)."""

    name: str
    pattern: re.Pattern[str]
    accept: Callable[[re.Match[str]], bool] | None = None

    def spans(self, text: str) -> Iterator[Span]:
        """Where the values are in ``text``, in order, none overlapping (read as it is seen:
        ``as_seen``, its tabs as spaces, its control sequences blanked; where it holds any, read
        too as a terminal shows it, ``shown``, without them: "\x1b[1mpassword:\x1b[0m hunter2"; a
        value read as the text came that is only sequences, "\x1b[0m" there, is none)."""
        seen = shown(text)
        if seen is None:
            yield from self._spans(as_seen(text))
        else:
            back = [shown_back(seen[1], a, b) for a, b in self._spans(seen[0])]
            came = [(a, b) for a, b in self._spans(as_seen(text)) if holds_value(text, seen[1], a, b)]
            yield from credentials.merge([*came, *back])

    def _spans(self, view: str) -> Iterator[Span]:
        """Where the values are in ``view`` (the text as it is seen), in order, none overlapping."""
        for m in self.pattern.finditer(view):
            if self.accept is None or self.accept(m):
                span = m.span("v") if "v" in self.pattern.groupindex else m.span()
                if span[0] >= 0:  # (a URL's user information without a password has none)
                    yield span

    def search(self, text: str) -> bool:
        return next(self.spans(text), None) is not None


# The words of a name that make the number under it a measure (a size, a duration, a count), and
# no identity number under a name of more words ("passport_scan_bytes", "ssn_lookup_latency_us",
# "passportOcrLatencyUs"); a unit's abbreviation only after another word of them ("ssn_us" is a
# country's number, "latency_us" microseconds). A name's state ("code", "status") or time ("ts")
# names none: "ssn_code: 123456789" is an identity number. Both sets, and ``_NAME_MEASURE_WORDS`` (a depth, a
# shape, a count of checks or requests, a model's name), are read only in the name itself, joined to
# its identity word by "_", ".", "-" or a camel-case capital ("passport_queue_depth",
# "passports_processed"), never after a space, where a word is prose's as often ("passport shape:
# C01X00T47", "ssn count: 123456789"); words a sentence or a bound may hold ("max", "errors": "passport for Max: C01X00T47",
# "ssn_max: 123456789") are none of them.
_MEASURE_WORDS = frozenset(
    {"secs", "seconds", "bytes", "size", "count", "total", "len", "length", "duration", "latency", "offset"}
)
_NAME_MEASURE_WORDS = frozenset(
    {
        "depth", "shape", "dims", "width", "height", "checks", "processed", "requests", "retries", "attempts",
        "hits", "misses", "calls", "items", "batches", "elapsed", "timeout", "model",
    }
)  # fmt: skip
_MEASURE_UNITS = frozenset({"ms", "us", "ns", "s", "sec"})
_NAME_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")  # (camel case: "OCRLatencyUs" is OCR, Latency, Us)
# The words after a measure's that name an identity number again ("ssn_processed_value",
# "passport_model_number"), and a measure's values: a number or a shape ("1 3 224 224", "3x224x224",
# "0.5"), or under "model" a model's name, a word, a version and more ("resnet50-v2-1234567").
_ID_WORDS = frozenset({"value", "id", "no", "number", "num", "nr", "code"})
_MEASURE_VALUE = re.compile(r"[0-9][0-9 .xX]{0,512}")
_MODEL_NAME = re.compile(r"[A-Za-z]{3,32}[0-9]{0,8}-[vV][0-9]{1,8}(?:[.-][A-Za-z0-9]{1,32}){0,8}")


def _names_measure(words: str, value: str | None) -> bool:
    """Whether the words after a name's identity word (``_MORE_WORDS``) name a measure of
    ``value``: their last word of ``_MEASURE_WORDS`` or ``_NAME_MEASURE_WORDS`` (a unit's only after
    another word), read only in the name itself (before any space: "ssn count" is prose's as often),
    no id's word after it (``_ID_WORDS``), over a number or a shape (``_MEASURE_VALUE``), a model's
    name under "model" (``_MODEL_NAME``); an id of letters and digits ("C01X00T47") is none. Without
    a value (a list's first item of no id: "ssn_count: [n/a, 123456789]") the name alone says."""
    found = [w.lower() for w in _NAME_WORD.findall(words.partition(" ")[0])]
    last = max(
        (
            k
            for k, w in enumerate(found)
            if w in _MEASURE_WORDS or w in _NAME_MEASURE_WORDS or (k and w in _MEASURE_UNITS)
        ),
        default=None,
    )
    if last is None or any(w in _ID_WORDS for w in found[last + 1 :]):
        return False
    if value is None:  # (a list's first item of no id: the name alone says)
        return True
    return _MEASURE_VALUE.fullmatch(value) is not None or (
        found[last] == "model" and _MODEL_NAME.fullmatch(value) is not None
    )


class _KeyedValues(Detector):
    """The values after a key that names them (``_KEYED``), none under a name whose words after
    the identity word name a measure (``_names_measure``). Such a match is no value, and the
    search goes on from the character after its start, not its end: a key among its words
    ("ssn_count_passport_no: 123456") is read. The next items of a list after the value
    (``_LIST_ITEM``) are values too. Linear: a start is tried once, each try bounded."""

    def _spans(self, view: str) -> Iterator[Span]:
        at = 0
        while (m := self.pattern.search(view, at)) is not None:
            if m.group("w") is not None and _names_measure(m.group("w"), m.group("v")):
                at = m.start() + 1
                continue
            at = m.end()
            if m.start("v") >= 0:  # (a plural's list's first item may be no id: "ssns: [none, 123456789]")
                yield m.span("v")
            pos, last = at, None  # (a list's other items, read once; over lines in brackets)
            items = _LIST_ITEM if m.start("l") < 0 else _BRACKETED_ITEM
            while (item := items.match(view, pos)) is not None:
                last, pos = item, item.end()
                if item.group("v") is not None:
                    yield item.span("v")
            if last is not None:  # (on after its last id, or from its last item, which may hold a key)
                at = pos if last.group("v") is not None else last.start()


class _SpeltAddresses(Detector):
    """The spelt addresses (``_SPELT_EMAIL``), and the items of a list of them as a field's value
    after the first (``_SPELT_ITEM``). Linear: each address and item read once."""

    def _spans(self, view: str) -> Iterator[Span]:
        at = 0
        while (m := self.pattern.search(view, at)) is not None:
            yield m.span()
            at = m.end()
            if m.group("f") is None and _IN_ADDRESS_FIELD.match(view, m.start()) is None:
                continue
            while (sep := _ITEM_SEP.match(view, at)) is not None and (
                item := _SPELT_ITEM.match(view, sep.end())
            ) is not None:
                yield item.span()
                at = item.end()


_NO_SEP = str.maketrans("", "", " ./_-")
_PRC_ID = re.compile(r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx]")


def _resident_id(m: re.Match[str]) -> bool:
    """A resident ID whose digits are spaced: its X check character marks it, else the date in
    its digits (an 18-digit run of another kind is no ID)."""
    value = m.group(0)
    return value[-1] in "Xx" or _PRC_ID.fullmatch(value.translate(_NO_SEP)) is not None


# A card number: 13 to 19 digits that pass the Luhn checksum (ISO/IEC 7812), written whole or in
# groups apart by one separator (a space, dot, slash, underscore or hyphen, up to two of them),
# the same between all its groups: four digits, then groups of 3 to 7. Its issuer's number (IIN)
# starts it: none starts with 0, one starting with 1 (an airline's UATP card) has 15 digits, one
# starting with 2 is Mastercard's or Mir's (2200 to 2720). Epoch milliseconds, microseconds and
# nanoseconds, times written as digits, float digits (never after a number's point) and most ids
# are no card; ten in a hundred of other numbers pass the checksum by chance.
_CARD_SHAPE = re.compile(  # at each group's start, the groups from there: at most six
    _NOT_ALNUM_BEFORE
    + r"(?<![0-9]\.)(?=(?P<w>[0-9]{13,19}|[0-9]{4}(?P<s>[ ./_-]{1,2})[0-9]{3,7}(?:(?P=s)[0-9]{3,7}){0,4})"
    + _NOT_ALNUM_AFTER
    + ")"
)
_LUHN_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")  # a doubled digit's digit sum


class _CardNumbers(Detector):
    """The card numbers in a text: at each group of digits, the longest run of groups from there
    that is one, then on after it (a card after a timestamp in one run of groups is found).
    Linear: a group starts one look of at most six groups."""

    def _spans(self, view: str) -> Iterator[Span]:
        after = 0
        for m in self.pattern.finditer(view):
            start = m.start()
            if start < after:
                continue
            window, sep = m.group("w"), m.group("s")
            parts = window.split(sep) if sep else [window]
            digits, best = 0, 0
            for k, part in enumerate(parts):
                digits += len(part)
                if digits > 19:
                    break
                if digits >= 13 and _is_card_number("".join(parts[: k + 1])):
                    best = digits + k * len(sep or "")
            if best:
                after = start + best
                yield start, after


def _is_card_number(digits: str) -> bool:
    if not 13 <= len(digits) <= 19 or digits[0] == "0" or (digits[0] == "1" and len(digits) != 15):
        return False
    if digits[0] == "2" and not "2200" <= digits[:4] <= "2720":
        return False
    raw = digits.encode()  # (bytes: their translate and sum run in C)
    return (sum(raw[-1::-2]) + sum(raw[-2::-2].translate(_LUHN_DOUBLED)) - 48 * len(raw)) % 10 == 0


# The keyed one and the spelt e-mail run only on text that holds their words (``_detectors``).
DETECTORS: tuple[Detector, ...] = (
    # Secrets first: a password or token that holds digits is masked whole, no phone cut out of it.
    *(Detector("secret", pattern) for pattern in credentials.PATTERNS),
    _KeyedValues("keyed", _KEYED),
    _SpeltAddresses("email", _SPELT_EMAIL),
    # Starts only where a run of local-part characters starts, every part bounded (RFC 5321:
    # local part 64, labels 63): linear in the text, where the unanchored [...]+@ scanned each
    # run once per start position (160 KB without an @ held the server 27 s). Addresses and
    # domains may hold letters of any script (RFC 6531: josé@example.com, иван@пример.рф). An
    # "@" with up to 64 spaces around it ("jane @ example.com"), a line end and indentation too
    # (``_AT_GAP``), before a common top-level domain only ("weights @ model.onnx", "ping @ 10.0.0.1"
    # are no address).
    Detector(
        "email",
        re.compile(
            rf"{_ADDRESS_START}{NOT_MASKED}(?:{_LOCAL}{{1,64}}@(?:[A-Za-z0-9{_LETTERS}-]{{1,63}}\.){{1,8}}[A-Za-z{_LETTERS}]{{2,63}}"
            rf"|{_SPACED_LOCAL}{_LOCAL}{{1,64}}(?=[ ]|@[ ]|{_BREAK}|@{_BREAK}){_AT_GAP}@{_AT_GAP}(?:[A-Za-z0-9-]{{1,63}}\.){{1,8}}(?i:{_TLDS})(?![A-Za-z0-9-]))"
        ),
    ),
    Detector("national_id", re.compile(_NOT_ALNUM_BEFORE + _PRC_ID.pattern + _NOT_ALNUM_AFTER)),
    # Spaced or hyphenated (6-8-4, 6-4-4-4, 4-4-4-4-2): its X check character or its date marks it.
    Detector(
        "national_id",
        re.compile(_NOT_ALNUM_BEFORE + rf"[1-9](?:{_SEP}{{0,2}}\d){{16}}{_SEP}{{0,2}}[0-9Xx]" + _NOT_ALNUM_AFTER),
        _resident_id,
    ),
    # US SSN, hyphenated: area 000, 666 and 900-999, group 00 and serial 0000 are never issued.
    Detector(
        "ssn",
        re.compile(
            _NOT_ALNUM_BEFORE
            + rf"(?<!\d{_SEP})(?!000|666|9)\d{{3}}-(?!00)\d{{2}}-(?!0000)\d{{4}}(?![ ./_-]?\d)"
            + _NOT_ALNUM_AFTER
        ),
    ),
    # Never the tail of a number written with dots (an IP address, a version: "10.172.16.254 200").
    Detector(
        "phone",
        re.compile(
            _NOT_ALNUM_BEFORE
            + r"(?<![0-9]\.)"
            # PRC mobile: whole, 3-4-4, 4-3-4 or 3-8 (one kind of separator; 3-8 not with a dot,
            # as a float is written), never in other groupings (an IP address: 176.110.216.14)
            + rf"(?:(?:(?:\+|00)86{_SEP}?)?1[3-9](?:\d{{9}}|\d(?P<m>{_SEP})\d{{4}}(?P=m)\d{{4}}"
            + rf"|\d{{2}}(?P<n>{_SEP})\d{{3}}(?P=n)\d{{4}}|\d[ /_-]\d{{8}})"
            + rf"|\+\d{{1,3}}(?:{_SEP}?\(\d{{1,4}}\))?(?:{_SEP}?\d){{6,14}}"  # E.164, "+44 (0)20 ..." too
            + rf"|(?:\+?1{_SEP}?)?(?:\({_NXX}\){_SEP}{{0,2}}|{_NXX}{_SEP}){_NXX}{_SEP}\d{{4}}"  # NANP
            # NANP without separators; not int32's and uint32's limits, nor right after named dims
            # or shape ("dims [5000000000]"), as the server's load errors print them (a phone number
            # in any other list is one)
            + r"|(?<!dims[ =:])(?<!shape[ =:])(?<!dims[ =:]\[)(?<!shape[ =:]\[)(?!2147483647|4294967295)"
            + rf"{_NXX}{_NXX}\d{{4}}"
            + r"|[6-9]\d{4}[ /_-]\d{5})"  # India's mobiles, 5 and 5 (not with a dot, as a float is written)
            + _NOT_ALNUM_AFTER
        ),
    ),
    # National formats (UK, DE, FR, IN, CN, JP): a trunk 0, the area code in parentheses or not,
    # then groups apart by one kind of separator; 10 to 12 digits in all, a run of its own (not
    # the tail of a date, a version or a UUID's digit groups). Its own pattern, which fails at
    # once where no "0" or "(0" starts (as one alternative of the others it doubled their time).
    Detector(
        "phone",
        re.compile(
            rf"(?=\(?0){_NOT_ALNUM_BEFORE}(?<!\d{_SEP})(?<![0-9A-Fa-f]-)"
            + r"(?=\(?(?:[ ./_)-]{0,2}\d){10,12}(?![ ./_-]?\d))"
            + r"(?:\(0\d{1,4}\) ?\d{2,8}(?:[ ./-]\d{2,8}){0,3}"
            + rf"|0\d{{1,5}}(?P<sep>{_SEP})\d{{2,8}}(?:(?P=sep)\d{{2,8}}){{0,4}}|0[1-9]\d{{8,9}})"
            + rf"(?![ ./_-]?\d)(?!-[0-9A-Fa-f]){_NOT_ALNUM_AFTER}"
        ),
    ),
    _CardNumbers("bank_card", _CARD_SHAPE),
)

# What every detector's match contains, in ASCII text: "@" (e-mail), "+" (international
# phone), ten digits at most three separators apart (IDs, phones, cards; three in a NANP
# number's "(555)  123-4567"; a tab reads as a space) or an SSN's nine, 3-2-4 apart by
# hyphens (the one value of fewer digits: nine in a row, in three access-log lines in ten,
# are pieces of their random hex ids), their first digit where a number's detector starts
# (``_NOT_ALNUM_BEFORE``: after no letter or digit, or after an escape's letter; a "(" before
# it is no letter), so never within a hex id (ten digits in a row are in one request id in
# twelve, and in most of the access-log lines they made suspect); or a key that names its
# value; "%", "\\" and "&" start an escape that may decode to one of them, a raw ESC a control
# sequence that may be between a value's characters (``shown``); "at" spelt for an
# e-mail (apart by spaces, tabs or a line end: the detectors read a tab as a space, ``as_seen``); a run of 64 base64
# characters (a private key's body line). Text with none of these,
# all ASCII, comes out of mask_text unchanged. SUSPECT is RE2 too (pyarrow's vectorised prefilter), which scans for its
# parts one by one: as one pattern, the base64 run's 64 counted steps beside the words made RE2's
# automaton so large that a request id took 2 us to scan, 20 times its parts' time.
# (after a control sequence of any kind too: its final byte, "[2K", "[?25h", ``as_seen``; after
# any other escape sequence's, "\x1b(B", "\x1bP")
_NUMBER = (  # (every ID's, phone's, card's, SSN's; RE2 has no lookbehind: the character before is read)
    r"\+|(?:^|[^0-9A-Za-z]|\\[nrtbf]|\\x[0-9A-Fa-f]{2}|(?:\[|\\x9[bB]|\\u009[bB])[0-?]*[ -/]*[@-~]|(?:\x1b|\\x1[bB]|\\033|\\u001[bB])(?:[ -/]+[0-~]|[78=>@-~]))(?:[0-9](?:[ \t./_()\-]{0,3}[0-9]){9}|[0-9]{3}-[0-9]{2}-[0-9]{4})"
)
_SHAPES = rf"[@%\\&\x1b]|{_NUMBER}"
SUSPECT_PARTS = (
    _SHAPES,
    credentials.B64_LINE,
    rf"(?i:{_KEY_NAMES}|[(\[{{<]at[)\]}}>]|[ \t\n]at[ \t\r\n](?s:.*)[ \t\n]dot[ \t\r\n]"
    rf"|{'|'.join(re.escape(h) for h in credentials.HINTS)})",
)
SUSPECT = "|".join(SUSPECT_PARTS)
_NUMBER_RE = re.compile(_NUMBER)
# Every digit as "0", _NUMBER's separators dropped: the digits of a match of it (ten, or an SSN's
# nine) are nine "0"s in a row then, so text without them, nor a "+", is not scanned with it (the
# scan, at every digit of a line of hex ids, was a third of an access-log line's hints).
_DIGITS_JOINED = str.maketrans({**dict.fromkeys("0123456789", "0"), **dict.fromkeys(" \t./_()-")})


def _has_number(text: str) -> bool:
    """Whether ASCII ``text`` holds a match of ``_NUMBER``."""
    return ("+" in text or "000000000" in text.translate(_DIGITS_JOINED)) and _NUMBER_RE.search(text) is not None


def _plain(text: str) -> bool:
    """Whether ``text`` is ASCII without a SUSPECT match: nothing in it, or in any piece of it,
    can be masked."""
    return _hints(text) == _NOTHING


# Whether a text may hold a key of ``_KEY_NAMES``, an "at" ``_SPELT_EMAIL`` takes, the secrets'
# patterns whose words it holds (``credentials.patterns_for``), a shape of ``_SHAPES``, an "@"
# and a number's shape (``_NUMBER``), the last three true of a text beyond ASCII: what each
# detector needs to match it, or its normalised form (an escape) to be read.
_Hints = tuple[bool, bool, tuple[re.Pattern[str], ...], bool, bool, bool]
_NOTHING: _Hints = (False, False, (), False, False, False)


def _hints(text: str) -> _Hints:
    """``text``'s ``_Hints``; a short text's kept (``_short_hints``)."""
    return _short_hints(text) if len(text) <= _SHORT else _text_hints(text)


# The words the hints look for in a text (in lower case): those a key of ``_KEY_NAMES`` holds,
# the spelt "at"s (``_SPELT_EMAIL``'s; " at " needs " dot " too, a line end read as a space:
# ``_spelt_words``), the secrets' (``credentials.HINTS``).
_NAME_WORDS = (
    "passport", "ssn", "security", "national", "nino", "card", "identity", "resident", "citizen", "aadhaar", "tax",
    "licen",
)  # fmt: skip
_SPELT_ATS = ("(at)", "[at]", "{at}", "<at>")
# Whether ASCII text holds any of them: one RE2 scan (a DFA: each character read once), where
# about 50 ``in`` tests, each a pass of its own, took a third of a log line's masking; text
# holding one (few log lines) is then looked at word by word.
_ANY_WORD = re2.compile(
    "|".join(
        [*(re.escape(w) for w in (*_NAME_WORDS, *_SPELT_ATS, *credentials.HINTS)), r"(?:[ \n]|\\[rnt])at[ \r\n\\]"]
    )
)


_ESCAPED_BREAK = re.compile(r"\\{1,8}[rnt]")


def _spelt_words(low: str) -> bool:
    """Whether ``low`` holds " at " and " dot ", a line end read as a space, one written escaped
    too (``_GAP``)."""
    if "\\" in low:
        low = _ESCAPED_BREAK.sub(" ", low)
    if "\n" in low:
        low = low.replace("\r", " ").replace("\n", " ")
    return " at " in low and " dot " in low


def _text_hints(text: str) -> _Hints:
    """``text``'s ``_Hints``, read in it as it came and, where it holds a control sequence, as a
    terminal shows it too (``shown``), as the detectors read it: a number, a key with a
    sequence between its characters ("4155\\x1b[0m552671") is one there."""
    hints = _read_hints(text)
    seen = shown(text)
    if seen is None:
        return hints
    more = _read_hints(seen[0])
    if more == hints:
        return hints
    found = set(hints[2] + more[2])
    return (
        hints[0] or more[0],
        hints[1] or more[1],
        tuple(p for p in credentials.PATTERNS if p in found),
        hints[3] or more[3],
        hints[4] or more[4],
        hints[5] or more[5],
    )


def _read_hints(text: str) -> _Hints:
    """``text``'s ``_Hints`` as it reads: words as substrings, in lower case. Python's re tries a
    case-insensitive alternation at every position (in the prefilter it made a clean line 7
    times as slow), ``in`` runs in C; ``_ANY_WORD`` first, in RE2 (ASCII text: beyond it, a
    character's lower case may be ASCII, and a lone surrogate is no UTF-8 for RE2). A tab
    reads as a space, as the detectors read it (``as_seen``)."""
    if "\t" in text:
        text = text.replace("\t", " ")
    low = credentials.lower(text)
    beyond = not text.isascii()
    words = beyond or _ANY_WORD.search(low) is not None
    key = words and any(w in low for w in _NAME_WORDS)
    spelt = words and (any(w in low for w in _SPELT_ATS) or _spelt_words(low))
    # (``_SHAPES`` is these characters or ``_NUMBER``: one scan of the text, not one for each)
    at, number = beyond or "@" in text, beyond or _has_number(text)
    shaped = at or number or "%" in text or "\\" in text or "&" in text
    return key, spelt, credentials.patterns_for(text, low, words), shaped, at, number


# The hints of the last 4,096 texts of at most 80 characters read, kept: a JSON log line's field
# names and the values it repeats (an access-log line's model, version, path, its input's digest
# from a client that sends one tensor again) are most of its pieces, each masked on its own.
_SHORT = 80
_short_hints = functools.lru_cache(maxsize=4096)(_text_hints)


@functools.cache  # (32 x 2**14 kinds of text at most: each secret's pattern in or out)
def _by_hints(hints: _Hints) -> tuple[Detector, ...]:
    """The detectors that may match a text of these hints: the keyed one, the spelt e-mail and
    each secret's pattern only where their words are in it, the e-mail where an "@" is, the
    others where a number's shape is."""
    key, spelt, secrets, _, at, number = hints
    return tuple(
        d
        for d in DETECTORS
        if (
            d.pattern in secrets
            if d.name == "secret"
            else key
            if d.pattern is _KEYED
            else spelt
            if d.pattern is _SPELT_EMAIL
            else at
            if d.name == "email"
            else number
        )
    )


def _detectors(text: str) -> tuple[Detector, ...]:
    """The detectors that may match ``text``."""
    return _by_hints(_hints(text))


# The charsets a header that is not UTF-8 may be in (it then reaches the masking read as Latin-1,
# its full-width digits and "@" as mojibake no detector reads and any reader decodes back).
_LEGACY_CHARSETS = ("utf-8", "gb18030", "shift_jis", "euc_kr", "big5")


def _finds(text: str) -> bool:
    """Whether a detector finds a value in ``text``."""
    return any(d.search(text) for d in _detectors(text))


def _legacy_readings(text: str) -> list[str]:
    """``text``'s bytes read in each of ``_LEGACY_CHARSETS`` that takes them, normalised, where
    ``text`` is what Latin-1 makes of bytes beyond ASCII (none above U+00FF); else none."""
    if text.isascii() or max(text) > "\xff":
        return []
    raw = text.encode("latin-1")
    readings = []
    for charset in _LEGACY_CHARSETS:
        try:
            readings.append(normalise(raw.decode(charset)))
        except UnicodeDecodeError:
            continue
    return readings


# 32 symbols, no digits: base32 with its six digits swapped for upper-case letters.
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_ALPHABET = "abcdefghijklmnopqrstuvwxyzBCDFGH"
_TO_TOKEN = str.maketrans(_B32, _ALPHABET)
_FROM_TOKEN = str.maketrans(_ALPHABET, _B32)
TOKEN_RE = re.compile(r"tok_([a-zBCDFGH]{8})_([a-zBCDFGH]+)")


def _encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").translate(_TO_TOKEN)


def _decode(text: str) -> bytes:
    b32 = text.translate(_FROM_TOKEN)
    return base64.b32decode(b32 + "=" * (-len(b32) % 8))


def find_sensitive(text: str) -> list[tuple[str, str]]:
    """(detector, value) for every sensitive value in ``text``, or in its normalised form
    (values are then as normalised: ``alice%40example.com`` is found as ``alice@example.com``)."""
    found = [(d.name, text[a:b]) for d in DETECTORS for a, b in d.spans(text)]
    folded = normalise(text)
    if folded != text:
        found += [
            (d.name, folded[a:b]) for d in DETECTORS for a, b in d.spans(folded) if (d.name, folded[a:b]) not in found
        ]
    return found


@dataclass(frozen=True)
class Key:
    kid: str
    aead: AESGCMSIV

    @classmethod
    def from_b64(cls, value: str) -> Key:
        raw = base64.b64decode(value, validate=True)
        if len(raw) != 32:
            raise ValueError(f"a key must be 32 bytes (AES-256), got {len(raw)}")
        return cls(_encode(hashlib.sha256(raw).digest())[:8], AESGCMSIV(raw))


def _nonce(kid: str) -> bytes:
    # A fixed nonce per key: GCM-SIV then gives equal tokens for equal values, by design.
    return hashlib.sha256(b"mask-v1|" + kid.encode()).digest()[:12]


def create_key_file(path: Path) -> None:
    """A new key file with one random default key, mode 0600, created exclusively."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"default": base64.b64encode(secrets.token_bytes(32)).decode(), "tenants": {}}, f, indent=2)
        f.write("\n")


class KeyRing:
    """The key file, re-read when it changes. Unloadable keys are remembered as errors.

    Whether it changed is looked up (a ``stat``) at most once every ``RECHECK_S`` seconds of
    ``clock`` (a ``stat`` on every log line was a tenth of the line's masking): a key rotated or
    removed in the file masks no line of this process once that long has passed after the file
    changes on this pod (a Kubernetes Secret's volume changes when the kubelet next syncs it, up
    to a minute or two after the Secret, a ``subPath`` mount never). A change is one of the
    file's modification time, change time, size, inode or device: a file put in place by a
    rename that kept the old one's time and size (a base64 key is always 44 characters) is one."""

    RECHECK_S = 1.0

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._checked: float | None = None  # when, by ``clock``, the file was last looked up
        self._unread = True  # whether it could not be stat'ed or read then
        self._errors: list[str] = []  # the load's, logged once the lock is released (``_log_errors``)
        self._default: Key | str | None = None  # a Key, or the reason it is unusable
        self._tenants: dict[str, Key | str] = {}
        self._by_kid: dict[str, Key] = {}

    def _refresh(self) -> None:
        now = self.clock()
        if self._checked is not None and 0 <= now - self._checked < self.RECHECK_S:
            return
        self._checked = now
        self._reload()
        if self._unread:  # looked up again at the next call: a file rewritten in place is read once written
            self._checked = None

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)
        except OSError as exc:
            stamp = None
            reason = f"key file {self.path} cannot be read: {exc.strerror}"
        if stamp is not None and stamp == self._stamp:
            return
        self._stamp = stamp
        self._tenants, self._by_kid = {}, {}
        self._unread = stamp is None
        if stamp is None:
            self._default = reason
            return
        try:
            raw = json.loads(self.path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("expected {'default': key, 'tenants': {...}}")
        except (OSError, ValueError, RecursionError) as exc:
            self._default = f"key file {self.path} is not valid: {json_refusal(exc)}"
            self._unread = True
            self._errors.append(self._default)
            return
        self._default = self._parse(raw.get("default"), "default")
        tenants = raw.get("tenants") or {}
        if isinstance(tenants, dict):
            self._tenants = {str(t): self._parse(v, f"tenant {t!r}") for t, v in tenants.items()}

    def _parse(self, value: object, what: str) -> Key | str:
        if value is None:
            return f"key file {self.path} has no {what} key"
        try:
            key = Key.from_b64(str(value))
        except ValueError as exc:
            reason = f"key file {self.path}: {what} key is unusable: {exc}"
            self._errors.append(reason)
            return reason
        self._by_kid[key.kid] = key
        return key

    def key_for(self, tenant: str | None) -> Key:
        with self._lock:
            self._refresh()
            key = self._tenants.get(tenant) if tenant is not None and tenant in self._tenants else self._default
        self._log_errors()
        if not isinstance(key, Key):
            raise MaskingUnavailable(str(key))
        return key

    def by_kid(self, kid: str) -> Key | None:
        with self._lock:
            self._refresh()
            key = self._by_kid.get(kid)
        self._log_errors()
        return key

    def _log_errors(self) -> None:
        """The load's errors logged, the lock released: the log's masking (``LogMasking``) asks
        this ring for its key, and under the lock (not re-entrant) every thread that logged hung."""
        if self._errors:
            with self._lock:
                errors, self._errors = self._errors, []
            for reason in errors:
                log.error("%s", reason)


class Masker:
    def __init__(self, keys: KeyRing, header_names: Iterable[str] = ()):
        self.keys = keys
        self.header_names = {h.lower() for h in header_names}

    def masks_whole(self, name: str) -> bool:
        """Whether a field of this name is masked whole: a configured header, or a name that
        says it holds an identity number (``SENSITIVE_KEY``: ``X-Meta-Passport``, ``ssn``) or a
        secret (``SECRET_KEY``: ``Authorization``, ``Cookie``, ``X-Api-Key``, ``db_password``)."""
        return (
            name.lower() in self.header_names
            or SENSITIVE_KEY.fullmatch(name) is not None
            or SECRET_KEY.fullmatch(name) is not None
        )

    def token(self, value: str, key: Key) -> str:
        """``value``'s token. A lone surrogate (a file name's undecodable byte, as Python reads it;
        JSON's "\\ud800") is encoded as itself: UTF-8 refused it, and the log call raised."""
        payload = key.aead.encrypt(_nonce(key.kid), value.encode("utf-8", "surrogatepass"), key.kid.encode())
        return f"tok_{key.kid}_{_encode(payload)}"

    def mask_text(self, text: str, key: Key | None) -> str:
        """Every detected value replaced by its token (``<masked>`` without a key). Text that holds a value only once
        normalised (``138\\u00300013 8000``, ``alice%40example.com``, full-width digits) is
        written normalised, its values masked; text of Latin-1 characters whose bytes, read as
        GBK, Shift-JIS, EUC-KR, Big5 or UTF-8, still hold a value once masked is masked whole
        (no span of another charset's reading maps back); other text is left as it was."""
        hints = _hints(text)
        if hints == _NOTHING:
            return text
        folded = normalise(text)
        if folded != text and _finds(folded):  # (masked whole: a value half in escapes is one value)
            masked = write_normalised(text, folded, lambda t, w: self._mask_raw(t, key, _detectors(t), w))
            text = folded
        else:
            masked = self._mask_raw(text, key, _by_hints(hints))
        if any(_finds(r) for r in _legacy_readings(masked)):
            return "<masked>" if key is None else self.token(text, key)
        return masked

    def _mask_raw(self, text: str, key: Key | None, detectors: tuple[Detector, ...], written: str | None = None) -> str:
        """``text``'s values (those of ``detectors``, the ones that may match it) as tokens. The
        values after a key (secrets, identity numbers) are found together in the text as it came,
        overlapping ones merged (as ``credentials.scrub`` finds them), and masked once; then each
        detector of shapes in turn, on the text with their tokens (an address is no piece of a
        URL's password: "bob@example.com:s3cret@host"). Masked one after another, a shorter value
        found first (an AWS key id, a JWT) was a token before the keyed rule read it, which takes
        no token for a value, and the secret after it ("credentials=AKIA...:wJalr...") stayed.
        ``written``: the text written in the place of ``text`` (of its length: its characters
        that ``reading.write_normalised`` holds), masked at the same spans, else ``text``."""
        written = text if written is None else written
        keyed = sum(1 for d in detectors if d.name == "secret" or d.pattern is _KEYED)  # (they come first)
        found = credentials.merge([span for d in detectors[:keyed] for span in d.spans(text)])
        text, written = self._tokens(text, written, key, credentials.changed_to(text, found))
        for detector in detectors[keyed:]:
            text, written = self._tokens(text, written, key, detector.spans(text))
        return written

    def _tokens(self, text: str, written: str, key: Key | None, spans: Iterable[Span]) -> tuple[str, str]:
        """``text`` and ``written`` with each of ``spans`` of ``text`` (in order, none overlapping)
        as its token."""
        read, pieces, end = [], [], 0
        for a, b in spans:
            token = "<masked>" if key is None else self.token(text[a:b], key)
            read += [text[end:a], token]
            pieces += [written[end:a], token]
            end = b
        if not read:
            return text, written
        text = "".join(read) + text[end:]
        return text, text if written is text else "".join(pieces) + written[end:]

    def mask_fields(self, fields: dict[str, str], tenant: str | None) -> dict[str, str]:
        """Configured names masked whole, every other value and every name by the detectors."""
        key = self.keys.key_for(tenant)
        return {
            self.mask_text(name, key): (
                self.token(value, key) if self.masks_whole(name) else self.mask_text(value, key)
            )
            for name, value in fields.items()
        }


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Fields that name their object's "value" field (Kubernetes' env, header lists, tags):
# {"name": "DB_PASSWORD", "value": "..."} is a field DB_PASSWORD.
_NAME_FIELDS = frozenset({"name", "key", "header"})
# A field name whose last word names a measure (a size, a duration, a count, a status): its
# number is no phone or card whatever its digits ("bytes", "duration_us", "bodySize").
_MEASURE = re.compile(
    r"(?:^|[-_. ]|(?<=[a-z])(?=[A-Z]))(?i:ms|us|ns|s|secs?|seconds|bytes|size|count|total|len|length"
    r"|status|code|port|ts|time|timestamp|duration|latency|offset)$"
)
# A word of a field's name that names a phone, a card or an identity number: a measure's word
# after it names its state, not its value ("phone_status", "card_count", "passport_no_len": a
# number there of a phone's or a card's shape is one). A word that only holds its letters
# ("company", "telemetry", "cardinality", "phones") is none.
_NAMES_VALUE = re.compile(
    rf"(?:(?<![A-Za-z])|(?<=[a-z])(?=[A-Z]))(?i:phone|mobile|tel|telephone|msisdn|fax|card|pan|{_KEY_NAMES})(?![a-z])"
)


def _measure(name: str) -> bool:
    """Whether a field of this name holds a measure (``_MEASURE``, no ``_NAMES_VALUE`` word)."""
    return _MEASURE.search(name) is not None and _NAMES_VALUE.search(name) is None


class LogMasking(logging.Filter):
    """The masking step of every log line, set on the handlers so that it sees the records of
    every logger (uvicorn's included): values found by the detectors become tokens under the
    default key (``<masked>`` while no key can be loaded), control characters are escaped (an
    ESC sequence or a newline in a request path cannot rewrite or forge a line)."""

    def __init__(self, masker: Masker):
        super().__init__()
        self.masker = masker

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            key: Key | None = self.masker.keys.key_for(None)
        except MaskingUnavailable:
            key = None
        message = self._masked(record.getMessage(), key)
        record.msg = _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", message)
        record.args = None
        if record.exc_info and not record.exc_text:  # a traceback quotes values too
            record.exc_text = self.masker.mask_text(logging.Formatter().formatException(record.exc_info), key)
        return True

    def _masked(self, message: str, key: Key | None) -> str:
        """The message masked. A JSON object (the access log's line) is masked value by value
        and written again: masked as one text, a value decoded to be masked (``%22`` to ``"``)
        would have ended its string, and the client's text would be fields of the line. A line
        that is ``_plain`` as a whole is written as it came: it has no escape, so each of its
        strings is a piece of it, plain too (most access-log lines: no parse on every request)."""
        if _plain(message):
            return message
        if message.startswith("{") and message.endswith("}"):
            try:
                fields = json.loads(message)
            except (ValueError, RecursionError):
                fields = None
            if isinstance(fields, dict):
                try:
                    return json.dumps(self._masked_json(fields, key))
                except RecursionError:  # (nested deeper than the stack takes: masked as text)
                    pass
        return self.masker.mask_text(message, key)

    def _masked_json(self, value: object, key: Key | None, name: str = "") -> object:
        """``value`` (a JSON line's, under the field ``name``) masked, its structure kept."""
        if isinstance(value, str):
            masked = self.masker.mask_text(value, key)
            # (a value found only after its field's name: "user_passport_no": "E1234567")
            return self._whole(value, key) if masked == value and self._named(name, value, key) else masked
        if isinstance(value, dict):
            named = any(
                str(k).lower() in _NAME_FIELDS and isinstance(v, str) and self.masker.masks_whole(v)
                for k, v in value.items()
            )
            return {
                self.masker.mask_text(str(k), key): (
                    self._whole(v, key)
                    if self.masker.masks_whole(str(k)) or (named and str(k).lower() == "value")
                    else self._masked_json(v, key, str(k))
                )
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self._masked_json(v, key, name) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # A number found only after its field's name (an id under a key that names it:
            # "user_passport_no"), or an integer of a shape (a phone, a card) under a name that is
            # no measure ("bytes", "duration_us" hold any number), masked whole as a string token:
            # the line stays JSON. A float whose value is an integer ("4155552671.0", "4.1e9") is
            # read, and masked, as that integer (its token the integer's).
            integral = isinstance(value, int) or value.is_integer()
            text = str(int(value)) if integral else str(value)
            if self._named(name, text, key) and (
                self.masker.mask_text(text, key) == text or (integral and not _measure(name))
            ):
                return self._whole(text, key)
        return value

    def _named(self, name: str, text: str, key: Key | None) -> bool:
        """Whether the detectors mask ``text`` read after its field's ``name`` (``name: text``)."""
        return not self.masker.mask_text(f"{name}: {text}", key).endswith(f": {text}")

    def _whole(self, value: object, key: Key | None) -> object:
        """Every string and number in ``value`` (a field named for an identity number: its
        list or object too, its structure kept) masked whole; null, true and false as they are."""
        if isinstance(value, dict):
            return {self.masker.mask_text(str(k), key): self._whole(v, key) for k, v in value.items()}
        if isinstance(value, list):
            return [self._whole(v, key) for v in value]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return "<masked>" if key is None else self.masker.token(str(value), key)
        return value


def reveal(token: str, keys: KeyRing) -> str:
    m = TOKEN_RE.fullmatch(token.strip())
    if m is None:
        raise ValueError(f"not a token: {token!r}")
    key = keys.by_kid(m.group(1))
    if key is None:
        raise ValueError(f"no key with id {m.group(1)} in {keys.path}")
    try:
        return key.aead.decrypt(_nonce(key.kid), _decode(m.group(2)), key.kid.encode()).decode("utf-8", "surrogatepass")
    except (InvalidTag, ValueError) as exc:
        raise ValueError(f"token {token[:24]}... does not decrypt with key {key.kid}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_server.masking", description="Reveal masked tokens.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reveal", help="print the value behind each token (needs the key file)")
    r.add_argument("--keys", type=Path, required=True, help="the key file the server masked with")
    r.add_argument("tokens", nargs="+")
    args = p.parse_args(argv)
    ring = KeyRing(args.keys)
    status = 0
    for token in args.tokens:
        try:
            print(reveal(token, ring))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
