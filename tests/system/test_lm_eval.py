"""lm-evaluation-harness against the server (issue 22): its `local-completions` model, unmodified, for all three
output types, against PEFT's forward pass.

The oracle for log-likelihoods is lm-eval's own `hf` model with `peft=` (PEFT's forward, fp32, batch size 1):
both sides then build the same requests from the same task, so each request's log-likelihood is compared one
to one (within 1e-4). The oracle for generations is greedy decoding by PEFT's forward (not `generate`, which
drops a prefix adapter's prefix on transformers >= 5.24), cut at the task's stop strings. The task is local
(three YAML files over a JSONL of our own, loaded by `datasets` offline); its generation has four stop
strings, to which lm-eval adds EOS: five, above OpenAI's four.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from prefixserve.demo import DEMO_MODEL_DIR
from tests.paths import REPO_ROOT
from tests.server_process import running
from tests.tiny_models import greedy_by_forward, peft_model, tokenizer

pytestmark = pytest.mark.slow  # a server process and lm-eval's runs

ADAPTER = REPO_ROOT / "adapters" / "pirate"
MAX_LENGTH = 1003  # max_total_tokens 1024 - the adapter's 20 virtual tokens - 1 (loglikelihood asks 1 token)
UNTIL = ["\n\n", ".", "!", "?"]
MAX_GEN_TOKS = 8
DOCS = [
    {"question": "The sea is", "choices": ["blue", "loud", "made of cheese"], "answer": 0,
     "text": "Once upon a time there was a pirate who sailed the sea.", "target": "blue"},
    {"question": "A pirate says", "choices": ["arr", "hello", "goodbye"], "answer": 0,
     "text": "The captain raised the flag and the crew cheered! Then they sailed away.", "target": "arr"},
    {"question": "Counting: one two", "choices": ["three", "five", "ten"], "answer": 0,
     "text": "Thank you for contacting support. How can I help you today?", "target": "three"},
    {"question": "Tell me about the sea", "choices": ["waves", "deserts"], "answer": 0,
     "text": "Hoist the sails and swab the deck, for treasure waits beyond the horizon.", "target": "waves"},
]  # fmt: skip
TASKS = {
    "ps_choice": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
    "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
    "ps_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
    "metric_list:\n  - metric: word_perplexity\n",
    "ps_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{target}}'\n"
    f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
    "metric_list:\n  - metric: exact_match\n",
}
LOGLIKELIHOOD_TASKS = ("ps_choice", "ps_rolling")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}"
        )
    return root


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm-eval-server")
    with running(["--adapter-dir", str(tmp / "store")], tmp / "server.log") as proc:
        files = [("files", (p.name, p.read_bytes())) for p in sorted(ADAPTER.iterdir()) if p.is_file()]
        assert httpx.put(f"{proc.url}/v1/adapters/pirate", files=files, timeout=30).status_code == 201
        yield proc


def evaluate(model: str, model_args: dict, tasks_dir: Path, tasks=tuple(TASKS)) -> dict[str, list]:
    """lm-eval's Python entry point (what its CLI calls): each task's per-document responses."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks),
        batch_size=1,
        # Only our tasks: indexing lm-eval's own 26,000 task files takes ~14 s on 2 cores, each time.
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        log_samples=True,
    )
    return {task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in out["samples"].items()}  # fmt: skip


@pytest.fixture(scope="module")
def peft_loglikelihoods(tasks_dir) -> dict[str | None, dict[str, list]]:
    """lm-eval's hf model over PEFT (or the base model alone), fp32: PEFT's forward pass."""
    out = {}
    for adapter in ("pirate", None):
        args = {"pretrained": str(DEMO_MODEL_DIR), "dtype": "float32", "device": "cpu"}
        out[adapter] = evaluate(
            "hf", args | ({"peft": str(ADAPTER)} if adapter else {}), tasks_dir, LOGLIKELIHOOD_TASKS
        )
    return out


@functools.cache
def peft_generation(adapter: str | None, context: str) -> str:
    tok = tokenizer(DEMO_MODEL_DIR)
    ids = greedy_by_forward(
        peft_model(DEMO_MODEL_DIR, ADAPTER if adapter else None), tok(context).input_ids, MAX_GEN_TOKS
    )
    text = tok.decode(ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in UNTIL if s in text), default=len(text))
    return text[:cut]


