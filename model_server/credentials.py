"""Credentials in free text, found once for every reader: the model server's masking (the
prediction log, every log line) and the rollout's Slack reports (``vision_rollout.notify.scrub``).

Secrets come from connections and key files and never reach a log or a report; the text that
quotes one (an exception's URL, a header an error echoes, a connection string) is read as
gitleaks and detect-secrets read it: by a key that names it, by its scheme, or by the shape its
issuer gives it. Each pattern starts at a boundary or a literal and every repetition is bounded,
so each runs in time linear in the text. A masking token already there (``tok_<kid>_...``) is
never a secret again.
"""

from __future__ import annotations

import bisect
import functools
import re

from model_server.reading import as_seen, holds_value, normalise, shown, shown_back, write_normalised

Span = tuple[int, int]

DATE_OR_TIME = r"(?:[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{1,2}:[0-9]{2})(?![0-9])"  # "2026-12-03", "12:30"
MASKED_HEAD = r"tok_[a-zBCDFGH]{8}_"  # (the masker's token's head: a value masked already)
NOT_MASKED = rf"(?!{MASKED_HEAD})"


def after_boundary(word: str) -> str:
    """A pattern's start: after no character of ``word`` (a character class's body), or after a
    line end, a tab, a backspace or a form feed written escaped (``\\n``, ``\\r``, ``\\t``, ``\\b``,
    ``\\f``, as repr() and json.dumps write them), whose letter is no part of the word after it."""
    return rf"(?:(?<![{word}])|(?<=\\[nrtbf]))"


# Not at an escape's letter (``after_boundary``'s): a pattern whose first characters may be letters
# starts after the escape, never with its letter.
NOT_ESCAPE_LETTER = r"(?!(?<=\\)[nrtbf])"


# A key that names a secret: the name ends in one of these words, after its prefixes
# ("aws_secret_access_key", "X-Api-Key", "db_password", "proxy-authorization",
# "app_db_primary_admin_password"); a name that only starts with one ("token_count",
# "password_file", "secret_name") names no secret. A name is read from its start, never from
# a prefix's separator on (``_PREFIXES``: up to 64 of 256 characters each, bounded, and one
# start a name: "a_b_c_d_..." is scanned once, not once a prefix).
_CRED_WORDS = (
    r"password|passwd|passphrase|pwd|secret|token|api[ _-]?key|apikey|credentials?|authorization"
    r"|(?:access|secret|private|signing|auth|account|master|encryption|client|service|ssh)[ _-]?key"
    r"|amz-signature"
)
_PREFIXES = r"(?<![A-Za-z0-9][_.-])(?:[A-Za-z0-9]+[_.-])*"
_SECRET_NAME = rf"{_PREFIXES}(?i:{_CRED_WORDS})"
_COOKIE_ONE = r"(?i:(?:set-)?cookie)"
_COOKIE = rf"{_COOKIE_ONE}(?i:s)?"  # (a log line's "cookies" too: a request's)
_COOKIE_PAIR = r"[!#$%&*+.^_`|~0-9A-Za-z-]{1,64}="  # a cookie's name (RFC 6265's token) and "="
SECRET_KEY = re.compile(rf"{_SECRET_NAME}|{_COOKIE}")  # a whole field name
_SCHEME = r"(?i:bearer|basic|token|digest|negotiate|ntlm)[ ]{1,3}"  # an Authorization header's
_CRED_CHAR = r"[^\s\"'`,;&<>]"
_NO_MASKED_AFTER = rf"(?!(?:{_SCHEME})?{MASKED_HEAD})"  # (nor "Bearer <token>")
# A blank between a key and its value: a space or a tab, or a tab, backspace or form feed written
# escaped ("\\t", as repr() and json.dumps write a tab: "password:\\thunter2"), whose letter is no
# value's first character (``VALUE_ESCAPE``).
BLANK = r"(?:[ \t]|\\[tbf])"
# A key's ":" or "=" (``_COLON``: its ":") and the blanks around it: any run of up to 64 spaces or
# tabs each side (columns aligned: "password:      hunter2"), bounded and possessive (a value never
# starts with a blank, so none is given back: a key that fails is given
# up after them).
_KEY_SEP = rf"{BLANK}{{0,64}}+[:=]{BLANK}{{0,64}}+"
# After a key's ":" or "=", a YAML list item's mark ("password: - hunter2"): its "-" and the
# blanks after it are no piece of the value (a "-" alone is no value: ``NO_VALUE``).
LIST_MARK = rf"(?:-{BLANK}{{1,64}}+)?+"
_COLON = rf"{BLANK}{{0,64}}+:{BLANK}{{0,64}}+"
# Markdown's marks around a key (a Slack text, a report): its closing "*", "_" (one to three: bold,
# italic, both), "~~" or backtick ("*password*: ...", "**token**: ...", "`token`: ...",
# "_api_key_: ..."); a bold ":" inside them, one or two marks after it before a blank ("*password:*
# ...", never "***", a mask's mark: "api_key=*** next" scrubbed again stays); a table's "|" between
# a key's cell and its value's ("| token | hunter2xyz |"), not before an empty cell ("| token | |").
# Each was no key's end nor separator, and the value after it was logged in clear.
_MD_CLOSE = r"(?:\*{1,3}+|_{1,3}+|~~|`)"
_MD_KEY_SEP = (
    rf"{_MD_CLOSE}?+{BLANK}{{0,64}}+(?:[:=](?:(?!\*{{3}})(?:\*{{1,2}}+|_{{1,2}}+)(?={BLANK}))?+"
    rf"|\|(?!{BLANK}{{0,64}}+\|)){BLANK}{{0,64}}+"
)


# A quote's escape: a string held in a JSON string has its quotes escaped ('\\"'), one held in
# that string has them escaped again ('\\\\\\"'), four deep at most: 1, 3, 7 or 15 backslashes
# (``_DEPTHS``: a quote not escaped too). A value's own escape is a run of up to 31 (its quote's,
# four deep) before its character.
_DEPTHS = (0, 1, 3, 7, 15)
_ESCAPE = r"\\(?:\\\\){0,7}"
# One of a value's backslashes in quotes written escaped (``e``), escaped as deep as they are:
# two and two more for each backslash of their escape ('\\\\\\\\' in '\\"...\\"', 8 in '\\\\\\"...').
_ESCAPED_BACKSLASH = r"(?:(?P=e)(?P=e)\\\\)"


# A string in quotes, to the quote ``q`` that closes it, on its line; in quotes written escaped
# (``e``: a JSON document held as a string, '{"body": "{\\"password\\": \\"...\\"}"}', or in one
# held in a string again, its quotes escaped again), to the quote escaped as its opening one is
# that closes it: a run of backslashes before a quote closes the string where it is the quote's
# escape after the value's own backslashes (``_ESCAPED_BACKSLASH``: the run's length, less the
# escape's, a multiple of theirs), else it is one of the value's characters, an escape of its
# own ("\\n", a quote of a string held in it); ``limit`` characters or escapes at most, each
# repetition bounded and possessive.
def quoted(limit: int | None) -> str:
    """A string's value in quotes (after ``OPEN_QUOTE``), to its closing quote (however long where
    ``limit`` is None)."""
    times = "++" if limit is None else f"{{1,{limit}}}"
    own = rf"{_ESCAPED_BACKSLASH}{{0,16}}+(?:(?!(?P=e)(?P=q))\\{{1,31}}+[^\n\\]|(?!(?P=q))[^\n\\])"
    return (
        rf"(?(e)(?:{own}|{_ESCAPED_BACKSLASH}{{1,16}}+(?=(?P=e)(?P=q))){times}(?=(?P=e)(?P=q))"
        rf"|(?:\\.|(?!(?P=q))[^\n\\]){times}(?=(?P=q)))"
    )


_QUOTED = quoted(256)
# A keyed value in quotes, however long: 256 characters at most left one longer to the run, which
# stopped at its first blank ('password: "' and 300 characters, then ' hunter2xyz" ok' was
# scrubbed to 'password: "*** hunter2xyz" ok'). A quote escaped as the opening one closes the
# read, so no two reads of values opened alike cover a character (linear).
_QUOTED_WHOLE = quoted(None)
# A key's closing quote, escaped too; a string's opening quote, or a Python bytes' repr's
# (botocore's headers: b'...'), not given back (its "b" no value of its own), escaped too (``e``).
# (The masking's keyed rule takes its key's and value's quotes so too.)
KEY_QUOTE = rf"(?:(?:{_ESCAPE})?[\"'])?"
_KEY_CLOSE = rf"(?:(?:{_ESCAPE})?[\"']|{_MD_CLOSE})?+"  # (a key's closing quote or Markdown)
OPEN_QUOTE = rf"(?>(?:b?(?P<e>{_ESCAPE})?(?P<q>[\"']))?)"
_OPEN_QUOTE_MD = rf"(?>(?:b?(?P<e>{_ESCAPE})?(?P<q>[\"'`]))?)"  # (a value in Markdown's backticks too)
# A quote before ",", ":" or a bracket's close after a key is a JSON string's end, no value's
# opening ('{"msg": "token: ", "n": 1}': ", " was masked, the line no JSON; "Enter password:"}').
# (A value's own first "," or "}" stays one: '{"password": ",Hunter2"}'.)
_STRING_END_NOT = rf"(?![,:][ ]{{0,8}}+(?:{_ESCAPE})?[\"']|[\]}}](?:[ ]{{0,8}}+[,\]}}]|\Z|(?:{_ESCAPE})?[\"']))"
_NOT_ESCAPED_QUOTE = rf"(?!{_ESCAPE}[\"'])"  # (nor its escape's first backslashes: '\\\\\\"' stays whole)
# A value's backslash: one written escaped ("\\\\", a pair whole: a run of them before a quote
# never loses its parity), or one before no escape's letter; an escaped line end, tab, backspace
# or form feed ("\\n", as repr() and json.dumps write them) ends the value, as does a backslash
# before a quote (its escape's, or a string's last backslash: the quote after it stays closing).
VALUE_ESCAPE = r"\\\\|\\(?![\s\"'\\nrtbf])"


# After a key in quotes and ":" (JSON, a dict's repr: {"password": 12345678}) a "}" closes the
# object, no character of the value; a "]" is one of its characters (a key and ":" are in no list).
# The key's closing quote (escaped too), its ":" and up to 64 blanks each side of it, as ``_KEY_SEP``
# reads them (``BLANK``: a tab written escaped too, '{"password":\\t12345678}'), read once where
# the key is read: ``group`` is set where the value starts right after them (no other ":" or
# blank, nor a quote or what the rule reads before a value, ``read_first``: a list's mark, a scheme).
def _after_quoted_key(group: str, read_first: str = "(?!)") -> str:
    """A key's closing quote, ":" and blanks; ``group`` (empty) set where its value follows them."""
    return (
        rf"(?:{_ESCAPE})?[\"']{BLANK}{{0,64}}+:{BLANK}{{0,64}}+"
        rf"(?![ \t:]|\\[tbf]|b?(?:{_ESCAPE})?[\"']|{read_first})(?P<{group}>)"
    )


# A Windows path's backslashes ("C:\\new\\x" as it came, not written escaped: its drive's
# backslash before no other) are its own, an escape's letter after them too ("\\n" of "\\new"),
# never a backslash before a space or a quote.
_DRIVE = r"[A-Za-z]:(?=\\(?![\s\"'\\]))"
_PATH_ESCAPE = r"\\\\|\\(?![\s\"'\\])"


# A ":" before a blank, a line end (written escaped too) or the text's end ends a value not in
# quotes, and stays ("access_token=tok123: 500", an error's code after it); one within it is its own.
_LAST_COLON = r"(?!:(?:\s|\\[nrtbf]|\Z))"


