import pytest

from building_image_triplet_model import records
from building_image_triplet_model.records import RejectError, parse_d_line

GOOD = b"d 88 1234 5 6789 40.75 -73.98 12.5 0.1 0.99 0.0 40.7501 -73.9801 2.5 20.0 185.0 5.0 0.0\n"


def test_parses_all_17_fields():
    dataset, target, patch, sv, floats = parse_d_line(GOOD)
    assert (dataset, target, patch, sv) == (88, 1234, 5, 6789)
    assert len(floats) == 13
    assert floats[0] == 40.75 and floats[1] == -73.98 and floats[-1] == 0.0
    assert dict(zip(records.FLOAT_FIELDS, floats, strict=True))["heading"] == 185.0


def test_d_line_found_after_other_lines():
    assert parse_d_line(b"x junk\n" + GOOD + b"a 1 2 3\n")[0] == 88


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"a 1 2 3\n", "no_d_line"),
        (b"", "no_d_line"),
        (b"d 1 2 3 4 5\n", "too_few_fields"),
        (GOOD.strip() + b" 7\n", "too_many_fields"),
        (GOOD.replace(b"40.75", b"north", 1), "non_numeric_field"),
        (GOOD.replace(b"1234", b"12.5"), "non_numeric_field"),
        (GOOD.replace(b"-73.98", b"nan", 1), "non_finite_value"),
        (GOOD.replace(b"12.5", b"inf", 1), "non_finite_value"),
        (GOOD.replace(b"40.75", b"91.0", 1), "lat_out_of_range"),
        (GOOD.replace(b"40.7501", b"-90.5"), "lat_out_of_range"),
        (GOOD.replace(b"-73.98 ", b"-181.0 "), "lon_out_of_range"),
        (GOOD.replace(b"1234", b"-1"), "id_out_of_range"),
        (GOOD.replace(b"1234", b"1000000000"), "id_out_of_range"),
        (b"\xff\xfe d 1", "unreadable_txt"),
    ],
)
def test_rejects_name_the_reason(raw, reason):
    with pytest.raises(RejectError) as err:
        parse_d_line(raw)
    assert err.value.reason == reason


def test_target_key_is_unique_across_datasets_and_documented():
    assert records.target_key(88, 1234) == 88_000_001_234
    assert records.target_key(3, 1234) != records.target_key(4, 1234)
    assert records.TARGET_KEY_FORMULA == "DatasetID * 1000000000 + TargetID"
    biggest = records.target_key(records.MAX_DATASET_ID, records.TARGET_KEY_BASE - 1)
    assert biggest < 2**63


def test_reason_codes_are_stable():
    # Codes are stored in files: appending is fine, renumbering is not.
    assert records.REJECT_REASONS[:3] == ("ok", "orphan_jpg", "orphan_txt")
    assert records.REASON_CODE["decode_error"] == 17
