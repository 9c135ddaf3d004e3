"""The `d` metadata line (records.py): strict numbers, ranges, and the stable reject codes."""

from __future__ import annotations

import pytest

from building_image_triplet_model.inputs import records
from building_image_triplet_model.inputs.records import RejectError, parse_d_line

FIELDS = [
    "88",  # DatasetID
    "1234",  # TargetID
    "5",  # PatchID
    "6789",  # StreetViewID
    "40.75",  # target_lat
    "-73.98",  # target_lon
    "12.5",  # target_height
    "0.1",  # normal_x
    "0.99",  # normal_y
    "0.0",  # normal_z
    "40.7501",  # street_lat
    "-73.9801",  # street_lon
    "2.5",  # street_height
    "20.0",  # distance
    "185.0",  # heading
    "5.0",  # pitch
    "-0.25",  # roll
]
INDEX = {name: i for i, name in enumerate(records.D_FIELDS)}


def line(**changes: str) -> bytes:
    values = list(FIELDS)
    for name, value in changes.items():
        values[INDEX[name]] = value
    return ("d " + " ".join(values) + "\n").encode()


GOOD = line()


def reason(raw: bytes) -> str:
    with pytest.raises(RejectError) as err:
        parse_d_line(raw)
    return err.value.reason


def test_valid_line_parses_into_4_ints_and_13_floats():
    dataset, target, patch, sv, floats = parse_d_line(GOOD)
    assert (dataset, target, patch, sv) == (88, 1234, 5, 6789)
    assert all(type(v) is int for v in (dataset, target, patch, sv))
    assert len(floats) == 13 and all(type(v) is float for v in floats)
    assert floats == tuple(float(v) for v in FIELDS[4:])
    named = dict(zip(records.FLOAT_FIELDS, floats, strict=True))
    assert named["target_lat"] == 40.75 and named["street_lon"] == -73.9801 and named["roll"] == -0.25
    assert records.D_FIELDS[:4] == ("DatasetID", "TargetID", "PatchID", "StreetViewID")


def test_a_byte_order_mark_is_no_part_of_the_d_line():
    assert parse_d_line(b"\xef\xbb\xbf" + GOOD) == parse_d_line(GOOD)


def test_d_line_among_other_lines_and_whitespace():
    raw = b"# header\nx junk here\r\n" + GOOD.replace(b" ", b" \t ") + b"a 1 2 3\n"
    assert parse_d_line(raw)[:4] == (88, 1234, 5, 6789)
    assert parse_d_line(GOOD.rstrip(b"\n"))[0] == 88  # no trailing newline
    assert parse_d_line(b"  " + GOOD)[0] == 88  # leading spaces before d


@pytest.mark.parametrize(
    ("token", "value"),
    [(".5", 0.5), ("5.", 5.0), ("-1.5E+02", -150.0), ("+3", 3.0), ("1e-3", 0.001), ("-0", 0.0), ("7", 7.0)],
)
def test_accepted_decimal_spellings(token, value):
    floats = parse_d_line(line(heading=token))[4]
    assert floats[records.FLOAT_FIELDS.index("heading")] == value


def test_accepted_integer_spellings():
    assert parse_d_line(line(PatchID="+3", StreetViewID="-12", TargetID="007"))[1:4] == (7, 3, -12)


@pytest.mark.parametrize(
    ("field", "token"),
    [
        ("target_lat", "40.75_01"),
        ("heading", "0x1A"),
        ("distance", "1_000"),
        ("TargetID", "1_000"),
        ("PatchID", "0x1A"),
        ("TargetID", "12.5"),  # a decimal where an integer belongs
        ("TargetID", "1e3"),
        ("StreetViewID", "+-1"),
        ("heading", "north"),
        ("heading", "1.2.3"),
        ("heading", "--1"),
        ("heading", "1e"),
        ("heading", "e5"),
        ("heading", "."),
        ("heading", "1,5"),  # a decimal comma
        ("heading", "\u0661\u0662"),  # Arabic-Indic digits: Python's float() takes them
        ("TargetID", "\uff11\uff12"),  # full-width digits: Python's int() takes them
        ("heading", "\u200b1"),  # a zero-width space is not whitespace to split()
        ("pitch", "0b101"),
        ("pitch", "1j"),
    ],
)
def test_non_numeric_fields(field, token):
    with pytest.raises(RejectError) as err:
        parse_d_line(line(**{field: token}))
    assert err.value.reason == "non_numeric_field"
    assert field in err.value.detail


