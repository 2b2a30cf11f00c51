"""The names and bounds of the session state file (docs/state.md), shared by its writer
(`state_io.encode_session`) and its readers (`state_metadata`, `state_tensors`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core import tensorfile

#: the `format` of a state file
FORMAT = "optserve.session/1"
PARAMS = "params/"
STATE = "state/"
SCALAR = "scalar/"
#: what a scalar of each Python type is written as (OptState's convention)
SCALAR_DTYPES: dict[type, np.dtype[Any]] = {
    bool: np.dtype("?"),
    int: np.dtype("<i8"),
    float: np.dtype("<f8"),
}
SCALAR_TYPES = {dtype: kind for kind, dtype in SCALAR_DTYPES.items()}
KIND_NAMES = {bool: "a flag (BOOL)", int: "an integer (I64)", float: "a real number (F64)"}
META = ["body", "__metadata__"]
# MAX_SAFE_INT (model.py): the largest counter (and integer of the JSON metadata) a file
# may hold: JSON clients in JavaScript read numbers as doubles, exact up to there
#: digits of a counter: 16 hold MAX_SAFE_INT (9007199254740991)
COUNTER_DIGITS = 16
#: the most dimensions a layout shape may have (NumPy's maximum)
MAX_DIMS = tensorfile.MAX_DIMS
#: tensors of a file per tensor of the layout: params/<t> and the state/<key>/<t>
#: arrays (the optimizer's and the session's own), with room to spare
TENSORS_PER_TENSOR = 16
#: tensors of a file besides those: the scalar/<key> entries
EXTRA_TENSORS = 64
#: how deep the JSON of spec, schedule state and `extra` may nest (they need a few levels)
MAX_DEPTH = 32
