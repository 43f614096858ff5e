"""The chat page and the admin dashboard in a real headless Chromium.

Run by `tests/api/browser.rs` (so by `cargo test`); needs Debian's `chromium` and
`chromium-driver`, which `.ci/run` installs. chatq talks to a mock upstream started here.
Screenshots go to a temporary folder whose path is printed. The test fails if a page logs a
JavaScript error or requests anything outside chatq.
"""

import json
import os
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

BIN = os.environ["CHATQ_BIN"]
MARKUP = '<img src=x onerror="window.__pwned=1"><b>bold</b> & <script>window.__pwned=2</script>'
GREETING = "Hello from the mock upstream, streamed word by word."
FAIL_ONCE = {"left": 1}


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = body["messages"][-1]["content"]
        if ("fail me" in prompt and FAIL_ONCE["left"] > 0) or "always fail" in prompt:
            FAIL_ONCE["left"] -= 1
            data = b'{"error": {"message": "the mock refuses"}}'
            self.send_response(400)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        reply = MARKUP if "markup" in prompt else ("recovered" if "fail me" in prompt else GREETING)
        if not body.get("stream"):
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}],
                               "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        words = reply.split(" ")
        for i, word in enumerate(words):
            piece = word if i == len(words) - 1 else word + " "
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.12)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def call(base, path, body=None, method=None):
    """One JSON request to a chatq; returns (status, body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class PagesInChromium(unittest.TestCase):
    @classmethod
    def start_chatq(cls, args):
        """Starts a chatq on a free loopback port in a data directory of its own."""
        data = tempfile.mkdtemp(prefix="chatq-data-")
        env = dict(os.environ)
        env.update({
            "OPENAI_API_KEY": "mock-key",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{cls.mock.server_port}/v1",
            "RUST_LOG": "info",
        })
        process = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--backoff-ms", "100", *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
        )
        base = None
        for line in process.stderr:
            if "listening on http://" in line:
                base = line.split("listening on ", 1)[1].strip()
                break
        threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
        cls.processes.append(process)
        return base

    @classmethod
    def setUpClass(cls):
        cls.mock = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        threading.Thread(target=cls.mock.serve_forever, daemon=True).start()
        cls.processes = []
        cls.base = cls.start_chatq(["--admin-token", "admin-secret", "--rate-limit", "5"])
        cls.bases = [cls.base]
        cls.shots = tempfile.mkdtemp(prefix="chatq-screenshots-")
        print(f"screenshots: {cls.shots}", flush=True)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1100,900"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        cls.driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
        cls.driver.set_script_timeout(20)

    @classmethod
    def tearDownClass(cls):
        cls.driver.quit()
        for process in cls.processes:
            process.terminate()
            process.wait(timeout=30)
        cls.mock.shutdown()

    def tearDown(self):
        # The whole page, not only the window: the admin page is taller than it.
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1100, max(900, min(height, 4000)))
        self.driver.save_screenshot(os.path.join(self.shots, self._testMethodName + ".png"))
        self.driver.set_window_size(1100, 900)
        logs = self.driver.get_log("browser")
        errors = [e for e in logs if e["level"] == "SEVERE" and e.get("source") != "network"]
        self.assertEqual(errors, [], "the page logged JavaScript errors")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                url = message["params"]["request"]["url"]
                if url.startswith(("chrome:", "about:", "data:")):
                    continue  # the browser's own pages, not the network
                self.assertTrue(any(url.startswith(b + "/") for b in self.bases), f"request outside chatq: {url}")

    def wait_for(self, condition, timeout=15):
        end = time.time() + timeout
        while time.time() < end:
            try:
                value = condition()
            except (StaleElementReferenceException, NoSuchElementException):
                # The admin page redraws its tables every 2 s; look again.
                value = None
            if value:
                return value
            time.sleep(0.02)
        self.fail("condition not met in time")

    def bubbles(self):
        return self.driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")

    def send(self, text):
        box = self.driver.find_element(By.ID, "text")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def open_chat(self, name):
        self.driver.get(self.base + "/")
        user = self.driver.find_element(By.ID, "user")
        user.clear()
        user.send_keys(name)

    def test_1_chat_streams_the_reply_and_shows_markup_as_text(self):
        self.open_chat("alice")
        self.wait_for(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#personality option"))
        box = self.driver.find_element(By.ID, "text")
        box.send_keys("line one")
        box.send_keys(Keys.SHIFT, Keys.ENTER)
        box.send_keys("line two")
        self.assertIn("\n", box.get_attribute("value"), "Shift+Enter adds a newline")
        self.assertEqual(self.bubbles(), [], "and does not send")
        box.clear()
        self.send("hi there")
        seen = set()

        def done():
            bubbles = self.bubbles()
            if bubbles:
                seen.add(bubbles[-1].text)
                return bubbles[-1].text == GREETING
            return False

        self.wait_for(done)
        partial = [t for t in seen if t and t != GREETING and GREETING.startswith(t)]
        self.assertTrue(partial, f"the reply appeared as it streamed, saw {seen}")
        self.send("show me markup")
        self.wait_for(lambda: len(self.bubbles()) == 2 and self.bubbles()[1].text == MARKUP)
        body = self.bubbles()[1]
        self.assertEqual(body.find_elements(By.XPATH, "./*"), [], "no elements were created from the reply")
        self.assertIsNone(self.driver.execute_script("return window.__pwned"), "nothing ran")

    def test_2_rate_limit_is_shown_in_words(self):
        self.open_chat("speedy")
        for i in range(5):
            self.send(f"message {i}")
            self.wait_for(lambda: len(self.bubbles()) == i + 1 and self.bubbles()[i].text == GREETING)
        self.send("one too many")
        error = self.wait_for(lambda: self.driver.find_element(By.ID, "error").text)
        self.assertIn("You can send again in", error)

    def test_3_admin_shows_counts_retries_a_failed_job_and_filters_the_log(self):
        self.open_chat("bob")
        self.send("please fail me")
        self.wait_for(lambda: self.driver.find_element(By.ID, "error").text)
        self.driver.get(self.base + "/admin")
        self.driver.find_element(By.ID, "token").send_keys("admin-secret", Keys.ENTER)
        failed_count = lambda: self.driver.find_element(By.CSS_SELECTOR, "#count-failed b").text
        self.wait_for(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#count-failed") and failed_count() == "1")
        completed = self.driver.find_element(By.CSS_SELECTOR, "#count-completed b").text
        self.assertGreaterEqual(int(completed), 7)
        # The state line says how the data directory's disk is doing.
        self.assertRegex(self.driver.find_element(By.ID, "state").text, r"disk \d+\.\d GiB free")
        def click_retry():
            rows = self.driver.find_elements(By.CSS_SELECTOR, "#failed tr")
            self.assertEqual(len(rows), 1)
            self.assertIn("the mock refuses", rows[0].text)
            rows[0].find_element(By.TAG_NAME, "button").click()
            return True

        self.wait_for(click_retry)
        self.wait_for(lambda: failed_count() == "0")
        self.wait_for(lambda: "recovered" in self.driver.find_element(By.ID, "recent").text)
        user_filter = self.driver.find_element(By.ID, "f-user")
        user_filter.send_keys("alice", Keys.ENTER)

        def only_alice():
            rows = self.driver.find_elements(By.CSS_SELECTOR, "#entries tr")
            users = [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows]
            return users if users and set(users) == {"alice"} else None

        users = self.wait_for(only_alice)
        self.assertEqual(len(users), 2)
        self.assertIn(MARKUP, self.driver.find_element(By.ID, "entries").text, "log text shown literally")
        self.assertIsNone(self.driver.execute_script("return window.__pwned"))

    def test_4_admin_opens_at_once_draws_the_last_day_and_edits_a_guild(self):
        # A chatq on loopback without an admin token: the dashboard needs no token, so it
        # opens at once, without asking for one.
        base = self.start_chatq(["--rate-limit", "100"])
        self.bases.append(base)
        for guild, n in [("g-big", 3), ("g-small", 1)]:
            for i in range(n):
                status, job = call(base, "/v1/chat/jobs", {"user_id": f"u{i}", "guild_id": guild, "prompt": f"hello {i}"})
                self.assertEqual(status, 202, job)
                call(base, f"/v1/chat/jobs/{job['id']}?wait=10")
        status, job = call(base, "/v1/chat/jobs", {"user_id": "x", "guild_id": "g-small", "prompt": "always fail"})
        self.assertEqual(status, 202, job)
        status, failed = call(base, f"/v1/chat/jobs/{job['id']}?wait=10")
        self.assertEqual(failed["status"], "failed", failed)

        self.driver.get(base + "/admin")
        self.wait_for(lambda: self.driver.find_element(By.ID, "panel").is_displayed())
        self.assertFalse(self.driver.find_element(By.ID, "login").is_displayed(), "no token form")
        total = lambda kind: sum(int(r.get_attribute("data-value"))
                                 for r in self.driver.find_elements(By.CSS_SELECTOR, f"#chart-hours rect.{kind}"))
        self.wait_for(lambda: total("requests") == 5)
        self.assertEqual(len(self.driver.find_elements(By.CSS_SELECTOR, "#chart-hours rect.requests")), 24, "one bar per hour")
        self.assertEqual(total("failed"), 1)
        self.assertEqual(total("fallback"), 0)
        tokens = {r.get_attribute("data-guild"): int(r.get_attribute("data-value"))
                  for r in self.driver.find_elements(By.CSS_SELECTOR, "#chart-guilds rect")}
        self.assertEqual(tokens, {"g-big": 54, "g-small": 18}, "18 tokens per upstream reply")
        self.assertIn("g-big", self.driver.find_element(By.ID, "chart-guilds").text)

        # A new guild's settings, first with a value the server refuses.
        self.wait_for(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#g-personality option[value=technical]"))
        self.driver.find_element(By.ID, "g-id").send_keys("g-big")
        self.driver.find_element(By.CSS_SELECTOR, "#g-personality option[value=technical]").click()
        self.driver.find_element(By.ID, "g-daily_token_quota").send_keys("500")
        self.driver.find_element(By.ID, "g-instructions").send_keys("Be brief.")
        temperature = self.driver.find_element(By.ID, "g-temperature")
        temperature.send_keys("5")
        self.driver.find_element(By.CSS_SELECTOR, "#guild-form button[type=submit]").click()
        error = self.wait_for(lambda: self.driver.find_element(By.ID, "error").text)
        self.assertIn("temperature", error)
        self.assertEqual(call(base, "/v1/guilds/g-big")[0], 404, "nothing was saved")
        temperature.clear()
        temperature.send_keys("0.4")
        self.driver.find_element(By.CSS_SELECTOR, "#guild-form button[type=submit]").click()
        row = lambda: self.driver.find_element(By.CSS_SELECTOR, "#guilds tr[data-guild=g-big]").text
        self.wait_for(lambda: "technical" in row() and "500" in row())
        status, saved = call(base, "/v1/guilds/g-big")
        self.assertEqual(status, 200, saved)
        self.assertEqual(saved["settings"]["personality"], "technical")
        self.assertEqual(saved["settings"]["daily_token_quota"], 500)
        self.assertEqual(saved["settings"]["instructions"], "Be brief.")
        self.assertAlmostEqual(saved["settings"]["temperature"], 0.4, places=5)
        self.assertEqual(self.driver.find_element(By.ID, "error").text, "")
        # Edit fills the form back from what is stored.
        self.driver.find_element(By.ID, "g-clear").click()
        self.assertEqual(self.driver.find_element(By.ID, "g-id").get_attribute("value"), "")

        def edit():
            self.driver.find_element(By.CSS_SELECTOR, "#guilds tr[data-guild=g-big] button").click()
            return self.driver.find_element(By.ID, "g-id").get_attribute("value") == "g-big"

        self.wait_for(edit)
        self.assertEqual(self.driver.find_element(By.ID, "g-daily_token_quota").get_attribute("value"), "500")
        self.driver.execute_script("window.scrollTo(0, 0)")


if __name__ == "__main__":
    unittest.main(verbosity=2)