# A value not in quotes is read whole, however long (a JWT, a signed token after "Bearer ": 256
# characters at most left the rest in clear), each character once: the run possessive, each look
# ahead bounded, and a match started only after a key, so a run is read by one match (linear).
# A line end written escaped twice or deeper ("\\\\n": a record held in a JSON string held in
# another) is a written backslash and a letter to a value's run; one before a secret's key and its
# ":", "=" or a blank (a Markdown key's too: "\\\\n*password* ==> x") ends the value there
# ("password: Tr0ub4dor\\\\ntoken: hunter2xyz" twice dumped masked "Tr0ub4dor\\\\ntoken", leaving
# ": hunter2xyz" in clear), so the key's rule reads the next.
# (Up to eight line ends, then blanks, tabs written escaped too: each look ahead bounded, or a
# megabyte of them was read again from each backslash.) A bracket, a list's mark or a quote,
# escaped too, may come before the key, and a quote after it (up to 16 of them and the blanks:
# "password: Tr0ub4dor\\\\n[token: hunter2xyz]" twice dumped masked "Tr0ub4dor\\\\n[token" and
# left ": hunter2xyz]" in clear; "\\\\n{'api_key': ...", "\\\\n- secret: ..." alike).
_BREAK_THEN_KEY = (
    rf"(?!(?<!\\)\\{{2,15}}[rnt](?:\\{{1,15}}[rn]){{0,7}}+(?:[ \t\[{{(<*#>-]|\\{{1,15}}t|\\{{0,15}}[\"']){{0,16}}+"
    rf"{_SECRET_NAME}{_KEY_CLOSE}(?:{_KEY_SEP}|{BLANK}))"
)


def _run(chars: str, limit: int | None = None) -> str:
    """A value not in quotes of ``chars`` and backslashes, to an escaped quote; a path's whole;
    ``limit`` characters at most where given (a rule that needs more after the value)."""
    times = "++" if limit is None else f"{{1,{limit}}}"
    return (
        rf"(?:{_DRIVE}(?:{_NOT_ESCAPED_QUOTE}{_LAST_COLON}{_BREAK_THEN_KEY}(?:[{chars}]|{_PATH_ESCAPE})){times}"
        rf"|(?:{_NOT_ESCAPED_QUOTE}{_LAST_COLON}{_BREAK_THEN_KEY}(?:[{chars}]|{VALUE_ESCAPE})){times})"
    )


_RUN_CHARS = r"^\s\"'`,;&<>\\"
# No value not in quotes: a place held where none is set ("(not set)", "-", "null", "None", "n/a",
# "***", a mask's mark; "<none>" is no value's characters), whole. A pair many blanks after a key
# ("api_key=" and 37 spaces then "model=resnet50", a line of pairs in columns) is masked still: it
# is as often the key's own value ("api_key=      key=sk-proj-..."), and so is one of other words
# ("password:" and 9 spaces then "16 bytes": its "16"). A run of up to three dashes ("-", "--",
# "---": a table's empty cell) is one too. A value ends before a quote or a line end written
# escaped at any depth ('-> null\\"' two strings deep: the "null" was read as a value).
_WRITTEN_PLACEHOLDER = r"(?:\(not set\)|-{1,3}+|(?i:null|none|n/a))"
PLACEHOLDER = rf"(?:{_WRITTEN_PLACEHOLDER}|\*{{3}})"
_VALUE_END = r"(?=[\s,;&)\]}\"'<>]|\\{1,15}[\"'nrtbf]|\Z)"
# A mask's mark, and up to three of a sentence's ".", "!", "?" or ":" after it, before a value's end
# or a quote or line end written escaped (any depth): the mask of a value that a bracket closed
# ("password: ('hunter2xyz',)." scrubbed to "password: ***.", which scrubbed again gave "password:
# ***"), no value, so a text scrubbed again stays as it is; and before an arrow glued to it
# ("password: ***->***", ``changed_to``), or an encoded quote or backslash (a text written
# normalised keeps them encoded, one before it too: "password: ***%22", scrubbed again, was
# "password: ***"; "token=%22***%22", "token=***").
_HELD_QUOTE = r"(?:%22|%5[cC]|&quot;|&#92;)"  # (as ``reading.write_normalised`` writes them)
_MASK_MARK = rf"{_HELD_QUOTE}?+\*{{3}}[.!?:]{{0,3}}+{_HELD_QUOTE}{{0,8}}+(?:{_VALUE_END}|(?=[-=]{{1,8}}+>))"
NO_VALUE = rf"(?!{_WRITTEN_PLACEHOLDER}{_VALUE_END}|{_MASK_MARK})"
# A placeholder then a word on its line ("password: none hunter2"): the placeholder stays, the word
# is the value, as any word after a secret's key is (a date after it is the line's, a token the
# mask's own). Not after a mask's mark: "***" is where a value was, the word after it the text's
# own ("access_token=*** 500"), and a text scrubbed again stays as it is. A word of a closed list
# that completes the placeholder's phrase ("none set", "n/a yet", "null here"), whole (a "." or "!"
# at most after it, then the value's end), is the placeholder's too: alone, nothing is masked; a
# word after it is the value ("none set hunter2"). Another word ("none settle") is the value, it
# and every word after it on its line (``pt``, ``_PLACEHOLDER_WORDS``: "none settle hunter2"), to
# the value's end (a ",", a quote, the line's end), 64 words at most, possessively; a date or time
# after them is the line's, a mask's mark the text's.
_PHRASE_WORD = r"(?i:set|yet|here|given|provided|configured|specified|supplied|required|needed)"
_PHRASE_END = r"(?=[\s,;&)\]}\"'<>]|\\[nrtbf\"']|\Z)"
_WORD_GAP = r"(?:[ ]|\\t){1,2}+"  # (a tab written escaped too: "none\\thunter2" in a JSON string)
PLACEHOLDER_THEN = (
    rf"(?:{_WRITTEN_PLACEHOLDER}(?:{_WORD_GAP}{_PHRASE_WORD}[.!]?+{_PHRASE_END})?+"
    rf"{_WORD_GAP}(?!{DATE_OR_TIME}){NOT_MASKED}(?=[^\s\"'`,;&<>\\])(?P<pt>))?+"
)
_CRED_RUN = _run(_RUN_CHARS)  # a value not in quotes, to an escaped quote


def _cred_run(*after_key: str, limit: int | None = None) -> str:
    """``_CRED_RUN``, to a "}" where any of the groups ``after_key`` (``_after_quoted_key``) is set."""
    closed, run = _run(_RUN_CHARS + "}", limit), _run(_RUN_CHARS, limit)
    return "".join(f"(?({g}){closed}|" for g in after_key) + run + ")" * len(after_key)


# A string in quotes in a dict's or a list's repr, whole (a bracket in it is none of the
# structure's: "{'pw': 'Tr0ub}4dor9'}"), on its line: its opening quote escaped ``k`` deep (0, 1,
# 3, 7 or 15 backslashes: a repr held in JSON strings), to the quote escaped as deep that closes it
# after the value's own backslashes (a run of ``k`` and ``2k + 2`` more for each: ``quoted``'s
# rule), its escapes in it; however long, each repetition possessive (256 characters at most ended
# a bracket's read at a longer one: 'credentials: {"a": "' and 300 characters, then '", "b":
# "hunter2xyz"}' was masked to its first string, the fields after it in clear). One not closed is
# none (an apostrophe in a word): its quote is one of the text's characters. Each read is linear:
# a string's quote, escaped k deep, is the close of one so opened before it, so no two reads of
# strings opened alike cover a character, and one not closed on its line fails at its line end.
def _in_quotes(q: str, k: int, refused: str = "") -> str:
    """That string; ``refused`` (a look ahead) refuses a character of it there, bare or escaped."""
    close = rf"(?:\\{{{2 * k + 2}}}){{0,8}}+\\{{{k}}}{q}"
    return rf"\\{{{k}}}{q}(?:(?!{close})\\{{1,32}}+{refused}[^\n\\]|{refused}[^\n\\{q}])*+{close}"


_IN_QUOTES = "(?>(?=[\\\\\"'])(?:" + "|".join(_in_quotes(q, k) for q in "\"'" for k in _DEPTHS) + "))"


# A quote that closes a JSON string is followed by blanks (a line end written escaped too) and a
# ",", ":", "}", "]" or the text's end (after one escaped once, the quote of the string that holds
# it too: ``held``): a bracket's repr in a JSON string never reads one as its own character.
def _closes(held: str, signs: str = ",:") -> str:
    return rf"(?:[ \t\r\n]|\\[nrt]){{0,64}}+(?:[{signs}}}\]]|[ \t\r\n]|\\[nrt]{held}|\Z)"


# (A bracket not closed reads a ":" after one escaped once as no close, ``_CLOSES_HELD_KEYLESS``: a
# dict cut short holds one as its character, 'password: [\\"a\\", \\":hunter2"'; the string that holds
# it ends so only where it is a key.)
_CLOSES, _CLOSES_HELD, _CLOSES_HELD_KEYLESS = _closes(""), _closes('|"'), _closes('|"', ",")


# A dict's or a list's repr as a value ("{'session': 'abc123'}", "['a', 'b']", a dict in a dict),
# to the bracket of its kind that closes it (a "{" to a "}"), on its line or a later one (a dict
# printed over lines: pprint, json.dumps(indent=2)), its strings whole, four deep at most, each
# repetition possessive (no backtracking into a bracket: one scan); one not closed (a record cut
# short, nested deeper, a bracket that closes another kind) fails closed: to the text's end, however
# long (``_NOT_CLOSED``: 4 KiB at most left the rest in clear), its later lines too (a dict over
# lines holds its secrets there).
def _bracketed(depth: int) -> str:
    """A bracket's repr, to the bracket that closes it, ``depth`` deep at most."""
    inner = _piece(depth)
    return rf"(?:\{{{inner}{{0,4094}}+\}}|\[{inner}{{0,4094}}+\])"


def _piece(depth: int, shut: str = "") -> str:
    """A piece of a bracket's repr ``depth`` deep at most (``shut``: a character that is none; a
    tuple's ")": a "(" in it then opens a group read to its own ")", ``depth - 1`` deep at most: a
    call's arguments, a tuple, a parenthesis; where none may open, a "(" is no piece)."""
    group = rf"|\({_piece(depth - 1, ')')}{{0,64}}+\)" if shut and depth > 1 else ""
    return (
        rf"(?:{_IN_QUOTES}|\\{{1,32}}+(?![\"'])|(?:\\\\){{1,16}}+(?=[\"'])|(?<!\\)\\'"
        rf"|(?:\\\\){{1,16}}+\\[\"']|(?<!\\)\\\"(?!{_CLOSES_HELD}){group}"
        + (rf"|[^{{}}\[\](){shut}\\\"]" if shut else r"|[^{}\[\]\\\"]")
        + rf"|\"(?!{_CLOSES})"
        + (f"|{_bracketed(depth - 1)}" if depth > 1 else "")
        + ")"
    )


def _tuple(depth: int) -> str:
    """A tuple's repr, to the ")" that closes it, a tuple in it ``depth`` deep at most (64 pieces
    at most, a string in quotes one piece: each key's tuple not closed was read 4,094 pieces on,
    over the keys after it; a longer one is read as one not closed)."""
    return rf"{_TUPLE_OPEN}{_piece(depth, ')')}{{0,64}}+\)"


