"""Record schemas are defined once (guardalign/records.py); docs/records.md is generated from them."""
from __future__ import annotations

from guardalign import records as R


def test_reference_is_current():
    assert R.REFERENCE_PATH.read_text(encoding="utf-8") == R.render_reference(), \
        "docs/records.md is stale: run `python -m guardalign.records`"


def test_every_field_is_documented_once_and_parquet_schema_derives_from_it():
    from guardalign.io.parquet import scan_schema

    for kind, fields in R.RECORD_KINDS.items():
        names = R.names(fields)
        assert len(names) == len(set(names)), kind
        assert all(f.doc and f.type for f in fields), kind
    schema = scan_schema()
    stored = [n for n in schema.names if n != "extra"]
    assert stored == [f.name for f in R.SCAN_RECORD if f.type != "json"]
    assert str(schema.field("categories").type) == "map<string, double>"
    assert set(R.MASK_NEEDS) <= set(R.names(R.SCAN_RECORD)) and set(R.PROVENANCE) <= set(R.names(R.SCAN_RECORD))


def test_detector_record_fields_are_scan_record_fields():
    from dataclasses import fields

    from guardalign.detection.detector import Detection

    assert {f.name for f in fields(Detection)} <= set(R.names(R.SCAN_RECORD))
