"""The `lmkit` command line: help, config precedence, errors, and train -> eval -> generate."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from lmkit.cli import build_parser, main
from lmkit.config import CORPUS_NAMES, ModelConfig, ParallelConfig, TrainConfig, describe
from lmkit.options import resolve_configs

TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--eval-interval", "0", "--log-interval", "1"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMKIT_CACHE", str(tmp_path / "cache"))


def _help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help entry (invocation and description joined on one line)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  --") or line.startswith("  -h"):
            current = line.split()[0].rstrip(",")
            entries[current] = line.strip()
        elif current and line.startswith("    ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_help_lists_every_option_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    for cls in (ModelConfig, TrainConfig, ParallelConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            entry = entries[flag]
            description, choices = describe(f)
            assert description and " ".join(description.split()) in entry, flag
            assert entry.count("(default:") == 1 and f"(default: {f.default})" in entry, entry
            if choices:
                assert "{" + ",".join(map(str, choices)) + "}" in entry, entry
    for flag in ("--config", "--resume", "--allow-schedule-change"):
        assert entries[flag].count("(default:") == 1 or "default: refuse" in entries[flag], entries[flag]
    for name in ("engine", "schedule", "zero", "tokenizer", "corpus", "dtype", "device"):
        assert "{" in entries["--" + name], name
    for command in ("eval", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "default" in capsys.readouterr().out


def _parsers():
    """(name, parser) of every lmkit command line: lmkit, its commands, the experiments program's."""
    import argparse

    from lmkit.lab.experiments import build_parser as experiments_parser

    for prog, parser in (("lmkit", build_parser()), ("experiments", experiments_parser())):
        yield prog, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{prog} {name}", sub) for name, sub in action.choices.items())


def test_every_help_is_complete_and_plain(monkeypatch):
    """Every option with a default says it, no "(default: None)", no markup; lmkit names its five verbs."""
    monkeypatch.setenv("COLUMNS", "100")
    seen = set()
    for prog, parser in _parsers():
        text = parser.format_help()
        assert "(default: None)" not in text and "`" not in text, (prog, text)
        entries = _help_entries(text)
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and not action.required \
                    and action.default is not None:
                assert "(default:" in entries[action.option_strings[0]], (prog, action.option_strings)
        seen.add(prog)
    assert {"lmkit train", "lmkit eval", "lmkit generate", "lmkit estimate", "lmkit export",
            "experiments chapter6"} <= seen
    description = build_parser().description
    assert all(verb in description for verb in ("train", "evaluate", "generate", "export", "estimate"))


def test_a_warning_reaches_the_terminal_as_one_line(capsys):
    import warnings

    from lmkit.options import one_line_warnings

    with one_line_warnings():
        warnings.warn("prompt of 40 tokens exceeds block_size=16;\n decoding without the KV cache",
                      stacklevel=1)
    err = capsys.readouterr().err
    assert err == "lmkit: warning: prompt of 40 tokens exceeds block_size=16; decoding without the KV cache\n"


def test_corpus_names_match_the_installed_corpora():
    from lmkit.data import CORPORA

    assert tuple(CORPORA) == CORPUS_NAMES