# A tuple's repr as a value, its "(" before a string in quotes (escaped too, a bytes' "b'"):
# "token: ('a', 'hunter2xyz')", "password: ('hunter2xyz',)", as Python prints a tuple (requests'
# auth): its "(" was the value, its strings left in clear. To the ")" that closes it, as a list's
# "]" closes one (a tuple in it is its characters); one not closed fails closed, as a bracket does.
# (Blanks and line ends, written escaped too, before a bracket's first quote, escaped as deep as it
# is (``_ESCAPE``): "secret {\n'a': ...", a dict printed over lines and cut short, was left in
# clear; up to 64, possessive.)
# Its "(" before a dict's or a list's "{" or "[", or before a word (a number, None, True: up to 64
# characters, no blank, quote, bracket or ",") and ",", opens one too, its strings after that first
# item ("token: (1, 'hunter2xyz')", "token: ([1], 'hunter2xyz')"), and so does its "(" before a
# tuple's "(" that opens one, four deep at most ("token: (('a', 'hunter2xyz'),)"): each had its "("
# and what followed it to the first "," masked, its strings left in clear. A tuple in a tuple is
# read to its own ")" ("token: ((optional))" is no tuple: the run, as before).
# Its "(" opens one too before a call's name and "(" ("datetime.datetime(2024, 1, 1, 0, 0)",
# "set()", "Decimal('1.5')"), an object's repr ("<Foo object at 0x7f>"), or an empty tuple, after
# any number of "(" (up to 63): each was masked to its first ")" or ",", its strings after it left
# in clear ("token: (datetime.datetime(2024, 1, 1, 0, 0), 'hunter2xyz')" to "token: ***, 1, 1, 0,
# 0), 'hunter2xyz')"). In a tuple every "(" opens a group read to its ")" (``_piece``: "('a', (2),
# 'hunter2xyz')" closed at "(2)"'s ")" before), four deep at most; one deeper is read as a tuple
# not closed, to the text's end (fails closed).
_BEFORE_QUOTE = r"(?:[ \t\r\n]|\\{1,8}[nrt]){0,64}+"
_FIRST_ITEM = (
    rf"(?:b?(?:{_ESCAPE})?[\"']|[{{\[]|<[A-Za-z_]|[^\s()\[\]{{}}\"'\\,]{{1,64}}+[ \t]{{0,8}}+,"
    r"|[A-Za-z_][A-Za-z0-9_.]{0,63}+\()"
)
_TUPLE_HEAD = (
    rf"(?:(?:{_BEFORE_QUOTE}\(){{0,63}}+{_BEFORE_QUOTE}{_FIRST_ITEM}|(?:{_BEFORE_QUOTE}\(){{1,63}}+{_BEFORE_QUOTE}\))"
)
_TUPLE_OPEN = rf"\((?={_TUPLE_HEAD})"
CLOSED_BRACKETED = rf"(?:{_bracketed(4)}|{_tuple(4)})"
# One not closed in a JSON string ('{"m": "api_key: [[ "}', or a string held in one, its quotes
# escaped once) ends before the quote that closes that string (``_closes``), not escaped or escaped
# once; a string in quotes in it (not so opened) is read whole, a backslash with the character it
# escapes, so the masked JSON parses; so is a string of a repr in single quotes closed before what
# closes one (a ",", ":", "]", "}", the text's end: ``_CLOSES``), a double quote in it none of the
# JSON's ("token: ['a\",b', 'hunter2xyz'", json.dumps'd too, was masked to that quote only). Other
# quotes are its characters (a dict's repr cut short in one of its strings). Such a string is read
# so only where its first double quote, before a single quote, is one that ends the bracket below
# (``_ENDS``), or it holds none (a piece, as in 435fc6a): else the bracket reads it as before
# 435fc6a ('password: {\'a\\": b\': \'\\"]\\"hunter2xyz' in a JSON string, whose two escaped double
# quotes were read as a string, was masked to its "]").
# Nor does it hold a double quote (bare or escaped) then a JSON separator (",", ":", "}", "]",
# blanks) and what opens a JSON value (a quote, escaped too, a digit, "-", "{", "[", true, false,
# null): that quote closes a JSON string, the single quote after it another's ('{"m": "token:
# [\'a", "b\',c": 1}' was masked to '{"m": "token: ***": 1}', the JSON broken).
# Nor does it open after a backslash (an escaped quote in a repr, never its opening: each of a
# megabyte of them was read 256 characters on).
_JSON_STRING_CLOSE = r"(?!\"(?:[ \t\r\n]|\\[nrt]){0,64}+[,:}\]](?:[ \t\r\n,:}\]]|\\[nrt]){0,64}+(?:\\{0,32}+\"|[-\d{\[]|true|false|null))"
_ENDS = rf"(?<!\\)(?:(?:\\\\){{0,32}}+\"(?={_CLOSES})|\\(?:\\{{4}}){{0,16}}+\"(?={_CLOSES_HELD_KEYLESS}))"
_REPR_STRING = rf"(?<!\\)(?='[^'\n\"]*?(?:(?<!\\)'|{_ENDS}))" + _in_quotes("'", 0, _JSON_STRING_CLOSE)
_NOT_CLOSED = (
    rf"(?:[{{\[]|{_TUPLE_OPEN})(?:{_REPR_STRING}(?={_CLOSES})|\"(?!{_CLOSES})(?:[^\"\\\n]|\\.)*+\""
    rf"|(?<!\\)\\\"(?!{_CLOSES_HELD_KEYLESS})(?:[^\"\\\n]|\\[^\"\n])*+\\\""
    rf"|\"(?!{_CLOSES})|(?:\\{{4}}){{0,16}}+\\\"(?!{_CLOSES_HELD_KEYLESS})"
    rf"|(?:\\{{4}}){{0,15}}+\\{{3}}\"|\\{{1,64}}+(?!\")|(?:\\\\){{1,32}}+(?=\")|[^\"\\])*+"
)
BRACKETED = rf"(?:{CLOSED_BRACKETED}|{_NOT_CLOSED})"
# A Kubernetes object's name (DNS-1123: lower-case letters, digits, "-" and "."), one with a
# sign ("-", ".", a namespace's "/"), and none that looks random (``_SECRET_SPACED``'s rule below).
_K8S_NAME = r"[a-z0-9](?:[a-z0-9]|[.-](?=[a-z0-9])){0,252}+"  # (a last "." ends a sentence)
_NAMESPACE = r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){0,62}+/"  # (a namespace's name and "/")
_SIGNED_NAME = (  # "my-app-2", "ns/db", "kube-system/db"
    rf"(?=[a-z0-9]{{1,253}}+[./-][a-z0-9])(?:{_NAMESPACE})?{_K8S_NAME}"
)
_NOT_RANDOM = (
    r"(?![a-z0-9./-]{0,240}(?<![a-z0-9])(?=[a-z]{0,15}[0-9])[a-z0-9]{16})"
    r"(?!(?=[a-f./-]{0,252}[0-9])[0-9a-f./-]{16,253}(?![a-z0-9./-]))"
)
# A key in quotes first in a tuple's or a list's repr (``t``: after "(" or "[" and its quote,
# escaped too, or a bytes' "b'"), then "," (a line end after it too) and its value in quotes, the
# tuple's last: a pair's repr ("('password', 'hunter2')", an item of dict.items(), a call's
# arguments, ASGI's headers "(b'x-api-key', b'...')", a pair as JSON writes it: '["password",
# "..."]'); a tuple of names ("('password', 'token', 'secret')") is none,
# nor a pair of names ("('password', 'token')"), nor a Kubernetes kind and its object's name
# ("('Secret', 'model-server-keys')"), as ``_OBJECT_NAMED`` reads "Secret model-server-keys": the
# kind is written with its capital; "secret" in lower case is a resource's type only before a
# namespaced name, as kubectl writes one ("('secret', 'kube-system/model-admin-2')"), else it is
# a field's name, and the name after it its value ("('secret', 'abc-def')").
_LINE_BREAK = r"(?:\r?\n|(?:\\{1,8}r)?\\{1,8}n)"  # (a line end written escaped too)
_NEXT_LINE = rf"{_LINE_BREAK}[ \t]{{0,16}}+"
_PAIR_COMMA = (  # (a comma on its own line too; up to 64 blanks each side, as ``_KEY_SEP`` reads them)
    rf"(?:{_ESCAPE})?[\"']{BLANK}{{0,64}}+(?:{_NEXT_LINE})?,{BLANK}{{0,64}}+(?:{_NEXT_LINE})?"
)
_PAIR_KEY = (  # (or its bracket, a line end and indentation, then its quote: rich's, pprint's, black's)
    "(?P<t>"
    + "|".join(rf"(?<=[(\[]{b}" + r"\\" * k + r"[\"'])" for b in ("", "b") for k in _DEPTHS)
    + rf"|(?<=[(\[]){BLANK}{{0,64}}+{_NEXT_LINE}b?(?:{_ESCAPE})?[\"']"
    + ")?"
)
_PAIR_SEP = (
    rf"(?(t)(?!(?:(?<=[\"']Secret){_PAIR_COMMA}(?:{_ESCAPE})?[\"']{_NOT_RANDOM}{_SIGNED_NAME}"
    rf"|(?<=[\"']secret){_PAIR_COMMA}(?:{_ESCAPE})?[\"']{_NOT_RANDOM}{_NAMESPACE}{_K8S_NAME})(?:{_ESCAPE})?[\"'])"
    rf"{_PAIR_COMMA}(?=b?(?:{_ESCAPE})?[\"'])(?!(?:{_ESCAPE})?[\"'](?i:{_CRED_WORDS})(?:{_ESCAPE})?[\"'])|(?!))"
)
_PAIR_END = (  # (its ")" on a line of its own too, a trailing "," before it)
    rf"(?(t)(?=(?(e)(?P=e))(?P=q){BLANK}{{0,64}}+(?:,{BLANK}{{0,64}}+)?(?:{_NEXT_LINE})?[)\]]))"
)
# A key's name as the value of the field before a field "value" (Kubernetes' env, a list of
# headers: {"name": "DB_PASSWORD", "value": "..."}, "- name: DB_PASSWORD\n  value: ..." in YAML,
# its line end written escaped too; a dict printed over lines, json.dumps(indent=2)'s, pprint's:
# a line end and indentation after the ","): "value" names a secret there. ("valueFrom:" names none.)
# The key's name so only as the value of a field "name", "key" or "header" (``nb``), its quotes
# escaped as deep as each other's (the key's at a line end, 'description: reset password', names
# none).
_NAMED_BY = (
    r"(?:(?<=[ \"'])(?P<nb>"
    + "|".join(
        rf"(?<=(?i:{w}){q}:{s}{q})"
        for w in ("name", "key", "header")
        for q in ("", *(r"\\" * k + "[\"']" for k in _DEPTHS))
        for s in ("", " ")
    )
    + "))?"
)
_FIELD_SEP = (  # between two fields: "," (a line end after it too), or a line end (YAML's); up to 64 blanks each side
    rf"[ \t]{{0,64}}+(?:,[ \t]{{0,64}}+(?:{_NEXT_LINE})?|(?:(?<=[ \t])#[^\r\n\\]{{0,256}}+)?{_NEXT_LINE})"
)


def _value_named(group: str) -> str:
    """A field "value" after the field that names its key (``group``: ``_after_quoted_key``'s)."""
    return rf"{KEY_QUOTE}{_FIELD_SEP}{KEY_QUOTE}(?i:value)(?>{_after_quoted_key(group, _SCHEME)}|{KEY_QUOTE}{_COLON})"


