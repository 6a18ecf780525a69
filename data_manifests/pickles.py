"""Reading the pickles that the seeds' datasets ship, without running code from them and without pandas.

Two kinds of pickle matter: MM-SADA's EPIC-Kitchens split files and EPIC-KITCHENS-100's UDA annotations are
pandas DataFrames; the EPIC-KITCHENS-100 UDA feature files are dicts of numpy arrays. ``load_pickle`` reads
both with an unpickler that resolves only an allow-list of globals: numpy array reconstruction, a few builtin
types, and the handful of pandas names a DataFrame of numpy columns pickles to. pandas itself is never imported:
each pandas name maps to a small stand-in that records what pandas would have rebuilt, and every DataFrame is
returned as a ``Table`` (column name -> 1-D numpy array; a named row index becomes a column, like
``reset_index()``). Anything else (another class, a function, pandas extension arrays) is refused with an error
naming the file and the global, so a hostile or unexpected pickle never runs.

Both pickle layouts of a DataFrame's block manager are understood: pandas >= 2 reduces it to
``BlockManager(blocks, axes)`` with ``_unpickle_block(values, placement, ndim)`` per block; older pandas stored
the state tuple whose fourth element holds ``{"0.14.1": {"axes": ..., "blocks": [...]}}`` (under the state key
``_data`` before pandas 1.1, ``_mgr`` after), with ``Int64Index``-style row indexes before pandas 2.

Python 2 pickles load too: their ``str`` values are decoded as latin-1 (as numpy recommends, so that arrays'
raw bytes survive; non-ASCII text pickled by Python 2 as UTF-8 bytes then reads as mojibake), and the objects
of protocol 0/1 pickles are rebuilt through ``copyreg._reconstructor``, which is allowed for the pandas
stand-ins only.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

try:  # numpy >= 2 moved the pickling helpers; old pickles still name numpy.core, new ones numpy._core
    from numpy._core import multiarray, numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray, numeric

Table = dict[str, np.ndarray]


class PickleRefused(ValueError):
    """A pickle holds something other than numpy arrays, builtin types and plain pandas DataFrames."""


# ---- pandas stand-ins: just enough to rebuild the columns ------------------------------------------------

class _IndexKind:
    """Stand-in for a pandas Index class; ``_new_Index`` receives it as ``cls``."""


class _RangeIndexKind(_IndexKind):
    pass


class _MultiIndexKind(_IndexKind):
    pass


class _Index:
    def __init__(self, values: np.ndarray, name) -> None:
        self.values, self.name = np.asarray(values), name


def _new_index(kind: type, state: dict) -> _Index:
    if kind is _RangeIndexKind:
        return _Index(np.arange(state["start"], state["stop"], state["step"]), state.get("name"))
    if kind is _MultiIndexKind:
        raise PickleRefused("a DataFrame with a MultiIndex is not supported; save it with reset_index() first")
    return _Index(state["data"], state.get("name"))


class _Block:
    def __init__(self, values: np.ndarray, placement) -> None:
        if not isinstance(values, np.ndarray):
            raise PickleRefused(f"a DataFrame column block holds {type(values).__name__}, not a numpy array "
                                f"(pandas extension types such as categoricals are not supported)")
        self.values, self.placement = values, placement


def _unpickle_block(values, placement, ndim: int) -> _Block:
    return _Block(values, placement)


class _BlockManager:
    """Both pickle layouts: pandas >= 2 calls ``BlockManager(blocks, axes)``; older pandas sets the state."""

    def __init__(self, blocks=(), axes=()) -> None:
        self.blocks, self.axes = list(blocks), list(axes)

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) >= 4 and isinstance(state[3], dict) and "0.14.1" in state[3]):
            raise PickleRefused("a DataFrame pickled by pandas older than 0.14.1 is not supported")
        layout = state[3]["0.14.1"]
        self.axes = list(layout["axes"])
        self.blocks = [_Block(block["values"], block["mgr_locs"]) for block in layout["blocks"]]


class _DataFrame:
    def __setstate__(self, state) -> None:
        self.manager = state.get("_mgr", state.get("_data")) if isinstance(state, dict) else state

    def table(self) -> Table:
        manager = self.manager
        if not isinstance(manager, _BlockManager) or len(manager.axes) != 2:
            raise PickleRefused("the DataFrame's data is not a two-axis block manager")
        columns, rows = manager.axes
        by_position: dict[int, np.ndarray] = {}
        for block in manager.blocks:
            values = np.atleast_2d(block.values)  # [columns in this block, rows]
            positions = np.arange(len(columns.values))[block.placement]
            by_position.update(zip(positions.tolist(), values))
        table: Table = {}
        if rows.name is not None:
            table[str(rows.name)] = rows.values
        for position in sorted(by_position):
            table[str(columns.values[position])] = by_position[position]
        return table


def _reconstructor(cls: type, base: type, state) -> object:
    """``copyreg._reconstructor`` (protocol 0/1 pickles of objects), for the pandas stand-ins only."""
    if cls not in (_DataFrame, _BlockManager) or base is not object or state is not None:
        raise PickleRefused(f"copyreg._reconstructor({getattr(cls, '__name__', cls)}, "
                            f"{getattr(base, '__name__', base)}, ...) builds only plain pandas DataFrames")
    return object.__new__(cls)


# ---- the allow-list -----------------------------------------------------------------------------------------

_NUMPY = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
          "_frombuffer": numeric._frombuffer, "ndarray": np.ndarray, "dtype": np.dtype}
_BUILTINS = {"slice": slice, "set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex,
             "object": object}  # object: copyreg._reconstructor's base argument
_PANDAS = {
    ("pandas.core.frame", "DataFrame"): _DataFrame,
    ("pandas.core.internals.managers", "BlockManager"): _BlockManager,
    ("pandas.core.internals", "BlockManager"): _BlockManager,
    ("pandas._libs.internals", "_unpickle_block"): _unpickle_block,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.base", "Index"): _IndexKind,
    ("pandas.core.indexes.numeric", "Int64Index"): _IndexKind,
    ("pandas.core.indexes.numeric", "UInt64Index"): _IndexKind,
    ("pandas.core.indexes.numeric", "Float64Index"): _IndexKind,
    ("pandas.core.indexes.range", "RangeIndex"): _RangeIndexKind,
    ("pandas.core.indexes.multi", "MultiIndex"): _MultiIndexKind,
}
_NUMPY_MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle, path: Path) -> None:
        super().__init__(handle, encoding="latin1")  # Python 2 str: bytes 0-255 map 1:1, nothing runs
        self.path = path

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name in _NUMPY:
            return _NUMPY[name]
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes
            return codecs.encode
        if module in ("copyreg", "copy_reg") and name == "_reconstructor":  # copy_reg: Python 2's name
            return _reconstructor
        if (module, name) in _PANDAS:
            return _PANDAS[(module, name)]
        hint = (" (a DataFrame column of a pandas extension type: categorical, datetime, nullable or string dtype; "
                "convert such columns with df.astype(object) and save again)" if module.startswith("pandas") else "")
        raise PickleRefused(f"{self.path}: refusing to load {module}.{name}: only numpy arrays, builtin types and "
                            f"pandas DataFrames of plain columns are read from pickles, and nothing in them is run"
                            + hint)


def load_pickle(path: Path):
    """The pickle's content with every pandas DataFrame replaced by a ``Table``; unknown globals are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pickle not found")
    try:
        with open(path, "rb") as handle:
            content = _RestrictedUnpickler(handle, path).load()
    except PickleRefused as error:
        raise PickleRefused(str(error) if str(error).startswith(str(path)) else f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, AttributeError) as error:
        # ValueError: an unsupported protocol, bad text (UnicodeDecodeError) or numbers in the opcodes
        raise PickleRefused(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
    return _tables_in(content)


def _tables_in(value):
    """Replace DataFrame stand-ins by Tables, inside dicts, lists and tuples too."""
    if isinstance(value, _DataFrame):
        return value.table()
    if isinstance(value, dict):
        return {key: _tables_in(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tables_in(item) for item in value)
    if isinstance(value, (_BlockManager, _Block, _Index)):
        raise PickleRefused(f"pandas internals ({type(value).__name__}) outside a DataFrame")
    return value


def load_table(path: Path) -> Table:
    """A table from a pickled DataFrame, a dict of equal-length lists/arrays, or a list of dicts (rows)."""
    content = load_pickle(path)
    if isinstance(content, list) and all(isinstance(row, dict) for row in content):
        columns = list(dict.fromkeys(key for row in content for key in row))
        content = {column: [row.get(column) for row in content] for column in columns}
    if not isinstance(content, dict) or not content:
        raise ValueError(f"{path}: expected a DataFrame, a dict of columns or a list of row dicts, "
                         f"got {type(content).__name__}")
    table = {str(key): np.asarray(values) for key, values in content.items()}
    lengths = {key: len(values) for key, values in table.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: columns have different lengths {lengths}")
    return table
