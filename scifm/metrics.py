"""Evaluation metrics for ``scifm predict`` output: regression, classification and text.

Every function returns plain Python data (``dict``/``list``/``float``/``int``/``str``) so results can be
passed straight to :func:`json.dumps`. Only numpy is imported at module import time.

The entry points for a prediction file are :func:`evaluate_file` / :func:`evaluate_predictions`, which
score the rows written to ``predictions.jsonl``; :func:`write_metrics` saves the result as JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "bleu",
    "classification_metrics",
    "evaluate_file",
    "evaluate_predictions",
    "match_class",
    "parse_number",
    "regression_metrics",
    "text_metrics",
    "write_metrics",
]


# -- regression --------------------------------------------------------------------------------------


def _as_finite_vector(values: Sequence[float], name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array; ValueError if not numeric, not 1-D or not finite."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] is not finite: {arr[i]!r}")
    return arr


def _check_lengths(n_true: int, n_pred: int, what: str = "y_true and y_pred") -> None:
    if n_true == 0 and n_pred == 0:
        raise ValueError(f"{what} are empty")
    if n_true != n_pred:
        raise ValueError(f"{what} have different lengths: {n_true} != {n_pred}")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either input is constant (the correlation is undefined)."""
    xc = x - x.mean()
    yc = y - y.mean()
    denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    if denom == 0.0:
        return float("nan")
    return float(min(1.0, max(-1.0, float(np.dot(xc, yc)) / denom)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)  # rank of the last member of each group of ties
    mean_rank = ends - (counts - 1) / 2.0
    return np.asarray(mean_rank[inverse.reshape(-1)], dtype=np.float64)


def _regression(y_true: np.ndarray, y_pred: np.ndarray, *, constant_ok: bool) -> dict[str, float]:
    residual = y_true - y_pred
    ss_res = float(np.dot(residual, residual))
    centred = y_true - y_true.mean()
    ss_tot = float(np.dot(centred, centred))
    if ss_tot == 0.0:
        if not constant_ok:
            raise ValueError("constant targets: R² (1 - SS_res/SS_tot) is undefined when SS_tot == 0")
        r2 = float("nan")
    else:
        r2 = 1.0 - ss_res / ss_tot
    n = int(y_true.size)
    return {
        "n": n,
        "rmse": math.sqrt(ss_res / n),
        "mae": float(np.mean(np.abs(residual))),
        "r2": float(r2),
        "pearson": _pearson(y_true, y_pred),
        "spearman": _pearson(_average_ranks(y_true), _average_ranks(y_pred)),
    }


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """Error and correlation metrics of predicted against true values.

    Args:
        y_true: Reference values.
        y_pred: Predicted values, same length as ``y_true``.

    Returns:
        ``n`` (count, an int), ``rmse``, ``mae``, ``r2`` (``1 - SS_res/SS_tot``), ``pearson`` and
        ``spearman`` (Pearson correlation of average ranks, ties sharing their mean rank). ``pearson``
        and ``spearman`` are ``nan`` when the predictions are constant, since a correlation is
        undefined then.

    Raises:
        ValueError: On empty input, different lengths, a non-finite value (the message names the
            index) or constant targets (``SS_tot == 0``, where R² is undefined).
    """
    t = _as_finite_vector(y_true, "y_true")
    p = _as_finite_vector(y_pred, "y_pred")
    _check_lengths(t.size, p.size)
    return _regression(t, p, constant_ok=False)


# -- classification ----------------------------------------------------------------------------------


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro F1 and a confusion matrix for class labels.

    A prediction that is ``None`` or not one of ``classes`` ("unparsed") is wrong: it is a false
    negative for its true class and a false positive for no class.

    Args:
        y_true: True class names; each must be in ``classes`` when that is given.
        y_pred: Predicted class names, ``None`` where no class could be read from the output.
        classes: Class names in the order used for ``confusion``; default: sorted union of ``y_true``.

    Returns:
        ``n``; ``accuracy``; ``macro_f1``, the mean over ``classes`` of per-class F1
        (``2TP / (2TP + FP + FN)``), leaving out a class with neither support nor predictions;
        ``classes`` (the order used); ``confusion``, a list of rows (one per true class in ``classes``
        order) whose columns are the predicted classes in the same order plus a final "other" column
        counting unparsed predictions; ``unparsed``, the count of such predictions.

    Raises:
        ValueError: On empty input, different lengths, duplicate or empty ``classes``, or a true label
            not in ``classes``.
    """
    _check_lengths(len(y_true), len(y_pred))
    labels = list(classes) if classes is not None else sorted(set(y_true))
    if not labels:
        raise ValueError("classes is empty")
    index = {c: i for i, c in enumerate(labels)}
    if len(index) != len(labels):
        dupes = sorted(c for c, k in Counter(labels).items() if k > 1)
        raise ValueError(f"classes has duplicates: {dupes}")
    k = len(labels)
    confusion = np.zeros((k, k + 1), dtype=np.int64)  # last column: "other"
    for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True)):
        if t not in index:
            raise ValueError(f"y_true[{i}] = {t!r} is not one of classes {labels}")
        col = index.get(p, k) if p is not None else k
        confusion[index[t], col] += 1
    n = len(y_true)
    tp = np.diag(confusion[:, :k])
    support = confusion.sum(axis=1)
    predicted = confusion[:, :k].sum(axis=0)
    f1s = [
        2.0 * float(tp[j]) / float(support[j] + predicted[j])
        for j in range(k)
        if support[j] + predicted[j] > 0
    ]
    return {
        "n": n,
        "accuracy": float(tp.sum()) / n,
        "macro_f1": float(sum(f1s) / len(f1s)),  # non-empty: every true label has support
        "classes": labels,
        "confusion": [[int(v) for v in row] for row in confusion],
        "unparsed": int(confusion[:, k].sum()),
    }


_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "«": "»"}
_TRAILING_PUNCT = ".,;:!"
_ALNUM = r"[^\W_]"  # a Unicode letter or digit


def _clean_answer(text: str) -> str:
    """Strip whitespace, trailing ``.,;:!`` and surrounding quotes, repeatedly."""
    s = text.strip()
    while True:
        before = s
        s = s.rstrip(_TRAILING_PUNCT).strip()
        if len(s) >= 2 and _QUOTE_PAIRS.get(s[0]) == s[-1]:
            s = s[1:-1].strip()
        if s == before:
            return s


def match_class(text: str, classes: Sequence[str]) -> str | None:
    """Map a generated answer to one of ``classes``.

    Whitespace, trailing ``.,;:!`` and surrounding quotes are stripped first. Then, in order:

    1. an exact (case-sensitive) match;
    2. a case-insensitive exact match, if exactly one class matches so;
    3. a search for class names as whole token sequences inside the text (case-insensitive; a match
       must not be preceded or followed by a letter or digit, so ``"A1"`` is not found in ``"A10"``).
       Longer names are searched first and an occurrence lying inside an occurrence of a longer name
       is ignored, so ``"CD4+ T helper cells"`` gives ``"CD4+ T helper"`` rather than ``"CD4+ T"``.
       If exactly one class is found it is returned.

    Args:
        text: The generated answer.
        classes: Candidate class names (may contain ``+``, ``/``, ``-``, spaces and digits).

    Returns:
        The matching class name, or ``None`` if none or several classes match.
    """
    raw = text.strip()
    if raw in classes:
        return raw
    s = _clean_answer(text)
    if s in classes:
        return s
    folded = s.casefold()
    ci = [c for c in classes if c.casefold() == folded]
    if len(ci) == 1:
        return ci[0]
    if ci:
        return None
    claimed: list[tuple[int, int]] = []
    found: list[str] = []
    for name in sorted(dict.fromkeys(classes), key=len, reverse=True):
        if not name.strip():
            continue
        pattern = re.compile(rf"(?<!{_ALNUM}){re.escape(name)}(?!{_ALNUM})", re.IGNORECASE)
        spans = [
            m.span()
            for m in pattern.finditer(s)
            if not any(a <= m.start() and m.end() <= b for a, b in claimed)
        ]
        if spans:
            found.append(name)
            claimed.extend(spans)
    return found[0] if len(found) == 1 else None


# -- numbers -----------------------------------------------------------------------------------------

_NUMBER = re.compile(
    r"(?<![\w.])"  # not part of an identifier such as "CD4" or "A1", nor "v1.2"'s second part
    r"[+-]?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)"
    r"(?:[eE][+-]?\d+)?"
)


def parse_number(text: str) -> float | None:
    """The first number written in ``text``.

    Accepted: an optional sign (``+``, ``-`` or the Unicode minus U+2212), digits with an optional
    decimal point, an optional exponent (``3.5e-2``). Commas are read as thousands separators only in
    the pattern ``d,ddd,ddd`` (one to three digits, then groups of exactly three), so ``"1,234.5"`` is
    1234.5 while ``"1,23"`` is 1. A number glued to a preceding letter, digit, underscore or ``.`` is
    skipped, so class-like tokens such as ``"CD4+"`` or ``"A1"`` are not numbers. Words such as
    ``nan`` or ``inf`` are not numbers, and a value that overflows to infinity gives ``None``.

    Args:
        text: Free text, e.g. ``"-1.22 kcal/mol"``.

    Returns:
        The value as a float, or ``None`` if the text has no number.
    """
    m = _NUMBER.search(text.replace("\u2212", "-"))
    if m is None:
        return None
    value = float(m.group(0).replace(",", ""))
    return value if math.isfinite(value) else None


# -- text --------------------------------------------------------------------------------------------


def _tokens(text: str, tokenize: str) -> list[str]:
    return list(text) if tokenize == "char" else text.split()


def bleu(
    references: Sequence[str],
    hypotheses: Sequence[str],
    *,
    max_n: int = 4,
    tokenize: str = "char",
) -> float:
    """Corpus-level BLEU (Papineni et al., 2002) with one reference per hypothesis.

    For each order ``n`` in ``1..max_n`` the clipped n-gram matches (each hypothesis n-gram counted at
    most as often as it occurs in its reference) and the hypothesis n-gram totals are summed over the
    corpus, giving precision ``p_n``. BLEU is ``BP * exp(mean(log p_n))`` with brevity penalty
    ``BP = exp(1 - r/c)`` when ``c < r`` (else 1), ``c`` and ``r`` being the total hypothesis and
    reference lengths in tokens.

    Smoothing: if any order has zero matches, every ``p_n`` with ``n > 1`` becomes
    ``(matches + 1) / (total + 1)`` (add-one, "smoothing 2" of Lin & Och, 2004); ``p_1`` is never
    smoothed, so no unigram match gives 0. This also makes a corpus of short identical strings
    (shorter than ``max_n`` tokens) score 1.0.

    Args:
        references: Reference texts.
        hypotheses: Generated texts, same length as ``references``.
        max_n: Highest n-gram order.
        tokenize: ``"char"``: the string's characters, spaces included; ``"word"``: whitespace split.

    Returns:
        A value in ``[0, 1]``; 0.0 when every hypothesis is empty.

    Raises:
        ValueError: On empty input, different lengths, ``max_n < 1`` or an unknown ``tokenize``.
    """
    _check_lengths(len(references), len(hypotheses), "references and hypotheses")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    if tokenize not in ("char", "word"):
        raise ValueError(f"tokenize must be 'char' or 'word', got {tokenize!r}")
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r_tok = _tokens(ref, tokenize)
        h_tok = _tokens(hyp, tokenize)
        ref_len += len(r_tok)
        hyp_len += len(h_tok)
        for n in range(1, max_n + 1):
            h_grams = Counter(tuple(h_tok[i : i + n]) for i in range(len(h_tok) - n + 1))
            r_grams = Counter(tuple(r_tok[i : i + n]) for i in range(len(r_tok) - n + 1))
            matches[n - 1] += sum(min(k, r_grams[g]) for g, k in h_grams.items())
            totals[n - 1] += max(len(h_tok) - n + 1, 0)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    smooth = any(m == 0 for m in matches)
    log_p = 0.0
    for n in range(max_n):
        if smooth and n > 0:
            log_p += math.log((matches[n] + 1) / (totals[n] + 1))
        else:
            log_p += math.log(matches[n] / totals[n])
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    return float(min(1.0, max(0.0, brevity * math.exp(log_p / max_n))))


def text_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Exact match and BLEU of generated against reference texts.

    Args:
        references: Reference texts.
        hypotheses: Generated texts, same length as ``references``.

    Returns:
        ``n``; ``exact_match``, the fraction equal after stripping surrounding whitespace;
        ``bleu_char`` and ``bleu_word``, corpus BLEU (see :func:`bleu`) on characters and on words.

    Raises:
        ValueError: On empty input or different lengths.
    """
    _check_lengths(len(references), len(hypotheses), "references and hypotheses")
    n = len(references)
    exact = sum(r.strip() == h.strip() for r, h in zip(references, hypotheses, strict=True))
    return {
        "n": n,
        "exact_match": exact / n,
        "bleu_char": bleu(references, hypotheses, tokenize="char"),
        "bleu_word": bleu(references, hypotheses, tokenize="word"),
    }


# -- prediction files --------------------------------------------------------------------------------


def _row_name(i: int, row: Mapping[str, Any]) -> str:
    return f"row {i} (id={row.get('id')!r})"


def _head_section(
    rows: list[tuple[int, Mapping[str, Any]]],
    classes: Sequence[str] | None,
    target_names: Sequence[str] | None,
) -> dict[str, Any]:
    kinds = {isinstance(r["target"], int) and not isinstance(r["target"], bool) for _, r in rows}
    if len(kinds) > 1:
        raise ValueError("rows mix integer (classification) and list (regression) targets")
    if kinds == {True}:
        return _head_classification(rows, classes)
    return _head_regression(rows, target_names)


def _head_classification(
    rows: list[tuple[int, Mapping[str, Any]]], classes: Sequence[str] | None
) -> dict[str, Any]:
    width = len(rows[0][1]["head"])
    names = list(classes) if classes is not None else [str(j) for j in range(width)]
    if len(names) != width:
        raise ValueError(f"{len(names)} classes given but the head has {width} logits")
    y_true: list[str] = []
    y_pred: list[str | None] = []
    for i, row in rows:
        logits = _as_finite_vector(row["head"], f"{_row_name(i, row)} head")
        if logits.size != width:
            raise ValueError(f"{_row_name(i, row)}: head has {logits.size} logits, expected {width}")
        target = row["target"]
        if not 0 <= target < width:
            raise ValueError(f"{_row_name(i, row)}: target {target} is not a class index < {width}")
        y_true.append(names[target])
        y_pred.append(names[int(np.argmax(logits))])
    return classification_metrics(y_true, y_pred, names)


def _head_regression(
    rows: list[tuple[int, Mapping[str, Any]]], target_names: Sequence[str] | None
) -> dict[str, Any]:
    targets: list[list[float]] = []
    outputs: list[list[float]] = []
    width: int | None = None
    for i, row in rows:
        target = row["target"]
        t = [target] if isinstance(target, (int, float)) else list(target)
        h = list(row["head"])
        if width is None:
            width = len(t)
        if len(t) != width or len(h) != width:
            raise ValueError(
                f"{_row_name(i, row)}: target has {len(t)} and head {len(h)} values, expected {width}"
            )
        targets.append(t)
        outputs.append(h)
    assert width is not None
    names = list(target_names) if target_names is not None else [f"output_{j}" for j in range(width)]
    if len(names) != width:
        raise ValueError(f"{len(names)} target_names given but the head has {width} outputs")
    t_arr = _as_finite_vector([v for t in targets for v in t], "target").reshape(-1, width)
    h_arr = _as_finite_vector([v for h in outputs for v in h], "head").reshape(-1, width)
    return {name: _regression(t_arr[:, j], h_arr[:, j], constant_ok=True) for j, name in enumerate(names)}


def evaluate_predictions(
    rows: Sequence[Mapping[str, Any]],
    *,
    classes: Sequence[str] | None = None,
    target_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score the rows of a ``predictions.jsonl`` written by ``scifm predict``.

    Each row has ``id`` and ``generated`` (text) and optionally ``answer`` (reference text or
    ``None``), ``target`` (a list of floats for a regression head, an int class index for a
    classification head) and ``head`` (regression outputs or classification logits). A section is
    computed over the rows that carry what it needs and left out when no row does.

    Sections:
        ``n``: the number of rows (always).
        ``head``: rows with ``head`` and ``target``. Regression: ``{name: regression_metrics}`` per
            output, named by ``target_names`` (default ``output_{i}``); a scalar float target is
            read as one output. Classification: :func:`classification_metrics` of
            ``classes[argmax(head)]`` against ``classes[target]`` (class names default to the
            index as a string). Unlike :func:`regression_metrics`, constant targets give ``r2`` =
            ``nan`` here instead of an error, so one constant output cannot abort the evaluation.
        ``text``: rows with a non-``None`` ``answer``: :func:`text_metrics` of the answers against
            the generated texts.
        ``text_numeric``: when every such answer contains a number (:func:`parse_number`):
            :func:`regression_metrics` of the parsed answers against the parsed generated values,
            over the rows whose generated text parses (rows that do not are left out), plus
            ``parsed`` (that count) and ``parse_rate`` (its fraction of the answered rows). If no
            generated text parses, only ``parsed`` = 0 and ``parse_rate`` = 0.0. Constant answers give
            ``r2`` = ``nan`` as above.
        ``text_class``: when ``classes`` is given: :func:`classification_metrics` of the answers
            against ``match_class(generated, classes)``. Answers are themselves mapped with
            :func:`match_class` (the identity for an exact class name).

    Args:
        rows: The prediction rows.
        classes: Class names, for a classification head and for ``text_class``.
        target_names: Names of the regression outputs.

    Returns:
        The metrics as plain data.

    Raises:
        ValueError: On no rows, a row without ``generated`` text, inconsistent head/target shapes,
            a target index out of range, or (with ``classes``) an answer that names no class.
    """
    if len(rows) == 0:
        raise ValueError("no prediction rows")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i} is not a mapping: {type(row).__name__}")
        if not isinstance(row.get("generated"), str):
            raise ValueError(f"{_row_name(i, row)} has no 'generated' text")
    result: dict[str, Any] = {"n": len(rows)}

    scored = [(i, r) for i, r in enumerate(rows) if r.get("head") is not None and r.get("target") is not None]
    if scored:
        result["head"] = _head_section(scored, classes, target_names)

    answered = [(i, r) for i, r in enumerate(rows) if r.get("answer") is not None]
    if answered:
        answers = [str(r["answer"]) for _, r in answered]
        generated = [str(r["generated"]) for _, r in answered]
        result["text"] = text_metrics(answers, generated)

        true_values = [parse_number(a) for a in answers]
        if all(v is not None for v in true_values):
            pairs = [
                (t, g)
                for t, g in zip(true_values, (parse_number(g) for g in generated), strict=True)
                if t is not None and g is not None
            ]
            numeric: dict[str, Any] = {"parsed": len(pairs), "parse_rate": len(pairs) / len(answers)}
            if pairs:
                t_arr = np.array([t for t, _ in pairs], dtype=np.float64)
                g_arr = np.array([g for _, g in pairs], dtype=np.float64)
                numeric = {**_regression(t_arr, g_arr, constant_ok=True), **numeric}
            result["text_numeric"] = numeric

        if classes is not None:
            true_classes: list[str] = []
            for (i, row), answer in zip(answered, answers, strict=True):
                label = match_class(answer, classes)
                if label is None:
                    raise ValueError(f"{_row_name(i, row)}: answer {answer!r} names none of {list(classes)}")
                true_classes.append(label)
            result["text_class"] = classification_metrics(
                true_classes, [match_class(g, classes) for g in generated], classes
            )
    return result


def evaluate_file(
    path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    target_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read a JSON-lines prediction file and score it with :func:`evaluate_predictions`.

    Args:
        path: The ``predictions.jsonl`` file; blank lines are skipped.
        classes: Passed to :func:`evaluate_predictions`.
        target_names: Passed to :func:`evaluate_predictions`.

    Returns:
        The metrics from :func:`evaluate_predictions`.

    Raises:
        ValueError: On a line that is not a JSON object (the message names the 1-based line number)
            or any error of :func:`evaluate_predictions`.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not valid JSON: {exc.msg}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno} is not a JSON object")
            rows.append(row)
    return evaluate_predictions(rows, classes=classes, target_names=target_names)


def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``metrics`` as indented JSON, creating parent directories.

    Undefined values (``nan``, e.g. a correlation with constant predictions) are written as ``NaN``,
    which Python's :mod:`json` reads back but strict JSON parsers reject.

    Args:
        metrics: The metrics, e.g. from :func:`evaluate_file`.
        path: Destination file.

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return out