# A YAML block scalar as the value ("password: |", ">-") of a key that starts its line (after
# its indentation ``ki``, a list item's "-" and spaces ``kd`` and a quote): its indicator and line
# end (``h``) stay, its lines are the value, the first one's indentation (``i``), more than the
# key line's (its "- " as two spaces, "-  " as three: the key's column), and every line after
# it that starts so (more indented too), to a line less indented or an empty one; 256 lines of 4 KiB at most, each run possessive; a token
# there is none (nor then its indicator). A key after words ("Reset your password: >"), or lines
# no more indented than its own (its siblings: "password: |\n  user: bob" in a list item), is
# no block, and no value.
# Its line ends written escaped too (``x``: a block in a JSON string, its key then after "\\n" or
# the string's quote; its lines then end at an escaped quote too); its indicator's digit before
# or after its "-" or "+", a comment after it; a blank line in it, before a line indented so.
# A plain value on the next lines, after a key and ":" with nothing after them but a comment
# (``p``: "password:\n  hunter2"), or a YAML list's mark ("password: - \n  hunter2",
# ``_MARK_AT_LINE_END``), is read so: its lines, more indented than the key's; its
# first line none that is a mapping's key (a ":" before a space or its line's end, no "," "[" "]"
# "{" "}" or "#" before it: "credentials:\n  username: bob"; a line such as "abc123def, password
# {'a': 'b'}", "hunter2 # note: x" or a flow mapping "{'user': ...}" is the value, left in clear
# before) or a comment; a comment after the key ("# set by ops") is no
# value where a line end follows it. Blank lines (blanks only) before its first line, any number,
# as YAML allows them ("password:\n\n  hunter2"): possessive, each line's blanks bounded, read once
# after the key (linear); a line end written escaped, the same each time.
_KEY_LINE = r"(?:(?:(?<![^\n])|(?<=\\n)|(?<=[\"']))(?P<ki>[ \t]{0,64}+)(?P<kd>-(?P<ks>[ ]{1,8}+))?[\"']?)?"
_LINE_REST = r"[ \t]{0,16}+(?:#[^\r\n\\]{0,256}+)?"  # (spaces, a comment)
_BLOCK_INDICATOR = rf"[|>](?:[-+]?[0-9]?|[0-9][-+]){_LINE_REST}"
_BLOCK_START = rf"{_BLOCK_INDICATOR}{_LINE_BREAK}"
# (the key's ":", up to 64 blanks after it, as ``_KEY_SEP`` reads them, its possessive run just
# read: a look behind of each width of them, tabs written escaped two characters each, before which
# a ":", never the "=" or "," read before them)
_AFTER_COLON = "(?:" + "|".join(rf"(?<=:[ \t\\tbf]{{{n}}})" for n in range(129)) + ")"
_NO_KEY_LINE = r"(?!#|(?(x)[^\r\n\\\",\[\]{}#]|[^\r\n,\[\]{}#]){0,4096}?:(?:[ \t]|\r?\n|\\|\"|\Z))"
# A label in capitals ("Password:", ``c``: its first letter a capital, its second a small one)
# with a line of words after it (letters only, one to three spaces apart, a "." or "!" at its
# end) is a form's or a message's text: "Password:\n  required field missing" (a YAML key is
# in lower case: "password:\n  correct horse battery staple" is a value).
_PROSE_LINE = r"[A-Za-z][a-z]{0,63}+(?:[ ]{1,3}[A-Za-z][a-z]{0,63}+){1,31}+[.!]?[ \t]{0,16}+(?:\r?\n|[\\\"']|\Z)"
_BLOCK_HEAD = (
    rf"(?:(?(ki)(?P<h>(?:(?(ar){_LINE_REST}|{_BLOCK_INDICATOR})|(?(m)|{_AFTER_COLON})(?P<p>){_LINE_REST})(?:\r?\n|(?P<x>(?:\\{{1,8}}r)?(?P<xb>\\{{0,7}})\\n))"
    rf"(?(x)(?:[ \t]{{0,64}}+(?P=x))*+|(?:[ \t]{{0,64}}+\r?\n)*+)"
    rf"(?P<i>(?P=ki)(?(kd)[ ](?P=ks))[ \t]{{1,64}}+)(?=\S)(?(p){_NO_KEY_LINE}(?(c)(?!{_PROSE_LINE})))){NOT_MASKED}|(?!))"
    rf"|(?!{_BLOCK_START}|{_AFTER_COLON}#[ \t][^\r\n\\]{{0,256}}+{_LINE_BREAK}))"  # (a comment is no value)
)
# A YAML list's mark after the key's ":" with nothing after it on its line but blanks or a comment
# after a blank (``m``: "password: - \n  hunter2"), or "--" so (a table's empty cell: "password:
# --\n  hunter2", "---" too): its item is on the next line, read as a plain value after the ":"
# alone is (``p``), the mark no piece of it; and so a placeholder's word (``_WRITTEN_PLACEHOLDER``:
# "password: none\n  hunter2", "null", "n/a", "(not set)", after a list's mark too: "- null"), or
# its phrase ("none set"). Where no such value follows (the next line no more indented than the
# key), nothing is: its line end, written escaped ("\\\\n" in a JSON string: a repr's "\\n"), is no
# value's first characters (``_MARKED_VALUE``).
_MARK_AT_LINE_END = (
    rf"(?:{_AFTER_COLON}(?P<m>(?:-[ ]{{1,16}})?{_WRITTEN_PLACEHOLDER}(?:[ ]{{1,2}}+{_PHRASE_WORD}[.!]?+)?+)"
    rf"(?=[ \t]{{0,16}}+(?:(?<=[ \t])#[^\r\n\\]{{0,256}}+)?{_LINE_BREAK}))?+"
)
_MARKED_VALUE = r"(?(h)|(?(m)(?!)))"
# A block's line held in a JSON string: no line end of its depth (``x``); a quote or a backslash
# escaped as deep as its text is (``xb``, the line end's backslashes less one: twice, and one) is
# one of its characters ('password: |\n  "hunter2Xyz9"' json.dumps'd: the escaped quote ended the
# line, the secret in clear); a run of 2 to 15 backslashes before a quote is read by those alone,
# so a string end's escape is never the value's (three deep, it took a pair of it: broken JSON).
_ESCAPED_LINE = rf"(?:(?!(?P=x))(?:[^\r\n\\\"]|(?P=xb)(?P=xb)\\[\\\"]|(?!\\{{2,15}}\"){VALUE_ESCAPE})){{1,4096}}+"
_BLOCK = (
    r"(?(x)"
    rf"{_ESCAPED_LINE}(?:(?:(?P=x)[ \t]{{0,64}}+(?=(?P=x))){{0,16}}+(?P=x)(?P=i){_ESCAPED_LINE}){{0,255}}+"
    r"|[^\r\n]{1,4096}+(?:(?:\r?\n[ \t]{0,64}+(?=\r?\n)){0,16}+\r?\n(?P=i)[^\r\n]{1,4096}+){0,255}+)"
)
_QUOTED_KEY_SEP = _after_quoted_key("k", rf"-{BLANK}|{_SCHEME}")  # (a list's mark, a scheme: read before its value)
_VALUE_NAMED, _COOKIE_NAMED = _value_named("kn"), _value_named("kc")
_KEYED_RUN = _cred_run("k", "kn", "kc")
_PLACEHOLDER_WORDS = (
    rf"(?(pt)(?:{_WORD_GAP}(?!{DATE_OR_TIME}|\*{{3}}){NOT_MASKED}(?=[^\s\"'`,;&<>\\]){_KEYED_RUN}){{0,63}}+)"
)
# Where a keyed match may start, a look ahead tried first (a key then a megabyte of "\n \t" took
# 6 s to mask: the key line's look behinds and the names were tried at every blank): the key
# line's blanks, its list's mark and quote (``_KEY_LINE``, read as it reads them), then a name's
# first character (``(?i)`` takes "\u0130", "\u0131", "\u017f" and "\u212a" for ASCII letters:
# the class reads them too); or a bracket before it (``_PAIR_KEY``'s line end after it). Every
# match starts where it holds, so it refuses no start the rule takes.
_KEYED_START = r"(?=[ \t]{0,64}+(?:-[ ]{1,8}+)?[\"']?(?i:[a-z0-9])|(?<=[(\[]))"
# requests' auth tuple ("auth=('bob', 'hunter2xyz')"): "auth", a prefix's too ("proxy_auth"), names a
# secret before a tuple or a list (elsewhere it names a scheme or a setting: "auth=basic", a Digest
# header's field). A key's ":" or "=" at its line's end, then a tuple, a list or a dict at the next
# line's start ("token:\n(b'x', 'hunter2xyz')"): the bracket is its value (the key's line end
# stays; a mask's mark there is none: "token:\\n***", scrubbed again, stays). Each was left in clear.
_AUTH_TUPLE = rf"|{_PREFIXES}(?i:auth){KEY_QUOTE}{_MD_KEY_SEP}(?={_TUPLE_OPEN}|\[)"
_BREAK_THEN_BRACKET = rf"(?:{_LINE_BREAK}[ \t]{{0,64}}+(?={_TUPLE_OPEN}|[\[{{]|{_MASK_MARK}))?+"
_ARROW_CHAR = r"(?:\u2192|\u21d2|\u27f6|\u27f9|\u2794|\u27a1\ufe0f?+)"
_ESCAPED_ARROW_CHAR = r"\\{1,15}u(?:2192|21[dD]2|27[fF][69]|2794|27[aA]1(?:\\{1,15}u[fF][eE]0[fF])?+)"


def _arrow_mark(group: str = "", lead: str = "") -> str:
    """An arrow, ``group`` (a name) set where it is one of equals signs; ``lead``, what may come
    before an arrow character ("password: \u21d2 x": the spaced rule's)."""
    equals = f"(?P<{group}>={{1,8}}+>)" if group else "={1,8}+>"
    return rf"(?:(?::[ \t]{{0,3}}+)?+(?:-{{1,8}}+>|{equals}|~>)|{lead}(?:{_ARROW_CHAR}|{_ESCAPED_ARROW_CHAR}))"


