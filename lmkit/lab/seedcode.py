"""The source's section 5.2 program, run as written: each error it raises, and the minimal fix that
lets it reach the next one (chapter 4).

`SEED_PROGRAM` is the program text of the source document's section 5.2, verbatim. `run_until_error`
executes a program's top-level statements one by one in a fresh namespace, under ``try``, and
stops at the first exception: it returns the statement's line, the line of the program where the
exception was raised (the innermost frame inside the program) and the exception's type and first
message line. `replay` runs the program, and while it fails, applies the first not yet applied
`Fix` whose pattern matches the error, and runs it again: the list of rounds is the list of the
program's errors in the order a reader meets them. Module stubs (``torchvision``, which the
program imports and this project does not install) are served by the namespace's own
``__import__``, so nothing is written into ``sys.modules``.

`word_fixes` are the minimal fixes the chapter applies, from stubbing the missing dataset to the
error that no minimal fix can repair (the model needs the target it is asked to predict).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["SEED_PROGRAM", "listing", "Failure", "Fix", "Round", "run_until_error", "replay", "word_fixes",
           "tiny_word_corpus"]

FILENAME = "<the source's section 5.2>"

#: The program of the source's section 5.2, verbatim.
SEED_PROGRAM = """\
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from nltk.tokenize import word_tokenize
from nltk.corpus import stopwords

# 加载数据集
train_data = datasets.WikiCorpus('wiki.train.txt')
test_data = datasets.WikiCorpus('wiki.test.txt')

# 数据预处理
def preprocess_text(text):
    tokens = word_tokenize(text)
    tokens = [token.lower() for token in tokens if token.isalpha()]
    tokens = [token for token in tokens if token not in stopwords.words('english')]
    return tokens

# 词嵌入
word_embedding = nn.Embedding(num_embeddings=len(train_data.vocab), embedding_dim=100)

# 编码器
class Encoder(nn.Module):
    def __init__(self, embedding_dim, hidden_dim):
        super(Encoder, self).__init__()
        self.embedding = nn.Embedding(embedding_dim, hidden_dim)
        self.lstm = nn.LSTM(hidden_dim, hidden_dim)

    def forward(self, input_sequence):
        embedded_sequence = self.embedding(input_sequence)
        output, (hidden, cell) = self.lstm(embedded_sequence)
        return hidden, cell

# 解码器
class Decoder(nn.Module):
    def __init__(self, embedding_dim, hidden_dim):
        super(Decoder, self).__init__()
        self.embedding = nn.Embedding(embedding_dim, hidden_dim)
        self.lstm = nn.LSTM(hidden_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, len(train_data.vocab))

    def forward(self, input_sequence, hidden, cell):
        embedded_sequence = self.embedding(input_sequence)
        output, (hidden, cell) = self.lstm(embedded_sequence, (hidden, cell))
        output = self.fc(output.squeeze(0))
        return output, hidden, cell

# 模型
class LanguageModel(nn.Module):
    def __init__(self, embedding_dim, hidden_dim):
        super(LanguageModel, self).__init__()
        self.encoder = Encoder(embedding_dim, hidden_dim)
        self.decoder = Decoder(embedding_dim, hidden_dim)

    def forward(self, input_sequence, target_sequence):
        hidden, cell = self.encoder(input_sequence)
        output, (hidden, cell) = self.decoder(target_sequence, hidden, cell)
        return output

# 模型参数
embedding_dim = 100
hidden_dim = 128
model = LanguageModel(embedding_dim, hidden_dim)
optimizer = optim.Adam(model.parameters(), lr=0.001)
criterion = nn.CrossEntropyLoss()

# 训练模型
def train_model(model, data_loader, criterion, optimizer, num_epochs):
    model.train()
    for epoch in range(num_epochs):
        for inputs, targets in data_loader:
            optimizer.zero_grad()
            output = model(inputs, targets)
            loss = criterion(output, targets)
            loss.backward()
            optimizer.step()
        print(f'Epoch {epoch+1}/{num_epochs}, Loss: {loss.item()}')

# 数据加载器
batch_size = 64
train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True)
test_loader = DataLoader(test_data, batch_size=batch_size, shuffle=False)

# 训练模型
train_model(model, train_loader, criterion, optimizer, num_epochs=10)

# 评估模型
def evaluate_model(model, data_loader, criterion):
    model.eval()
    total_loss = 0
    with torch.no_grad():
        for inputs, targets in data_loader:
            output = model(inputs, targets)
            total_loss += criterion(output, targets).item()
    return total_loss / len(data_loader)

