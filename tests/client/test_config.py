"""Where the client finds the API and its key, how recipe files read, how progress shows: no server needed."""

import io

import pytest

from client import ApiError, Client, JobOut, Lines
from client.config import config_path, resolve
from client.progress import Rich, reporter
from client.recipes import recipe_body


@pytest.fixture()
def no_environment(monkeypatch, tmp_path):
    for name in ("MCS_API_URL", "MCS_API_KEY", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MCS_CONFIG", str(tmp_path / "config.toml"))
    return tmp_path / "config.toml"


def test_arguments_then_environment_then_config_file(no_environment, monkeypatch):
    no_environment.write_text('url = "https://file.example/"\nkey = "from-file"\n')
    assert resolve() == resolve(None, None)
    assert (resolve().url, resolve().key) == ("https://file.example", "from-file")
    monkeypatch.setenv("MCS_API_KEY", "from-env")
    assert (resolve().url, resolve().key) == ("https://file.example", "from-env")
    monkeypatch.setenv("MCS_API_URL", "http://env.example:8000")
    assert (resolve().url, resolve().key) == ("http://env.example:8000", "from-env")
    assert (resolve("http://arg", "from-arg").url, resolve("http://arg", "from-arg").key) == ("http://arg",
                                                                                          "from-arg")
    with Client(key="k") as client:
        assert client.url == "http://env.example:8000"


def test_the_config_file_lives_under_xdg_config_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MCS_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_path() == tmp_path / "mcs" / "config.toml"


def test_without_a_key_the_error_says_where_to_put_one(no_environment):
    with pytest.raises(ApiError) as missing:
        Client()
    assert missing.value.code == "missing_api_key" and "MCS_API_KEY" in missing.value.message
    assert str(no_environment) in missing.value.message
    no_environment.write_text("key = [unclosed")
    with pytest.raises(ApiError) as broken:
        Client()
    assert broken.value.code == "invalid_config"


def test_a_url_alone_defaults_to_mcs_serve(no_environment):
    assert resolve(key="k").url == "http://127.0.0.1:8000"


def test_recipes_from_yaml_json_lists_and_mappings(tmp_path):
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("steps:\n  - type: distill\n    lr: 1e-4\n    epochs: 1\nexport: [onnx]\nqueue: gpu\n")
    assert recipe_body(yaml_file) == {"steps": [{"type": "distill", "lr": 1e-4, "epochs": 1}], "export": ["onnx"],
                                      "queue": "gpu"}
    listed = tmp_path / "steps.yml"
    listed.write_text("- {type: quantize, bits: 8}\n")
    assert recipe_body(str(listed)) == {"steps": [{"type": "quantize", "bits": 8}]}
    as_json = tmp_path / "r.json"
    as_json.write_text('{"steps": [{"type": "quantize"}]}')
    assert recipe_body(as_json) == {"steps": [{"type": "quantize"}]}
    assert recipe_body([{"type": "quantize"}]) == {"steps": [{"type": "quantize"}]}


def test_a_jobspec_is_sent_as_written(tmp_path):
    from core.compression.spec import JobSpec

    spec = JobSpec.model_validate({"steps": [{"type": "quantize", "bits": 4}]})
    assert recipe_body(spec) == {"steps": [{"type": "quantize", "bits": 4}]}  # no defaults filled in


@pytest.mark.parametrize("content", ["steps: [unclosed", "just a string", "42"])
def test_unreadable_recipe_files_are_invalid_recipe(tmp_path, content):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    with pytest.raises(ApiError) as error:
        recipe_body(bad)
    assert error.value.code == "invalid_recipe" and str(bad) in error.value.message
    with pytest.raises(ApiError, match="no recipe file"):
        recipe_body(tmp_path / "missing.yaml")


def job(status: str, progress: float, message: str | None) -> JobOut:
    return JobOut.model_validate({
        "id": "job_1", "model_id": "mdl_1", "status": status, "queue": "cpu", "progress": progress,
        "current_step": 0, "message": message, "steps": [], "metrics": None, "error": None, "estimate": None,
        "attempts": 1, "cancel_requested": False, "artifacts": [], "created_at": "2025-01-01T00:00:00Z",
        "started_at": None, "finished_at": None})


def test_plain_lines_when_piped_a_bar_on_a_terminal():
    stream = io.StringIO()
    lines = reporter(True, stream)
    assert isinstance(lines, Lines) and not isinstance(reporter(False), (Lines, Rich))
    with lines:
        for update in (job("queued", 0, None), job("running", 0.5, "step 1/1 quantize"),
                       job("running", 0.5, "step 1/1 quantize"), job("succeeded", 1, None)):
            lines.job(update)
        transfer = lines.transfer("upload m", 1000)
        for _ in range(4):
            transfer.advance(250)
        transfer.close()
    assert stream.getvalue().splitlines() == [
        "  queued      0.0%  ", "  running    50.0%  step 1/1 quantize", "  succeeded 100.0%  ",
        "upload m:   0% (0 B of 1.0 kB)", "upload m:  20% (250 B of 1.0 kB)", "upload m:  50% (500 B of 1.0 kB)",
        "upload m:  70% (750 B of 1.0 kB)", "upload m: 100% (1.0 kB of 1.0 kB)"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = reporter(True, Terminal())
    assert isinstance(bar, Rich)
    with bar:  # one live display at a time: a transfer after a job (and back) replaces it
        bar.job(job("running", 0.25, "step 1/2"))
        bar.transfer("download a.zip", 10).advance(10)
        bar.job(job("succeeded", 1, None))
