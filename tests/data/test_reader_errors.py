"""Files that cannot be read end in one DataError line: the file, what is wrong, what to do."""

import json

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import read_preferences, read_sft


def read_error(reader, path) -> DataError:
    with pytest.raises(DataError) as info:
        reader(path)
    return info.value


def test_latin1_jsonl_names_the_line_and_how_to_convert(tmp_path):
    path = tmp_path / "sft.jsonl"
    text = '{"prompt": "a", "completion": "b"}\n{"prompt": "caf\u00e9", "completion": "b"}\n'
    path.write_bytes(text.encode("latin-1"))
    err = read_error(read_sft, path)
    # "é" is byte 0xe9 in latin-1, after the 15 bytes {"prompt": "caf of line 2: column 16
    assert str(err) == (f"{path}:2: not UTF-8 text (byte 0xe9 at column 16); it looks like latin-1 or cp1252: "
                        f"re-save it as UTF-8, e.g. iconv -f latin1 -t UTF-8 '{path}' > utf8.jsonl")


def test_latin1_json_document(tmp_path):
    path = tmp_path / "sft.json"
    path.write_bytes('[\n {"prompt": "\u00e0", "completion": "b"}\n]'.encode("latin-1"))
    err = read_error(read_sft, path)
    assert (err.line, err.path) == (2, str(path))
    assert "not UTF-8 text (byte 0xe0 at column 14)" in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("encoding, name", [("utf-16", "sft.jsonl"), ("utf-16-le", "sft.jsonl"),
                                            ("utf-16", "sft.json")])
def test_utf16_file_is_one_clear_line(tmp_path, encoding, name):
    path = tmp_path / name
    path.write_bytes(json.dumps({"prompt": "a", "completion": "b"}).encode(encoding) + "\n".encode(encoding))
    err = read_error(read_sft, path)
    assert str(err) == (f"{path}: the file is UTF-16 (or another wide encoding), not UTF-8: re-save it as UTF-8, "
                        f"e.g. iconv -f UTF-16 -t UTF-8 '{path}' > utf8{path.suffix}")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    for name in ("sft.jsonl", "sft.json"):
        path = tmp_path / name
        path.write_bytes(json.dumps({"prompt": "a", "completion": "b"}).encode("utf-8-sig") + b"\n")
        assert read_sft(path)[0].response == "b"


def test_corrupt_parquet_is_one_clear_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 50), good)
    path = tmp_path / "prefs.parquet"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a truncated download
    err = read_error(read_preferences, path)
    text = str(err)
    assert text.startswith(f"{path}: not a readable Parquet file (")
    assert text.endswith("): it is truncated or not Parquet; export it again (e.g. pandas DataFrame.to_parquet) "
                         "or convert it to JSONL")
    assert "\n" not in text


def test_malformed_jsonl_line_reports_the_real_column(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    err = read_error(read_sft, path)
    # the missing comma is after `{"prompt": "a"` + a space: column 16
    assert str(err) == f"{path}:2: not valid JSON (Expecting ',' delimiter at column 16)"


def test_malformed_json_document_reports_line_and_column(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text('[{"prompt": "a", "completion": "b"}, {"prompt": "a" "completion": "b"}]')
    err = read_error(read_sft, path)
    assert str(err) == f"{path}:1: not valid JSON (Expecting ',' delimiter at column 53)"


def test_json_list_errors_name_the_record_not_a_line(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], indent=2))
    err = read_error(read_sft, path)
    assert (err.line, err.record, err.field) == (None, 2, "completion")
    assert str(err) == f"{path}: record 2: field 'completion': missing"


def test_error_without_a_file_has_no_placeholder_prefix():
    assert str(DataError("bad value", field="role")) == "field 'role': bad value"
    assert str(DataError("no records")) == "no records"
    assert str(DataError("x", path="f.jsonl", line=3, field="prompt")) == "f.jsonl:3: field 'prompt': x"
