"""The named recipes the server offers (`GET /v1/presets`)."""

from typing import TYPE_CHECKING

from api.schemas import PresetOut

if TYPE_CHECKING:
    from client.client import Client


class Presets:
    def __init__(self, client: "Client") -> None:
        self._client = client

    def list(self) -> list[PresetOut]:
        """Every preset: its name (give it as `{"preset": NAME}` to `jobs.submit`, with optional `overrides`),
        summary, steps and what the benchmarks measured with it."""
        return [PresetOut.model_validate(item) for item in self._client.http.json("GET", "/v1/presets")]
