"""A pickle decoder for data files that ship as pickles (the revisited
Oxford/Paris ground truth ``gnd_*.pkl``) that never runs anything the file names.

``pickle.load`` calls whatever the file asks for; an allow-list of callables is
not enough either (``numpy.ndarray`` itself reads raw memory at an offset the
file chooses). This module does not unpickle: it walks the opcodes
(:mod:`pickletools` describes them) and builds the values itself. It admits

- ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``,
  ``tuple``, ``dict``;
- numpy arrays and numpy scalars of the dtypes in :data:`PLAIN_DTYPES` (bool,
  int8-64, uint8-64, float32/64; either byte order), in exactly the opcode forms
  numpy writes in pickle protocols 0-5: ``numpy[._]core.multiarray._reconstruct``
  followed by BUILD with ``(1, shape, dtype, fortran_order, raw bytes)``;
  ``numpy[._]core.numeric._frombuffer(bytes, dtype, shape, 'C'|'F')``
  (protocol 5, in-band buffer); ``multiarray.scalar(dtype, bytes)``; the dtype
  as ``numpy.dtype(code, False, True)`` followed by BUILD with numpy's
  version-3 state of a plain dtype. The byte length must be exactly
  ``prod(shape) * itemsize``; the array is copied into fresh memory.
- ``_codecs.encode(text, 'latin1')`` and ``bytes()``: how protocols 0-2 store
  bytes.

Nothing named by the file is ever called or imported. Everything else (any
other global, a constructor call, BUILD on anything but those forms, SETITEM
on an array, sets, persistent ids, out-of-band buffers, data after STOP) is an
:class:`~mom.errors.InputError` naming the file, the opcode and its byte
position. Limits (also one-line errors): the file size, the decoded size,
nesting depth, the number of values and of containers, see the constants below. A container
that already sits inside another one cannot be changed any more, so values
never refer to themselves (no cycles).
"""
from __future__ import annotations

import codecs
import io
import math
import os
import pickletools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mom.errors import InputError

MAX_FILE_BYTES = 256 << 20
MAX_DECODED_BYTES = 1 << 30  # hard cap on the bytes of decoded strings, bytes and arrays
DECODED_BYTES_PER_FILE_BYTE = 4  # and at most this many per byte of the file (plus DECODED_SLACK)
DECODED_SLACK = 1 << 16
MAX_DEPTH = 100  # nested containers (and open MARKs)
MAX_VALUES = 2_000_000  # values pushed, stored in containers or memoized, all together
MAX_CONTAINERS = 200_000  # lists, dicts, tuples and arrays built
MAX_NUMBER_TEXT = 1000  # characters of a text-encoded number (INT, LONG, FLOAT)
MAX_ARRAY_DIMS = 32
HIGHEST_PROTOCOL = 5