# 测试数据
test_targets = test_data.seq
test_inputs = torch.tensor([word_embedding[word] for word in word_tokenize(test_targets[0])])

# 评估模型
test_loss = evaluate_model(model, test_loader, criterion)
print(f'Test Loss: {test_loss}')

# 生成文本
def generate_text(model, start_word, max_length=50):
    input_word = start_word
    generated_text = start_word
    with torch.no_grad():
        for _ in range(max_length):
            input_tensor = torch.tensor([word_embedding[word] for word in input_word.split()])
            output = model(input_tensor)
            predicted_word = torch.argmax(output).item()
            generated_text += " " + str(predicted_word)
            input_word = generated_text.split()[-2:]
    return generated_text

# 输出测试文本
print(generate_text(model, "我喜欢编程"))
"""


def listing(source: str = SEED_PROGRAM, width: int = 88) -> str:
    """`source` with line numbers (the lines `Failure` reports); a line longer than `width` continues
    on the next, unnumbered, line, broken at a space."""
    out = []
    for number, line in enumerate(source.splitlines(), 1):
        prefix = f"{number:>3} | "
        while len(prefix) + len(line) > width and " " in line[: width - len(prefix)]:
            cut = line.rindex(" ", 0, width - len(prefix))
            out.append(prefix + line[:cut])
            line, prefix = " " * 8 + line[cut + 1:], "    | "
        out.append(prefix + line)
    return "\n".join(out)


@dataclass
class Failure:
    """Where a run stopped: the top-level statement, the line that raised, the exception."""

    statement_line: int
    line: int
    code: str
    error: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.error}: {self.message}"


@dataclass
class Fix:
    """A minimal change that lets the program past one error: `pattern` (a regular expression)
    matches ``"Type: message"`` of the error it answers; `apply` takes the program text and the
    module stubs and returns the new text (it may add stubs)."""

    pattern: str
    description: str
    apply: Callable[[str, dict[str, types.ModuleType]], str]


@dataclass
class Round:
    """One run of the program: its failure (None when it ran to the end), what it printed, and
    the fix applied after it (None when none applies)."""

    failure: Failure | None
    printed: list[str] = field(default_factory=list)
    fix: Fix | None = None


def _first_line(error: BaseException) -> str:
    """The first informative line of an exception's message (nltk frames its messages in stars)."""
    text = str(error)
    if isinstance(error, KeyError) and error.args:
        text = repr(error.args[0])
    for line in text.splitlines():
        line = line.strip()
        if line and set(line) != {"*"}:
            return line
    return text.strip()


