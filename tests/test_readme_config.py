"""The README's config reference states the defaults `pretrain_defaults()` and `detect_defaults()`
really have: every `key | value` row of the pretraining table and every `key=value` of the
detection field list is parsed and compared (descriptive values, e.g. "biases/norms/PE/t/b", are
not compared; the counts below keep the parser from silently matching nothing)."""

from __future__ import annotations

import ast
import os
import re

import pytest

from rovit_jax.detect_config import detect_defaults
from rovit_jax.pretrain_config import pretrain_defaults

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _split_top(text: str) -> list[str]:
    """Splits at commas outside brackets and double-quoted strings."""
    parts, depth, current, quoted = [], 0, "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "([{":
            depth += 1
        elif not quoted and ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


class _Descriptive(ValueError):
    pass


def _value(text: str):
    # Remarks in parentheses after a value: "0 (=end)", "0.01 (None: ...)", "(before AdamW...)".
    text = re.sub(r"\s+\((?:=|None:|before )[^)]*\)\s*$", "", text.strip()).strip("` ")
    fraction = re.fullmatch(r"(\d+)/(\d+)", text)
    if fraction:
        return int(fraction[1]) / int(fraction[2])
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[A-Za-z_]\w*", text):  # a bare word names a string value: cosine
            return text
        raise _Descriptive(text) from None


def _norm(v):
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def _lookup(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _pretrain_rows(readme: str) -> list[tuple[str, str]]:
    start = readme.index("| `task` |")
    table = readme[start : readme.index("\n\n", start)]
    pairs = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        keys = []
        for key in re.findall(r"`([^`]*)`", cells[0]):
            brace = re.fullmatch(r"(.*)\{(.*)\}", key)
            keys += [brace[1] + k.strip() for k in brace[2].split(",")] if brace else [key]
        values = _split_top(cells[1])
        assert len(keys) == len(values), (
            f"README row {line!r}: {len(keys)} keys, {len(values)} values"
        )
        pairs += zip(keys, values)
    return pairs


def _detect_items(readme: str) -> list[tuple[str, str]]:
    start = readme.index("Detection config fields (")
    body = " ".join(readme[start : readme.index("\n\n", start)].split()).split(":", 1)[1]
    pairs = []

    def walk(prefix: str, inner: str) -> None:
        for item in _split_top(inner):
            nested = re.fullmatch(r"(\w+)\{(.*)\}", item)
            if nested:
                walk(prefix + nested[1], nested[2])
            elif "=" in item:
                key, value = item.split("=", 1)
                pairs.append((prefix + key.strip(), value))

    for prefix, inner in re.findall(r"`(\w+)\.\{(.*?)\}`", body):
        walk(prefix + ".", inner)
    pairs += re.findall(r"`([\w.]+)=([^`]*)`", body)
    return pairs


@pytest.mark.parametrize(
    "rows, defaults, min_compared",
    [(_pretrain_rows, pretrain_defaults, 55), (_detect_items, detect_defaults, 45)],
    ids=["pretraining table", "detection fields"],
)
def test_readme_defaults_equal_the_config_defaults(rows, defaults, min_compared):
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    config = defaults()
    compared, wrong = 0, []
    for key, text in rows(readme):
        try:
            want = _value(text)
        except _Descriptive:
            continue
        got = _lookup(config, key)  # a KeyError names a README key the config does not have
        compared += 1
        if _norm(want) != _norm(got):
            wrong.append(f"{key}: README {text!r}, config {got!r}")
    assert not wrong, "README config reference disagrees with the defaults:\n" + "\n".join(wrong)
    assert compared >= min_compared, compared
