"""The reporting-guideline items the report can answer, and the ones it cannot.

Topics of TRIPOD+AI (BMJ 2024) and CLAIM (2024 update), paraphrased; the published checklists are
the authority for their wording and numbering. Each item names the report section that answers
it, or says why the data cannot (``None``): such items are listed as "not available from the data",
never dropped, so a reviewer sees the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ITEMS", "ChecklistItem", "checklist_rows"]


@dataclass(frozen=True)
class ChecklistItem:
    guideline: str  # "TRIPOD+AI", "CLAIM" or "both"
    topic: str
    section: str | None  # the report section's id, or None: not answerable from the data
    how: str  # what answers it, or why nothing can


ITEMS: tuple[ChecklistItem, ...] = (
    ChecklistItem(
        "both", "Model type and intended use stated", "summary", "model id, architecture, backbone; research use only"
    ),
    ChecklistItem("both", "Data sources", "audit", "data folder, formats and colour modes per class"),
    ChecklistItem(
        "both",
        "Eligibility: inclusion and exclusion of images",
        "data-flow",
        "unreadable files, exact duplicates and label conflicts excluded, with counts",
    ),
    ChecklistItem("CLAIM", "Data preprocessing", "reproducibility", "preprocessing preset, input size, normalisation"),
    ChecklistItem(
        "CLAIM",
        "Selection of data subsets / partitioning, and leakage between them",
        "data-flow",
        "patient-free proxy: duplicate and near-duplicate groups never span partitions",
    ),
    ChecklistItem("both", "Handling of missing or unreadable data", "data-flow", "unreadable files named and excluded"),
    ChecklistItem(
        "both",
        "Outcome / reference standard definition",
        None,
        "not available from the data: class folders carry labels only, with no record of how they were made",
    ),
    ChecklistItem(
        "CLAIM", "Annotators, annotation tools, inter-rater variability", None, "not available from the data"
    ),
    ChecklistItem(
        "both",
        "Sample size and its justification",
        "data-flow",
        "counts per class and partition; interval widths in Performance show the precision it buys",
    ),
    ChecklistItem("both", "Participant / image flow diagram", "data-flow", "files read to train / validation / test"),
    ChecklistItem(
        "both",
        "Demographic and clinical characteristics per partition",
        None,
        "not available from the data: no age, sex or site per image",
    ),
    ChecklistItem(
        "both",
        "Model description and training procedure",
        "reproducibility",
        "every training setting, seed, precision, library versions",
    ),
    ChecklistItem(
        "both",
        "Performance metrics with uncertainty",
        "performance",
        "sensitivity, specificity, precision, accuracy, F1, AUC with 95% intervals",
    ),
    ChecklistItem(
        "both",
        "Operating threshold and how it was chosen",
        "performance",
        "metrics at 0.5 and at the operating threshold fitted on validation data",
    ),
    ChecklistItem("TRIPOD+AI", "Calibration", "calibration", "reliability diagram, ECE, Brier, calibration slope"),
    ChecklistItem("TRIPOD+AI", "Clinical utility (decision analysis)", "calibration", "decision curve"),
    ChecklistItem(
        "CLAIM",
        "Robustness and shortcut analysis",
        "probes",
        "shortcut-adversarial accuracy, occlusion probes, source probe; metadata-only baseline in Audit",
    ),
    ChecklistItem("CLAIM", "Failure analysis", "explanations", "every misclassified test image, false negatives first"),
    ChecklistItem(
        "CLAIM",
        "Explainability and its validation",
        "explanations",
        "Grad-CAM and attention maps with a model-randomisation sanity check",
    ),
    ChecklistItem(
        "TRIPOD+AI",
        "Uncertainty of individual predictions",
        "calibration",
        "conformal prediction sets: coverage and abstention",
    ),
    ChecklistItem(
        "TRIPOD+AI",
        "Fairness across subgroups",
        None,
        "not available from the data: no subgroup attributes are recorded",
    ),
    ChecklistItem(
        "both",
        "External validation",
        None,
        "not available from this run: it is tested on a held-out part of one data set only",
    ),
    ChecklistItem(
        "both",
        "Code, model and protocol availability",
        "reproducibility",
        "command, settings, sha256 of weights and of the split's content ids",
    ),
)


def checklist_rows(available: set[str]) -> list[dict]:
    """One row per item: where it is answered (a section present in this report), or why not."""
    rows = []
    for it in ITEMS:
        if it.section is None:
            status, where = "not available from the data", None
        elif it.section in available:
            status, where = "answered", it.section
        else:
            status, where = "not in this run (its files lack it)", None
        rows.append({"guideline": it.guideline, "topic": it.topic, "status": status, "section": where, "how": it.how})
    return rows
