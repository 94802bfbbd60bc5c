"""`evaluate` module for multiple-choice accuracy with Perceptio's strict answer parser.

Load it offline by path: `evaluate.load(metric_path("multiple_choice"))`. The parsing and scoring are
`perceptio.evaluation.answer_parsing` and `perceptio.evaluation.multiple_choice`, so this module and the Python API
always agree.
"""

from __future__ import annotations

import datasets
import evaluate

from perceptio.evaluation.multiple_choice import multiple_choice_summary


_DESCRIPTION = """\
Multiple-choice accuracy with a strict parser: an answer scores only when, after removing spatial tokens, it names
exactly one option letter ("(B)", "B", "B.", "The answer is (B).") and that letter is the reference. An answer naming
no letter, several letters ("A or B") or a letter outside the choices counts as wrong.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `str`): generated answers; spatial tokens are allowed and ignored.
    references (`list` of `str`): ground-truth letters written "(A)" or "A".
    num_choices (`int` or `list` of `int`): number of options, for all samples or per sample. Required.
Returns:
    accuracy (`float`): fraction of predictions whose parsed letter equals the reference, in [0, 1].
    num_samples (`int`): how many samples were scored.
    num_unparsed (`int`): how many predictions named no single letter within the choices (all scored wrong).
Examples:
    >>> accuracy = evaluate.load(metric_path("multiple_choice"))
    >>> accuracy.compute(predictions=["(B)", "A or B"], references=["(B)", "(A)"], num_choices=2)
    {'accuracy': 0.5, 'num_samples': 2, 'num_unparsed': 1}
"""

_CITATION = """\
@article{perceptio2026,
  title={Perceptio: Perception Enhanced Vision Language Models via Spatial Token Generation},
  journal={arXiv preprint arXiv:2603.18795},
  year={2026}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultipleChoice(evaluate.Metric):
    """Accuracy of strictly parsed option letters against "(A)"-style references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, num_choices=None) -> dict:
        if num_choices is None:
            raise ValueError(
                "num_choices is required: pass compute(..., num_choices=4) or one count per sample, so letters "
                "outside the choices are scored wrong."
            )
        return multiple_choice_summary(predictions, references, num_choices)
