"""The seed text's claims about BN, and one verdict per claim recorded by the notebook that tests it.

Each claim is tested in one chapter notebook, which calls ``record(key, verdict, evidence,
section=...)`` right after the cell whose assertions back it. ``record`` glues the claim, the
verdict and the evidence (myst-nb ``glue``) so that the book's "Claims, checked" page renders what
the executed notebooks measured, never a typed copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

try:
    from myst_nb import glue
except ImportError:  # outside the book (e.g. on Colab): the printed line shows the verdict

    def glue(name, value, display=True):
        pass


CLAIMS = {  # key -> the claim, in the order the seed text makes them
    "ics": "Batch normalization reduces internal covariate shift.",
    "higher_lr": "Batch normalization allows higher learning rates.",
    "fewer_epochs": "Batch normalization dramatically reduces the number of training epochs needed.",
    "regularizes": "Batch normalization acts as a regularizer and reduces the need for dropout.",
    "placement": "Batch normalization belongs after the linear layer and before the activation.",
    "small_batches": "Batch normalization depends on the batch size and struggles with small batches.",
    "rnn_bn": "Batch normalization is less effective in recurrent networks.",
    "rnn_ln": "Layer normalization is better suited to recurrent networks.",
    "style_in": "Instance normalization suits style transfer.",
    "transfer": "Batch normalization helps transfer learning, particularly when the new dataset is small.",
}
VERDICTS = ("supported", "partly", "not supported", "contested")
_LABEL = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")  # a MyST target such as (ics-lr)=


@dataclass(frozen=True)
class Record:
    """One claim's verdict, as a notebook recorded it."""

    key: str
    claim: str
    verdict: str
    evidence: str
    section: str


def record(key, verdict, evidence, *, section):
    """Check and glue one claim's verdict and evidence; print them; return the Record."""
    if key not in CLAIMS:
        raise ValueError(f"unknown claim {key!r}; the claims are {', '.join(CLAIMS)}")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
    if not isinstance(evidence, str) or not evidence.strip():
        raise ValueError(f"evidence must be a non-empty sentence, got {evidence!r}")
    if not isinstance(section, str) or not _LABEL.fullmatch(section):
        raise ValueError(f"section must be a label such as 'ics-lr' (a (label)= target), got {section!r}")
    rec = Record(key, CLAIMS[key], verdict, evidence.strip(), section)
    for field in ("claim", "verdict", "evidence"):
        glue(f"claim_{key}_{field}", getattr(rec, field), display=False)
    print(f"Claim ({key}): {rec.claim} Verdict: {verdict}. {rec.evidence}")
    return rec