# An arrow at the end of a key's line ("password ->", "token ==>", ":=>", ": ->", "~>", "\u21d2":
# ``_arrow_mark``; Ruby's hashes pretty-printed, a report's) is read as YAML's block indicator is
# (``ar``): the lines after it more indented than the key's are the value, to a line less indented.
# ("=>" is so already: the key's "=" and the indicator ">"; ":>" too.) An arrow is never a value's
# first characters (``_NO_ARROW``: "password ==> hunter2xyz" was masked to "password =***>
# hunter2xyz", the value in clear; the spaced rule reads it now), nor an arrow character, written
# escaped too, before a blank, a line end or a mask ("password: \u21d2 hunter2Xyz9" was masked to
# "password: *** hunter2Xyz9": the spaced rule reads a key's ":" or "=" and the arrow after it, ``_ARROW_LEAD``;
# "token \\\\u21d2 ***" scrubbed again was "token *** ***"; one before its value,
# "password: \\\\u2192hunter2Xyz9" json.dumps'd twice, is read with it, masked), nor, after a spaced key, line
# ends written escaped twice before a blank (an arrow's value on the next lines, indented,
# json.dumps'd twice: the run of escapes alone, read to the blank, was masked, the value not).
_ARROW_BLANK = rf"(?:{BLANK}|\\{{2,15}}t)"  # (after an arrow: a tab written escaped twice or deeper too)
_ARROW_LEAD = rf"(?:[:=]{BLANK}{{0,64}}+)?+"  # (before an arrow character: "password: \u21d2 x", "token = \u2192 x")
_ARROW_AT_LINE_END = (
    rf"(?(ki){BLANK}{{0,64}}+(?!=>)(?P<ar>){_arrow_mark('', _ARROW_LEAD)}(?={_LINE_REST}{_LINE_BREAK})|(?!))"
)
_NO_ARROW = rf"(?!(?:-{{1,8}}+|={{1,8}}+|~)>|(?:{_ARROW_CHAR}|{_ESCAPED_ARROW_CHAR})(?:{_ARROW_BLANK}|\Z|\*{{3}}|{_LINE_BREAK}))"
_SECRET_KEYED = re.compile(
    rf"{_KEYED_START}{_KEY_LINE}{after_boundary('A-Za-z0-9')}{_PAIR_KEY}{_NAMED_BY}"
    rf"(?:(?>(?:(?P<c>)(?=[A-Z][a-z]))?){_SECRET_NAME}(?:(?>{_QUOTED_KEY_SEP}|{KEY_QUOTE}{_ARROW_AT_LINE_END}|{KEY_QUOTE}{_MD_KEY_SEP}){_MARK_AT_LINE_END}{LIST_MARK}|{_PAIR_SEP}"
    rf"|(?(nb){_VALUE_NAMED}|(?!)))|(?(nb){_COOKIE_ONE}{_COOKIE_NAMED}|(?!)){_AUTH_TUPLE})"
    rf"{_OPEN_QUOTE_MD}{_NO_MASKED_AFTER}(?:{_SCHEME})?(?!{_SCHEME}){_BLOCK_HEAD}{_MARKED_VALUE}(?(h)|(?(q)|{PLACEHOLDER_THEN}))"
    rf"(?(h)|(?(q)|(?(pt)|{_BREAK_THEN_BRACKET})))(?P<v>(?(h){_BLOCK}|(?(q)|{NO_VALUE}{_NO_ARROW})(?:(?(q){_STRING_END_NOT}{_QUOTED_WHOLE}|(?:{BRACKETED}|{_KEYED_RUN}))|{_KEYED_RUN}){_PLACEHOLDER_WORDS})){_PAIR_END}"
)
# A field "value" before the field that names it ({"value": "...", "name": "DB_PASSWORD"}: a
# dict's keys in any order, as a JSON object may have them, json.dumps(sort_keys=True) too): its
# value, in quotes or not, then the field "name", "key" or "header" whose value names a secret.
# (Its value not in quotes, 256 characters at most: the field after it must follow, and a run read
# to its end was read again from each "value:", a megabyte of them quadratic.)
_QUOTED_VALUE_KEY, _VALUE_RUN = _after_quoted_key("k"), _cred_run("k", limit=256)
_NAMED_AFTER = re.compile(
    rf"{after_boundary('A-Za-z0-9_')}(?i:value)(?>{_QUOTED_VALUE_KEY}|{KEY_QUOTE}{_COLON}){OPEN_QUOTE}{NOT_MASKED}"
    rf"(?P<v>(?(q){_QUOTED}|{_VALUE_RUN}))(?(q)(?(e)(?P=e))(?P=q)){_FIELD_SEP}"
    rf"{KEY_QUOTE}(?i:name|key|header){KEY_QUOTE}{_COLON}{KEY_QUOTE}"
    rf"(?:{_SECRET_NAME}|{_COOKIE_ONE})(?![A-Za-z0-9_.-])"
)
# The same key, then up to 64 blanks (``BLANK``: tabs written escaped too; and "is", as many after
# it; columns aligned: "password      hunter2x9") and no ":" or "=" (the keyed rule's, none of a
# value: "db_password\\t=\\thunter2"): a value in quotes, a literal there
# (detect-secrets' ``private_key "..."``: 'password "hunter2"', "my api key is 'AbC 12'"), or a
# dict's or a list's repr closed ("password {'db': 'b3cret9'}", over lines too), or one not closed
# whose first character (after blanks and line ends: ``_BEFORE_QUOTE``) is a quote, escaped too, or a
# tuple's that opens one (``_TUPLE_OPEN``: "password (1, 'hunter2xyz'") ('token {\\"value\\": \\"eyJ...' in a JSON string:
# ``_NOT_CLOSED``, to the quote that ends that string; in plain text to its end); else
# ("password hunter2", "the api key is AbC123...") a value of 6 characters or more that is no word
# of prose, that is one holding a digit, a symbol other than . _ / - : ! ? or a capital after its
# first character, and no date or time, nor a word in capitals ("password reset", "secret
# model-server-keys", "Secret Manager", "token 512", "api key INVALID." stay). The word "secret"
# alone names an object there, not its value, only as Kubernetes writes it: its kind "Secret"
# before a name that holds a "-", "." or a namespace's "/" ("in Secret models/admin-2",
# 'Secret "my-app-2"'), or "secret" before a name in quotes, or one holding such a sign, that is
# "not found", "is invalid", "is forbidden" or "already exists" ('secret "db2" not found'). Such
# a name is one as Kubernetes takes it (DNS-1123: lower-case letters, digits, "-" and "."), none
# that looks random (a run of 16 letters and digits holding a digit, a UUID, a hex string), and
# never after a word that makes "secret" a credential's name ("client secret", "webhook secret"),
# nor after its possessive ("the client's secret", its apostrophe typographic too: U+2019).
# (``_K8S_NAME``, ``_SIGNED_NAME``, ``_NOT_RANDOM``: above, with the pair's rule.)
_OWNERS = (
    "client", "webhook", "api", "app", "application", "shared", "signing", "jwt", "oauth", "consumer",
    "hmac", "session", "cookie", "bot", "otp", "totp", "encryption", "master", "private", "aws",
)  # fmt: skip
# "client secret", "the client's secret": no owner, its possessive or not, one to three blanks
# before it. One look behind for each width (13), its owners of that width and their blanks as
# alternatives, each as wide: one look behind for each owner, possessive and blank run (120) read
# the same, each tried on its own.
_POSSESSIVES = (("", 0), ("['\u2019]s", 2))  # (each, and how wide)
_NOT_OWNED = "".join(
    "(?<!"
    + "|".join(
        rf"(?i:{'|'.join(w for w in _OWNERS if len(w) == size)}){s}[ \t]{{{n}}}"
        for size in sorted({len(w) for w in _OWNERS})
        for s, extra in _POSSESSIVES
        for n in (1, 2, 3)
        if size + extra + n == width
    )
    + ")"
    for width in sorted({len(w) + extra + n for w in _OWNERS for _, extra in _POSSESSIVES for n in (1, 2, 3)})
)
_OBJECT_NAMED = (
    rf"(?!(?=(?i:secret){BLANK}){_NOT_OWNED}(?:Secret{BLANK}{{1,3}}+(?P<k>[\"']?){_NOT_RANDOM}{_SIGNED_NAME}(?P=k)"
    rf"(?![^\s,;:.)\]])|(?i:secret){BLANK}{{1,3}}+(?:(?P<n>[\"']){_NOT_RANDOM}{_K8S_NAME}(?P=n)|{_NOT_RANDOM}{_SIGNED_NAME})"
    rf"{BLANK}{{1,3}}+(?:not found|is invalid|is forbidden|already exists)(?![A-Za-z0-9])))"
)
# (An owner more than three blanks before "secret", a tab written escaped among them: "client
# \\tsecret", is read with the match, ``o``, from its first letter: no object's name follows it.)
_OWNED = rf"(?P<o>(?i:{'|'.join(_OWNERS)})(?:['\u2019]s)?{BLANK}{{1,64}}+(?=(?i:secret){BLANK}))?"
# After a spaced key, a "(" before a word that is no Python literal (None, True, False, nan, inf: a
# number starts with a digit or "-") and a "," is prose, not a tuple's repr ("Reset your password
# (see, e.g., the docs) today.", "the token (e.g., a JWT) expires"): no repr prints a bare word first.
# Read as a tuple, it was masked, and one not closed within 64 pieces masked the rest of the text.
_PROSE_PAREN = rf"\({_BEFORE_QUOTE}(?!(?:None|True|False|nan|inf)[ \t]{{0,8}}+,)[A-Za-z][^\s()\[\]{{}}\"'\\,]{{0,63}}+[ \t]{{0,8}}+,"
# An arrow between a secret's key and its value ("password -> hunter2xyz9", "token => hunter2xyz",
# "→"), blanks around it or none, read as a spaced key's blanks are: its value so too (a word of
# prose after it stays, "password -> reset"). Its value was left in clear. Longer arrows too, a
# bounded run of up to 8 dashes or equals signs ("-->", "==>", "--->"), a ":" and up to 3 blanks
# before one (":=>", Ruby's old hash; ": ->"), a ":" or "=" and blanks before an arrow character
# ("password: \u21d2 x": ``_ARROW_LEAD``), "~>", and "\u21d2", "\u27f6", "\u27f9", "\u2794", "\u27a1" (an emoji
# selector after it too) as "\u2192" is, each written escaped too ("\\u21d2"). ("|>" is none:
# Elixir's and F#'s pipe, "token |> String.trim()", is code, no value after a key.) ``ea``: an arrow
# of equals signs (Ruby's hash rocket, whose quoted values are values: ``_RENAMED``).
_ARROW = rf"{BLANK}{{0,64}}+{_arrow_mark('ea', _ARROW_LEAD)}{_ARROW_BLANK}{{0,64}}+(?P<aw>)"  # ("\u2192" written escaped too)
# A key in quotes before an arrow ("'token' -> hunter2xyz", '"password" => "hunter2xyz"', Ruby's
# hash), its quote escaped too; a key after a quote only before an arrow (``_ARROW``: else a
# spaced key's blanks after it are a sentence's, "'token' expired"). After a key in quotes and an
# arrow other than one of equals signs, a value in quotes that is a field's name is a rename's, no
# secret ("Renamed field 'token' -> 'access_token'", "'password' → 'db.password'"): a key-like
# name, one to eight words of lower-case letters joined by "_", "." or "-" (no digit, no capital:
# a secret in quotes, "'token' -> 'hunter2xyz'", holds one; a word of prose, "'token' -> 'expired'",
# is one too), or a secret's key alone ("'token' -> 'API_KEY'"). (A password of lower-case
# letters alone so written stays readable, as it does after a spaced key: "password -> hunter".)
# After "=>" (Ruby's hash: '{"password"=>"db_pass_prod"}') it is the value, masked.
_KEY_CLOSE_QUOTE = rf"(?:(?P<kq>(?:{_ESCAPE})?[\"'])(?={BLANK}{{0,64}}+{_arrow_mark('', _ARROW_LEAD)}))"
_FIELD_NAME = r"(?:[a-z]{1,32}+(?:[_.-][a-z]{1,32}+){0,7}+|(?i:" + _CRED_WORDS + "))"
_RENAMED = r"(?(kq)(?(ea)|(?!" + _FIELD_NAME + r"(?(e)(?P=e))(?P=q))))"
# A spaced key's value is never another secret's key before its own separator or arrow
# ('passwd \u2192 "private_key" \u21d2 k3murfHm', "token -> **PASSWORD** ~> {x}"), nor one of
# letters alone (its prefixes too) before a blank ('password: \u2192 PRIVATE_KEY "Zq9xW8vU7"'): read
# as the first key's value, masked, it left the second's value in clear. The first key is left
# without one. (A word with a digit before a blank is a value: "password is Hunter2_pwd ok".)
_KEY_AS_VALUE = (
    rf"(?![!#$%&(*+./:;<=>?@\[^_{{|}}~-]{{0,2}}+{_MD_CLOSE}?+{after_boundary('A-Za-z0-9')}(?:{_SECRET_NAME}{_KEY_CLOSE}{BLANK}{{0,64}}+(?:[:=]|{_arrow_mark()})"
    rf"|(?<![A-Za-z0-9][_.-])(?:[A-Za-z]+[_.-]){{0,8}}(?i:{_CRED_WORDS}){_KEY_CLOSE}{BLANK}))"
)
# A Markdown key's separator before an arrow ("*password:* \u21d2 x", "| password | \u2192 x", a
# table's cells): read as the key's close, the arrow after it is the spaced rule's (the keyed rule
# reads the separator, then no value where an arrow starts one). And a verb of a value's state
# after the key, as "is" ("the password was x", "token set to x", "password changed to x", a
# ":" after it too), its words apart by blanks.
_MD_BEFORE_ARROW = (
    rf"(?:(?:{_MD_CLOSE}?+{BLANK}{{0,64}}+:(?:\*{{1,2}}+|_{{1,2}}+)|{BLANK}{{0,64}}+\|)"
    rf"(?={BLANK}{{0,64}}+{_arrow_mark('', _ARROW_LEAD)}))?+"
)
# A word of prose, no value: one in capitals ("INVALID.") or of lower-case letters, a capital
# first or none, and ". _ / : ! ? -" alone ("reset", "Secret", "api.example.com"), an escaped
# quote, line end or tab after it too ('expired\\"', its JSON string's end two strings deep;
# "reset\\nnext": each was masked there; a backslash before anything else, or first, is a
# value's sign: "token is \\\\tZq9x..."); or shorter than 6.
_NO_PROSE = (
    rf"(?![A-Z]{{1,255}}[.:!?]{{0,3}}(?!{_CRED_CHAR}))"
    rf"(?=[A-Z]?+[a-z._/:!?-]{{0,255}}(?:[^\sa-z._/:!?\"'`,;&<>\\-]|(?<![A-Za-z])\\(?!\\{{0,15}}[\"'])|\\(?!\\{{0,15}}[\"'nrtbf])))"
    rf"(?={_CRED_CHAR}{{6}})"
)
# A version, an address, a region, a host's or a pod's name ("v1.2.3", "us-east-1", "pod/api-7f9c";
# none of a piece longer than 12, as a key's random part is: "sk-live-4eC39HqLyjWDarjtT1zdp7dc").
_NAME_LIKE = r"(?:v?[0-9]{1,9}(?:\.[0-9]{1,9}){1,3}|[a-z0-9]{1,12}(?:[-./][a-z0-9]{1,12}){1,8})(?=[\s,;\"'`]|\\|\Z)"
# "from" before a value, then "to" and another that is no word of prose nor ``_NAME_LIKE``, in
# quotes or not ("changed password from x to y", ``_FROM_TO``; "token from GitHub to cache" stays).
_TO = rf"{BLANK}{{1,64}}+(?i:in)?+(?i:to):?+{BLANK}{{1,64}}+"  # (the "to" of "from x to y", "into", "to:")
_FROM_THEN_TO = (
    rf"from(?=:?+{BLANK}{{1,64}}+(?!{_NAME_LIKE})(?:[^\s\\]|\\(?![tbf])){{1,256}}+{_TO}"
    rf"(?:(?:{_ESCAPE})?[\"'`]|(?!{_NAME_LIKE}){_NO_PROSE}))"
)
_FROM_VERB = "(?i:changed|was|is)"  # (a verb before "from": "password was from x to y")
_STATE_VERB = (
    rf"(?i:(?:(?:was|is|has{BLANK}{{1,8}}+been|had{BLANK}{{1,8}}+been){BLANK}{{1,8}}+)?(?:set|changed|reset|updated){BLANK}{{1,8}}+to"
    rf"|is{BLANK}{{1,8}}+now|is|was"
    rf"|(?:{_FROM_VERB}{BLANK}{{1,8}}+)?{_FROM_THEN_TO})(?::(?={BLANK}))?+"
)
# Whose secret it is, between its key and its separator or verb ("password for bob: x", "the API
# key for user 'acme' is x", "token of svc-a changed from x to y"): a user's or an account's name,
# in quotes (escaped too, a JSON string's) or not, of up to three words ("for John Smith"), 64
# characters a word at most; a qualifier in parentheses after it or alone ("password (prod): x",
# "password for bob (prod) is x"; read as a tuple's repr, the qualifier was masked, the secret
# kept), and a "," ("for user bob, is: x"). (Read as a spaced key's: a word of prose after it
# stays, "password for bob: expired"; a "(x)" with no separator nor verb after it is a value.)
_OWNER_WORD = r"[\w.@+-]{1,64}+(?:['\u2019]\w{1,64}+)?+"  # (an apostrophe inside: "O'Brien")
# (an owner's second or third word is no verb of state: "for bob is hunter2xyz -> x" is bob's value)
_NOT_A_VERB = r"(?!(?i:is|was|has|had|set|changed|reset|updated|from|to|into)(?![\w.@+'\u2019-]))"
_WHOM = (
    rf"(?i:for|of){BLANK}{{1,8}}+(?:(?i:user|account|service|tenant|client|customer|team|the){BLANK}{{1,8}}+)?"
    rf"(?:(?:{_ESCAPE})?+(?:'[^'\\\r\n]{{1,64}}+(?:{_ESCAPE})?+'|\"[^\"\\\r\n]{{1,64}}+(?:{_ESCAPE})?+\")"
    rf"|(?:(?:{_ESCAPE})?[\"'`])?{_OWNER_WORD}(?:(?:{_ESCAPE})?[\"'`])?"
    rf"|{_OWNER_WORD}(?:{BLANK}{{1,3}}+{_NOT_A_VERB}{_OWNER_WORD}){{1,2}})"
)
_QUALIFIER = r"\((?=[A-Za-z0-9])[^()\"'`\\\r\n]{1,64}+\)"  # (no quote in it: "('hunter2xyz',):" is a tuple's repr)
_WHO = rf"(?:{_WHOM},?+(?:{BLANK}{{1,8}}+{_QUALIFIER})?|{_QUALIFIER}),?+"
# Right after the key, a qualifier before a separator or an arrow is never the value (its own,
# masked or a mask's mark, is after it: "password (prod): ***" scrubbed again), nor one before a
# verb of state and a mask right after it ("password (prod) changed from *** to ***"); before a
# verb and anything else it is ("password (hunter2xyz) was rejected"), and after a separator or
# a verb ("password is (hunter2xyz) -> rejected").
_NO_QUALIFIER = (
    rf"(?!{_QUALIFIER},?+(?:{BLANK}{{0,8}}+[:=]|{BLANK}{{0,64}}+{_arrow_mark()}"
    rf"|{BLANK}{{1,8}}+(?:{_STATE_VERB}|{_FROM_VERB}{BLANK}{{1,8}}+(?i:from):?+){BLANK}{{1,64}}+"
    rf"(?:\*{{3}}|{MASKED_HEAD})))"
)
_STATED = (  # (after a separator, blanks or none: "password for bob:x")
    rf"(?:{_WHO}{BLANK}{{0,8}}+[:=]{BLANK}{{0,64}}+|(?:(?:{_WHO}{BLANK}{{1,8}}+)?{_STATE_VERB}){BLANK}{{1,64}}+"
    rf"|{_NO_QUALIFIER})"
)
_SECRET_SPACED = re.compile(  # (its match starts at an owner's or a name's first character: a look ahead first)
    rf"(?=(?i:[a-z0-9])){after_boundary('A-Za-z0-9')}{_OWNED}(?(o)|{_OBJECT_NAMED}){_SECRET_NAME}(?:{_KEY_CLOSE_QUOTE}|{_MD_CLOSE})?+(?:(?:{BLANK}{{1,8}}+{_WHO})?{_MD_BEFORE_ARROW}{_ARROW}|(?(kq)(?!)){BLANK}{{1,64}}+{_STATED})(?:(?P<e>{_ESCAPE})?(?P<q>[\"'`]))?{_NO_MASKED_AFTER}{_KEY_AS_VALUE}"
    rf"(?P<v>(?(q){_STRING_END_NOT}{_RENAMED}{_QUOTED_WHOLE}|(?:(?!{_PROSE_PAREN}){CLOSED_BRACKETED}|(?!{_PROSE_PAREN})(?=[{{\[]{_BEFORE_QUOTE}(?:{_ESCAPE})?[\"']|{_TUPLE_OPEN}){_NOT_CLOSED}|(?!(?(aw)(?!)|[:=])|{_SCHEME}|{_MASK_MARK}|(?:{_ARROW_CHAR}|{_ESCAPED_ARROW_CHAR})(?:{_ARROW_BLANK}|\Z|{_MASK_MARK}|{_LINE_BREAK}|\\{{0,15}}[\"'])|(?:\\{{2,15}}[rn]){{1,16}}+[ \t])(?!{DATE_OR_TIME}){_NO_PROSE}{_CRED_RUN})))"
)
# A URL query's parameter (after "?" or "&") named for a secret, and also, there only, for a key, a signature or
# auth (``?key=``, ``&sig=`` of a SAS URL, ``X-Goog-Signature=``).
# Its quote, escaped too (a URL held in a JSON string: '?token=\\"abc\\"', or deeper: ``_ESCAPE``),
# is no piece of the value, nor the escape of the quote that ends it (``_NOT_ESCAPED_QUOTE``: kept
# whole); a backslash written escaped ("\\\\") is read as a pair, its parity kept. Up to 64
# quotes before the value ('?sig=\\"\\"abc123def': an empty string written before it), each the
# first's quote escaped as deep as it is (``qe``, ``qq``), possessively: an unescaped quote after
# escaped ones closes the JSON string that holds the URL, and is never read as one of the run.
# The value ends at a ":" before a blank, as a keyed one does (``_LAST_COLON``: "?token=abc123:
# 500", an error's code after the URL, keeps its ":").
# More such quotes than 64 fail closed: those past the 64th, however many, are read with the value,
# masked with it, where a value follows them (a run of quotes alone is none). The value is read
# whole, however long (a SAS signature, a presigned URL's: 256 characters at most left the rest in
# clear), each character once: every repetition possessive, each look ahead bounded, and a match
# started only after "?" or "&" and a key, so a run is read by one match (linear).
_QUERY_SECRET = re.compile(
    rf"(?<=[?&]){_PREFIXES}(?i:{_CRED_WORDS}|key|sig|signature|auth)="
    rf"(?:(?P<qe>(?:{_ESCAPE})?)(?P<qq>[\"'])(?:(?P=qe)(?P=qq)){{0,63}}+)?+{NOT_MASKED}"
    rf"(?P<v>(?(qq)(?:(?P=qe)(?P=qq))*+)(?:{_NOT_ESCAPED_QUOTE}{_LAST_COLON}(?:[^\s&;#\"'`<>\\]|\\\\|\\))++)"
)
# A cookie header's value, all its pairs (their values in quotes too), to the end of the line (or
# of its quotes: the string's, read as ``quoted`` reads it, its escapes whole); and so an
# Authorization header's in a scheme of parameters ("AWS4-HMAC-SHA256 Credential=...,
# SignedHeaders=..., Signature=...", "AWS AKIA...:signature"), not one of a single credential
# (Bearer, Basic, Token: those are found whole by the key before them, or by ``_BEARER``). A
# value that is a dict's or a list's repr ("cookies: {'session': 'abc123'}", as a log line
# writes a request's; a dict in it too) is masked whole (``BRACKETED``). "cookies" (plural, a
# log line's word) is a header only before a pair, a dict or a list ("cookies: 3" is a count).
# A pair's or a parameter's value in quotes (session="...", oauth_signature="..."), whole, as
# far as the next pair (";", ",", a space) or the string that holds the header ends.
_PARAM_IN_QUOTES = rf"(?<==){_IN_QUOTES}(?=[;,\s]|\\{{0,15}}[\"']|\Z)"
# (an arrow between the name and its value too: "Cookie ==> sid=abc123XYZ9" was masked to "Cookie
# =***> sid=abc123XYZ9", the "=" of the arrow read as its separator and the cookie left in clear;
# after a name in quotes, Ruby's hash rocket only: '{"Cookie" => "sid=..."}', a rename's other arrows;
# after an arrow its scheme is read before the value, ``ha``: "Authorization \u2192 Digest x", where
# the keyed rule, which reads one after ":", reads no arrow)
_HEADER_SEP = (
    rf"(?:(?:{KEY_QUOTE}{BLANK}{{0,64}}+={{1,8}}+>|{BLANK}{{0,64}}+{_arrow_mark()}){BLANK}{{0,64}}+(?!{_LINE_BREAK}|\s)(?P<ha>)"
    rf"|{KEY_QUOTE}{_KEY_SEP}(?!={{0,7}}+>))"
)
_WHOLE_HEADER = re.compile(
    rf"{after_boundary('A-Za-z0-9-')}(?:{_COOKIE_ONE}(?P<p>(?i:s))?|(?i:(?:proxy-)?authorization)){_HEADER_SEP}"
    rf"{OPEN_QUOTE}{_NO_MASKED_AFTER}(?(ha)(?:{_SCHEME})?+|(?!{_SCHEME}))(?(p)(?=[{{\[]|{_COOKIE_PAIR}))"
    rf"(?P<v>(?(q){quoted(4096)}|{BRACKETED})|{_NOT_ESCAPED_QUOTE}[^\s\"'<>](?:{_PARAM_IN_QUOTES}|[^\r\n\"'<>\\]|{_NOT_ESCAPED_QUOTE}\\)*+)"
)
# "cookie" or "cookies" then spaces and a pair ("cookie session=abc123", as free text writes it,
# no ":"): its pairs apart by ";", to the first space after them (the prose after it stays). Up
# to 64 blanks after the word, a tab written escaped too ("cookie\\tsession=abc123"), possessively.
# A setting is no cookie, after any of those blanks ("cookie      policy=strict", "cookie
# SameSite=Lax.": prose or a config line): one pair whose value is a word of up to 15 letters, a
# capital first or none, then nothing but a sentence's marks before a space, a quote, a backslash
# or the text's end (a cookie's value holds a digit, a symbol or a capital after its first letter,
# as a session's does, or more pairs follow it: "policy=strict; session=abc123" is one).
_COOKIE_SETTING = rf"{_COOKIE_PAIR}[A-Z]?[a-z]{{1,15}}+[.,!?)]{{0,2}}+(?:[\s\"'<>\\]|\Z)"
# A pair's value in quotes, as RFC 6265 allows one ('session="abc123"'), those quotes escaped too
# (a JSON string's: 'session=\\"abc123\\"'); a cookie's octets are no blank, quote, ";" or "\\".
# Each piece is read whole, however long (4,096 characters at most left the rest in clear), as is
# the value of a cookie or an authorization header (``_WHOLE_HEADER``): each run possessive.
_COOKIE_PIECE = r"(?:[^\s\"'<>;\\]++(?:\"[^\s\";\\]*+\"|\\\"[^\s\";\\]*+\\\")|(?:[^\s\"'<>;\\]|\\(?!\\{0,15}[\"']))++)"
_COOKIE_SPACED = re.compile(
    rf"{after_boundary('A-Za-z0-9-')}{_COOKIE}{BLANK}{{1,64}}+{NOT_MASKED}(?={_COOKIE_PAIR})(?!{_COOKIE_SETTING})"
    rf"(?P<v>{_COOKIE_PIECE}(?:;[ \t]{{0,2}}{_COOKIE_PIECE}){{0,63}})"
)
# "Bearer <credential>" or "Basic <credential>" anywhere: a credential of 8 characters or more
# that holds a capital, a digit or one of + / = (a lower-case word after "bearer" is prose), read
# whole however long (2,048 characters at most left the rest in clear).
_BEARER = re.compile(
    rf"{after_boundary('A-Za-z0-9')}(?i:bearer|basic)[ ]{{1,3}}{NOT_MASKED}"
    r"(?P<v>(?=[a-z._~-]{0,2048}[A-Z0-9+/=])[A-Za-z0-9._~+/-]{8,}+={0,2})"
)
# A URL's password: "scheme://user:password@host" (``v``: the user stays readable); ``u``, its
# whole user information, the user alone too ("https://<token>@host"), for a reader who shows none.
# Its end is the last "@" before the host's end, as clients split it (urllib, urllib3): a password
# or user with an "@" not encoded ("u:p@ss@host", "bob@example.com:pw@host") is one whole.
_AT_PIECES = r"(?:@[^\s/?#@:\"'<>]{1,128}){0,3}"
_URL_USERINFO = re.compile(
    rf"://(?P<u>[^\s/?#@:\"'<>]{{0,128}}{_AT_PIECES}(?::{NOT_MASKED}(?P<v>[^\s?#@\"'<>]{{1,256}}{_AT_PIECES}))?)@"
)
# Shapes their issuers give them (gitleaks' rules): AWS access key ids, Slack, GitHub, GitLab,
# Google (API keys, OAuth access tokens "ya29.", Cloud Storage HMAC access ids "GOOG1"), Stripe,
# npm and PyPI tokens, Slack webhook paths, JWEs (RFC 7516's compact form: five parts, its
# encrypted key empty under "dir") and JWTs, private key blocks.
_ISSUED = re.compile(
    rf"{after_boundary('A-Za-z0-9_-')}(?:"
    r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Za-z0-9])"
    r"|xox[a-z]-[0-9A-Za-z-]{10,250}|xapp-[0-9A-Za-z-]{10,250}"
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}|glpat-[A-Za-z0-9_-]{20,255}"
    r"|AIza[0-9A-Za-z_-]{35}|ya29\.[0-9A-Za-z_-][0-9A-Za-z._-]{19,2047}|GOOG1[A-Z0-9]{20,100}(?![A-Za-z0-9])"
    r"|[sr]k_(?:live|test)_[0-9A-Za-z]{10,255}|npm_[A-Za-z0-9]{36}"
    r"|pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,1000}"
    r"|eyJ[A-Za-z0-9_-]{5,4096}\.[A-Za-z0-9_-]{0,4096}\.[A-Za-z0-9_-]{1,4096}\.[A-Za-z0-9_-]{1,65536}\.[A-Za-z0-9_-]{1,4096}"
    r"|eyJ[A-Za-z0-9_-]{5,4096}\.eyJ[A-Za-z0-9_-]{5,4096}\.[A-Za-z0-9_-]{0,4096}"
    r")"
)
# An HTTP Digest authorization's response (RFC 7616: the hash of the password, the nonce and the
# request, which a dictionary attack reverses) and its cnonce, wherever its parameters are
# written: "response" names it only before 32 to 128 hex digits (an MD5 or SHA-256 digest). Up to
# 64 blanks each side of its "=", a tab written escaped too ("cnonce=\\t\"...\""), possessively
# (``_KEY_SEP``'s runs: no value starts with a blank). Its quote escaped too (a header held in a
# JSON string, 'cnonce=\\"...\\"', or deeper: ``_ESCAPE``), not given back; the value ends before
# an escaped quote (``_NOT_ESCAPED_QUOTE``: the escape of the quote that closes it stays whole).
_DIGEST_PARAM = re.compile(
    rf"{after_boundary('A-Za-z0-9_-')}(?i:(?P<c>cnonce)|response){BLANK}{{0,64}}+={BLANK}{{0,64}}+"
    rf"(?>(?:{_ESCAPE})?\")?{NOT_MASKED}"
    rf"(?P<v>(?(c)(?:{_NOT_ESCAPED_QUOTE}[^\s\"',;<>]){{1,256}}|[0-9A-Fa-f]{{32,128}}(?![A-Za-z0-9])))"
)
_SLACK_WEBHOOK = re.compile(
    rf"hooks\.slack\.com/(?:services|workflows|triggers)/{NOT_MASKED}(?P<v>[A-Za-z0-9/_+-]{{8,256}})"
)
_PRIVATE_KEY = re.compile(  # its body, to its END line
    rf"-----BEGIN[ A-Z0-9]{{0,40}}PRIVATE KEY(?: BLOCK)?-----(?:\s|\\n){{0,72}}+{NOT_MASKED}(?![\s\\])"
    r"(?P<v>(?:(?!-----END)[A-Za-z0-9+/=\s\\:,.-]){1,16384})"
)
# A private key's body line logged alone (a key logged one line per record: its BEGIN line in one
# record, each body line in its own, which ``_PRIVATE_KEY`` never sees together): RFC 7468's full
# line, exactly 64 base64 characters, holding a capital, a small letter and a digit (a hex digest,
# an upper-case id, a word is none), a run of its own (not a piece of a longer run, a dotted or
# hyphenated name, a base64url id). Its last, shorter line (its padding "=" too), which alone is
# not told from other short text, is a whole line (to a line end, a string's end, an END line or
# the text's end) where a full body line from a line's start and a line end come before it, or
# a line end and a private key's END line after it (a key logged without its BEGIN line), each
# line indented or not (a YAML block scalar's lines: "  tls.key: |", without its BEGIN line), the
# last line after a full one indented as it is (``d``: a key's lines are indented alike; a short
# line indented otherwise is the text around a base64 run, "    <64 characters>\nDone"); logged
# in a record of its own, it stays readable. A line end written escaped (``\n``, as repr() and
# json.dumps write a key's lines joined) ends a run too (``after_boundary``).
B64_LINE = r"[A-Za-z0-9+/]{64}"  # (RE2 too: the masking's vectorised prefilter)
_B64_START = after_boundary("A-Za-z0-9+/=_.-")
_MIXED = r"(?=[A-Za-z0-9+/]{0,63}[A-Z])(?=[A-Za-z0-9+/]{0,63}[a-z])(?=[A-Za-z0-9+/]{0,63}[0-9])"
_PEM_BODY_LINE = re.compile(rf"{_B64_START}{_MIXED}{B64_LINE}(?![A-Za-z0-9+/=_.-])")
_LINE_START = r"(?:(?<![^\n])|(?<=\\n)|(?<=[\"']))"  # (a string's start too: a key's lines in repr(), json.dumps)
_LINE_END = r"(?:\r?\n|(?:\\{1,2}r)?\\{1,2}n)"
_INDENT = r"[ \t]{0,64}+"  # (a key's lines indented: a YAML block scalar's, "  tls.key: |", nested deep)
# A line that is one word in small letters, a capital first or not ("done", "Done"), after a
# full line is the text after a base64 run, no key's last line, unless a private key's END line
# follows it (a key's last line is so one in 18 of four characters, one in 700 of eight). One in
# capitals is a key's as often ("QIDAQAB": an RSA key's exponent), and is masked.
_WORD_LINE = r"[A-Z]?[a-z]{1,63}(?=\r?\n|\\{1,2}[rn]|\\{0,15}[\"']|\Z)"
_PEM_LAST_LINE = re.compile(  # (at a full line: its next line is the value; or at the value)
    rf"(?:{_LINE_START}(?P<d>{_INDENT})(?={B64_LINE}{_LINE_END}){_MIXED}{B64_LINE}"
    rf"|{_B64_START}{NOT_ESCAPE_LETTER}(?=[A-Za-z0-9+/]{{1,64}}={{0,2}}{_LINE_END}{_INDENT}-----END[ A-Z0-9]{{0,40}}PRIVATE KEY))"
    rf"(?=(?:{_LINE_END}(?(d)(?P=d)|{_INDENT}))?(?(d)(?!{_WORD_LINE}))(?P<v>[A-Za-z0-9+/]{{1,64}}={{0,2}})"
    r"(?=\r?\n|\\{1,2}[rn]|\\{0,15}[\"']|-----END|\Z))"  # (a whole line: a string's end too)
)
# In the order the masking runs them: a password or token that holds digits is masked whole, no
# phone cut out of it. Each pattern's value is its group ``v`` where it has one, else its match.
# With each, the words one of which every match of it holds, in lower case (a key's name, a
# scheme, an issuer's prefix): a text without them is not searched by it (``patterns_for``). A
# private key's body line has no word: its own shape.
_KEY_WORDS = ("pass", "pwd", "secret", "token", "key", "credential", "auth", "sig")  # _CRED_WORDS'
_ISSUERS = (
    "akia", "asia", "abia", "acca", "a3t", "xox", "xapp", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
    "glpat", "aiza", "ya29.", "goog1", "k_live_", "k_test_", "npm_", "pypi-", "eyj",
)  # fmt: skip
_HINTED: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (_URL_USERINFO, ("://",)),
    (_PRIVATE_KEY, ("private key",)),
    (_PEM_LAST_LINE, ("private key",)),  # (before the body lines: the masking reads them before it masks them)
    (_PEM_BODY_LINE, ()),
    (_ISSUED, _ISSUERS),
    (_SLACK_WEBHOOK, ("hooks.slack.com",)),
    (_BEARER, ("bearer", "basic")),
    (_DIGEST_PARAM, ("cnonce", "response")),
    (_WHOLE_HEADER, ("cookie", "auth")),
    (_COOKIE_SPACED, ("cookie",)),
    (_SECRET_KEYED, (*_KEY_WORDS, "cookie")),  # ({"name": "Cookie", "value": ...})
    (_NAMED_AFTER, (*_KEY_WORDS, "cookie")),
    (_SECRET_SPACED, _KEY_WORDS),
    (_QUERY_SECRET, _KEY_WORDS),
)
PATTERNS: tuple[re.Pattern[str], ...] = tuple(pattern for pattern, _ in _HINTED)
HINTS = tuple(dict.fromkeys(word for _, words in _HINTED for word in words))  # every pattern's words
# Each word, and the patterns it is a word of (bit i: ``PATTERNS[i]``); the body lines' bits.
_WORD_BITS = tuple((w, sum(1 << i for i, (_, words) in enumerate(_HINTED) if w in words)) for w in HINTS)
_BODY_LINE_BITS = 1 << PATTERNS.index(_PEM_BODY_LINE) | 1 << PATTERNS.index(_PEM_LAST_LINE)


