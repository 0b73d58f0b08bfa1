"""Loaders for the deployment assets and a small Terraform-regex (RE2) to Python translator.

No Docker engine, Terraform binary or AWS account exists where these tests run, so the assets are
checked by parsing them: HCL2 with python-hcl2 (7.x), YAML with PyYAML, the Dockerfile by hand.

python-hcl2 7.x representation, relied on below:

* every block type maps to a list of dicts (``{"resource": [{"aws_x": {"name": {...}}}, ...]}``),
  nested blocks (``statement {}``) to lists of dicts;
* a literal string is its value (``"kms:Decrypt"``); any expression is its HCL source wrapped in
  ``${...}`` (``var.kms_key_arn`` -> ``"${var.kms_key_arn}"``); string literals *inside* an
  expression keep their HCL escapes (``"\\\\."`` stays two backslashes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TERRAFORM = DEPLOY / "terraform"

# Metric names the worker exports (contract between deploy/ and worker/metrics).
WORKER_METRICS = frozenset(
    {
        "billing_entries_total",
        "billing_fence_results_total",
        "billing_fail_open_total",
        "billing_credit_issued_base_units_total",
        "billing_cap_exceeded_total",
        "billing_pending",
        "billing_wal_append_seconds",
        "billing_entry_seconds",
        "billing_breaker_open",
    }
)
HISTOGRAMS = frozenset({"billing_wal_append_seconds", "billing_entry_seconds"})
FIVE_ALARMS = frozenset(
    {"cpu_high", "memory_high", "error_rate", "billing_pending_high", "desired_count_drift"}
)


# --- Terraform ---------------------------------------------------------------------------------


def load_terraform() -> dict[str, list[Any]]:
    """All ``deploy/terraform/*.tf`` files parsed and merged by top-level block type."""
    merged: dict[str, list[Any]] = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open(encoding="utf-8") as handle:
            parsed: dict[str, list[Any]] = hcl2.load(handle)  # type: ignore[attr-defined]
        for key, blocks in parsed.items():
            merged.setdefault(key, []).extend(blocks)
    return merged


def labelled(tf: dict[str, list[Any]], kind: str, type_: str) -> dict[str, dict[str, Any]]:
    """``resource``/``data`` blocks of one type, by name."""
    out: dict[str, dict[str, Any]] = {}
    for entry in tf.get(kind, []):
        for block_type, named in entry.items():
            if block_type != type_:
                continue
            for name, body in named.items():
                assert name not in out, f"duplicate {kind} {type_}.{name}"
                out[name] = body
    return out


def variables(tf: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for entry in tf.get("variable", []):
        out.update(entry)
    return out


def tf_locals(tf: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in tf.get("locals", []):
        out.update(entry)
    return out


def unwrap(value: Any) -> Any:
    """``"${expr}"`` -> ``"expr"``; anything else unchanged."""
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        return value[2:-1]
    return value


def jsonencoded(value: str) -> Any:
    """The literal argument of ``jsonencode(...)`` as Python data (references stay ``${...}``)."""
    prefix, suffix = "${jsonencode(", ")}"
    assert value.startswith(prefix) and value.endswith(suffix), value[:80]
    return json.loads(value[len(prefix) : -len(suffix)])


def resolve_local(tf: dict[str, list[Any]], value: Any) -> Any:
    """Follow ``"${local.x}"`` references (one level at a time) to the local's value."""
    for _ in range(10):
        match = re.fullmatch(r"\$\{local\.([A-Za-z0-9_]+)\}", value) if isinstance(value, str) else None
        if not match:
            return value
        value = tf_locals(tf)[match.group(1)]
    raise AssertionError("local reference loop")


def iter_statements(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Statements of an ``aws_iam_policy_document``, including ``dynamic "statement"`` contents."""
    yield from doc.get("statement", [])
    for dynamic in doc.get("dynamic", []):
        for label, body in dynamic.items():
            if label == "statement":
                yield from body.get("content", [])


_HCL_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def hcl_unescape(raw: str) -> str:
    """The value of an HCL quoted-string literal given its source between the quotes."""
    out: list[str] = []
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "\\":
            nxt = raw[i + 1]
            if nxt in _HCL_ESCAPES:
                out.append(_HCL_ESCAPES[nxt])
                i += 2
                continue
            if nxt == "u":
                out.append(chr(int(raw[i + 2 : i + 6], 16)))
                i += 6
                continue
            if nxt == "U":
                out.append(chr(int(raw[i + 2 : i + 10], 16)))
                i += 10
                continue
            raise ValueError(f"unknown HCL escape \\{nxt}")
        if raw.startswith(("$${", "%%{"), i):
            out.append(raw[i + 1 : i + 3])
            i += 3
            continue
        if raw.startswith(("${", "%{"), i):
            raise ValueError("template interpolation inside a regex literal")
        out.append(char)
        i += 1
    return "".join(out)


_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": " \\t",
    "digit": "0-9",
    "lower": "a-z",
    "space": " \\t\\n\\v\\f\\r",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}


def re2_to_python(pattern: str) -> re.Pattern[str]:
    """Compile a Terraform (RE2 syntax) regex with Python ``re`` and the same meaning.

    Differences handled: RE2's ``$`` (without ``(?m)``) and ``\\z`` match only at the very end of
    the text, Python's ``$`` also before a final newline -> ``\\Z``; POSIX classes ``[[:digit:]]``
    are expanded. Constructs whose meaning differs and are not translated are refused.
    """
    if re.search(r"\(\?[a-zA-Z]*[mU]", pattern):
        raise ValueError("multi-line / ungreedy flags are not translated")
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            nxt = pattern[i + 1]
            if nxt in "pPCQE":
                raise ValueError(f"RE2 escape \\{nxt} not translated")
            out.append("\\Z" if nxt == "z" and not in_class else pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            posix = re.match(r"\[:(\^?)([a-z]+):\]", pattern[i:])
            if posix:
                if posix.group(1):
                    raise ValueError("negated POSIX class not translated")
                out.append(_POSIX_CLASSES[posix.group(2)])
                i += posix.end()
                continue
            if char == "]":
                in_class = False
            out.append(char)
            i += 1
            continue
        if char == "[":
            in_class = True
            out.append(char)
            i += 1
            if pattern[i : i + 1] == "^":
                out.append("^")
                i += 1
            if pattern[i : i + 1] == "]":  # a literal ] right after [ or [^
                out.append("\\]")
                i += 1
            continue
        out.append("\\Z" if char == "$" else char)
        i += 1
    return re.compile("".join(out))


_CAN_REGEX = re.compile(
    r'\$\{can\(regex\("(?P<pattern>(?:[^"\\]|\\.)*)",\s*var\.(?P<var>[A-Za-z0-9_]+)\)\)\}'
)


def validation_regexes(variable: dict[str, Any], name: str) -> list[re.Pattern[str]]:
    """Each ``validation`` of ``variable`` must be exactly ``can(regex("...", var.<name>))``."""
    patterns = []
    for validation in variable.get("validation", []):
        match = _CAN_REGEX.fullmatch(validation["condition"])
        assert match, f"validation of {name} is not a plain can(regex(...)): {validation['condition']}"
        assert match.group("var") == name
        patterns.append(re2_to_python(hcl_unescape(match.group("pattern"))))
    return patterns


def terraform_accepts(patterns: list[re.Pattern[str]], value: str) -> bool:
    """Terraform's ``regex()`` searches (it is not anchored); every validation must pass."""
    return all(pattern.search(value) is not None for pattern in patterns)


def _lazy_if(expression: str) -> str:
    """``IF(c, a, b)`` -> ``((a) if (c) else (b))``: only the chosen branch is evaluated, as in
    CloudWatch, where the unchosen branch's datapoint (say a division by zero) is not used."""
    start = expression.find("IF(")
    if start < 0:
        return expression
    depth = 0
    args: list[str] = []
    current: list[str] = []
    i = start + 3
    while True:
        char = expression[i]
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                break
            depth -= 1
        elif char == "," and depth == 0:
            args.append("".join(current))
            current = []
            i += 1
            continue
        current.append(char)
        i += 1
    args.append("".join(current))
    assert len(args) == 3, f"IF takes 3 arguments: {expression!r}"
    cond, yes, no = (_lazy_if(arg) for arg in args)
    replaced = f"(IF_({cond}, lambda: ({yes}), lambda: ({no})))"
    return expression[:start] + replaced + _lazy_if(expression[i + 1 :])


def metric_math(expression: str, values: dict[str, float | None]) -> float | None:
    """Evaluate the CloudWatch metric-math subset used by the alarms for one datapoint.

    ``None`` is a missing datapoint; all ``None`` means the metrics have no data at all.
    Supports IF, FILL, arithmetic, comparisons, ``||``/``&&`` (also ``OR``/``AND``) and the
    ids of other queries.
    """
    python = re.sub(r"\|\||\bOR\b", " or ", expression)
    python = re.sub(r"&&|\bAND\b", " and ", python)
    python = re.sub(r"(?<![<>=!])!(?!=)|\bNOT\b", " not ", python)
    allowed = set(values) | {"IF", "FILL", "or", "and", "not"}
    for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", python):
        assert name in allowed, f"unsupported name {name!r} in metric math {expression!r}"
    python = _lazy_if(python)
    if values and all(value is None for value in values.values()):
        # FILL only fills gaps of a series that exists: with no datapoint at all in the period,
        # there is no timestamp to fill and the expression has no datapoint either.
        return None

    def if_(condition: Any, yes: Any, no: Any) -> Any:
        if condition is None:
            return None
        return yes() if condition else no()

    def fill(value: Any, default: float) -> Any:
        return default if value is None else value

    namespace: dict[str, Any] = {**values, "__builtins__": {}, "IF_": if_, "FILL": fill}
    try:
        result: float | None = eval(python, namespace)  # our own .tf text, parsed above
    except (TypeError, ZeroDivisionError):  # arithmetic on a missing datapoint, x / 0: no datapoint
        return None
    return result


def alarm_fires(comparison: str, value: float | None, threshold: float, missing: str) -> bool:
    if value is None:
        return missing == "breaching"
    return {
        "GreaterThanThreshold": value > threshold,
        "GreaterThanOrEqualToThreshold": value >= threshold,
        "LessThanThreshold": value < threshold,
        "LessThanOrEqualToThreshold": value <= threshold,
    }[comparison]


def number(tf: dict[str, list[Any]], value: Any) -> float:
    """A literal number or ``${var.x}`` resolved to the variable's default."""
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"\$\{var\.([A-Za-z0-9_]+)\}", str(value))
    assert match, f"not a number or a variable: {value!r}"
    return float(variables(tf)[match.group(1)]["default"])


# --- YAML / Dockerfile -------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: continuations joined, comments and heredocs skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        parts = []
        while line.endswith("\\") and i < len(lines):
            parts.append(line[:-1].strip())
            line = lines[i].strip()
            i += 1
            while line.startswith("#") and i < len(lines):  # comments inside a continuation
                line = lines[i].strip()
                i += 1
        parts.append(line)
        text = " ".join(part for part in parts if part)
        for marker in re.findall(r"<<-?['\"]?([A-Za-z_]+)['\"]?", text):
            while i < len(lines) and lines[i].strip() != marker:
                i += 1
            i += 1
        instruction, _, args = text.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out
