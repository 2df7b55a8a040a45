"""AudioSet's class order, defined once: unit ``i`` of an AudioSet head is the ``i``-th class of
``class_labels_indices.csv`` sorted by ``mid``, not the file's ``index`` column (ontology order).

Why mid order: the published fine-tuned head was trained by EVAR, whose ``MultiLabelBinarizer`` numbers the mids of
its AudioSet metadata in sorted order (nttcslab/eval-audio-repr ``evar/data.py:73-75``; the labels are mids,
``evar/utils/make_as_metadata.py``), and the published inference names its units the same way
(aurianworld/matpac ``inference_matpac/matpac/model.py:92-94``, ``read_csv(...).sort_values('mid')``). The two orders
agree at 0 of AudioSet's 527 positions (``index`` 0 is Speech, ``/m/09x0r``; unit 0 is Firecracker, ``/g/122z_qxw``).

Every producer and consumer of an AudioSet label id uses this order: ``data.prepare`` stores ``AudioSetClasses.unit``
of each mid in the records (and ``label_order: 'mid'`` in its manifest), fine-tuning trains unit ``k`` on label
``k``, ``embed --tag --labels`` names unit ``i`` ``names[i]``; ``convert`` passes the head's units through unchanged.
"""

from __future__ import annotations

import csv
import dataclasses

LABEL_ORDER = "mid"  # what prepare's manifest records as 'label_order' for AudioSet labels


@dataclasses.dataclass(frozen=True)
class AudioSetClasses:
    """The classes of a ``class_labels_indices.csv`` in head order: ``mids[i]``, ``names[i]`` and the file's
    ``index`` column (``ontology[i]``) of unit ``i``."""

    mids: tuple[str, ...]
    names: tuple[str, ...]
    ontology: tuple[int, ...]

    @property
    def unit(self) -> dict[str, int]:
        """mid -> head unit (the label id a record stores)."""
        return {mid: i for i, mid in enumerate(self.mids)}


def _rows(path: str) -> list[tuple[int, list[str]]]:
    """(line number, stripped fields) of the non-blank rows; ValueError for a file that is not UTF-8 CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, skipinitialspace=True)
            return [(reader.line_num, [c.strip() for c in row]) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as e:
        raise ValueError(f"--labels={path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"--labels={path}: not readable as CSV ({e})") from None


def read_audioset_classes(path: str) -> AudioSetClasses:
    """The classes of AudioSet's ``class_labels_indices.csv`` (columns ``index``, ``mid``, ``display_name``; the name
    defaults to the mid) sorted by mid. OSError when unreadable; ValueError naming the file and line of a bad row, a
    missing column or a repeated mid."""
    rows = _rows(path)
    header = [c.lower() for c in rows[0][1]] if rows else []
    if "mid" not in header or "index" not in header:
        raise ValueError(
            f"--labels={path}: the header must name 'index' and 'mid' columns (AudioSet's class_labels_indices.csv), "
            f"got {header}"
        )
    col = {name: header.index(name) for name in ("index", "mid", "display_name") if name in header}
    classes: dict[str, tuple[str, int]] = {}
    for line, row in rows[1:]:
        field = {name: row[c] if c < len(row) else "" for name, c in col.items()}
        mid, text = field["mid"], field["index"]
        index = int(text) if text.isdigit() else -1
        if not mid or index < 0:
            raise ValueError(
                f"--labels={path}, line {line}: expected a mid and a non-negative integer index, got "
                f"mid={mid!r}, index={text!r}"
            )
        if mid in classes:
            raise ValueError(f"--labels={path}, line {line}: mid {mid!r} appears twice: one row per class")
        classes[mid] = (field.get("display_name") or mid, index)
    mids = tuple(sorted(classes))  # str order is code-point order, as pandas' sort_values and sklearn's np.unique
    return AudioSetClasses(mids, tuple(classes[m][0] for m in mids), tuple(classes[m][1] for m in mids))
