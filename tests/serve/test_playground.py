"""The playground page of `jaxrast serve` (GET /) in a real headless Chromium (Debian's chromium and
chromedriver, driven by Selenium) against a live server on the toy family: the page asks for the
API key, a problem is typed, the λ slider moved, both columns streamed; the RAST column equals the
completions API, its shaded tokens carry the KL of `jaxrast analyze trace`, the grades are
`jaxrast eval`'s, and the browser asked nothing of any other host.

Screenshots for docs/: `JAXRAST_PLAYGROUND_SCREENSHOTS=docs python -m pytest tests/serve/test_playground.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import types
from pathlib import Path

import pytest
from serve_fixtures import FAMILY, post, running, wait_until

from jaxrast.cli import main
from jaxrast.serve.app import create_app
from jaxrast.serve.config import ServeConfig
from jaxrast.serve.server import build_service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="the browser tests need Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver; .ci/run installs them)")

KEY = "playground-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBLEM = "heldout-777001-2"  # a toy problem where the base guesses and RAST writes its steps
SETTINGS = dict(temperature=1.0, top_p=1.0, max_tokens=60, seed=11)
LAM = 0.8  # the slider's default 1.0, four steps (0.05) to the left
THRESHOLD = 0.1  # the page's default
STATIC = Path(__file__).resolve().parents[2] / "jaxrast" / "serve" / "static"


@pytest.fixture(scope="module")
def server():
    cfg = ServeConfig(base=f"{FAMILY}/m_base", pairs=((f"{FAMILY}/s_rl", f"{FAMILY}/s_base", 1.0),), max_slots=4,
                      max_len=128, steps_per_call=8, api_key=KEY)
    service, app = build_service(cfg)
    with running(app) as url:
        yield url, service


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium / chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--no-first-run", "--disable-extensions", "--hide-scrollbars"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def until(driver, script: str, timeout_s: float = 60, what: str = "") -> None:
    """Waits until the JavaScript expression is true; fails with the page's status lines."""
    if not wait_until(lambda: js(driver, f"return Boolean({script});"), timeout_s, every=0.1):
        status = js(driver, "return [...document.querySelectorAll('[role=status], .col-status, #key-status')]"
                            ".map(e => e.id + ': ' + e.textContent).join(' | ')")
        pytest.fail(f"timed out waiting for {what or script}; page: {status}")


def connect(driver, url: str) -> None:
    """Loads the page; it asks for the key (focused), which is typed in."""
    driver.get(url + "/")
    until(driver, "!document.getElementById('key-panel').hidden", what="the page to ask for the API key")
    assert js(driver, "return document.activeElement.id") == "api-key"
    field = driver.find_element("id", "api-key")
    field.send_keys(KEY)
    driver.find_element("id", "key-submit").click()
    until(driver, "document.getElementById('controls').dataset.ready === 'true'", what="the server's info")
    until(driver, "document.getElementById('problem').options.length > 1", what="the toy problems")


def set_number(driver, element_id: str, value) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


def run_both(driver) -> None:
    driver.find_element("id", "run").click()
    until(driver, "document.getElementById('controls').dataset.run === 'done'", 120, "both columns to finish")