# dtype code -> dtype (native order); the file's byte order is applied on top.
PLAIN_DTYPES = {code: np.dtype(code) for code in
                ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f4", "f8")}

# (module, name) -> what the decoder does with it; nothing here is ever imported.
_GLOBALS = {
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
    ("builtins", "bytes"): "bytes",
    ("__builtin__", "bytes"): "bytes",
}
for _package in ("numpy.core", "numpy._core"):  # numpy < 2 and numpy >= 2
    _GLOBALS[(f"{_package}.multiarray", "_reconstruct")] = "reconstruct"
    _GLOBALS[(f"{_package}.multiarray", "scalar")] = "scalar"
    _GLOBALS[(f"{_package}.numeric", "_frombuffer")] = "frombuffer"

_REFUSED_OPCODES = {
    "PERSID": "persistent ids are not plain data",
    "BINPERSID": "persistent ids are not plain data",
    "INST": "it would build an object of a class",
    "OBJ": "it would build an object of a class",
    "NEWOBJ": "it would build an object of a class",
    "NEWOBJ_EX": "it would build an object of a class",
    "EXT1": "extension-registry references are not plain data",
    "EXT2": "extension-registry references are not plain data",
    "EXT4": "extension-registry references are not plain data",
    "EMPTY_SET": "sets are not admitted",
    "ADDITEMS": "sets are not admitted",
    "FROZENSET": "sets are not admitted",
    "NEXT_BUFFER": "out-of-band buffers are not admitted",
    "READONLY_BUFFER": "out-of-band buffers are not admitted",
}


class _Refused(Exception):
    """Raised inside the decoder; :func:`loads` adds the file, opcode and position."""


@dataclass(eq=False)
class _Global:
    kind: str
    qualname: str


@dataclass(eq=False)
class _Dtype:
    """``numpy.dtype(code, ...)``: usable once its BUILD state arrived."""

    code: str
    dtype: np.dtype | None = None


@dataclass(eq=False)
class _PendingArray:
    """``_reconstruct(ndarray, (0,), b'b')``: becomes ``array`` on BUILD."""

    array: np.ndarray | None = None


@dataclass(eq=False)
class _Buffer:
    """A protocol-5 in-band buffer (BYTEARRAY8): only an array's data."""

    data: bytes


@dataclass(eq=False)
class _Container:
    value: object
    depth: int
    plain: bool
    sealed: bool = False  # inside another container: no longer changed


def _checked_number_text(reader):
    def read(stream):
        start = stream.tell()
        line = stream.readline(MAX_NUMBER_TEXT + 2)
        if len(line) > MAX_NUMBER_TEXT and not line.endswith(b"\n"):
            raise _Refused(f"a number written with more than {MAX_NUMBER_TEXT} characters")
        stream.seek(start)
        return reader(stream)
    return read


def _read_py2_string(stream):
    """STRING: a quoted, escaped byte string; decoded as latin-1 (as pickle's encoding='latin1')."""
    raw = pickletools.read_stringnl(stream, decode=False)
    return codecs.escape_decode(raw)[0].decode("latin-1")


_ARGUMENT_READERS = {
    "STRING": _read_py2_string,
    "INT": _checked_number_text(pickletools.read_decimalnl_short),
    "LONG": _checked_number_text(pickletools.read_decimalnl_long),
    "FLOAT": _checked_number_text(pickletools.read_floatnl),
}


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class _Decoder:
    def __init__(self, data: bytes):
        self.stream = io.BytesIO(data)
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict[int, object] = {}
        self.containers: dict[int, _Container] = {}
        self.values = 0
        self.containers_built = 0
        self.decoded = 0
        self.budget = min(MAX_DECODED_BYTES, DECODED_BYTES_PER_FILE_BYTE * len(data) + DECODED_SLACK)
        self.opcode = "start"
        self.position = 0

    # -- the opcode walk ---------------------------------------------------

    def run(self):
        while True:
            self.position = self.stream.tell()
            code = self.stream.read(1)
            if not code:
                self.opcode = "end of file"
                raise _Refused("the pickle ends before its STOP opcode")
            op = pickletools.code2op.get(code.decode("latin-1"))
            if op is None:
                self.opcode = f"byte {code!r}"
                raise _Refused("not a pickle opcode")
            self.opcode = op.name
            reader = _ARGUMENT_READERS.get(op.name, op.arg.reader if op.arg else None)
            arg = reader(self.stream) if reader else None
            if op.name == "STOP":
                return self.finish()
            self.step(op.name, arg)

    def step(self, name: str, arg) -> None:
        if name in _REFUSED_OPCODES:
            raise _Refused(_REFUSED_OPCODES[name])
        handler = _HANDLERS.get(name)
        if handler is None:
            raise _Refused("opcode not admitted")
        handler(self, arg)

    def finish(self):
        if self.stream.read(1):
            raise _Refused("data after the STOP opcode")
        if self.metastack or len(self.stack) != 1:
            raise _Refused(f"STOP with {len(self.stack)} values and {len(self.metastack)} open MARKs on the stack")
        value = self.pop()
        self.require_plain(value, "the result")
        return value

    # -- accounting --------------------------------------------------------

    def count(self, n: int = 1) -> None:
        self.values += n
        if self.values > MAX_VALUES:
            raise _Refused(f"more than {MAX_VALUES:,} values")

    def count_container(self) -> None:
        self.containers_built += 1
        if self.containers_built > MAX_CONTAINERS:
            raise _Refused(f"more than {MAX_CONTAINERS:,} lists, dicts, tuples and arrays")

    def spend(self, n_bytes: int) -> None:
        self.decoded += n_bytes
        if self.decoded > self.budget:
            raise _Refused(f"decoded data would exceed {self.budget:,} bytes "
                           f"({DECODED_BYTES_PER_FILE_BYTE}x the file size, at most {MAX_DECODED_BYTES:,})")

    # -- the stack -----------------------------------------------------------

    def push(self, value) -> None:
        self.count()
        self.stack.append(value)

    def pop(self):
        if not self.stack:
            raise _Refused("stack underflow")
        return self.resolved(self.stack.pop())

    def top(self):
        if not self.stack:
            raise _Refused("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.metastack:
            raise _Refused("no MARK to pop to")
        items = [self.resolved(item) for item in self.stack]
        self.stack = self.metastack.pop()
        return items

    @staticmethod
    def resolved(value):
        """A built array in place of its pending form (memo references)."""
        if isinstance(value, _PendingArray) and value.array is not None:
            return value.array
        return value

    # -- containers ----------------------------------------------------------

    def new_container(self, value, items=(), plain: bool = True):
        self.count_container()
        depth = 1 + max((self.depth_of(item) for item in items), default=0)
        if depth > MAX_DEPTH:
            raise _Refused(f"containers nested deeper than {MAX_DEPTH}")
        self.containers[id(value)] = _Container(value, depth, plain)
        for item in items:
            self.seal(item)
        return value

    def depth_of(self, value) -> int:
        entry = self.containers.get(id(value))
        return entry.depth if entry is not None and entry.value is value else 0

    def seal(self, value) -> None:
        entry = self.containers.get(id(value))
        if entry is not None and entry.value is value:
            entry.sealed = True

    def is_plain(self, value) -> bool:
        if value is None or type(value) in (bool, int, float, str, bytes, list, dict):
            return True
        if isinstance(value, (np.ndarray, np.generic)):
            return type(value) is np.ndarray or isinstance(value, (np.bool_, np.integer, np.floating))
        if type(value) is tuple:
            entry = self.containers.get(id(value))
            return entry is not None and entry.value is value and entry.plain
        return False

    def require_plain(self, value, role: str) -> None:
        if not self.is_plain(value):
            raise _Refused(f"{role} is {_describe(value)}, not plain data")

    def insert(self, target, kind: type, items: list) -> None:
        """Put ``items`` (values, or (key, value) pairs for dicts) into ``target``."""
        if type(target) is not kind:
            raise _Refused(f"adds items to {_describe(target)}; only to a {kind.__name__}")
        entry = self.containers[id(target)]
        if entry.sealed:
            raise _Refused(f"changes a {kind.__name__} that already sits inside another container")
        values = [v for pair in items for v in pair] if kind is dict else items
        for value in values:
            if value is target:
                raise _Refused(f"puts a {kind.__name__} inside itself")
            self.require_plain(value, "an item")
        if kind is dict:
            for key, _ in items:
                if type(key) in (list, dict) or isinstance(key, np.ndarray):
                    raise _Refused(f"a dict key is {_describe(key)} (unhashable)")
        self.count(len(values))
        entry.depth = max(entry.depth, 1 + max((self.depth_of(v) for v in values), default=0))
        if entry.depth > MAX_DEPTH:
            raise _Refused(f"containers nested deeper than {MAX_DEPTH}")
        for value in values:
            self.seal(value)
        if kind is list:
            target.extend(items)
        else:
            target.update(items)

    def make_tuple(self, items: list) -> tuple:
        value = tuple(items)
        return self.new_container(value, items, plain=all(self.is_plain(item) for item in items))

    # -- opcode handlers -----------------------------------------------------

    def op_value(self, arg) -> None:
        self.push(arg)

    def op_text(self, arg) -> None:
        self.spend(len(arg))
        self.push(arg)

    def op_long_binary(self, arg) -> None:
        self.spend(arg.bit_length() // 8)
        self.push(arg)

    def op_bytearray(self, arg) -> None:
        self.spend(len(arg))
        self.push(_Buffer(bytes(arg)))

    def op_none(self, _) -> None:
        self.push(None)

    def op_true(self, _) -> None:
        self.push(True)

    def op_false(self, _) -> None:
        self.push(False)

    def op_empty_list(self, _) -> None:
        self.push(self.new_container([]))

    def op_empty_dict(self, _) -> None:
        self.push(self.new_container({}))

    def op_empty_tuple(self, _) -> None:
        self.push(self.make_tuple([]))

    def op_mark(self, _) -> None:
        if len(self.metastack) >= MAX_DEPTH:
            raise _Refused(f"MARKs nested deeper than {MAX_DEPTH}")
        self.metastack.append(self.stack)
        self.stack = []

    def op_list(self, _) -> None:
        items = self.pop_mark()
        target = self.new_container([])
        self.insert(target, list, items)
        self.push(target)

    def op_dict(self, _) -> None:
        items = self.pop_mark()
        target = self.new_container({})
        self.insert(target, dict, _pairs(items))
        self.push(target)

    def op_tuple(self, _) -> None:
        self.push(self.make_tuple(self.pop_mark()))

    def op_tuple_n(self, n: int) -> None:
        if len(self.stack) < n:
            raise _Refused("stack underflow")
        items = [self.pop() for _ in range(n)][::-1]
        self.push(self.make_tuple(items))

    def op_append(self, _) -> None:
        value = self.pop()
        self.insert(self.top(), list, [value])

    def op_appends(self, _) -> None:
        items = self.pop_mark()
        self.insert(self.top(), list, items)

    def op_setitem(self, _) -> None:
        value = self.pop()
        key = self.pop()
        self.insert(self.top(), dict, [(key, value)])

    def op_setitems(self, _) -> None:
        items = self.pop_mark()
        self.insert(self.top(), dict, _pairs(items))

    def op_put(self, index) -> None:
        if index < 0:
            raise _Refused("negative memo index")
        self.count()
        self.memo[index] = self.top()

    def op_memoize(self, _) -> None:
        self.op_put(len(self.memo))

    def op_get(self, index) -> None:
        if index not in self.memo:
            raise _Refused(f"memo entry {index} was never stored")
        self.push(self.resolved(self.memo[index]))

    def op_pop(self, _) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_pop_mark(self, _) -> None:
        self.pop_mark()

    def op_dup(self, _) -> None:
        self.push(self.top())

    def op_proto(self, version) -> None:
        if version > HIGHEST_PROTOCOL:
            raise _Refused(f"pickle protocol {version} (this decoder reads 0-{HIGHEST_PROTOCOL})")

    def op_frame(self, _) -> None:
        pass

    def op_global(self, arg) -> None:
        module, _, name = arg.partition(" ")
        self.push(_global(module, name))

    def op_stack_global(self, _) -> None:
        name = self.pop()
        module = self.pop()
        if type(module) is not str or type(name) is not str:
            raise _Refused("STACK_GLOBAL needs two strings")
        self.push(_global(module, name))

    def op_reduce(self, _) -> None:
        args = self.pop()
        function = self.pop()
        if not isinstance(function, _Global):
            raise _Refused(f"calls {_describe(function)}")
        if type(args) is not tuple:
            raise _Refused(f"{function.qualname} with arguments that are not a tuple")
        self.push(_REDUCERS[function.kind](self, function, args))

    def op_build(self, _) -> None:
        state = self.pop()
        target = self.top()
        if isinstance(target, _Dtype) and target.dtype is None:
            target.dtype = _dtype_from_state(target.code, state)
        elif isinstance(target, _PendingArray) and target.array is None:
            target.array = self.array_from_state(state)
            self.stack[-1] = target.array
        else:
            raise _Refused(f"BUILD on {_describe(target)}; only on a new numpy array or dtype")

    # -- the numpy forms -------------------------------------------------------

    def reduce_reconstruct(self, function: _Global, args: tuple):
        if not (len(args) == 3 and isinstance(args[0], _Global) and args[0].kind == "ndarray"
                and _is_int_tuple(args[1]) and args[1] == (0,) and args[2] in (b"b", "b")):
            raise _Refused(f"{function.qualname} with arguments other than (numpy.ndarray, (0,), b'b')")
        return _PendingArray()

    def reduce_dtype(self, function: _Global, args: tuple):
        if not (len(args) == 3 and type(args[0]) is str and args[1] in (False, 0) and args[2] in (True, 1)):
            raise _Refused("numpy.dtype with arguments other than (code, False, True)")
        if args[0] not in PLAIN_DTYPES:
            raise _Refused(f"dtype {args[0]!r} is not one of {', '.join(PLAIN_DTYPES)}")
        return _Dtype(args[0])

    def reduce_encode(self, function: _Global, args: tuple):
        if not (len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1")):
            raise _Refused("_codecs.encode with arguments other than (text, 'latin1')")
        if any(ord(char) > 255 for char in args[0]):
            raise _Refused("_codecs.encode of text that is not latin-1")
        self.spend(len(args[0]))
        return args[0].encode("latin-1")

    def reduce_bytes(self, function: _Global, args: tuple):
        if args != ():
            raise _Refused("bytes() with arguments (only bytes() = b'' is admitted)")
        return b""

    def reduce_scalar(self, function: _Global, args: tuple):
        if len(args) != 2:
            raise _Refused(f"{function.qualname} with arguments other than (dtype, bytes)")
        dtype = _built_dtype(args[0])
        data = _raw_bytes(args[1])
        if len(data) != dtype.itemsize:
            raise _Refused(f"a {dtype} scalar needs {dtype.itemsize} bytes, got {len(data)}")
        return self.copied_array(data, dtype, (), "C")[()]

    def reduce_frombuffer(self, function: _Global, args: tuple):
        if len(args) != 4 or args[3] not in ("C", "F"):
            raise _Refused(f"{function.qualname} with arguments other than (buffer, dtype, shape, 'C'|'F')")
        data = args[0].data if isinstance(args[0], _Buffer) else args[0]
        if type(data) is not bytes:
            raise _Refused(f"array data is {_describe(data)}, not bytes")
        return self.copied_array(data, _built_dtype(args[1]), args[2], args[3])

    def reduce_refused(self, function: _Global, args: tuple):
        raise _Refused(f"calls {function.qualname} directly (arrays only in numpy's own pickle forms)")

    def array_from_state(self, state) -> np.ndarray:
        if type(state) is not tuple or len(state) != 5 or state[0] != 1 or type(state[0]) is not int:
            raise _Refused("an array's state must be (1, shape, dtype, fortran_order, data)")
        _, shape, dtype, fortran, data = state
        if fortran not in (True, False):
            raise _Refused("an array's fortran_order must be a bool")
        array = self.copied_array(_raw_bytes(data), _built_dtype(dtype), shape, "F" if fortran else "C")
        # numpy's __setstate__ swaps such arrays into the native byte order; so do we.
        return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="), order="K")

    def copied_array(self, data: bytes, dtype: np.dtype, shape, order: str) -> np.ndarray:
        if not _is_int_tuple(shape) or len(shape) > MAX_ARRAY_DIMS or any(n < 0 for n in shape):
            raise _Refused(f"an array shape must be a tuple of at most {MAX_ARRAY_DIMS} sizes >= 0")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise _Refused(f"array data has {len(data)} bytes; shape {shape} of {dtype} needs exactly {expected}")
        self.spend(expected)
        self.count_container()
        flat = np.frombuffer(data, dtype=dtype) if expected else np.zeros(0, dtype)
        if dtype.kind == "b" and flat.view(np.uint8).max(initial=0) > 1:
            raise _Refused("bool array data holds bytes other than 0 and 1")
        return flat.reshape(shape, order=order).copy(order=order)


def _pairs(items: list) -> list[tuple]:
    if len(items) % 2:
        raise _Refused("odd number of items for a dict")
    return list(zip(items[::2], items[1::2]))


def _is_int_tuple(value) -> bool:
    return type(value) is tuple and all(type(n) is int for n in value)


def _global(module: str, name: str) -> _Global:
    kind = _GLOBALS.get((module, name))
    if kind is None:
        raise _Refused(f"global {_one_line(module, 80)}.{_one_line(name, 80)} is not admitted "
                       "(only plain containers, numbers, strings and numpy arrays)")
    return _Global(kind, f"{module}.{name}")


def _built_dtype(value) -> np.dtype:
    if not isinstance(value, _Dtype) or value.dtype is None:
        raise _Refused(f"expected a numpy dtype, got {_describe(value)}")
    return value.dtype


def _raw_bytes(value) -> bytes:
    if type(value) is bytes:
        return value
    if type(value) is str and all(ord(char) < 256 for char in value):  # Python 2 pickles
        return value.encode("latin-1")
    raise _Refused(f"array data is {_describe(value)}, not raw bytes (object arrays are refused)")


def _dtype_from_state(code: str, state) -> np.dtype:
    """The dtype for numpy's version-3 state of a plain dtype, else refused."""
    dtype = PLAIN_DTYPES[code]
    byte_orders = ("|",) if dtype.itemsize == 1 else ("<", ">")
    plain_state = (type(state) is tuple and len(state) == 8 and state[0] == 3 and state[1] in byte_orders
                   and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0))
    if not plain_state:
        raise _Refused(f"dtype {code} with a state other than numpy's plain (3, byte order, None, None, None, -1, -1, 0)")
    return dtype if state[1] == "|" else dtype.newbyteorder(state[1])


def _describe(value) -> str:
    if isinstance(value, _Global):
        return value.qualname
    if isinstance(value, _Dtype):
        return "a numpy dtype"
    if isinstance(value, _PendingArray):
        return "an unfinished array"
    if isinstance(value, _Buffer):
        return "a bytearray"
    if type(value) is tuple:
        return "a tuple holding something other than plain data"
    return f"a {type(value).__name__}"


_HANDLERS = {
    **dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "FLOAT", "BINFLOAT"), _Decoder.op_value),
    **dict.fromkeys(("LONG1", "LONG4"), _Decoder.op_long_binary),
    **dict.fromkeys(("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                     "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"), _Decoder.op_text),
    "BYTEARRAY8": _Decoder.op_bytearray,
    "NONE": _Decoder.op_none,
    "NEWTRUE": _Decoder.op_true,
    "NEWFALSE": _Decoder.op_false,
    "EMPTY_LIST": _Decoder.op_empty_list,
    "EMPTY_DICT": _Decoder.op_empty_dict,
    "EMPTY_TUPLE": _Decoder.op_empty_tuple,
    "MARK": _Decoder.op_mark,
    "LIST": _Decoder.op_list,
    "DICT": _Decoder.op_dict,
    "TUPLE": _Decoder.op_tuple,
    "TUPLE1": lambda self, _: self.op_tuple_n(1),
    "TUPLE2": lambda self, _: self.op_tuple_n(2),
    "TUPLE3": lambda self, _: self.op_tuple_n(3),
    "APPEND": _Decoder.op_append,
    "APPENDS": _Decoder.op_appends,
    "SETITEM": _Decoder.op_setitem,
    "SETITEMS": _Decoder.op_setitems,
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), _Decoder.op_put),
    "MEMOIZE": _Decoder.op_memoize,
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _Decoder.op_get),
    "POP": _Decoder.op_pop,
    "POP_MARK": _Decoder.op_pop_mark,
    "DUP": _Decoder.op_dup,
    "PROTO": _Decoder.op_proto,
    "FRAME": _Decoder.op_frame,
    "GLOBAL": _Decoder.op_global,
    "STACK_GLOBAL": _Decoder.op_stack_global,
    "REDUCE": _Decoder.op_reduce,
    "BUILD": _Decoder.op_build,
}