# A secret's value changed, as a plan or a diff writes it ('~ api_token = "abc123XYZ9" -> "Zq9xW8vU7k"',
# Terraform's plan; "password: OldPass123 \u2192 NewPass456", a rotation's log): the value after the
# arrow is the secret's new one, and was in clear. Read right after a value found (its closing
# quote, escaped too, blanks, an arrow, blanks), in quotes to their close (however long; a quote
# before a blank, ",", ":" or a bracket's close, or one closed before a word's character, is a
# JSON string's end, none: '{"m": "token=x ->", "n": ...}' kept its structure) or not in quotes
# to a blank, and again after it (a chain, however long: each character read once). A
# placeholder, a mask's mark, a token, a bracket ("(known after apply)", "[FILTERED]", a dict), a
# number alone ("-> 200 OK", a status), a date or time, a line end, or another secret's key are no
# value; arrows in a row are one, and a scheme before the value is kept ("Bearer x -> Bearer y").
# An arrow glued to the value ("hunter2->Tr0ub4dor", "Authorization: a -> b": the header's value
# read to the ">") is read from its "-" or "=" in the value. After no value, a placeholder (no
# value: "null", "n/a", '""', "(sensitive value)", a mask's "***") is read as one where a secret's
# key is before it ('~ password = null -> "s3cr3t"', Terraform's plan of a value first set; "*** ->
# new", a CI log's mask of the old one: the new one was in clear): the text with each placeholder
# before an arrow written as letters (``_EMPTY_THEN_ARROW``), the values found there that end where
# one did start a chain.
def _changed(sep: str, plain: str = "") -> re.Pattern[str]:
    """A new value after a value's close and ``sep``; one not in quotes ``plain`` too."""
    return re.compile(
        rf"(?:(?:{_ESCAPE})?[\"'`])?+{sep}(?:{_SCHEME})?+"
        rf"{NO_VALUE}{_NO_MASKED_AFTER}(?![(\[{{<]|\\{{1,15}}[rn]){_OPEN_QUOTE_MD}{_KEY_AS_VALUE}"
        rf"(?P<v>(?(q)(?![\s,:\]}}]){_QUOTED_WHOLE}|{plain}(?![0-9]{{1,4}}+{_VALUE_END})(?!{DATE_OR_TIME}){_CRED_RUN}))"
        rf"(?(q)(?(e)(?P=e))(?P=q)(?![A-Za-z0-9_]))"
    )