def column(driver, name: str) -> dict:
    return js(driver, """
        const s = document.getElementById('col-' + arguments[0]), out = document.getElementById(arguments[0] + '-out');
        const cell = (f) => document.querySelector(`#summary-table td[data-col="${arguments[0]}"][data-field="${f}"]`);
        return {state: s.dataset.state, text: s.dataset.text, shown: out.textContent,
                status: document.getElementById(arguments[0] + '-status').textContent,
                tokens: [...out.querySelectorAll('.tok')].map(t => ({token: t.dataset.token, kl: Number(t.dataset.kl),
                    base: t.dataset.logpBase, rast: t.dataset.logpRast, above: t.classList.contains('above'),
                    shade: getComputedStyle(t).backgroundColor})),
                grade: cell('grade').textContent, correct: cell('grade').dataset.correct,
                share: cell('share').dataset.share, count: cell('tokens').textContent};""", name)


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def screenshot(driver, directory: str, width: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    metrics = dict(width=width, height=1000, deviceScaleFactor=1, mobile=False)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = js(driver, "return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
    js(driver, "window.scrollTo(0, 0)")
    span = driver.find_element("css selector", "#rast-out .tok")
    js(driver, "arguments[0].focus()", span)
    ActionChains(driver).move_to_element(span).perform()  # the first answer token's tooltip: the shift acts there
    until(driver, "document.getElementById('tip').dataset.i === '0' && !document.getElementById('tip').hidden")
    height = js(driver, "return Math.ceil(window.scrollY + document.querySelector('footer')"
                        ".getBoundingClientRect().bottom)")  # the whole page, tooltip shown
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
    os.makedirs(directory, exist_ok=True)
    driver.save_screenshot(os.path.join(directory, f"playground_{width}.png"))


@needs_browser
def test_playground_streams_both_columns_with_the_shift_the_trace_and_the_grades(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    url, service = server
    # (e) the page loads without the key and asks for it; the API still refuses requests without it
    for path, body in (("/v1/completions", {"model": "jaxrast", "prompt": "Q 1 +02\nA:", "max_tokens": 4}),
                       ("/v1/rast/grade", {"completions": ["#3"], "gold": "3"})):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, err, _ = post(url + path, body, headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, headers)
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "/v1/rast/info", timeout=30)
    assert refused.value.code == 401
    connect(browser, url)

    # a toy problem: picked, then typed into the prompt box; the slider moved; the sampling set
    Select(browser.find_element("id", "source")).select_by_value("toy")
    Select(browser.find_element("id", "problem")).select_by_value(PROBLEM)
    question = next(p for p in _toy_rows() if p["id"] == PROBLEM)
    until(browser, f"document.getElementById('prompt').value === {json.dumps(question['question'])}")
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(question["question"])
    assert prompt.get_property("value") == question["question"]
    slider = browser.find_element("id", "lam-0")
    for _ in range(4):
        slider.send_keys(Keys.ARROW_LEFT)
    assert float(slider.get_property("value")) == pytest.approx(LAM)
    assert browser.find_element("id", "lam-0-value").text == f"{LAM:.2f}"
    for field, key in (("temperature", "temperature"), ("top-p", "top_p"), ("max-tokens", "max_tokens"),
                       ("seed", "seed")):
        set_number(browser, field, SETTINGS[key])
    run_both(browser)
    base, rast = column(browser, "base"), column(browser, "rast")
    assert base["state"] == rast["state"] == "done", (base["status"], rast["status"])

    # (a) each column is the completions API's text for the same settings and seed
    common = dict(model="jaxrast", prompt=question["question"], **SETTINGS)
    status, api_rast, _ = post(url + "/v1/completions", {**common, "mode": "rast", "lam": [LAM], "shift": True}, AUTH)
    assert status == 200
    status, api_base, _ = post(url + "/v1/completions", {**common, "mode": "base"}, AUTH)
    assert rast["text"] == rast["shown"] == api_rast["choices"][0]["text"]
    assert base["text"] == base["shown"] == api_base["choices"][0]["text"]
    assert base["text"].startswith("#") and "=" in rast["text"]  # the shift: the base guesses, RAST writes steps
    assert int(rast["count"]) == api_rast["usage"]["completion_tokens"] == len(rast["tokens"])

    # (b) the shaded tokens carry the KL of `jaxrast analyze trace` on the same ids with the same λ
    tok = service.tokenizer
    ids = [tok.convert_tokens_to_ids(t["token"]) if t["token"] in tok.all_special_tokens
           else tok(t["token"], add_special_tokens=False)["input_ids"][0] for t in rast["tokens"]]
    traj = tmp_path / "traj.jsonl"
    row = {"id": "p", "prompt_ids": service.encode(question["question"]), "token_ids": ids}
    traj.write_text(json.dumps(row) + "\n")
    trace = tmp_path / "trace.jsonl"
    assert main(["analyze", "trace", "--traj", str(traj), "--rows", "p", "--base", f"{FAMILY}/m_base",
                 "--pair", f"{FAMILY}/s_rl", f"{FAMILY}/s_base", str(LAM), "--out", str(trace), "--no-progress"]) == 0
    steps = json.loads(trace.read_text().splitlines()[0])["steps"]
    assert len(steps) == len(rast["tokens"])
    for step, shown in zip(steps, rast["tokens"]):
        assert shown["kl"] == pytest.approx(step["kl"], abs=1e-4), step["step"]
        assert float(shown["base"]) == pytest.approx(step["logp_base"], abs=1e-4)
        assert float(shown["rast"]) == pytest.approx(step["logp_combined"], abs=1e-4)
        assert shown["above"] == (shown["kl"] > THRESHOLD)
    kls = [t["kl"] for t in rast["tokens"]]
    assert kls.index(max(kls)) == 0 and kls[0] > 0.5  # the shift acts on the first answer token
    assert rast["tokens"][0]["shade"] != "rgba(0, 0, 0, 0)"  # ... which is shaded
    above = sum(k > THRESHOLD for k in kls)
    assert float(rast["share"]) == pytest.approx(above / len(kls))

    # hovering a token, or focusing it with the keyboard, shows its log-probs and the shifted tokens
    spans = browser.find_elements("css selector", "#rast-out .tok")
    ActionChains(browser).move_to_element(spans[0]).perform()
    until(browser, "!document.getElementById('tip').hidden && document.getElementById('tip').dataset.i === '0'")
    tip = browser.find_element("id", "tip").text
    assert f"{steps[0]['kl']:.4f}" in tip and f"{steps[0]['logp_base']:.3f}".replace("-", "−") in tip
    assert "promoted" in tip and "suppressed" in tip and json.dumps(steps[0]["delta"][0][0]) in tip
    js(browser, "arguments[0].focus()", spans[0])
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    assert js(browser, "return document.activeElement.dataset.i") == "1"
    until(browser, "document.getElementById('tip').dataset.i === '1'", 10, "the focused token's tooltip")
    assert spans[1].get_attribute("aria-describedby") == "tip"

    # (c) the grades shown are `jaxrast eval`'s on the same completions and gold
    pred, gold, report = tmp_path / "pred.jsonl", tmp_path / "gold.jsonl", tmp_path / "report.json"
    pred.write_text("".join(json.dumps({"id": PROBLEM, "sample": i, "completion": c["text"]}) + "\n"
                            for i, c in enumerate((base, rast))))
    gold.write_text(json.dumps({"id": PROBLEM, "question": question["question"], "answer": question["answer"]}) + "\n")
    assert main(["eval", "--pred", str(pred), "--data", str(gold), "--json", str(report), "--workers", "1",
                 "--no-progress"]) == 0
    verdicts = {v["sample"]: v for v in json.loads(report.read_text())["verdicts"]}
    for i, c in enumerate((base, rast)):
        assert c["correct"] == str(verdicts[i]["correct"]).lower(), (c["grade"], verdicts[i])
        assert f"answer {verdicts[i]['extracted']}" in c["grade"]
    assert rast["correct"] == "true" and base["correct"] == "false"  # this problem: RAST right, the base wrong

    # (d) every request of the page went to this server
    urls = requested_urls(browser)
    assert {url + p for p in ("/", "/static/playground.js", "/static/shift.js", "/static/playground.css",
                              "/v1/rast/info", "/v1/completions", "/v1/rast/grade")} <= set(urls)
    assert all(u.startswith(url + "/") or u.startswith("data:") for u in urls), urls
    resources = js(browser, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(u.startswith(url + "/") for u in resources), resources
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"  # the key probe's 401 aside
              and not (e["source"] == "network" and "/v1/rast/info" in e["message"] and "401" in e["message"])]
    assert not errors, errors

    if os.environ.get("JAXRAST_PLAYGROUND_SCREENSHOTS"):
        for width in (1280, 390):
            screenshot(browser, os.environ["JAXRAST_PLAYGROUND_SCREENSHOTS"], width)
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@needs_browser
def test_a_prompt_the_tokenizer_cannot_encode_shows_the_servers_error(server, browser):
    url, _ = server
    status, err, _ = post(url + "/v1/completions", {"model": "jaxrast", "prompt": "Q 12 +03 é\nA:",
                                                    "max_tokens": 4}, AUTH)
    assert status == 400 and "é" in err["error"]["message"] and err["error"]["param"] == "prompt"
    connect(browser, url)
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("Solve x² = 4")  # a benchmark-style prompt: letters and ² are not in the toy vocabulary
    run_both(browser)
    for name in ("base", "rast"):
        col = column(browser, name)
        assert col["state"] == "error" and "cannot encode" in col["status"] and "²" in col["status"], col["status"]
    assert "cannot encode" in browser.find_element("id", "form-status").text


def _toy_rows():
    from jaxrast.serve.playground import problems

    return problems("toy")


class _Stub:
    """A service without models: enough for the page, the problem lists and the grader."""

    def __init__(self, lams):
        self.model_name, self.max_len, self.slots, self.accepting = "stub", 64, 2, True
        self.pairs = [types.SimpleNamespace(lam=x) for x in lams]
        self.metrics = None

    def start(self):
        pass

    def stop(self, grace_s=0.0):
        pass


@pytest.fixture(scope="module")
def stub_server():
    with running(create_app(_Stub([1.0, 0.5]))) as url:
        yield url


@needs_browser
def test_without_an_api_key_the_page_needs_none_and_has_a_slider_per_pair(stub_server, browser):
    browser.get(stub_server + "/")
    until(browser, "document.getElementById('controls').dataset.ready === 'true'", what="the server's info")
    assert js(browser, "return document.getElementById('key-panel').hidden")
    values = js(browser, "return [...document.querySelectorAll('#lams input[type=range]')].map(e => e.value)")
    assert values == ["1", "0.5"]
    labels = js(browser, "return [...document.querySelectorAll('#lams input')].map(e => e.labels[0].textContent)")
    assert labels == ["pair 1 (default 1)", "pair 2 (default 0.5)"]
    # every control has a label, and the streams are live regions
    unlabeled = js(browser, "return [...document.querySelectorAll('input, select, textarea')]"
                            ".filter(e => !e.labels || !e.labels.length).map(e => e.id)")
    assert not unlabeled
    assert js(browser, "return ['base-out', 'rast-out'].map(i => document.getElementById(i).getAttribute('aria-live'))"
              ) == ["polite", "polite"]


def test_the_page_is_self_contained_and_the_rast_endpoints_answer(stub_server):
    import urllib.request

    assert sorted(p.name for p in STATIC.iterdir()) == ["index.html", "playground.css", "playground.js", "shift.js"]
    for name in ("index.html", "playground.js", "shift.js", "playground.css"):
        text = (STATIC / name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} names another host"
    with urllib.request.urlopen(stub_server + "/", timeout=30) as resp:
        csp = resp.headers["Content-Security-Policy"]
        assert "connect-src 'self'" in csp and "default-src 'none'" in csp
    gold = _toy_rows()[0]["answer"]
    right, wrong = f"#{int(gold):02d}\n", f"#{(int(gold) + 1) % 100:02d}\n"
    status, body, _ = post(stub_server + "/v1/rast/grade", {"completions": [right, wrong], "source": "toy",
                                                            "id": "heldout-777001-0"})
    assert status == 200 and body["gold"] == gold and [v["correct"] for v in body["verdicts"]] == [True, False]
    status, body, _ = post(stub_server + "/v1/rast/grade", {"completions": ["so #42\n", "#41"], "gold": "42"})
    assert status == 200 and [v["correct"] for v in body["verdicts"]] == [True, False]
    assert body["verdicts"][0]["extracted"] == "42"
    status, err, _ = post(stub_server + "/v1/rast/grade", {"completions": ["#1"]})
    assert status == 400 and err["error"]["param"] == "gold"
    status, err, _ = post(stub_server + "/v1/rast/grade", {"completions": ["#1"], "source": "nope", "id": "1"})
    assert status == 404 and "unknown problem source" in err["error"]["message"]
    with urllib.request.urlopen(stub_server + "/v1/rast/problems?source=gsm8k", timeout=30) as resp:
        listing = json.loads(resp.read())
    first = listing["problems"][0]
    with urllib.request.urlopen(f"{stub_server}/v1/rast/problem?source=gsm8k&id={first['id']}", timeout=30) as resp:
        row = json.loads(resp.read())
    assert row["id"] == first["id"] and row["question"] and row["answer"]
