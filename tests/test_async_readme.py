"""The README's asyncio examples run as written, on both backends: the plain one, and the
FastAPI app, driven through Starlette's test client (its loop in a thread of its own, as a
server runs it), with the lifespan that starts and stops the AsyncRuntime."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_URL = "sqlite:///sleeptime.db"


def example(marker: str, db_url: str) -> str:
    """The README's python block that holds `marker`, on the database `db_url`."""
    blocks: list[str] = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (block,) = [block for block in blocks if marker in block]
    assert EXAMPLE_URL in block
    return block.replace(EXAMPLE_URL, db_url)


def events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events: (event name, JSON data) in order."""
    found = []
    for chunk in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        found.append((fields.get("event", "message"), json.loads(fields["data"])))
    return found


def test_the_asyncio_example_runs(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(example("asyncio.run(main())", db_url), str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert "teal" in printed[0]  # the scripted agent answers from the memory block
    assert printed[1] == str(list(range(3, 13)))
    assert "favorite color: teal" in printed[2]


# Recent Starlette asks for `httpx2` in its test client; `httpx` works the same here.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_fastapi_example_takes_and_streams_turns(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient  # noqa: PLC0415  # under the filter above

    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {}
    exec(compile(example("FastAPI(lifespan=lifespan)", db_url), str(README), "exec"), names)

    with TestClient(names["app"]) as client:
        group_id = client.post("/groups").json()["id"]
        turn = client.post(f"/groups/{group_id}/turns", json={"text": "my name is Ada"})
        assert turn.status_code == 200, turn.text
        assert turn.json()["turn"] == 1 and turn.json()["fired"]
        assert turn.json()["messages"][0]["role"] == "assistant"

        with client.stream(
            "POST", f"/groups/{group_id}/turns/stream", json={"text": "hello"}
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            body = streamed.read().decode()
        *messages, (last, result) = events(body)
        assert [name for name, _ in messages] == ["message"] * len(messages) and messages
        assert all(data["role"] == "assistant" for _, data in messages)
        assert last == "done" and result["turn"] == 2
        assert [m["id"] for m in result["messages"]] == [data["id"] for _, data in messages]

        missing = client.post("/groups/group-nobody/turns", json={"text": "hi"})
        assert missing.status_code == 404 and "group-nobody" in missing.json()["detail"]
        missing = client.post("/groups/group-nobody/turns/stream", json={"text": "hi"})
        assert missing.status_code == 404
        rt = names["app"].state.rt
    assert rt.stopped  # the lifespan stopped it