_CHANGED_TO = _changed(rf"(?:{BLANK}{{0,64}}+{_arrow_mark()}{_ARROW_BLANK}{{0,64}}+){{1,4}}+")
# A value after "from" (a spaced key's: "password from x to y", as prose writes a change): the
# value after "to" is the new one, where no word of prose.
_FROM_TO = _changed(_TO, f"(?!{_NAME_LIKE}){_NO_PROSE}")
_FROM = re.compile("(?i:from)")
_AFTER_FROM = re.compile(rf"(?<![A-Za-z])(?i:from):?+{BLANK}{{1,64}}+(?:(?:{_ESCAPE})?[\"'`])?\Z")
_ARROWS = (">", "\u2192", "\u21d2", "\u27f6", "\u27f9", "\u2794", "\u27a1", "\\u2")  # (">": every arrow of signs)


_EMPTY = (  # (a phrase's word after it too: "none set -> x", "not set -> x")
    rf"(?:(?<![A-Za-z0-9_/-])|(?<=\\[tn]))(?:(?:{PLACEHOLDER}|(?i:not)(?={_WORD_GAP}{_PHRASE_WORD}))(?:{_WORD_GAP}{_PHRASE_WORD}[.!]?+)?+"
    rf"|(?P<e>{_ESCAPE})?(?P<q>[\"'])(?(e)(?P=e))(?P=q)|\((?i:sensitive(?: value)?)\))"
)
_THEN_ARROW = rf"(?=(?:(?:{_ESCAPE})?[\"'`])?+{BLANK}{{0,64}}+{_arrow_mark()})"
_EMPTY_THEN_ARROW = re.compile(_EMPTY + _THEN_ARROW)
# A placeholder between two arrows in a chain ("old -> null -> new": unset, then set again): the
# chain goes on after it.
_THROUGH_EMPTY = re.compile(
    rf"(?:(?:{_ESCAPE})?[\"'`])?+{BLANK}{{0,64}}+{_arrow_mark()}{_ARROW_BLANK}{{0,64}}+{_EMPTY}{_THEN_ARROW}"
)
# A placeholder after a secret's key and "from" ("password changed from *** to x", a CI log's mask
# of the old value; "from null to x"): read as a value found there, so the one after "to" is.
_FROM_EMPTY = re.compile(
    rf"(?<![A-Za-z0-9_]){_SECRET_NAME}{_KEY_CLOSE}(?:{BLANK}{{1,8}}+{_WHO})?(?:{BLANK}{{1,8}}+{_FROM_VERB})?+{BLANK}{{1,8}}+(?i:from):?+"
    rf"{BLANK}{{1,64}}+(?P<p>{_EMPTY})(?={_TO})"
)


