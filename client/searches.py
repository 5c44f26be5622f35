"""Searches to a quality budget (`POST /v1/searches`): the smallest or fastest recipe whose evaluation on your
held-out dataset meets a constraint, found by trials that run as ordinary jobs."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.schemas import SearchOut
from client.errors import INVALID_RECIPE, ApiError
from client.recipes import load_recipe_file

if TYPE_CHECKING:
    from client.client import Client


class Searches:
    def __init__(self, client: "Client") -> None:
        self._client = client

    def submit(self, model: str, request: dict[str, Any] | str | Path, *, queue: str | None = None) -> SearchOut:
        """Start a search on `model` (an id). `request`: the body without `model_id` (objective, constraint,
        evaluate, space, budget, parallelism), as a mapping or the path of a YAML/JSON file. Not retried: a second
        POST would start a second search."""
        body = dict(request) if isinstance(request, dict) else load_recipe_file(Path(request))
        if not isinstance(body, dict):
            raise ApiError(INVALID_RECIPE, "a search request is a mapping (objective, constraint, evaluate, ...)")
        body["model_id"] = model
        if queue is not None:
            body["queue"] = queue
        return SearchOut.model_validate(self._client.http.json("POST", "/v1/searches", json=body, retry=False))

    def get(self, search_id: str) -> SearchOut:
        return SearchOut.model_validate(self._client.http.json("GET", f"/v1/searches/{search_id}"))

    def cancel(self, search_id: str) -> SearchOut:
        """End the search and cancel its queued and running trials."""
        return SearchOut.model_validate(self._client.http.json("POST", f"/v1/searches/{search_id}/cancel",
                                                               retry=False))

    def report(self, search_id: str) -> str:
        """The search's self-contained HTML report."""
        return self._client.http.request("GET", f"/v1/searches/{search_id}/report").text