def _namespace(stubs: dict[str, types.ModuleType]) -> dict[str, Any]:
    def _import(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002 (builtins' names)
        top = name.split(".")[0]
        if top in stubs:
            return stubs[name] if fromlist and name in stubs else stubs[top]
        return builtins.__import__(name, globals, locals, fromlist, level)

    return {"__name__": "__seed__", "__builtins__": {**vars(builtins), "__import__": _import}}


def run_until_error(source: str, stubs: dict[str, types.ModuleType] | None = None,
                    ) -> tuple[Failure | None, list[str]]:
    """Execute `source` statement by statement in a fresh namespace; stop at the first exception.

    Returns the `Failure` (None if every statement ran) and the lines the program printed.
    """
    tree = ast.parse(source, FILENAME)
    lines = source.splitlines()
    namespace = _namespace(stubs or {})
    printed = io.StringIO()
    failure = None
    with contextlib.redirect_stdout(printed):
        for node in tree.body:
            code = compile(ast.Module([node], type_ignores=[]), FILENAME, "exec")
            try:
                exec(code, namespace)  # noqa: S102 (running the source's program is the point)
            except Exception as error:  # noqa: BLE001 (every error of the program is reported)
                line = node.lineno
                tb = error.__traceback__
                while tb is not None:  # the innermost frame inside the program
                    if tb.tb_frame.f_code.co_filename == FILENAME:
                        line = tb.tb_lineno
                    tb = tb.tb_next
                failure = Failure(node.lineno, line, lines[line - 1].strip(), type(error).__name__,
                                  _first_line(error))
                break
    return failure, printed.getvalue().splitlines()


@contextlib.contextmanager
def _one_thread():
    """torch on one thread: the program's operations are tiny, and waiting for a second thread costs
    more than it saves (much more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def replay(source: str, fixes: list[Fix], max_rounds: int = 20) -> list[Round]:
    """Run `source`; while it fails, apply the first unused fix that matches the error and rerun.

    Runs with torch on one thread and restores the number of threads afterwards."""
    with _one_thread():
        return _replay(source, fixes, max_rounds)


def _replay(source: str, fixes: list[Fix], max_rounds: int) -> list[Round]:
    stubs: dict[str, types.ModuleType] = {}
    unused = list(fixes)
    rounds: list[Round] = []
    for _ in range(max_rounds):
        failure, printed = run_until_error(source, stubs)
        rounds.append(Round(failure, printed))
        if failure is None:
            break
        fix = next((f for f in unused if re.search(f.pattern, f"{failure.error}: {failure.message}")), None)
        if fix is None:
            break
        unused.remove(fix)
        rounds[-1].fix = fix
        source = fix.apply(source, stubs)
    return rounds


# ---------------------------------------------------------------- the chapter's minimal fixes
def tiny_word_corpus(train_lines: list[str], test_lines: list[str], length: int = 8,
                     max_items: int = 64) -> Callable[[str], Dataset]:
    """A stand-in for the program's ``datasets.WikiCorpus(path)``: a dataset of (input, target) word-id
    windows, ``length`` words each, the target shifted by one word, over lower-case letter-only words
    of `train_lines` (paths with "train") or `test_lines` (others); one vocabulary for both (``vocab``,
    a dict), the lines as ``seq``."""
    def words(line: str) -> list[str]:
        return re.sub(r"[^a-z ]", " ", line.lower()).split()

    vocab: dict[str, int] = {}
    for line in train_lines + test_lines:
        for w in words(line):
            vocab.setdefault(w, len(vocab))

    class WikiCorpus(Dataset):
        def __init__(self, path: str):
            lines = train_lines if "train" in path else test_lines
            self.vocab, self.seq = vocab, [" ".join(words(line)) for line in lines if words(line)]
            ids = [vocab[w] for line in self.seq for w in line.split()]
            starts = range(0, len(ids) - length - 1, length)
            self.items = [(torch.tensor(ids[s:s + length]), torch.tensor(ids[s + 1:s + length + 1]))
                          for s in starts][:max_items]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int):
            return self.items[i]

    return WikiCorpus


def _stub_torchvision(source: str, stubs: dict[str, types.ModuleType]) -> str:
    top = types.ModuleType("torchvision")
    for name in ("datasets", "transforms"):
        sub = types.ModuleType(f"torchvision.{name}")
        setattr(top, name, sub)
        stubs[f"torchvision.{name}"] = sub
    stubs["torchvision"] = top
    return source


def _replace(old: str, new: str) -> Callable[[str, dict[str, types.ModuleType]], str]:
    def apply(source: str, stubs: dict[str, types.ModuleType]) -> str:
        if old not in source:
            raise ValueError(f"the program has no {old!r} to replace")
        return source.replace(old, new)

    return apply


def word_fixes(corpus: Callable[[str], Dataset]) -> list[Fix]:
    """The chapter's minimal fixes, in the order the errors appear; `corpus` stands in for the
    missing ``datasets.WikiCorpus`` (`tiny_word_corpus`)."""
    def stub_corpus(source: str, stubs: dict[str, types.ModuleType]) -> str:
        stubs["torchvision.datasets"].WikiCorpus = corpus
        return source

    return [
        Fix(r"No module named 'torchvision'", "stub an empty torchvision with datasets and transforms",
            _stub_torchvision),
        Fix(r"has no attribute 'WikiCorpus'", "stub WikiCorpus: 64 windows of 8 words of the Bible",
            stub_corpus),
        Fix(r"^IndexError: index out of range", "nn.Embedding(vocabulary size, width), not (100, 128)",
            _replace("nn.Embedding(embedding_dim, hidden_dim)",
                     "nn.Embedding(len(train_data.vocab), hidden_dim)")),
        Fix(r"too many values to unpack", "unpack the decoder's three results",
            _replace("output, (hidden, cell) = self.decoder", "output, hidden, cell = self.decoder")),
        Fix(r"^(RuntimeError|ValueError): Expected (target|input)", "flatten [batch, time] before the loss",
            _replace("criterion(output, targets)", "criterion(output.flatten(0, 1), targets.flatten())")),
        Fix(r"^LookupError: Resource 'punkt", "split on spaces instead of nltk's punkt tokenizer",
            _replace("word_tokenize(test_targets[0])", "test_targets[0].split()")),
        Fix(r"'Embedding' object is not subscriptable", "look words up in the vocabulary",
            _replace("word_embedding[word]", "train_data.vocab[word]")),
        Fix(r"^KeyError", "unknown words get id 0",
            _replace("train_data.vocab[word]", "train_data.vocab.get(word, 0)")),
    ]



