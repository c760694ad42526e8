"""CSV tables, plain or gzipped, with the columns they must have."""
import gzip

import pytest

from datasets.annotation import DataError
from datasets.csv_table import read_csv


def test_plain_gzipped_and_bad(tmp_path):
    (tmp_path / "a.csv").write_text("\ufeffid,view\n1,PA\n2,\n")
    assert read_csv(tmp_path / "a.csv", ("id", "view")) == [{"id": "1", "view": "PA"},
                                                            {"id": "2", "view": ""}]
    (tmp_path / "b.csv.gz").write_bytes(gzip.compress(b"id,view\n3,AP\n"))
    assert read_csv(tmp_path / "b.csv.gz", ("view",))[0]["view"] == "AP"
    with pytest.raises(DataError, match=r"b.csv.gz: missing column\(s\) \['split'\]"):
        read_csv(tmp_path / "b.csv.gz", ("id", "split"))
    with pytest.raises(DataError, match=r"nope.csv: cannot read CSV"):
        read_csv(tmp_path / "nope.csv", ("id",))
    (tmp_path / "c.csv.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(DataError, match=r"c.csv.gz: cannot read CSV"):
        read_csv(tmp_path / "c.csv.gz", ("id",))
