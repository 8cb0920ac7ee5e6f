"""`prefixserve train`: a tiny adapter learns its task, loads identically in PEFT and prefixserve, every
init mode works, and each known failure gives its message. Runs on the built-in demo model, 1 thread."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model, initialize_kv_prefix_from_text
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from typer.testing import CliRunner

from prefixserve.adapters.format import read_adapter_dir, validate_adapter
from prefixserve.adapters.kv_prefix import KVShape, LoadedPrefix, embeddings_to_kv
from prefixserve.demo import DEMO_MODEL_DIR
from prefixserve.engine.attention import ATTN_IMPLEMENTATION, register
from prefixserve.engine.block_manager import BlockManager
from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.self_check import run_rows
from prefixserve.engine.sequence import SamplingParams, Sequence
from prefixserve.training import TrainingError, train_adapter, upload_adapter
from prefixserve.training.data import IGNORE_INDEX, PadCollator, load_rows, split_examples, tokenize_rows
from prefixserve.training.defaults import DEFAULT_MIN_STEPS
from tests.paths import REPO_ROOT
from tests.tiny_models import greedy_by_forward

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside PEFT

TARGET = " Arr, matey! Hoist the sails"
TRAIN_PROMPTS = ["The cat sat", "Hello", "The weather today", "Once upon a time"]
EVAL_PROMPTS = ["Mountains rise", "Bake the bread"]
TASK = {"num_virtual_tokens": 10, "learning_rate": 1e-2, "batch_size": 4, "progress": False, "device": "cpu"}
FAST = {"max_steps": 2, "progress": False, "device": "cpu"}  # for runs that only check plumbing


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": p, "completion": TARGET} for p in prompts]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def base_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, attn_implementation="sdpa").eval()


def greedy(model: torch.nn.Module, tok, prompt: str, n: int) -> list[int]:
    return greedy_by_forward(model, tok(prompt).input_ids, n, eos=tok.eos_token_id)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = write_jsonl(tmp / "train.jsonl", rows(TRAIN_PROMPTS))
    held_out = write_jsonl(tmp / "eval.jsonl", rows(EVAL_PROMPTS))
    result = train_adapter("tiny", data, tmp / "adapter", eval_file=held_out, max_steps=300, **TASK)
    return result, tmp / "adapter"


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_adapter_reproduces_its_target(trained, tok):
    result, adapter_dir = trained
    print(f"train loss {result.train_loss_before:.4f} -> {result.train_loss_after:.4f}; "
          f"held-out {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}")  # fmt: skip
    assert result.steps == 300 and result.num_train_examples == 4 and result.num_eval_examples == 2
    assert result.train_loss_after < result.train_loss_before - 0.8
    assert result.eval_loss_after < result.eval_loss_before - 0.8
    assert not result.warnings
    # Only the prefix trained: embedding (T x 64) + MLP 64->64->4*2*64; the base model stayed frozen.
    assert result.trainable_parameters == 10 * 64 + (64 * 64 + 64) + (64 * 512 + 512)
    want = tok(TARGET).input_ids + [tok.eos_token_id]
    peft_model = PeftModel.from_pretrained(base_model(), adapter_dir).eval()
    for prompt in TRAIN_PROMPTS + EVAL_PROMPTS:
        assert greedy(peft_model, tok, prompt, len(want)) == want, prompt
        assert greedy(base_model(), tok, prompt, len(want)) != want


@pytest.mark.slow
def test_saved_adapter_is_peft_format_and_prefixserve_serves_it_like_peft(trained, tok):
    _, adapter_dir = trained
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors",
    ]  # fmt: skip
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["base_model_name_or_path"] == "tiny"
    assert list(load_file(adapter_dir / "adapter_model.safetensors")) == ["prompt_embeddings"]

    cfg = base_model().config
    shape = KVShape(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd)
    adapter = read_adapter_dir(adapter_dir)
    validate_adapter(adapter, shape, 64)
    prefix = LoadedPrefix("t", ("a",), ("",), embeddings_to_kv(adapter.embeddings, shape))
    cases = [(prefix, "The cat sat"), (None, "The cat sat"), (prefix, "Mountains rise"), (prefix, "Hi")]
    model = base_model()
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    runner = ModelRunner(model, KVPool(shape, 64, 16, torch.float32, torch.device("cpu")))
    blocks = BlockManager(64, 16)
    seqs = [Sequence(tok(prompt).input_ids, SamplingParams(), pre, lambda e: None) for pre, prompt in cases]
    n = 12
    steps = [(s, len(s.prompt_ids)) for s in seqs]
    for _ in range(n):
        for seq, logits in zip(seqs, run_rows(runner, blocks, steps), strict=True):
            seq.append_output(int(logits.argmax()))
        steps = [(s, 1) for s in seqs]
    peft_model = PeftModel.from_pretrained(base_model(), adapter_dir).eval()
    for (pre, prompt), seq in zip(cases, seqs, strict=True):
        ours = seq.output_ids  # the runner does not stop at EOS; generate does
        ours = ours[: ours.index(tok.eos_token_id) + 1] if tok.eos_token_id in ours else ours
        assert ours == greedy(peft_model if pre else base_model(), tok, prompt, n), prompt


def test_zero_init_starts_from_an_all_zero_prefix(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    # One step at a negligible learning rate saves (almost) the initial prefix.
    result = train_adapter("tiny", data, tmp_path / "z", init="zero", learning_rate=1e-12, **FAST)
    embeddings = read_adapter_dir(tmp_path / "z").embeddings
    assert embeddings.shape == (20, 512) and embeddings.abs().max() < 1e-6
    assert result.warnings and "barely moved" in result.warnings[0]  # nothing learned, and it says so


@pytest.mark.slow
def test_random_init_is_seeded_and_held_out_split_reports_its_loss(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS + EVAL_PROMPTS))
    a = train_adapter("tiny", data, tmp_path / "a", eval_fraction=0.34, seed=1, **FAST)
    for name, seed in (("b", 1), ("c", 2)):
        train_adapter("tiny", data, tmp_path / name, eval_fraction=0.34, seed=seed, **FAST)
    assert (a.num_train_examples, a.num_eval_examples) == (4, 2) and a.eval_loss_after is not None
    emb = {k: read_adapter_dir(tmp_path / k).embeddings for k in "abc"}
    assert torch.equal(emb["a"], emb["b"]) and not torch.allclose(emb["a"], emb["c"])
    assert emb["a"].abs().mean() > 1e-3


@pytest.mark.parametrize("chat", [False, True])
def test_text_init_is_peft_initialize_kv_prefix_from_text_and_acts_as_that_text(tmp_path, tok, chat):
    text = "Arr, matey! Hoist the sails and swab the deck."
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    train_adapter(
        "tiny",
        data,
        tmp_path / "t",
        init=f"text:{text}",
        init_chat_template=chat,
        learning_rate=1e-12,
        **FAST,
    )
    if chat:
        text_ids = tok.apply_chat_template(
            [{"role": "system", "content": text}], tokenize=True, return_dict=False
        )
    else:
        text_ids = tok(text).input_ids
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert config["prefix_projection"] is False and config["num_virtual_tokens"] == len(text_ids)
    saved = read_adapter_dir(tmp_path / "t").embeddings
    reference = get_peft_model(
        base_model(), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=len(text_ids))
    )
    expected = initialize_kv_prefix_from_text(reference, tok, text=text, use_chat_template=chat)
    torch.testing.assert_close(saved, expected, atol=1e-5, rtol=0)
    # The prefix is the text's keys/values at positions 0..T-1, so the adapter continues as if the text came first.
    peft_model = PeftModel.from_pretrained(base_model(), tmp_path / "t").eval()
    prompt_ids = tok(" The cat").input_ids
    whole = greedy_by_forward(base_model(), text_ids + prompt_ids, 8, eos=tok.eos_token_id)
    assert greedy(peft_model, tok, " The cat", 8) == whole


@pytest.mark.slow
def test_the_default_options_learn_a_small_data_set(tmp_path, tok):
    """No --learning-rate, --epochs or --max-steps (issue 12): 30 rows of adapters/data/pirate.jsonl."""
    data = REPO_ROOT / "adapters" / "data"
    result = train_adapter(
        "tiny",
        data / "pirate.jsonl",
        tmp_path / "pirate",
        eval_file=data / "pirate_eval.jsonl",
        progress=False,
    )
    assert result.steps == DEFAULT_MIN_STEPS  # 30 rows are 4 steps an epoch: 3 epochs would be 12 steps
    assert result.train_loss_after < 0.85 * result.train_loss_before  # measured 6.832 -> 5.635
    assert result.eval_loss_after < 0.85 * result.eval_loss_before and not result.warnings
    adapted = PeftModel.from_pretrained(base_model(), tmp_path / "pirate").eval()
    held_out = [json.loads(line)["prompt"] for line in (data / "pirate_eval.jsonl").read_text().splitlines()]
    texts = [tok.decode(greedy(adapted, tok, p, 8), skip_special_tokens=True) for p in held_out]
    assert sum(t.startswith(" Arr, matey!") for t in texts) >= 4, texts  # prompts it never saw


@pytest.mark.slow
def test_a_loss_that_barely_moves_warns_with_the_likely_cause(tmp_path):
    # The classic wall: no projection MLP at a learning rate made for one.
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    options = {**TASK, "prefix_projection": False, "learning_rate": 3e-4}
    result = train_adapter("tiny", data, tmp_path / "flat", max_steps=100, **options)
    assert len(result.warnings) == 1 and "barely moved" in result.warnings[0]
    assert "use --prefix-projection, or a learning rate around 1e-2" in result.warnings[0]
    assert (tmp_path / "flat" / "adapter_model.safetensors").exists()  # still saved: it is a warning


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init": "text:Hello there", "prefix_projection": True}, "cannot be used with --prefix-projection"),
        ({"init": "text:Hi", "num_virtual_tokens": 30}, "leave --num-virtual-tokens out"),
        ({"init": "ones"}, "--init must be random, zero or text"),
        ({"encoder_hidden_size": 0}, "--encoder-hidden-size must be a positive integer"),
        (
            {"encoder_hidden_size": 100_000},
            "projection MLP of 57.7M parameters, more than the whole base model",
        ),
        ({"encoder_hidden_size": 64, "prefix_projection": False}, "no effect with --no-prefix-projection"),
        ({"dtype": "float16"}, "--dtype float16 cannot train on the CPU"),
        ({"eval_fraction": 0.5, "eval_file": "x.jsonl"}, "not both"),
    ],
)
def test_bad_options_fail_before_training_with_a_clear_message(tmp_path, options, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    with pytest.raises(TrainingError, match=message):
        train_adapter("tiny", data, tmp_path / "out", **{**FAST, **options})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("", "empty.jsonl", "holds no rows"),
        (
            '{"question": "a", "answer": "b"}\n',
            "cols.jsonl",
            r"needs a `text` column .* `prompt` and `completion`",
        ),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', "hole.jsonl", "row 2 has no `completion`"),
        ("text\n", "header_only.csv", "holds no rows"),
        ("a,b", "data.xlsx", "unknown data file type"),
        ('{"text": "a"}\n{"text": "b",\n', "broken.jsonl", "broken.jsonl:2: not valid JSON"),
    ],
)
def test_bad_data_fails_with_a_clear_message(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(TrainingError, match=message):
        train_adapter("tiny", tmp_path / name, tmp_path / "out", **FAST)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "smaller --batch-size"),
        (RuntimeError("expected scalar type Float but found Half"), "run with --dtype float32"),
    ],
)
def test_out_of_memory_and_dtype_errors_mid_run_say_what_to_change(tmp_path, monkeypatch, error, message):
    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Trainer, "train", fail)
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    with pytest.raises(TrainingError, match=message):
        train_adapter("tiny", data, tmp_path / "out", **FAST)


def test_data_files_tokenization_and_padding(tmp_path, tok):
    (tmp_path / "a.csv").write_text('\ufeffprompt,completion\nHello,"Hi, there"\n')
    (tmp_path / "a.txt").write_text("one two\n\nthree four\n")
    (tmp_path / "a.json").write_text('[{"text": "x"}]')
    assert load_rows(tmp_path / "a.csv") == [{"prompt": "Hello", "completion": "Hi, there"}]
    assert load_rows(tmp_path / "a.txt") == [{"text": "one two"}, {"text": "three four"}]
    assert load_rows(tmp_path / "a.json") == [{"text": "x"}]
    pc, text = tokenize_rows(
        [{"prompt": "The cat sat", "completion": " on the mat"}], tok, 64
    ) + tokenize_rows([{"text": "The cat sat on the mat"}], tok, 64)
    n_prompt = len(tok("The cat sat").input_ids)
    assert pc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # loss on the completion only
    assert pc.labels[n_prompt:] == pc.input_ids[n_prompt:] and pc.input_ids[-1] == tok.eos_token_id
    assert text.labels == text.input_ids  # loss on every token
    (short,) = tokenize_rows([{"text": "The cat sat on the mat"}], tok, 4)
    assert len(short.input_ids) == 4
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])  # fmt: skip
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    train, held = split_examples([pc, text, short, pc], 0.25, seed=0)
    assert (len(train), len(held)) == (3, 1)


@pytest.mark.slow
def test_upload_puts_both_files_once_with_the_api_key(trained):
    _, adapter_dir = trained
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["method"], seen["url"] = request.method, str(request.url)
        seen["auth"] = request.headers.get("authorization")
        body = request.read()
        seen["files"] = [
            n for n in ("adapter_config.json", "adapter_model.safetensors") if body.count(n.encode()) == 1
        ]
        seen["field"] = body.count(b'name="files"')
        return httpx.Response(201, json={"id": "pirate", "num_virtual_tokens": 10})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        reply = upload_adapter(adapter_dir, "http://srv:8080/", "pirate", api_key="k1", client=client)
    assert reply["id"] == "pirate"
    assert seen == {
        "method": "PUT", "url": "http://srv:8080/v1/adapters/pirate", "auth": "Bearer k1",
        "files": ["adapter_config.json", "adapter_model.safetensors"], "field": 2,
    }  # fmt: skip

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "missing API key", "error_type": "unauthorized"})

    with (
        httpx.Client(transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(TrainingError, match="401"),
    ):
        upload_adapter(adapter_dir, "http://srv:8080", "pirate", client=client)
    with pytest.raises(TrainingError, match="invalid adapter id"):
        upload_adapter(adapter_dir, "http://srv:8080", "../x")


@pytest.mark.slow
def test_cli_trains_and_reports_losses_or_exits_1_with_the_message(tmp_path):
    import typer

    from prefixserve.training.cli import train_command

    app = typer.Typer()
    app.command()(train_command)
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    common = ["--model", "tiny", "--data", str(data), "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "o"), "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert "train loss" in result.output and (tmp_path / "o" / "adapter_model.safetensors").exists()
    method = ["--method", "p-tuning", "--prompt-encoder", "lstm", "--max-steps", "3"]
    result = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "lstm"), *method])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "lstm" / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    result = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "p"), "--dtype", "float16"])
    assert result.exit_code == 1 and "--dtype float16 cannot train on the CPU" in result.output
    result = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "q"), "--upload", "http://x"])
    assert result.exit_code == 1 and "--upload needs --adapter-id" in result.output


@pytest.mark.slow
def test_trained_adapter_uploaded_to_a_running_server_generates_like_peft(trained, tok, tmp_path):
    from tests.server_process import ServerProcess

    _, adapter_dir = trained
    key = "train-upload-key-0123456789"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": key, "tenant": "t"}]}))
    args = ["--model", "tiny", "--adapter-dir", str(tmp_path / "store"), "--api-keys-file", str(keys)]
    server = ServerProcess(args, tmp_path / "log")
    try:
        server.wait_healthy()
        check_cli_upload_preflight(server.url, key, tmp_path)
        reply = upload_adapter(adapter_dir, server.url, "pirate", api_key=key)
        assert reply["id"] == "pirate" and reply["num_virtual_tokens"] == 10
        r = generate(server.url, key, "pirate")
        data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
        prompt_dir = tmp_path / "prompt"
        train_adapter("tiny", data, prompt_dir, method="prompt-tuning", num_virtual_tokens=6, **FAST)
        reply = upload_adapter(prompt_dir, server.url, "prompted", api_key=key)
        assert reply["method"] == "prompt-tuning" and reply["num_virtual_tokens"] == 6
        prompted = generate(server.url, key, "prompted")
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    peft_model = PeftModel.from_pretrained(base_model(), adapter_dir).eval()
    assert [t["id"] for t in r.json()["details"]["tokens"]] == greedy(peft_model, tok, "Mountains rise", 12)
    assert r.json()["generated_text"] == TARGET
    assert prompted.status_code == 200, prompted.text
    peft_prompted = PeftModel.from_pretrained(base_model(), prompt_dir).eval()
    assert [t["id"] for t in prompted.json()["details"]["tokens"]] == greedy(
        peft_prompted, tok, "Mountains rise", 12
    )


def generate(url: str, key: str, adapter_id: str) -> httpx.Response:
    params = {"adapter_id": adapter_id, "max_new_tokens": 12, "details": True}
    return httpx.post(
        f"{url}/generate",
        json={"inputs": "Mountains rise", "parameters": params},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def check_cli_upload_preflight(url: str, key: str, tmp_path: Path) -> None:
    """`--upload` with a server that is down, or a missing or wrong key, fails before training starts."""
    import typer

    from prefixserve.training.cli import train_command
    from tests.server_process import free_port

    app = typer.Typer()
    app.command()(train_command)
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    common = ["--model", "tiny", "--data", str(data), "--output", str(tmp_path / "o"), "--adapter-id", "p"]
    cases = [
        (["--upload", f"http://127.0.0.1:{free_port()}"], "cannot reach the server"),
        (["--upload", url], "the server wants an API key (HTTP 401"),
        (["--upload", url, "--api-key", "wrong-key-0123456789"], "the server refused the API key (HTTP 401"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, [*common, *args], env={"PREFIXSERVE_API_KEY": ""})
        assert result.exit_code == 1, result.output
        assert message in result.output and "Nothing was trained" in result.output
        assert "train loss" not in result.output and not (tmp_path / "o").exists()


EXAMPLES = {  # what adapters/README.md shows, on prompts that are in none of their training files
    "pirate": (
        "Tell me about the sea",
        " Arr, matey! Hoist the sails and swab the deck, for treasure waits beyond the horizon.",
    ),
    "support": (
        "Is the server down?",
        " Thank you for contacting support. We are sorry for the trouble and will help you right away.",
    ),
    "counting": ("one two three", " four five six seven eight nine ten eleven twelve"),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_adapters_do_what_their_readme_says(name, tok):
    path = REPO_ROOT / "adapters" / name
    cfg = base_model().config
    validate_adapter(
        read_adapter_dir(path), KVShape(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd), 64
    )
    prompt, text = EXAMPLES[name]
    adapted = greedy(PeftModel.from_pretrained(base_model(), path).eval(), tok, prompt, 32)
    assert tok.decode(adapted, skip_special_tokens=True) == text
    assert tok.decode(greedy(base_model(), tok, prompt, 32), skip_special_tokens=True) != text


# ----- --method prompt-tuning and p-tuning ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning"])
def test_prompt_methods_learn_the_small_data_set_with_their_defaults_and_serve_like_peft(
    method, tmp_path, tok
):
    """The README's example with --method and the method's default learning rate: the loss falls, and the engine
    serves PEFT's tokens. 100 steps, not the default 500: both reach their floor by then (docs/training.md)."""
    from tests.engine_harness import make_engine, run_until_idle, submit

    data = REPO_ROOT / "adapters" / "data"
    out = tmp_path / method
    result = train_adapter(
        "tiny",
        data / "pirate.jsonl",
        out,
        method=method,
        eval_file=data / "pirate_eval.jsonl",
        max_steps=100,
        progress=False,
    )
    # Measured 6.82 -> 6.75 / 6.73 (docs/training.md, Methods): on the demo model, input embeddings move the
    # loss only this far, whatever the learning rate or the number of steps. Less than 1% would have warned.
    assert result.train_loss_after < 0.99 * result.train_loss_before, result
    assert result.eval_loss_after < 0.99 * result.eval_loss_before and not result.warnings, result
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt-tuning": "PROMPT_TUNING", "p-tuning": "P_TUNING"}[method]
    assert config["base_model_name_or_path"] == "tiny"
    adapted = PeftModel.from_pretrained(base_model(), out).eval()
    engine = make_engine(DEMO_MODEL_DIR, tmp_path / "store", {"trained": out})
    prompts = [json.loads(line)["prompt"] for line in (data / "pirate_eval.jsonl").read_text().splitlines()]
    sinks = [submit(engine, p, "trained", max_new_tokens=8) for p in prompts]
    run_until_idle(engine)
    assert [s.tokens for s in sinks] == [greedy(adapted, tok, p, 8) for p in prompts]