@pytest.mark.parametrize("argv, fragment", [
    (["--engine", "fsdp"], "argument --engine: invalid choice: 'fsdp' (choose from 'lmkit', 'native')"),
    (["--schedule", "zb"], "argument --schedule: invalid choice: 'zb'"),
    (["--zero", "4"], "argument --zero: invalid choice: 4 (choose from 0, 1, 2, 3)"),
    (["--tokenizer", "word"], "argument --tokenizer: invalid choice: 'word'"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda'"),
    (["--corpus", "kjv+wiki"], "argument --corpus: invalid choice: 'wiki'"),
    (["--nonfinite", "ignore"], "argument --nonfinite: invalid choice: 'ignore'"),
])
def test_argparse_rejects_values_outside_the_choices(argv, fragment, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_choices_accept_their_values():
    args = build_parser().parse_args(["train", "--corpus", "kjv+tang", "--device", "cuda:1", "--zero", "2",
                                      "--engine", "native", "--nonfinite", "skip"])
    assert (vars(args)["train.corpus"], vars(args)["train.device"], vars(args)["parallel.zero"]) == \
        ("kjv+tang", "cuda:1", 2)


def test_toml_then_flags_take_precedence(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\nn_layer = 3\nd_model = 96\n\n[train]\nlr = 0.01\ncorpus = "tang"\n\n'
                      '[parallel]\ndp = 2\n')
    args = build_parser().parse_args(["train", "--config", str(config), "--lr", "0.02"])
    model_cfg, train_cfg, parallel_cfg = resolve_configs(args)
    assert (model_cfg.n_layer, model_cfg.d_model, model_cfg.n_head) == (3, 96, 4)
    assert (train_cfg.lr, train_cfg.corpus) == (0.02, "tang")
    assert parallel_cfg.dp == 2 and parallel_cfg.world_size == 2


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--n-head", "3"], "not divisible by model.n_head=3"),
        (["train", "--corpus", "nope", "--max-steps", "1"], "invalid choice: 'nope'"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--lr", "fast"], "invalid float value"),
        (["generate", "/no/such/run", "--prompt", "x"], "neither a checkpoint"),
        (["train", "--dp", "2"], "launch with torchrun --nproc_per_node=2"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, fragment, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_toml_section(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[optimizer]\nlr = 1\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown section" in capsys.readouterr().err


def test_module_entry_point_exits_nonzero_without_traceback():
    result = subprocess.run([sys.executable, "-m", "lmkit", "train", "--n-head", "5"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "not divisible" in result.stderr and "Traceback" not in result.stderr


def test_train_eval_generate_round_trip(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--corpus", "tinyshakespeare", "--max-steps", "4", "--out-dir", out, *TINY]) == 0
    text = capsys.readouterr().out
    assert "step      4 | loss" in text and "saved" in text
    assert main(["eval", out, "--iters", "3", "--json"]) == 0
    assert '"val_loss"' in capsys.readouterr().out
    assert main(["generate", out, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.strip()) > len("ROMEO:")
    assert main(["generate", out, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "0"]) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible
    # a prompt longer than the model's block (16): one line on stderr, not Python's warning and source line
    assert main(["generate", out, "--prompt", "ROMEO: " * 5, "--max-new-tokens", "2", "--seed", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["lmkit: warning: prompt of 35 tokens exceeds block_size=16; decoding without the KV "
                   "cache on the last block_size tokens"], err
    # a longer run from the saved step: refused without the flag (the cosine would re-stretch), then allowed
    longer = ["train", "--corpus", "tinyshakespeare", "--max-steps", "6", "--out-dir", out,
              "--resume", "auto", *TINY]
    assert main(longer) == 2
    assert "--allow-schedule-change" in capsys.readouterr().err
    assert main([*longer, "--allow-schedule-change"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_generate_chinese_prompt_with_byte_level_bpe(tmp_path, capsys):
    out = str(tmp_path / "zh")
    assert main(["train", "--corpus", "tang", "--tokenizer", "bpe", "--bpe-vocab-size", "600",
                 "--max-steps", "3", "--out-dir", out, *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", out, "--prompt", "我喜欢编程", "--max-new-tokens", "10", "--seed", "1",
                 "--stream"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("我喜欢编程") and len(printed.strip()) > len("我喜欢编程")


def test_export_hf_dir_then_generate_from_it_and_with_int8(tmp_path, capsys):
    """export --hf-dir writes what transformers loads; generate --hf-dir decodes what the checkpoint does;
    --int8 decodes a batch of prompts with int8 weights."""
    import transformers


    out, hf_dir = tmp_path / "run", tmp_path / "hf"
    train = ["train", "--corpus", "tinyshakespeare", "--max-steps", "4", "--out-dir", str(out), *TINY]
    assert main(train) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--hf-dir", str(hf_dir)]) == 0
    assert "transformers GPT-2 directory" in capsys.readouterr().out
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True).eval()
    greedy = _same_as_the_checkpoint(theirs, out, hf_dir, capsys)
    assert main(["generate", str(out), "--int8", "--device", "cpu", *greedy]) == 0
    int8 = capsys.readouterr().out.split("-" * 40 + "\n")
    assert int8[0].startswith("ROMEO:") and int8[1].startswith("To be") and len(int8[0]) > len("ROMEO:\n")


def test_preset_llama_then_toml_then_flags(tmp_path, capsys, monkeypatch):
    """--preset sets the network; the TOML file and the flags override it; an unknown preset exits 2."""
    from lmkit.config import model_preset

    def model(*argv: str) -> ModelConfig:
        return resolve_configs(build_parser().parse_args(["train", *argv]))[0]

    llama = model("--preset", "llama")
    assert llama == model_preset("llama")
    assert (llama.pos, llama.norm, llama.mlp, llama.bias, llama.tie_embeddings, llama.kv_heads) == \
        ("rope", "rms", "swiglu", False, False, ModelConfig.n_head // 2)
    assert model("--preset", "llama", "--n-head", "8").kv_heads == 4  # n_head/2 of the final n_head
    assert model("--preset", "llama", "--n-kv-head", "1").n_kv_head == 1
    assert model("--preset", "llama", "--tie-embeddings").tie_embeddings
    assert model("--preset", "gpt2") == model() == ModelConfig()
    config = tmp_path / "run.toml"
    config.write_text("[model]\nbias = true\nd_model = 64\n")
    from_toml = model("--preset", "llama", "--config", str(config))
    assert (from_toml.bias, from_toml.d_model, from_toml.mlp) == (True, 64, "swiglu")
    assert not model("--preset", "llama", "--config", str(config), "--no-bias").bias
    assert main(["train", "--preset", "mistral"]) == 2
    err = capsys.readouterr().err
    assert "argument --preset: invalid choice: 'mistral' (choose from 'gpt2', 'llama')" in err
    assert err.count("\n") == 1
    monkeypatch.setenv("COLUMNS", "100")
    entry = _help_entries(dict(_parsers())["lmkit train"].format_help())["--preset"]
    assert all(word in entry for word in ("gpt2", "llama", "mlp=swiglu", "n_kv_head", "(default:")), entry


def test_export_hf_dir_of_a_llama_run_then_generate_from_it(tmp_path, capsys):
    """A --preset llama run exports as a LlamaForCausalLM with the run's logits; generate --hf-dir decodes
    what the checkpoint does."""
    import json

    import transformers


    out, hf_dir = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--preset", "llama", "--corpus", "tinyshakespeare", "--max-steps", "3",
                 "--out-dir", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--hf-dir", str(hf_dir)]) == 0
    assert "transformers Llama directory (LlamaForCausalLM)" in capsys.readouterr().out
    assert json.loads((hf_dir / "config.json").read_text())["num_key_value_heads"] == 1
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert theirs.config.num_key_value_heads == 1 and theirs.config.hidden_act == "silu"
    _same_as_the_checkpoint(theirs, out, hf_dir, capsys)


def test_export_hf_dir_refuses_a_network_transformers_lacks(tmp_path, capsys):
    out, hf_dir = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--pos", "rope", "--corpus", "tinyshakespeare", "--max-steps", "1",
                 "--out-dir", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--hf-dir", str(hf_dir)]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM needs also norm='rms', mlp='swiglu'" in err and err.count("\n") == 1, err
    assert not hf_dir.exists()


def _same_as_the_checkpoint(theirs, out, hf_dir, capsys) -> list[str]:
    """The exported transformers model `theirs` gives the run's latest checkpoint's logits, and
    ``lmkit generate --hf-dir`` its greedy text; returns the greedy flags used."""
    import torch

    from lmkit.checkpoint.format import find_latest
    from lmkit.checkpoint.single import load_checkpoint
    from lmkit.model import GPT

    latest = find_latest(out)
    ours = GPT(load_checkpoint(latest).config("model", ModelConfig))
    load_checkpoint(latest, model=ours)
    idx = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours.eval()(idx)[0], atol=1e-5, rtol=0)
    greedy = ["--prompt", "ROMEO:", "--prompt", "To be", "--max-new-tokens", "12", "--greedy"]
    assert main(["generate", str(out), *greedy]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["generate", "--hf-dir", str(hf_dir), *greedy]) == 0
    assert capsys.readouterr().out == from_checkpoint
    return greedy
