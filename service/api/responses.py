"""The JSON response class of the API: rendered by orjson with NumPy support, as the
sessions layer encodes its replies (`service.sessions.codecs.dumps`)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from service.sessions.codecs import dumps


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (NumPy arrays and scalars included)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