_REDUCERS = {
    "reconstruct": _Decoder.reduce_reconstruct,
    "dtype": _Decoder.reduce_dtype,
    "encode": _Decoder.reduce_encode,
    "bytes": _Decoder.reduce_bytes,
    "scalar": _Decoder.reduce_scalar,
    "frombuffer": _Decoder.reduce_frombuffer,
    "ndarray": _Decoder.reduce_refused,
}


def loads(data: bytes, where: str = "pickle"):
    """Decode ``data`` (see the module doc); ``where`` names it in errors."""
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{where}: {len(data):,} bytes; pickled data files are read up to {MAX_FILE_BYTES:,}")
    decoder = _Decoder(bytes(data))
    try:
        return decoder.run()
    except _Refused as refusal:
        raise InputError(f"{where}: refusing {decoder.opcode} at byte {decoder.position}: {refusal}") from None
    except Exception as error:  # noqa: BLE001 - any failure on an untrusted file is one line, never a crash
        raise InputError(f"{where}: not a readable pickle of plain data: {decoder.opcode} at byte "
                         f"{decoder.position}: {type(error).__name__}: {_one_line(error)}") from None


def load(path: str | os.PathLike):
    """Decode the pickle file at ``path`` (plain data only, see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputError(f"{path}: {size:,} bytes; pickled data files are read up to {MAX_FILE_BYTES:,}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    return loads(data, where=str(path))