def test_python_would_have_accepted_these():
    # what the strict patterns exist for: each is a number to Python's int()/float()
    assert float("1_000") == 1000 and int("\uff11\uff12") == 12 and float(" 1 ") == 1.0
    assert float("\u0661\u0662") == 12.0


@pytest.mark.parametrize("token", ["inf", "nan", "-Infinity", "+inf", "NaN", "INF", "infinity"])
def test_non_finite_literals(token):
    assert reason(line(target_height=token)) == "non_finite_value"
    assert reason(line(PatchID=token)) == "non_finite_value"


@pytest.mark.parametrize("token", ["1e999", "-1e999", "1" + "0" * 400])
def test_float_overflow_is_non_finite(token):
    with pytest.raises(RejectError) as err:
        parse_d_line(line(distance=token))
    assert err.value.reason == "non_finite_value" and "distance" in err.value.detail


def test_underflow_is_zero_not_a_reject():
    assert parse_d_line(line(normal_z="1e-999"))[4][records.FLOAT_FIELDS.index("normal_z")] == 0.0


def test_repeated_identical_d_line_is_fine():
    assert parse_d_line(GOOD + b"x\n" + GOOD) == parse_d_line(GOOD)
    assert parse_d_line(GOOD + GOOD.replace(b" ", b"  "))[0] == 88  # same tokens, other spacing


def test_two_different_d_lines_conflict():
    other = line(heading="186.0")
    with pytest.raises(RejectError) as err:
        parse_d_line(GOOD + other)
    assert err.value.reason == "conflicting_d_lines" and "2" in err.value.detail
    assert reason(GOOD + line(TargetID="99") + GOOD) == "conflicting_d_lines"
    assert reason(GOOD + b"d 1 2\n") == "conflicting_d_lines"  # even when the other is malformed


def test_field_counts():
    short = b"d " + b" ".join(f.encode() for f in FIELDS[:-1]) + b"\n"
    with pytest.raises(RejectError) as err:
        parse_d_line(short)
    assert err.value.reason == "too_few_fields" and err.value.detail == "16 of 17"
    with pytest.raises(RejectError) as err:
        parse_d_line(GOOD.rstrip() + b" 7\n")
    assert err.value.reason == "too_many_fields" and err.value.detail == "18 of 17"
    assert reason(b"d\n") == "too_few_fields"


@pytest.mark.parametrize(
    ("changes", "want"),
    [
        ({"target_lat": "90.0001"}, "lat_out_of_range"),
        ({"target_lat": "-91"}, "lat_out_of_range"),
        ({"street_lat": "-90.5"}, "lat_out_of_range"),
        ({"street_lat": "1e3"}, "lat_out_of_range"),
        ({"target_lon": "180.01"}, "lon_out_of_range"),
        ({"street_lon": "-181"}, "lon_out_of_range"),
        ({"DatasetID": "-1"}, "id_out_of_range"),
        ({"DatasetID": str(records.MAX_DATASET_ID + 1)}, "id_out_of_range"),
        ({"TargetID": "-1"}, "id_out_of_range"),
        ({"TargetID": str(records.TARGET_KEY_BASE)}, "id_out_of_range"),
        ({"PatchID": str(2**63)}, "id_out_of_range"),
        ({"StreetViewID": str(-(2**63) - 1)}, "id_out_of_range"),
    ],
)
def test_out_of_range(changes, want):
    assert reason(line(**changes)) == want


