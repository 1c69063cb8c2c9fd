"""LM-BFF / MeZO k-shot TSV splits (``sentence<TAB>label`` with a header row)."""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Union


def load_lmbff_tsv(path: Union[str, "os.PathLike"]) -> List[Dict[str, object]]:
    """Rows as ``{"sentence": str, "label": int}``; a clear error for missing or malformed files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LM-BFF split {path!r} does not exist")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header or header[:2] != ["sentence", "label"]:
            raise ValueError(f"{path!r}: expected a 'sentence<TAB>label' header, got {header!r}")
        for i, row in enumerate(reader, start=2):
            if len(row) < 2:
                raise ValueError(f"{path!r} line {i}: expected 2 tab-separated fields")
            rows.append({"sentence": row[0].strip(), "label": int(row[1])})
    return rows
