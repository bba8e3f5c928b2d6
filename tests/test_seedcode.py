"""lmkit.lab.seedcode: the source's 5.2 program run statement by statement, its errors and the fixes."""

from __future__ import annotations

import torch

from lmkit.lab import seedcode


def test_run_until_error_stops_at_the_first_failing_statement_and_names_the_inner_line():
    program = "x = 1\nprint('hello')\ndef f():\n    return 1 / 0\ny = f()\nprint('never')\n"
    failure, printed = seedcode.run_until_error(program)
    assert printed == ["hello"]
    assert (failure.statement_line, failure.line, failure.error) == (5, 4, "ZeroDivisionError")
    assert failure.code == "return 1 / 0" and failure.message == "division by zero"
    assert seedcode.run_until_error("a = 2\n") == (None, [])


def test_replay_applies_matching_fixes_until_none_applies():
    program = "import nosuchmodule\nvalue = nosuchmodule.answer\nprint(value)\n"

    def stub(source, stubs):
        import types

        stubs["nosuchmodule"] = types.ModuleType("nosuchmodule")
        return source

    def answer(source, stubs):
        stubs["nosuchmodule"].answer = 42
        return source

    fixes = [seedcode.Fix("has no attribute 'answer'", "define it", answer),
             seedcode.Fix("No module named 'nosuchmodule'", "stub it", stub)]
    rounds = seedcode.replay(program, fixes)
    assert [r.failure.error if r.failure else None for r in rounds] == [
        "ModuleNotFoundError", "AttributeError", None]
    assert [r.fix.description if r.fix else None for r in rounds] == ["stub it", "define it", None]
    assert rounds[-1].printed == ["42"]
    import sys

    assert "nosuchmodule" not in sys.modules  # stubs live in the program's namespace only


def test_replay_stops_when_no_fix_matches_and_restores_threads():
    threads = torch.get_num_threads()
    rounds = seedcode.replay("raise KeyError('k')\n", [])
    assert len(rounds) == 1 and rounds[0].fix is None and rounds[0].failure.message == "'k'"
    assert torch.get_num_threads() == threads


def test_the_source_program_first_fails_on_torchvision_then_on_wikicorpus():
    corpus = seedcode.tiny_word_corpus(["in the beginning god created"] * 4, ["and the earth was"] * 4,
                                       length=2, max_items=4)
    fixes = seedcode.word_fixes(corpus)[:1]
    rounds = seedcode.replay(seedcode.SEED_PROGRAM, fixes)
    assert [r.failure.error for r in rounds] == ["ModuleNotFoundError", "AttributeError"]
    assert "WikiCorpus" in rounds[1].failure.message


def test_tiny_word_corpus_shares_one_vocabulary_and_shifts_targets():
    corpus = seedcode.tiny_word_corpus(["A b, c d e f!"], ["g a b"], length=2)
    train, test = corpus("wiki.train.txt"), corpus("wiki.test.txt")
    assert train.vocab is test.vocab and set(train.vocab) == set("abcdefg")
    x, y = train[0]
    assert torch.equal(x[1:], y[:-1]) and test.seq == ["g a b"]


def test_listing_numbers_lines_and_wraps_long_ones():
    text = seedcode.listing("a = 1\nb = [" + "x, " * 40 + "]\n", width=40)
    lines = text.splitlines()
    assert lines[0] == "  1 | a = 1" and lines[1].startswith("  2 | b = [")
    assert all(len(line) <= 40 for line in lines) and lines[2].startswith("    | ")
    assert max(map(len, seedcode.listing().splitlines())) <= 88
