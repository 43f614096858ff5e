"""The official `openai` Python SDK, unmodified, against a running chatq.

Started by `.ci/run` in a virtual environment with the pinned SDK. chatq runs without an API
key, so replies are the personalities' fallback texts, which the tests compare exactly.
"""

import json
import os
import subprocess
import tempfile
import threading
import unittest
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("CHATQ_BIN", str(ROOT / "target" / "debug" / "chatq"))
FALLBACKS = {
    p["name"]: p["fallback"]
    for p in json.loads((ROOT / "data" / "personalities.json").read_text())
}


class ChatqServer:
    def __init__(self, *args):
        self.dir = tempfile.TemporaryDirectory()
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        env["RUST_LOG"] = "info"
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.dir.name, *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.address = None
        for line in self.proc.stderr:
            if "listening on http://" in line:
                self.address = line.split("listening on ", 1)[1].strip()
                break
        if self.address is None:
            raise RuntimeError("chatq exited before listening")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        code = self.proc.wait(timeout=30)
        self.dir.cleanup()
        return code


class OpenAISdkAgainstChatq(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ChatqServer("--rate-limit", "3")
        cls.client = openai.OpenAI(
            base_url=cls.server.address + "/v1", api_key="not-needed", max_retries=0
        )

    @classmethod
    def tearDownClass(cls):
        assert cls.server.stop() == 0, "chatq exits 0 on SIGTERM"

    def test_create(self):
        completion = self.client.chat.completions.create(
            model="chatq-technical",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a queue?"},
            ],
            user="py-create",
        )
        self.assertEqual(completion.object, "chat.completion")
        self.assertEqual(completion.model, "chatq-technical")
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.choices[0].message.role, "assistant")
        self.assertEqual(completion.choices[0].message.content, FALLBACKS["technical"])

    def test_stream(self):
        stream = self.client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Hello there"}],
            stream=True,
            user="py-stream",
        )
        pieces = []
        finish = None
        for chunk in stream:
            self.assertEqual(chunk.object, "chat.completion.chunk")
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        self.assertEqual("".join(pieces), FALLBACKS["helpful"])
        self.assertGreater(len([p for p in pieces if p]), 3, "streamed in several deltas")
        self.assertEqual(finish, "stop")

    def test_rate_limit_raises_rate_limit_error(self):
        messages = [{"role": "user", "content": "again"}]
        for _ in range(3):
            self.client.chat.completions.create(
                model="chatq-helpful", messages=messages, user="py-limited"
            )
        with self.assertRaises(openai.RateLimitError) as caught:
            self.client.chat.completions.create(
                model="chatq-helpful", messages=messages, user="py-limited"
            )
        self.assertIsNotNone(caught.exception.response.headers.get("retry-after"))

    def test_bad_request_and_unknown_model(self):
        with self.assertRaises(openai.UnprocessableEntityError):
            self.client.chat.completions.create(
                model="chatq-helpful",
                messages=[{"role": "user", "content": "<script>alert(1)</script>"}],
                user="py-bad",
            )
        with self.assertRaises(openai.NotFoundError):
            self.client.chat.completions.create(
                model="chatq-pirate",
                messages=[{"role": "user", "content": "hi"}],
                user="py-bad2",
            )

    def test_models(self):
        ids = {m.id for m in self.client.models.list()}
        self.assertIn("chatq-sarcastic", ids)
        self.assertIn("gpt-4o-mini", ids)


if __name__ == "__main__":
    unittest.main(verbosity=2)
