"""scifm.metrics: values checked against scikit-learn/scipy or computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scifm.metrics import (
    bleu,
    classification_metrics,
    evaluate_file,
    evaluate_predictions,
    match_class,
    parse_number,
    regression_metrics,
    text_metrics,
    write_metrics,
)

CELL_CLASSES = [
    "CD4+ T",
    "CD4+ T helper",
    "CD14+ Monocyte",
    "Dendritic",
    "CD4+/CD45RA+/CD25- Naive T",
    "cF4",
    "A1",
]


def _plain(value: Any) -> None:
    """Assert ``value`` holds only built-in JSON types (no numpy scalars)."""
    if isinstance(value, dict):
        for v in value.values():
            _plain(v)
    elif isinstance(value, list):
        for v in value:
            _plain(v)
    else:
        assert type(value) in (int, float, str, bool, type(None)), type(value)


# -- regression --------------------------------------------------------------------------------------


def test_regression_matches_sklearn_and_scipy() -> None:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    y = rng.normal(size=20)
    p = y + rng.normal(scale=0.5, size=20)
    p[3] = p[4]  # a tie in the predictions, for the rank average
    m = regression_metrics(y.tolist(), p.tolist())
    assert m["n"] == 20
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, p)))
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["r2"] == pytest.approx(r2_score(y, p))
    assert m["pearson"] == pytest.approx(pearsonr(y, p)[0])
    assert m["spearman"] == pytest.approx(spearmanr(y, p)[0])
    _plain(m)
    json.dumps(m)


def test_regression_hand_values() -> None:
    # residuals 0, 0, -1, 1 -> SS_res 2, RMSE sqrt(2/4), MAE 0.5; mean 2.5 -> SS_tot 5 -> R² 0.6
    m = regression_metrics([1, 2, 3, 4], [1, 2, 4, 3])
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["mae"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(0.6)
    assert m["spearman"] == pytest.approx(0.8)  # 1 - 6*2/(4*15)


def test_regression_constant_prediction_gives_nan_correlation() -> None:
    m = regression_metrics([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert math.isnan(m["pearson"]) and math.isnan(m["spearman"])
    assert m["r2"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "match"),
    [
        ([], [], "empty"),
        ([1.0, 2.0], [1.0], "different lengths"),
        ([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0], r"y_true\[1\]"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, float("inf")], r"y_pred\[2\]"),
        ([2.0, 2.0], [1.0, 3.0], "constant targets"),
    ],
)
def test_regression_errors(y_true: list[float], y_pred: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        regression_metrics(y_true, y_pred)


# -- classification ----------------------------------------------------------------------------------


def test_classification_matches_sklearn() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    classes = ["b", "a", "c"]
    y_true = ["a", "a", "b", "c", "c", "b", "a", "c"]
    y_pred = ["a", "b", "b", "c", "a", "c", "a", "c"]
    m = classification_metrics(y_true, y_pred, classes)
    assert m["n"] == 8
    assert m["classes"] == classes
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=classes, average="macro"))
    expected = confusion_matrix(y_true, y_pred, labels=classes)
    assert [row[:-1] for row in m["confusion"]] == expected.tolist()
    assert [row[-1] for row in m["confusion"]] == [0, 0, 0]
    assert m["unparsed"] == 0
    _plain(m)


def test_classification_other_column_and_unparsed() -> None:
    m = classification_metrics(["a", "a", "b", "b"], ["a", None, "b", "zzz"], ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion"] == [[1, 0, 1], [0, 1, 1]]
    assert m["unparsed"] == 2
    # each class: TP 1, FP 0 (unparsed is nobody's false positive), FN 1 -> F1 = 2/(2+0+1)
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_classification_default_classes_and_absent_class() -> None:
    m = classification_metrics(["y", "x", "y"], ["y", "x", "x"])
    assert m["classes"] == ["x", "y"]
    # x: TP1 FP1 FN0 -> 2/3; y: TP1 FP0 FN1 -> 2/3
    assert m["macro_f1"] == pytest.approx(2 / 3)
    # "c" has no support and no predictions: left out of the mean
    assert classification_metrics(["a", "b"], ["a", "b"], ["a", "b", "c"])["macro_f1"] == 1.0


def test_classification_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="different lengths"):
        classification_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match=r"y_true\[1\]"):
        classification_metrics(["a", "q"], ["a", "a"], ["a", "b"])


# -- match_class -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Dendritic", "Dendritic"),
        ("  'Dendritic'. ", "Dendritic"),
        ('"CD14+ Monocyte".', "CD14+ Monocyte"),
        ("dendritic", "Dendritic"),
        ("CF4", "cF4"),
        ("cF4", "cF4"),
        ("The cell is a cd14+ monocyte!", "CD14+ Monocyte"),
        ("CD4+ T helper cells", "CD4+ T helper"),
        ("cd4+ t", "CD4+ T"),
        ("looks like a CD4+ T cell", "CD4+ T"),
        ("type: cd4+/cd45ra+/cd25- naive t", "CD4+/CD45RA+/CD25- Naive T"),
        ("Answer: A1;", "A1"),
        ("A10", None),  # no whole-token match
        ("Dendritic or A1", None),  # two classes
        ("CD4+ T or CD4+ T helper", None),  # the shorter one also occurs on its own
        ("no idea", None),
    ],
)
def test_match_class(text: str, expected: str | None) -> None:
    assert match_class(text, CELL_CLASSES) == expected


# -- parse_number ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-1.22 kcal/mol", -1.22),
        ("The value is 3.5e-2", 0.035),
        ("\u22122.1", -2.1),
        ("+4", 4.0),
        ("1,234.5", 1234.5),
        ("12,345,678 atoms", 12345678.0),
        ("1,23", 1.0),  # not a thousands pattern: the comma ends the number
        (".5 eV", 0.5),
        ("about 7 or 8", 7.0),
        ("abc", None),
        ("nan", None),
        ("inf", None),
        ("A1", None),  # glued to a letter: a name, not a number
        ("CD4+ T", None),
        ("1e999", None),  # overflows
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    got = parse_number(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


# -- BLEU and text -----------------------------------------------------------------------------------


def test_bleu_identical_is_one() -> None:
    refs = ["CCO", "c1ccccc1", "a", "the cat sat"]
    assert bleu(refs, refs) == 1.0
    assert bleu(refs, refs, tokenize="word") == 1.0


def test_bleu_empty_hypotheses_is_zero() -> None:
    assert bleu(["abc", "de"], ["", ""]) == 0.0
    assert bleu(["abc"], ["xyz"]) == 0.0  # no unigram match


def test_bleu_hand_computed_with_brevity_penalty() -> None:
    # words; ref "the cat sat on the mat" (r = 6), hyp "the cat on the mat" (c = 5)
    # unigrams: the x2, cat, on, mat -> all within reference counts: p1 = 5/5
    # bigrams: "the cat", "cat on", "on the", "the mat" -> "cat on" absent: p2 = 3/4
    # BP = exp(1 - 6/5); BLEU = BP * sqrt(p1 * p2)
    expected = math.exp(1 - 6 / 5) * math.sqrt(1.0 * 0.75)
    got = bleu(["the cat sat on the mat"], ["the cat on the mat"], max_n=2, tokenize="word")
    assert got == pytest.approx(expected)
    assert got == pytest.approx(0.70904, abs=1e-5)


def test_bleu_corpus_sums_counts() -> None:
    # chars, max_n = 2. Pair 1 "ab"/"ab": unigrams 2/2, bigrams 1/1.
    # Pair 2 "abc"/"abd": unigrams a, b match -> 2/3; bigrams "ab" matches, "bd" not -> 1/2.
    # corpus p1 = 4/5, p2 = 2/3 (not the mean of sentence scores); c = r = 5 -> BP = 1
    assert bleu(["ab", "abc"], ["ab", "abd"], max_n=2) == pytest.approx(math.sqrt(4 / 5 * 2 / 3))


def test_bleu_char_counts_spaces_and_no_penalty_when_longer() -> None:
    # hyp chars 'a', ' ', 'b' vs ref 'a', 'b': p1 = 2/3; c = 3 >= r = 2 -> BP = 1
    assert bleu(["ab"], ["a b"], max_n=1) == pytest.approx(2 / 3)


def test_bleu_smoothing() -> None:
    # words, ref "a b c d", hyp "a b d c": p1 = 4/4; bigrams ab, bd, dc -> 1/3;
    # trigrams abd, bdc -> 0/2: a zero, so add-one for n > 1:
    # p2 = 2/4, p3 = 1/3, p4 = (0 + 1)/(1 + 1); c = r = 4 -> BP = 1
    expected = (1.0 * 0.5 * (1 / 3) * 0.5) ** 0.25
    assert bleu(["a b c d"], ["a b d c"], tokenize="word") == pytest.approx(expected)


def test_bleu_errors() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        bleu([], [])
    with pytest.raises(ValueError, match="tokenize"):
        bleu(["a"], ["a"], tokenize="bpe")


def test_text_metrics() -> None:
    m = text_metrics(["CCO", "c1ccccc1 "], [" CCO", "c1cccc1"])
    assert m["n"] == 2
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["bleu_char"] == pytest.approx(bleu(["CCO", "c1ccccc1 "], [" CCO", "c1cccc1"]))
    assert m["bleu_word"] == pytest.approx(bleu(["CCO", "c1ccccc1 "], [" CCO", "c1cccc1"], tokenize="word"))
    assert 0.0 < m["bleu_char"] < 1.0
    _plain(m)


# -- prediction rows and files -----------------------------------------------------------------------


def _regression_rows() -> list[dict[str, Any]]:
    return [
        {
            "id": "a",
            "generated": "-1.0 kcal/mol",
            "answer": "-1.2",
            "target": [-1.2, 3.0],
            "head": [-1.0, 2.0],
        },
        {"id": "b", "generated": "0.5", "answer": "0.4", "target": [0.4, 1.0], "head": [0.0, 1.5]},
        {"id": "c", "generated": "I am not sure", "answer": "2.0", "target": [2.0, 0.0], "head": [2.5, 0.5]},
        {"id": "d", "generated": "\u22123", "answer": "-3.1", "target": [-3.1, 2.0], "head": [-2.0, 2.5]},
    ]


def test_evaluate_regression_head_and_numeric_text() -> None:
    rows = _regression_rows()
    m = evaluate_predictions(rows, target_names=["expt", "calc"])
    assert m["n"] == 4
    assert set(m) == {"n", "head", "text", "text_numeric"}
    assert set(m["head"]) == {"expt", "calc"}
    expt = regression_metrics([r["target"][0] for r in rows], [r["head"][0] for r in rows])
    calc = regression_metrics([r["target"][1] for r in rows], [r["head"][1] for r in rows])
    assert m["head"]["expt"] == pytest.approx(expt)
    assert m["head"]["calc"] == pytest.approx(calc)
    assert m["text"] == pytest.approx(
        text_metrics([r["answer"] for r in rows], [r["generated"] for r in rows])
    )
    # row "c" does not parse and is left out of the regression
    numeric = m["text_numeric"]
    assert numeric["parsed"] == 3
    assert numeric["parse_rate"] == pytest.approx(0.75)
    assert numeric["n"] == 3
    assert numeric["rmse"] == pytest.approx(regression_metrics([-1.2, 0.4, -3.1], [-1.0, 0.5, -3.0])["rmse"])
    assert numeric["mae"] == pytest.approx((0.2 + 0.1 + 0.1) / 3)
    _plain(m)
    json.dumps(m)


def test_evaluate_default_names_and_no_numeric_parse() -> None:
    rows = [
        {"id": "a", "generated": "none", "answer": "1.5", "target": [1.0], "head": [1.5]},
        {"id": "b", "generated": "n/a", "answer": "2.5", "target": [2.0], "head": [2.5]},
    ]
    m = evaluate_predictions(rows)
    assert set(m["head"]) == {"output_0"}
    assert m["head"]["output_0"]["mae"] == pytest.approx(0.5)
    assert m["text_numeric"] == {"parsed": 0, "parse_rate": 0.0}


def test_evaluate_text_only_answers_not_numeric() -> None:
    rows = [{"id": "a", "generated": "CCO"}, {"id": "b", "generated": "CCN", "answer": "CCN"}]
    m = evaluate_predictions(rows)
    assert set(m) == {"n", "text"}  # answers are not numbers; no head
    assert m["n"] == 2
    assert m["text"]["n"] == 1 and m["text"]["exact_match"] == 1.0


def test_evaluate_classification_head_and_text_class() -> None:
    classes = ["A1", "cF4", "Dendritic"]
    rows = [
        {"id": "0", "generated": "A1", "answer": "A1", "target": 0, "head": [2.0, 0.1, -1.0]},
        {"id": "1", "generated": "It is cf4.", "answer": "cF4", "target": 1, "head": [0.0, 1.0, 0.5]},
        {"id": "2", "generated": "A1", "answer": "Dendritic", "target": 2, "head": [3.0, 0.0, 1.0]},
        {"id": "3", "generated": "unsure", "answer": "Dendritic", "target": 2, "head": [0.0, 0.0, 4.0]},
    ]
    m = evaluate_predictions(rows, classes=classes)
    assert set(m) == {"n", "head", "text", "text_class"}
    head = m["head"]
    # head argmax: A1, cF4, A1, Dendritic vs true A1, cF4, Dendritic, Dendritic
    assert head["accuracy"] == pytest.approx(0.75)
    assert head["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]]
    # A1: TP1 FP1 FN0 -> 2/3; cF4: 1; Dendritic: TP1 FP0 FN1 -> 2/3
    assert head["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    text_class = m["text_class"]
    # text: A1, cF4 (matched inside the sentence), A1, None
    assert text_class["accuracy"] == pytest.approx(0.5)
    assert text_class["unparsed"] == 1
    assert text_class["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1]]
    # A1: TP1 FP1 FN0 -> 2/3; cF4: 1; Dendritic: TP0 FP0 FN2 -> 0
    assert text_class["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    _plain(m)


def test_evaluate_classification_head_without_classes_uses_indices() -> None:
    rows = [
        {"id": "0", "generated": "x", "target": 1, "head": [0.0, 2.0]},
        {"id": "1", "generated": "y", "target": 0, "head": [0.0, 2.0]},
    ]
    m = evaluate_predictions(rows)
    assert m["head"]["classes"] == ["0", "1"]
    assert m["head"]["confusion"] == [[0, 1, 0], [0, 1, 0]]
    assert "text" not in m


def test_evaluate_errors() -> None:
    with pytest.raises(ValueError, match="no prediction rows"):
        evaluate_predictions([])
    with pytest.raises(ValueError, match="generated"):
        evaluate_predictions([{"id": "a"}])
    with pytest.raises(ValueError, match="target 5"):
        evaluate_predictions([{"id": "a", "generated": "", "target": 5, "head": [0.0, 1.0]}])


def test_evaluate_file_and_write_metrics(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    rows = _regression_rows()
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    m = evaluate_file(path, target_names=["expt", "calc"])
    assert m == evaluate_predictions(rows[:3], target_names=["expt", "calc"])
    out = write_metrics(m, tmp_path / "sub" / "dir" / "metrics.json")
    assert out.is_file()
    assert json.loads(out.read_text()) == m


def test_evaluate_file_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a", "generated": "1"}\n\n{"id": "b", "generated": \n')
    with pytest.raises(ValueError, match="line 3"):
        evaluate_file(path)