def test_range_edges_are_accepted():
    parsed = parse_d_line(
        line(
            target_lat="90",
            street_lat="-90.0",
            target_lon="-180",
            street_lon="180.0",
            DatasetID=str(records.MAX_DATASET_ID),
            TargetID=str(records.TARGET_KEY_BASE - 1),
            PatchID=str(-(2**63)),
            StreetViewID=str(2**63 - 1),
        )
    )
    assert parsed[:4] == (records.MAX_DATASET_ID, records.TARGET_KEY_BASE - 1, -(2**63), 2**63 - 1)
    assert records.target_key(parsed[0], parsed[1]) < 2**63
    # heights, normals and angles have no range: only lat/lon are checked
    assert parse_d_line(line(target_height="-1e6", heading="720", distance="-5"))[4][2] == -1e6


@pytest.mark.parametrize("raw", [b"\xff\xfe d 1", b"d 88 \xe9 5\n", GOOD[:-3] + b"\xc3\n"])
def test_non_utf8_is_unreadable_txt(raw):
    assert reason(raw) == "unreadable_txt"


@pytest.mark.parametrize(
    "raw", [b"", b"\n\n", b"a 1 2 3\n", b"D " + GOOD[2:], b"dd " + GOOD[2:], b"#" + GOOD, b"x d 1 2\n"]
)
def test_no_d_line(raw):
    assert reason(raw) == "no_d_line"


def test_huge_integer_field_is_a_reject_not_a_crash():
    with pytest.raises(RejectError) as err:
        parse_d_line(line(StreetViewID="9" * 5000))
    assert err.value.reason == "id_out_of_range"


def test_reject_error_names_reason_and_detail():
    err = RejectError("no_d_line")
    assert str(err) == "no_d_line" and err.detail == ""
    err = RejectError("too_few_fields", "3 of 17")
    assert str(err) == "too_few_fields: 3 of 17" and isinstance(err, ValueError)
    with pytest.raises(AssertionError):
        RejectError("not_a_reason")


# Codes are stored in files (shards, rejects): existing codes never change, new reasons are appended.
PINNED_REASONS = (
    "ok",
    "orphan_jpg",
    "orphan_txt",
    "empty_image",
    "unreadable_txt",
    "no_d_line",
    "too_few_fields",
    "too_many_fields",
    "non_numeric_field",
    "non_finite_value",
    "lat_out_of_range",
    "lon_out_of_range",
    "id_out_of_range",
    "duplicate_stem",
    "not_a_regular_file",
    "unrecognized_file",
    "not_jpeg",
    "decode_error",
    "conflicting_d_lines",
    "unreadable_image",
    "truncated_scan",
)


def test_reason_codes_never_change():
    assert records.REJECT_REASONS[: len(PINNED_REASONS)] == PINNED_REASONS
    assert len(set(records.REJECT_REASONS)) == len(records.REJECT_REASONS)
    for code, name in enumerate(PINNED_REASONS):
        assert records.REASON_CODE[name] == code
    assert records.REASON_CODE["ok"] == 0


def test_field_dtypes_keep_coordinates_in_float64():
    for name in records.COORD_FIELDS:
        assert records.FIELD_DTYPES[name].itemsize == 8 and records.FIELD_DTYPES[name].kind == "f"
    for name in records.ID_FIELDS:
        assert records.FIELD_DTYPES[name].kind == "i" and records.FIELD_DTYPES[name].itemsize == 8
    assert records.FIELD_DTYPES["heading"].itemsize == 4
    assert list(records.FIELD_DTYPES) == list(records.D_FIELDS)


def test_target_key_is_unique_across_datasets():
    assert records.target_key(88, 1234) == 88_000_001_234
    assert records.target_key(3, 1234) != records.target_key(4, 1234)
    assert records.TARGET_KEY_FORMULA == "DatasetID * 1000000000 + TargetID"
    assert records.target_key(records.MAX_DATASET_ID, records.TARGET_KEY_BASE - 1) < 2**63
    assert (records.MAX_DATASET_ID + 2) * records.TARGET_KEY_BASE > 2**63 - 1