def _before_arrow(view: str, a: int, b: int) -> int:
    """Where the value ``view[a:b]`` ends before an arrow read in it ("a->b": its "-", one sign's
    run: "dGVzdA==->x" keeps its "=="; a header's value, read to the ">": "a -", its blank too),
    else ``b``."""
    if view.startswith(">", b) and b > a and view[b - 1] in "-=":
        value = view[a:b].rstrip(view[b - 1])
        if b - a - len(value) <= 8 and (value := value.rstrip(" \t")):
            return a + len(value)
    return b


def changed_to(text: str, found: list[Span]) -> list[Span]:
    """``found`` (spans of values in ``text``, in order, merged) and the new values written after
    them (``_CHANGED_TO``; after "from", ``_FROM_TO``), merged."""
    if not any(arrow in text for arrow in _ARROWS) and not _FROM.search(text):
        return found
    if (seen := shown(text)) is not None:  # (as a terminal shows it too: an arrow in colour, "x \x1b[33m->\x1b[0m y")
        where = seen[1]
        read = [(bisect.bisect_left(where, a), bisect.bisect_left(where, b)) for a, b in found]
        back = [shown_back(where, a, b) for a, b in _chained(seen[0], [(a, b) for a, b in read if a < b])]
        # (once, that view as it is: a sequence its own removal shows is none; and no span against a
        # backslash, which splits an escape's run: "\\\\e[0m" one string deeper is no sequence)
        found = merge(found + [(a, b) for a, b in back if text[b - 1] != "\\" and text[a - 1 : a] != "\\"])
    return _chained(text, found)


def _chained(text: str, found: list[Span]) -> list[Span]:
    """``changed_to`` of ``text`` as it is seen (``as_seen``), not as a terminal shows it."""
    view = as_seen(text)  # (as ``spans`` reads it: the same positions)
    starts = found
    if empty := [m.span() for m in _EMPTY_THEN_ARROW.finditer(view)]:
        pieces, end = [], 0
        for a, b in empty:
            pieces += [text[end:a], "x" * (b - a)]
            end = b
        filled = "".join(pieces) + text[end:]  # (the text's: ``spans`` reads it as it reads the text)
        ends = {b for _, b in empty}
        starts = found + [(a, b) for a, b in spans(filled, chained=False) if _before_arrow(filled, a, b) in ends]
    if _FROM.search(view):
        starts = starts + [m.span("p") for m in _FROM_EMPTY.finditer(view)]
    starts = sorted(starts)
    more: list[Span] = []
    cut: dict[Span, int] = {}  # (a value found, where it ends before an arrow read in it)
    reach = -1
    for a, b in starts:
        if b <= reach:  # (read already by the chain of a value before it: each character read once)
            continue
        if (end := _before_arrow(view, a, b)) != b:
            cut[a, b] = end
        b = end
        if _AFTER_FROM.search(view, max(a - 80, 0), a):
            while (m := _FROM_TO.match(view, b)) and m.end("v") > m.start("v"):  # ("from x to y to z")
                more.append(m.span("v"))
                b = m.end("v")
        while m := _THROUGH_EMPTY.match(view, b) or _CHANGED_TO.match(view, b):  # (a chain, however long)
            if m.re is _THROUGH_EMPTY:
                b = m.end()
                continue
            if m.end("v") <= m.start("v"):
                break
            b = _before_arrow(view, *m.span("v"))
            more.append((m.start("v"), b))
        reach = b
    return merge([(a, cut.get((a, b), b)) for a, b in found] + more) if more or cut else found


@functools.cache  # (2**14 kinds of text at most)
def _patterns(bits: int) -> tuple[re.Pattern[str], ...]:
    return tuple(pattern for i, pattern in enumerate(PATTERNS) if bits >> i & 1)


def lower(text: str) -> str:
    """``text`` in lower case as Python re's ``(?i)`` reads it, where the words are looked for:
    beyond ASCII, "\u0131" and "\u0130" (a Turkish dotless and dotted I, whose ``lower`` is
    no "i": "NAT\u0130ONAL_\u0130D", "COOK\u0130E" were logged in clear) as "i", and a long "s"
    as "s" (of U+0080 to U+2FFFF, the only ones ``(?i)`` takes for an ASCII letter that ``lower``
    does not make one; a Kelvin sign's is "k")."""
    low = text.lower()
    if not text.isascii():
        low = low.replace("\u0131", "i").replace("i\u0307", "i").replace("\u017f", "s")
    return low


def patterns_for(text: str, low: str, words: bool = True) -> tuple[re.Pattern[str], ...]:
    """The patterns that may match ``text`` (``low``: it in lower case, ``lower``): those whose words it
    holds (none where ``words`` is false: the caller found none of ``HINTS`` in it), and the
    private key's body line patterns where it holds one. ``in`` runs in C, a case-insensitive
    alternation in Python's re at every position; one loop over the words (a nested one per
    pattern was a third of a JSON record's masking). A body line holds a capital: text that
    ``lower`` leaves as it is holds none, and is not searched for one (the search tries its
    lookaheads at every position: a third of an access-log line's hints)."""
    bits = _BODY_LINE_BITS if low != text and _PEM_BODY_LINE.search(text) else 0
    if words:
        for word, word_bits in _WORD_BITS:
            if word in low:
                bits |= word_bits
    return _patterns(bits)


def spans(text: str, userinfo: bool = False, chained: bool = True) -> list[Span]:
    """Where the credentials in ``text`` are, in order, overlapping ones merged; with
    ``userinfo``, a URL's whole user information (its user too) rather than its password; with
    ``chained``, the new values written after them (``changed_to``) too."""
    found: list[Span] = []
    view, seen = as_seen(text), shown(text)  # (a tab as a space, a control sequence's final byte ends a word)
    for pattern in patterns_for(text, lower(text)):
        found += [(a, b) for a, b in (m.span(_group(pattern, userinfo)) for m in pattern.finditer(view)) if a < b]
    if seen is not None:  # (read too as a terminal shows it, its words there, each span mapped back)
        found = [(a, b) for a, b in found if holds_value(text, seen[1], a, b)]  # (only sequences: none)
        for pattern in patterns_for(seen[0], lower(seen[0])):
            found += [
                shown_back(seen[1], a, b)
                for a, b in (m.span(_group(pattern, userinfo)) for m in pattern.finditer(seen[0]))
                if a < b
            ]
    return changed_to(text, merge(found)) if chained else merge(found)


def _group(pattern: re.Pattern[str], userinfo: bool) -> str | int:
    """The group of ``pattern``'s match that is its value (``spans``)."""
    return "u" if userinfo and "u" in pattern.groupindex else "v" if "v" in pattern.groupindex else 0


def merge(found: list[Span]) -> list[Span]:
    """``found`` in order, overlapping or touching spans as one."""
    merged: list[Span] = []
    for a, b in sorted(found):  # (runs already in order: Timsort merges them in linear time)
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def scrub(text: str, mark: str = "***") -> str:
    """``text`` with each credential as ``mark``, a URL's user information whole
    (``https://***@host``): for a reader who needs none of it (a Slack report). Text that holds
    one once read as a person reads it (``password%3Dhunter2``, ``api\u00a0key ...``) is
    written so (``normalise``), as the masking writes it."""
    folded = normalise(text)
    if folded != text and spans(folded, userinfo=True):
        return write_normalised(
            text, folded, lambda t, w: _scrubbed(t, w, mark), lambda t: bool(spans(t, userinfo=True))
        )
    return _scrubbed(text, text, mark)


def _scrubbed(text: str, written: str, mark: str) -> str:
    """``written`` (``text``'s length) with each span of a credential in ``text`` as ``mark``."""
    pieces, end = [], 0
    for a, b in spans(text, userinfo=True):
        pieces += [written[end:a], mark]
        end = b
    return "".join(pieces) + written[end:] if pieces else written