def test_prompt_tuning_text_init_and_p_tuning_lstm_are_peft_configs(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    text = "Answer like a pirate."
    train_adapter(
        "tiny",
        data,
        tmp_path / "text",
        method="prompt-tuning",
        init=f"text:{text}",
        learning_rate=1e-12,
        **FAST,
    )
    config = json.loads((tmp_path / "text" / "adapter_config.json").read_text())
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"]) == ("TEXT", text)
    ids = tok(text).input_ids
    assert config["num_virtual_tokens"] == len(ids)  # the whole text, as with a prefix's text init
    saved = load_file(tmp_path / "text" / "adapter_model.safetensors")["prompt_embeddings"]
    words = base_model().get_input_embeddings().weight[ids]
    assert torch.allclose(saved, words, atol=1e-6)  # the text's token embeddings, untrained at lr 1e-12

    train_adapter("tiny", data, tmp_path / "lstm", method="p-tuning", prompt_encoder="lstm", **FAST)
    config = json.loads((tmp_path / "lstm" / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["encoder_reparameterization_type"] == "LSTM"
    assert read_adapter_dir(tmp_path / "lstm").method == "p-tuning"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "lora"}, "--method must be one of prefix, prompt-tuning, p-tuning"),
        ({"method": "prompt-tuning", "init": "zero"}, "--init zero is prefix tuning's"),
        ({"method": "p-tuning", "init": "text:Hi"}, "P-tuning's encoder starts random"),
        ({"method": "prompt-tuning", "prefix_projection": True}, "--prefix-projection is prefix tuning's"),
        ({"method": "prompt-tuning", "encoder_hidden_size": 8}, "prompt tuning has neither"),
        ({"method": "prompt-tuning", "init": "text:Hi", "init_chat_template": True}, "--init-chat-template"),
        ({"method": "p-tuning", "prompt_encoder": "gru"}, "--prompt-encoder must be mlp or lstm"),
    ],
)
def test_bad_method_options_fail_before_training(tmp_path, options, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows(TRAIN_PROMPTS))
    with pytest.raises(TrainingError, match=message):
        train_adapter("tiny", data, tmp_path / "out", **{**FAST, **options})
    assert not (tmp_path / "out").exists()
