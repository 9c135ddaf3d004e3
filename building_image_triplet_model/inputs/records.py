"""The `d` metadata line of the 3D Street View dataset, its validation, and the global target key.

A line reads ``d DatasetID TargetID PatchID StreetViewID target_lat target_lon target_height normal_x
normal_y normal_z street_lat street_lon street_height distance heading pitch roll``.
"""

from __future__ import annotations

import math
import re
from typing import Final

import numpy as np

ID_FIELDS: Final = ("DatasetID", "TargetID", "PatchID", "StreetViewID")
COORD_FIELDS: Final = ("target_lat", "target_lon", "street_lat", "street_lon")
FLOAT_FIELDS: Final = (
    "target_lat",
    "target_lon",
    "target_height",
    "normal_x",
    "normal_y",
    "normal_z",
    "street_lat",
    "street_lon",
    "street_height",
    "distance",
    "heading",
    "pitch",
    "roll",
)
D_FIELDS: Final = ID_FIELDS + FLOAT_FIELDS
assert len(D_FIELDS) == 17

# Latitudes and longitudes need float64 (float32 is ~1 m at these longitudes); the rest are fine in float32.
FIELD_DTYPES: Final[dict[str, np.dtype]] = {
    **{name: np.dtype(np.int64) for name in ID_FIELDS},
    **{name: np.dtype(np.float64 if name in COORD_FIELDS else np.float32) for name in FLOAT_FIELDS},
}

# The global target key: TargetID repeats across datasets, so the key folds DatasetID in.
# key = DatasetID * TARGET_KEY_BASE + TargetID, readable in decimal (88000001234 = dataset 88, target 1234).
TARGET_KEY_BASE: Final = 1_000_000_000
MAX_DATASET_ID: Final = (2**63 - 1) // TARGET_KEY_BASE - 1
TARGET_KEY_FORMULA: Final = f"DatasetID * {TARGET_KEY_BASE} + TargetID"

# Reject reasons. Codes are stored in files, so never renumber; append new ones.
REJECT_REASONS: Final = (
    "ok",  # 0: not a reject
    "orphan_jpg",  # an image without a .txt of the same stem
    "orphan_txt",  # a .txt without an image of the same stem
    "empty_image",  # zero-byte image
    "unreadable_txt",  # not UTF-8 / not text
    "no_d_line",
    "too_few_fields",
    "too_many_fields",
    "non_numeric_field",
    "non_finite_value",
    "lat_out_of_range",
    "lon_out_of_range",
    "id_out_of_range",
    "duplicate_stem",
    "not_a_regular_file",  # a link or device among the members
    "unrecognized_file",  # neither .jpg/.jpeg nor .txt
    "not_jpeg",  # the image bytes are not a JPEG (found while embedding)
    "decode_error",  # the JPEG does not decode (found while embedding)
    "conflicting_d_lines",  # a .txt with two different d lines
    "unreadable_image",  # an image file of an extracted folder that cannot be read
    "truncated_scan",  # the JPEG's scan data ends early, before its end marker (found while embedding)
)
# The reasons the decoder finds (the embedding step); every other reason is the index's.
DECODER_REASONS: Final = ("not_jpeg", "decode_error", "truncated_scan")
REASON_CODE: Final = {name: code for code, name in enumerate(REJECT_REASONS)}


class RejectError(ValueError):
    """An item that is bad input: counted and listed, never fatal."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASON_CODE, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# What a number in a d line looks like: sign, digits, one decimal point, an exponent. Python's own int() and
# float() also take "1_000", "inf", "nan" and surrounding spaces, which a d line never holds.
_INT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_NON_FINITE = re.compile(r"[+-]?(?:inf|infinity|nan)\Z", re.IGNORECASE)


def _number(token: str, pattern: re.Pattern[str], name: str) -> str:
    if pattern.match(token):
        return token
    if _NON_FINITE.match(token):
        raise RejectError("non_finite_value", f"{name}={token}")
    kind = "an integer" if pattern is _INT else "a decimal number"
    raise RejectError("non_numeric_field", f"{name}={token!r} is not {kind}")


def parse_d_line(raw: bytes) -> tuple[int, int, int, int, tuple[float, ...]]:
    """Parse the `d` line of one metadata file.

    Returns the four ids and the 13 float fields, or raises RejectError naming what is wrong. A file may
    repeat its d line; two different d lines are a reject of their own.
    """
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is no part of the text
    except UnicodeDecodeError as exc:
        raise RejectError("unreadable_txt", str(exc)) from None
    d_lines = {tuple(t) for line in text.splitlines() if (t := line.split()) and t[0] == "d"}
    if not d_lines:
        raise RejectError("no_d_line")
    if len(d_lines) > 1:
        raise RejectError("conflicting_d_lines", f"{len(d_lines)} different d lines")
    values = d_lines.pop()[1:]
    if len(values) < len(D_FIELDS):
        raise RejectError("too_few_fields", f"{len(values)} of {len(D_FIELDS)}")
    if len(values) > len(D_FIELDS):
        raise RejectError("too_many_fields", f"{len(values)} of {len(D_FIELDS)}")
    tokens = [_number(v, _INT, name) for v, name in zip(values[:4], ID_FIELDS, strict=True)]
    if any(len(t) > 30 for t in tokens):  # far beyond int64 (and beyond what int() converts at 4300)
        raise RejectError("id_out_of_range", "an id with more than 30 digits")
    ids = [int(t) for t in tokens]
    floats = tuple(float(_number(v, _FLOAT, name)) for v, name in zip(values[4:], FLOAT_FIELDS, strict=True))
    for name, value in zip(FLOAT_FIELDS, floats, strict=True):
        if not math.isfinite(value):  # a literal beyond float64's range, such as 1e999
            raise RejectError("non_finite_value", f"{name} overflows")
        if name.endswith("_lat") and abs(value) > 90:
            raise RejectError("lat_out_of_range", f"{name}={value}")
        if name.endswith("_lon") and abs(value) > 180:
            raise RejectError("lon_out_of_range", f"{name}={value}")
    dataset_id, target_id = ids[0], ids[1]
    if not (0 <= dataset_id <= MAX_DATASET_ID and 0 <= target_id < TARGET_KEY_BASE):
        raise RejectError("id_out_of_range", f"DatasetID={dataset_id} TargetID={target_id}")
    if not all(-(2**63) <= v < 2**63 for v in ids[2:]):
        raise RejectError("id_out_of_range", "PatchID/StreetViewID beyond int64")
    return ids[0], ids[1], ids[2], ids[3], floats


def target_key(dataset_id: np.ndarray | int, target_id: np.ndarray | int) -> np.ndarray | int:
    """The globally unique target key (see TARGET_KEY_FORMULA)."""
    return dataset_id * TARGET_KEY_BASE + target_id
