"""Versioned, immutable data sets, by subject: what a data set holds (`schema`), a model's original
data (`originals`), version folders written, hashed and read (`versions`), training versions
compiled from the current labels (`compiling`), frozen validation versions and their fixes
(`validation`), and their SQL (`store`).

The names callers use are re-exported here: `from feedback import datasets as ds`, then
`ds.compile_training(...)`.
"""

from feedback.datasets.compiling import compile_training
from feedback.datasets.originals import (
    MIN_PER_CLASS,
    Imported,
    bundled_originals,
    import_originals,
    originals_for,
    read_original,
    split_originals,
)
from feedback.datasets.schema import Blob, Input, LabelSchema, Originals, Progress, Rows, input_key
from feedback.datasets.store import DatasetVersion, Kind, LabelledItem
from feedback.datasets.validation import (
    MIN_JUDGED_PER_CLASS,
    MIN_VALIDATION_PER_CLASS,
    VALIDATION_FRACTION,
    LabelFix,
    fix_validation,
    freeze_validation,
    freeze_validation_from_verdicts,
)
from feedback.datasets.versions import (
    FORMAT,
    MANIFEST,
    Loaded,
    Written,
    dir_hash,
    dvc_dir_hash,
    image_file,
    read_version,
    tree_hash,
    verify,
)

__all__ = [
    "FORMAT",
    "MANIFEST",
    "MIN_JUDGED_PER_CLASS",
    "MIN_PER_CLASS",
    "MIN_VALIDATION_PER_CLASS",
    "VALIDATION_FRACTION",
    "Blob",
    "DatasetVersion",
    "Imported",
    "Input",
    "Kind",
    "LabelFix",
    "LabelSchema",
    "LabelledItem",
    "Loaded",
    "Originals",
    "Progress",
    "Rows",
    "Written",
    "bundled_originals",
    "compile_training",
    "dir_hash",
    "dvc_dir_hash",
    "fix_validation",
    "freeze_validation",
    "freeze_validation_from_verdicts",
    "image_file",
    "import_originals",
    "input_key",
    "originals_for",
    "read_original",
    "read_version",
    "split_originals",
    "tree_hash",
    "verify",
]