def assert_equal_to_peft(ours: dict[str, list], oracle: dict[str, list], adapter: str | None) -> None:
    for task in LOGLIKELIHOOD_TASKS:
        assert len(ours[task]) == len(oracle[task]) == len(DOCS)
        for doc, (mine, theirs) in enumerate(zip(ours[task], oracle[task], strict=True)):
            assert len(mine) == len(theirs)
            for response, reference in zip(mine, theirs, strict=True):
                (ll, *greedy), (ll_ref, *greedy_ref) = _values(response), _values(reference)
                assert abs(ll - ll_ref) <= 1e-4, f"{task} doc {doc}: {ll} vs PEFT's {ll_ref}"
                assert greedy == greedy_ref, f"{task} doc {doc}: is_greedy"
    generated = [r[0][0] for r in ours["ps_gen"]]  # [[text]] per document
    assert generated == [peft_generation(adapter, d["question"]) for d in DOCS]


def _values(response) -> list:
    """A response as lm-eval keeps it, [[ll, is_greedy]] or [ll] (strings in its sample files), as [ll, ...]."""
    values = response[0] if isinstance(response[0], list | tuple) else response
    return [
        v in (True, "True") if isinstance(v, bool) or v in ("True", "False") else float(v) for v in values
    ]


@pytest.mark.parametrize(
    "client_args",
    [
        pytest.param(
            {"tokenizer": str(DEMO_MODEL_DIR), "num_concurrent": 1}, id="local-tokenizer-tokenized-c1"
        ),
        pytest.param(
            {"tokenizer_backend": "remote", "num_concurrent": 4}, id="remote-tokenizer-tokenized-c4"
        ),
        pytest.param(
            {"tokenizer_backend": "remote", "tokenized_requests": False, "num_concurrent": 1},
            id="remote-tokenizer-untokenized-c1",
        ),
    ],
)
@pytest.mark.parametrize("adapter", ["pirate", None], ids=["adapter", "base-model"])
def test_local_completions_equals_peft(server, tasks_dir, peft_loglikelihoods, client_args, adapter):
    args = {"model": adapter or "tiny", "base_url": f"{server.url}/v1/completions", "max_length": MAX_LENGTH}
    ours = evaluate("local-completions", args | client_args, tasks_dir)
    assert_equal_to_peft(ours, peft_loglikelihoods[adapter], adapter)


def test_the_documented_command_line(server, tasks_dir, peft_loglikelihoods, tmp_path):
    """docs/evaluating.md's command, as a user runs it: remote tokenizer, several requests at a time."""
    model_args = (
        f"model=pirate,base_url={server.url}/v1/completions,tokenizer_backend=remote,"
        f"num_concurrent=4,max_length={MAX_LENGTH}"
    )
    lm_eval = Path(sys.executable).parent / "lm-eval"
    result = subprocess.run(
        [str(lm_eval), "run", "--model", "local-completions", "--model_args", model_args,
         "--tasks", *TASKS, "--include_path", str(tasks_dir), "--output_path", str(tmp_path), "--log_samples"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ours = {}
    for task in TASKS:
        (path,) = glob.glob(str(tmp_path / "pirate" / f"samples_{task}_*.jsonl"))
        lines = Path(path).read_text().splitlines()
        samples = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
        ours[task] = [s["resps"] for s in samples]
    assert_equal_to_peft(ours, peft_loglikelihoods["pirate"], "pirate")


def test_a_prompt_over_the_context_says_what_the_adapter_leaves(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "pirate", "prompt": [10 + i % 800 for i in range(1010)], "max_tokens": 8},
        timeout=30,
    )
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "this adapter leaves 1004 tokens for prompt and new tokens together" in message, message
    assert (
        "(max_total_tokens 1024 - 20 virtual tokens)" in message and "at most 1003 prompt tokens" in message
    )
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
    assert {m["id"]: m["max_model_len"] for m in models} == {"tiny": 1024, "pirate": 1004}
