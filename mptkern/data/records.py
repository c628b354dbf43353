"""The record layer: a data file as a list of located records, ``(locator, dict)``.

Real datasets ship as JSON lines, one JSON document (an array of objects, or an object of objects
keyed by id), CSV / TSV tables and Excel sheets. The typed readers (:mod:`mptkern.data.readers`)
turn records into examples; this module only gets the records out of the file, each with a
locator that says where it is, so that every error can name the file and the record.

======  ==============================================  ==============================
layout  file                                            locator
======  ==============================================  ==============================
jsonl   one JSON object a line (blank lines skipped)    line number (int)
json    an array of objects                             ``"item I"`` (0-based index)
json    an object of objects keyed by id (PubMedQA)     ``"record KEY"``; the key is
                                                        added as field ``_key``
csv     RFC 4180, header row, quoted fields may hold    line where the row starts (int)
        newlines (MTS-Dialog)
tsv     tab-separated, header row, no quoting           line number (int)
xlsx    header row of the first (or ``sheet=``) sheet   ``"row N"`` (sheet row number)
======  ==============================================  ==============================

Why it is hand-written where it is: the parsing is not. :mod:`json`, :mod:`csv` and openpyxl do
it; this module only keeps what those hide: the line a CSV row starts on (``csv.DictReader``
drops it, and a row with newlines inside quotes spans several lines), the key of an object of
objects, column positions beside names (a header can be wrong: COVID-Fact's RTE ``dev.tsv``
names its label column ``entailment``), and a :class:`DataFormatError` naming file and record
instead of a bare ``KeyError`` or a silently short row. pandas was not used: it coerces types
(``"NA"`` becomes NaN, ids become ints) and loses the row's line.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from mptkern._optional import require
from mptkern.data.schema import Example, Task, make_example

__all__ = ["DataFormatError", "DroppedRecordsWarning", "LAYOUTS", "ON_ERROR", "read_records", "read_jsonl",
           "check_choice", "build_example", "read_examples"]

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "jsonl", "json", "csv", "tsv", "xlsx")
_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".xlsx": "xlsx"}


class DataFormatError(ValueError):
    """Malformed input, located. ``line`` (the locator) is a line number, a string such as
    ``"record 21645374"``, ``"item 17"`` or ``"row 5"``, or None when the error concerns the whole
    file. ``str(err)`` is ``"<file>:<line>: <reason>"`` for a line number,
    ``"<file>: <locator>: <reason>"`` for a string and ``"<file>: <reason>"`` for None.
    Attributes ``path``, ``line``, ``reason``."""

    def __init__(self, path, line: int | str | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        if line is None:
            msg = f"{path}: {reason}"
        elif isinstance(line, int):
            msg = f"{path}:{line}: {reason}"
        else:
            msg = f"{path}: {line}: {reason}"
        super().__init__(msg)


class DroppedRecordsWarning(UserWarning):
    """A reader called with ``on_error="drop"`` skipped malformed records (one warning per call)."""


def _fail(errors: list | None, err: DataFormatError) -> None:
    """Raise ``err``, or collect it in ``errors`` when the caller asked to."""
    if errors is None:
        raise err
    errors.append(err)


def read_records(path, layout: str = "auto", *, engine: str = "json", cache_dir: str | None = None,
                 sheet: str | None = None, errors: list | None = None) -> list[tuple[int | str, dict]]:
    """The records of a data file, in file order, as ``(locator, record)`` (see the module table).

    Args:
        path: the file.
        layout: ``"auto"`` (by suffix: ``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.xlsx``) or one of
            ``"jsonl"``, ``"json"``, ``"csv"``, ``"tsv"``, ``"xlsx"``.
        engine, cache_dir: for ``jsonl`` only, see :func:`read_jsonl`.
        sheet: for ``xlsx`` only, the sheet name (default: the first sheet).
        errors: None (default) raises the first malformed record; a list collects the
            :class:`DataFormatError` of each malformed record instead and the good records are
            returned. Errors of the whole file (not JSON, no header) always raise.

    Table records (csv, tsv, xlsx) map each header name to its cell and also each column position
    (``0``, ``1``, ...) to it, so a field can be addressed as ``"label"`` or ``3``. Cells are
    strings exactly as written (csv, tsv) or openpyxl's values (xlsx: str, int, float, datetime;
    an empty cell is None). A header name used twice addresses its first column.

    Raises:
        FileNotFoundError; ValueError for an unknown layout, suffix or engine; DataFormatError.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    path = Path(path)
    if layout == "auto":
        layout = _BY_SUFFIX.get(path.suffix.lower())
        if layout is None:
            raise ValueError(f"{path}: cannot tell the layout from the suffix {path.suffix!r}; pass layout= one of "
                             f"{list(LAYOUTS[1:])} (suffixes {', '.join(_BY_SUFFIX)})")
    if engine != "json" and layout != "jsonl":
        raise ValueError(f"engine={engine!r} reads JSON lines only; {path} has layout {layout!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if layout == "jsonl":
        return read_jsonl(path, engine=engine, cache_dir=cache_dir, errors=errors)
    if layout == "json":
        return _read_json(path, errors)
    if layout == "xlsx":
        return _read_xlsx(path, sheet, errors)
    return _read_table(path, layout, errors)


def read_jsonl(path, *, engine: str = "json", cache_dir: str | None = None,
               errors: list | None = None) -> list[tuple[int, dict]]:
    """Rows of a JSON-lines file as ``(line number, dict)``, blank lines skipped.

    Args:
        engine: ``"json"`` (default): each line parsed with :mod:`json`, values exactly as written; a
            malformed line raises :class:`DataFormatError` with its line number.
            ``"datasets"``: ``datasets.load_dataset("json", data_files=path, split="train")`` (an Arrow
            table, cached under ``cache_dir`` or the datasets cache), for large files that several runs
            read. Columns some rows lack are None there. Caveat: when Arrow cannot type a column
            (mixed types, e.g. NLI labels ``"entailment"`` and ``0``) datasets falls back to
            ``pandas.read_json``, which coerces values silently (``"-"`` became ``0`` in a test); and a
            malformed line is located by re-reading the file with :mod:`json`.
        cache_dir: the datasets cache directory (``engine="datasets"`` only).
        errors: see :func:`read_records`.
    """
    if engine not in ("json", "datasets"):
        raise ValueError(f"engine must be one of ['json', 'datasets'], got {engine!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8-sig") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    if engine == "datasets":
        datasets = require("datasets", purpose='read_jsonl(engine="datasets")')
        try:
            ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
            if len(ds) == len(lines):
                return [(lineno, row) for (lineno, _), row in zip(lines, ds.to_list())]
        except Exception as exc:  # noqa: BLE001 - any Arrow/datasets failure: diagnose line by line below
            log.debug("datasets could not load %s (%s); reading it line by line", path, exc)
    out = []
    for lineno, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(errors, DataFormatError(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(row, dict):
            _fail(errors, DataFormatError(path, lineno, f"expected a JSON object, got {type(row).__name__}"))
            continue
        out.append((lineno, row))
    return out


def _read_json(path: Path, errors) -> list[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, exc.lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    out = []
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            if isinstance(item, dict):
                out.append((f"item {i}", item))
            else:
                _fail(errors, DataFormatError(path, f"item {i}", f"expected a JSON object, got {type(item).__name__}"))
    elif isinstance(doc, dict):
        for key, value in doc.items():
            if isinstance(value, dict):
                out.append((f"record {key}", {**value, "_key": key}))
            else:
                _fail(errors, DataFormatError(path, f"record {key}", f"expected a JSON object keyed by id, got "
                                              f"{type(value).__name__} (the file must be an array of objects "
                                              "or an object of objects)"))
    else:
        raise DataFormatError(path, None, f"expected a JSON array of objects or an object of objects, "
                              f"got {type(doc).__name__}")
    return out


def _table_record(header: list[str], cells) -> dict:
    rec: dict = {}
    for name, value in zip(header, cells):
        if name and name not in rec:
            rec[name] = value
    rec.update(enumerate(cells))
    return rec


def _read_table(path: Path, layout: str, errors) -> list[tuple[int, dict]]:
    if layout == "csv":
        kwargs = {}
    else:  # tsv: a tab between cells, quotes are text
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    out, header = [], None
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **kwargs)
        start = 1
        while True:
            try:
                cells = next(reader, None)
            except csv.Error as exc:
                raise DataFormatError(path, start, f"unreadable {layout.upper()} row ({exc})") from None
            if cells is None:
                break
            line, start = start, reader.line_num + 1
            if not cells:  # a blank line
                continue
            if header is None:
                header = [c.strip() for c in cells]
            elif len(cells) != len(header):
                _fail(errors, DataFormatError(path, line, f"row has {len(cells)} cells, the header has {len(header)} "
                                              f"({', '.join(header)})"))
            else:
                out.append((line, _table_record(header, cells)))
    if header is None:
        raise DataFormatError(path, None, "empty file: no header row")
    return out


def _read_xlsx(path: Path, sheet: str | None, errors) -> list[tuple[str, dict]]:
    openpyxl = require("openpyxl", purpose=f"reading {path.name} (an .xlsx workbook)")
    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        if sheet is None:
            ws = wb.worksheets[0]
        elif sheet in wb.sheetnames:
            ws = wb[sheet]
        else:
            raise DataFormatError(path, None, f"no sheet {sheet!r}; sheets: {wb.sheetnames}")
        ws.reset_dimensions()  # rows as long as their last written cell, not the sheet's stated width
        out, header = [], None
        for rowno, values in enumerate(ws.iter_rows(min_row=1, values_only=True), 1):
            values = list(values)
            while values and (values[-1] is None or values[-1] == ""):
                values.pop()  # trailing empty cells (MeQSum has some in D/E)
            if not values:
                continue
            if header is None:
                header = ["" if v is None else str(v).strip() for v in values]
            elif len(values) > len(header):
                _fail(errors, DataFormatError(path, f"row {rowno}", f"row has a value in column {len(values)}, the "
                                              f"header has {len(header)} ({', '.join(header)})"))
            else:
                out.append((f"row {rowno}", _table_record(header, values + [None] * (len(header) - len(values)))))
    finally:
        wb.close()
    if header is None:
        raise DataFormatError(path, None, f"sheet {ws.title!r} is empty: no header row")
    return out


# ----------------------------------------------------------------------------------------------
# records -> examples (shared by the readers)
# ----------------------------------------------------------------------------------------------
ON_ERROR = ("raise", "drop")


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed`` (a reader option's choices)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def build_example(task: Task, path, line, input_text, **gold) -> Example:
    """:func:`~mptkern.data.schema.make_example`, its ValueError turned into a :class:`DataFormatError` at ``path:line``."""
    try:
        return make_example(task, input_text, **gold)
    except ValueError as exc:
        raise DataFormatError(path, line, str(exc)) from None


def _position(err: DataFormatError):
    """Sort key of an error's locator in file order (``"record KEY"`` locators keep their order)."""
    loc = err.line
    if isinstance(loc, str) and loc.rsplit(" ", 1)[-1].isdigit() and not loc.startswith("record "):
        loc = int(loc.rsplit(" ", 1)[-1])
    return (0, loc) if isinstance(loc, int) else (1, 0)


def read_examples(reader: str, path, task: Task, task_type: str, convert, *, layout, on_error, engine, cache_dir,
                  sheet) -> list[Example]:
    """Records of ``path`` through ``convert(loc, row) -> Example | None`` (None: skip the record),
    raising or, with ``on_error="drop"``, dropping records that raise :class:`DataFormatError`."""
    if task.type != task_type:
        raise ValueError(f"{reader} builds {task_type} examples; task {task.name!r} is {task.type}")
    check_choice("on_error", on_error, ON_ERROR)
    dropped: list[DataFormatError] = [] if on_error == "drop" else None
    records = read_records(path, layout, engine=engine, cache_dir=cache_dir, sheet=sheet, errors=dropped)
    total = len(records) + len(dropped or ())
    out = []
    for loc, row in records:
        try:
            ex = convert(loc, row)
        except DataFormatError as err:
            if dropped is None:
                raise
            dropped.append(err)
            continue
        if ex is not None:
            out.append(ex)
    if dropped:
        dropped.sort(key=_position)  # read errors were collected first; put them in file order
        warnings.warn(f"{reader}({path}): dropped {len(dropped)} malformed record(s) of {total}; first: {dropped[0]}",
                      DroppedRecordsWarning, stacklevel=3)
    return out
