"""Uploads: the model is a field of a multipart/form-data body (audio transcriptions and
translations, image edits), through the real OpenAI SDK, llmux and fake backends."""

from __future__ import annotations

import trio

from tests.conftest import fake_model_block, llmux_running, write_config

AUDIO = b"RIFF" + bytes(range(256)) * 400  # about 100 KB of "audio"


async def test_the_sdk_uploads_reach_the_model_the_form_names(fakes, tmp_path):
    import openai

    a, b = fakes.start("a", "b", wake_delay=0.05)
    upstream = {"upstream_model": "org/whisper-b", "aliases": ["whisper-1"]}
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b, **upstream))
    async with llmux_running(path) as (server, client):

        def use_sdk() -> tuple[str, str, str]:
            sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
            heard = sdk.audio.transcriptions.create(model="a", file=("a.wav", AUDIO))
            # An alias the backend knows by another name: the form's field is rewritten.
            translated = sdk.audio.translations.create(model="whisper-1", file=("b.wav", AUDIO))
            try:
                sdk.audio.transcriptions.create(model="nope", file=("c.wav", AUDIO))
            except openai.NotFoundError as exc:
                missing = f"{exc} {exc.body['code']}"
            return heard.text, translated.text, missing

        heard, translated, missing = await trio.to_thread.run_sync(use_sdk)
        states = {
            m["id"]: m["llmux"]["state"] for m in (await client.get("/v1/models")).json()["data"]
        }
    assert heard.startswith("a heard") and heard.endswith("for model a")
    assert translated.startswith("b heard") and translated.endswith("for model org/whisper-b")
    assert "nope" in missing and "model_not_found" in missing
    assert states == {"a": "asleep", "b": "active"}
    assert a.state()["rejected_while_asleep"] == b.state()["rejected_while_asleep"] == 0
    assert {t for t in a.received()["targets"] if t.startswith("POST /v1")} == {
        "POST /v1/audio/transcriptions"
    }


def _form(*fields: tuple[str, bytes]) -> tuple[bytes, dict[str, str]]:
    boundary = "llmuxtestboundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value + b"\r\n"
        for name, value in fields
    )  # fmt: skip
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    return parts + f"--{boundary}--\r\n".encode(), headers


async def test_a_form_without_one_model_or_not_a_form_is_refused(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a), server={"max_body_bytes": 50_000})
    async with llmux_running(path) as (_, client):
        url = "/v1/audio/transcriptions"
        twice, headers = _form(("model", b"a"), ("file", AUDIO[:1000]), ("model", b"b"))
        none, headers = _form(("file", AUDIO[:1000]))
        answers = {
            "twice": await client.post(url, content=twice, headers=headers),
            "none": await client.post(url, content=none, headers=headers),
            "json": await client.post(url, json={"model": "a"}),
            "garbled": await client.post(url, content=b"--x\r\nno", headers=headers),
        }
        big, headers = _form(("model", b"a"), ("file", AUDIO))
        answers["too big"] = await client.post(url, content=big, headers=headers)
        ok, headers = _form(("file", AUDIO[:1000]), ("model", b"a"))  # model after the file
        answers["ok"] = await client.post(url, content=ok, headers=headers)
    codes = {name: (r.status_code, r.json()["error"]["message"] if r.status_code != 200 else "")
             for name, r in answers.items()}  # fmt: skip
    assert codes["twice"] == (400, "the form names 'model' more than once")
    assert codes["none"] == (400, "the form has no 'model' field")
    assert codes["json"][0] == 400 and "multipart/form-data" in codes["json"][1]
    assert codes["garbled"][0] == 400
    assert codes["too big"][0] == 413
    assert codes["ok"][0] == 200
    assert a.state()["served"] == 1


def test_the_model_is_known_once_its_field_has_arrived_not_the_file():
    """So an unknown model or a full queue is answered without waiting for the upload (the
    answer-then-drain path is the JSON bodies' one, tests/test_bounds.py)."""
    from llmux.http.form import FormModelScanner

    body, headers = _form(("model", b"whisper"), ("file", AUDIO * 5))
    scanner = FormModelScanner(headers["content-type"].split("boundary=")[1].encode())
    for end in range(0, 300, 7):  # the first bytes, a few at a time, as a network gives them
        scanner.feed(body[:end])
    assert scanner.done and scanner.model == "whisper"
    start, stop = scanner.span
    assert body[start:stop] == b"whisper"
    scanner.feed(body)
    assert scanner.finish() == "whisper"


async def test_every_sdk_call_of_the_route_table_reaches_the_model_it_names(fakes, tmp_path):
    """Each JSON route the OpenAI SDK has, called through llmux: 200, and the backend got that
    path (the SDK's answer parsing is lenient; the route is what is checked)."""
    import openai

    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):

        def use_sdk() -> None:
            sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            sdk.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}])
            sdk.completions.create(model="a", prompt="x", max_tokens=2)
            sdk.embeddings.create(model="a", input="x")
            sdk.moderations.create(model="a", input="x")
            sdk.images.generate(model="a", prompt="x")
            sdk.audio.speech.create(model="a", voice="alloy", input="x").read()
            sdk.responses.create(model="a", input="x")
            sdk.models.retrieve("a")

        await trio.to_thread.run_sync(use_sdk)
        for route in ("/v1/rerank", "/rerank", "/v1/score", "/infill"):  # not in the SDK
            answer = await client.post(route, json={"model": "a", "query": "q", "text_1": "t"})
            assert answer.status_code == 200, route
    reached = {t for t in a.received()["targets"] if not t.startswith(("GET /", "POST /fake"))}
    assert reached == {
        f"POST {p}"
        for p in (
            "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/moderations",
            "/v1/images/generations", "/v1/audio/speech", "/v1/responses", "/v1/rerank",
            "/rerank", "/v1/score", "/infill",
        )
    }  # fmt: skip
