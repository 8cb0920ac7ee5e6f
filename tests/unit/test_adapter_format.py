"""Reading and validating PEFT adapter uploads: every failure is a typed error with an actionable message."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from prefixserve.adapters.archive import read_upload
from prefixserve.adapters.errors import AdapterMismatchError, AdapterTooLargeError, InvalidAdapterError
from prefixserve.adapters.format import read_adapter_dir, validate_adapter
from prefixserve.adapters.kv_prefix import KVShape, embeddings_to_kv, kv_to_embeddings

SHAPE = KVShape(num_layers=2, num_kv_heads=4, head_dim=8, hidden_size=32)
LIMIT = 2**20


def peft_files(t: int = 5, shape: KVShape = SHAPE, **config_overrides) -> dict[str, bytes]:
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": t,
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.num_kv_heads,
        "token_dim": shape.num_kv_heads * shape.head_dim,
        "prefix_projection": False,
        **config_overrides,
    }
    tensor = torch.randn(t, shape.token_width)
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save({"prompt_embeddings": tensor}),
    }


def upload(files: dict[str, bytes]):
    return read_upload(list(files.items()), LIMIT)


def test_layout_matches_design_index_formula():
    t = 3
    emb = torch.arange(t * SHAPE.token_width, dtype=torch.float32).view(t, -1)
    kv = embeddings_to_kv(emb, SHAPE)
    h, d = SHAPE.num_kv_heads, SHAPE.head_dim
    for layer in range(SHAPE.num_layers):
        for head in range(h):
            for tok in range(t):
                for ch in range(d):
                    assert kv[layer, 0, head, tok, ch] == emb[tok, ((2 * layer) * h + head) * d + ch]
                    assert kv[layer, 1, head, tok, ch] == emb[tok, ((2 * layer + 1) * h + head) * d + ch]
    assert torch.equal(kv_to_embeddings(kv), emb)


def test_valid_pair_is_accepted():
    adapter = upload(peft_files(t=7))
    validate_adapter(adapter, SHAPE, max_virtual_tokens=64)
    assert adapter.num_virtual_tokens == 7


def test_cartridge_is_accepted():
    adapter = upload(peft_files(peft_type="CARTRIDGE", num_frozen_tokens=1))
    validate_adapter(adapter, SHAPE, max_virtual_tokens=64)
    assert adapter.peft_type == "CARTRIDGE" and adapter.num_virtual_tokens == 5


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_unservable_dtypes_are_refused(dtype):
    files = peft_files()
    files["adapter_model.safetensors"] = save(
        {"prompt_embeddings": torch.zeros(5, SHAPE.token_width, dtype=dtype)}
    )
    with pytest.raises(
        InvalidAdapterError, match=f"has dtype {str(dtype).removeprefix('torch.')}; save it as one"
    ):
        upload(files)


def test_values_that_overflow_the_served_dtype_are_refused():
    files = peft_files()
    files["adapter_model.safetensors"] = save({"prompt_embeddings": torch.full((5, SHAPE.token_width), 1e5)})
    adapter = upload(files)
    validate_adapter(adapter, SHAPE, 64, torch.float32)
    with pytest.raises(InvalidAdapterError, match="values up to 1e\\+05, which overflow float16"):
        validate_adapter(adapter, SHAPE, 64, torch.float16)


@pytest.mark.parametrize("value", [-7e4, 7e4])
def test_one_value_that_overflows_among_ordinary_ones_is_refused(value):
    """The check looks at the extremes: one value past float16's 65,504, of either sign, anywhere."""
    weights = torch.randn(5, SHAPE.token_width)
    weights[3, 17] = value
    files = {**peft_files(), "adapter_model.safetensors": save({"prompt_embeddings": weights})}
    adapter = upload(files)
    validate_adapter(adapter, SHAPE, 64, torch.bfloat16)
    with pytest.raises(InvalidAdapterError, match="values up to 7e\\+04, which overflow float16"):
        validate_adapter(adapter, SHAPE, 64, torch.float16)


def test_a_deeply_nested_config_is_refused():
    files = {**peft_files(), "adapter_config.json": b"[" * 100_000 + b"]" * 100_000}
    with pytest.raises(InvalidAdapterError, match="nested too deeply"):
        upload(files)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "LORA"}, "peft_type is 'LORA'"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "only CAUSAL_LM"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
        ({"num_transformer_submodules": 2}, "encoder-decoder"),
    ],
)
def test_bad_config_fields(change, message):
    with pytest.raises(InvalidAdapterError, match=message):
        upload(peft_files(**change))


def test_shape_mismatch_names_the_field():
    other = KVShape(num_layers=3, num_kv_heads=4, head_dim=8, hidden_size=32)
    adapter = upload(peft_files(shape=other))
    with pytest.raises(AdapterMismatchError, match="num_layers is 3 but the served base model needs 2"):
        validate_adapter(adapter, SHAPE, 64)


def test_width_mismatch():
    files = peft_files()
    files["adapter_model.safetensors"] = save({"prompt_embeddings": torch.randn(5, SHAPE.token_width + 1)})
    with pytest.raises(AdapterMismatchError, match="width"):
        validate_adapter(upload(files), SHAPE, 64)


def test_rows_must_match_num_virtual_tokens():
    files = peft_files(t=5)
    files["adapter_model.safetensors"] = save({"prompt_embeddings": torch.randn(6, SHAPE.token_width)})
    with pytest.raises(InvalidAdapterError, match="has 6 rows but num_virtual_tokens is 5"):
        validate_adapter(upload(files), SHAPE, 64)


def test_too_many_virtual_tokens():
    with pytest.raises(InvalidAdapterError, match="above this server's limit of 4"):
        validate_adapter(upload(peft_files(t=5)), SHAPE, max_virtual_tokens=4)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_values_are_refused(value, dtype):
    files = peft_files()
    bad = torch.randn(5, SHAPE.token_width).to(dtype)
    bad[2, 3] = value
    files["adapter_model.safetensors"] = save({"prompt_embeddings": bad})
    with pytest.raises(InvalidAdapterError, match="NaN or infinite"):
        validate_adapter(upload(files), SHAPE, 64)


def test_pickle_is_never_loaded():
    files = peft_files()
    del files["adapter_model.safetensors"]
    files["adapter_model.bin"] = b"\x80\x04 not even read"
    with pytest.raises(InvalidAdapterError, match="pickle file, which this server never loads.*safetensors"):
        upload(files)


def test_missing_config_and_garbage_weights():
    files = peft_files()
    with pytest.raises(InvalidAdapterError, match="missing adapter_config.json"):
        upload({"adapter_model.safetensors": files["adapter_model.safetensors"]})
    with pytest.raises(InvalidAdapterError, match="not a readable safetensors file"):
        upload({**files, "adapter_model.safetensors": b"garbage"})
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        upload({**files, "adapter_config.json": b"{nope"})
    with pytest.raises(InvalidAdapterError, match="no 'prompt_embeddings' tensor"):
        upload({**files, "adapter_model.safetensors": save({"other": torch.zeros(1)})})


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


def _tar(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    return buf.getvalue()


def test_archives_with_a_top_level_directory_are_read():
    files = peft_files(t=4)
    nested = {f"my-adapter/{k}": v for k, v in files.items()}
    assert read_upload([("a.zip", _zip(nested))], LIMIT).num_virtual_tokens == 4
    assert read_upload([("a.tar.gz", _tar(nested))], LIMIT).num_virtual_tokens == 4


def test_unsafe_archives_are_refused():
    files = peft_files()
    with pytest.raises(InvalidAdapterError, match="unsafe path"):
        read_upload([("a.zip", _zip({"../adapter_config.json": files["adapter_config.json"]}))], LIMIT)
    with pytest.raises(InvalidAdapterError, match="link or special file"):
        read_upload([("a.tar.gz", _tar(files, symlink="adapter_model.bin"))], LIMIT)


def test_size_limits():
    files = peft_files()
    with pytest.raises(AdapterTooLargeError, match="limit"):
        read_upload(list(files.items()), max_bytes=100)
    # A small archive that unpacks to more than the limit (a zip bomb in miniature).
    bomb = _zip(
        {"adapter_config.json": files["adapter_config.json"], "adapter_model.safetensors": b"\0" * 50_000}
    )
    assert len(bomb) < 2_000
    with pytest.raises(AdapterTooLargeError, match="unpacks to more than"):
        read_upload([("bomb.zip", bomb)], max_bytes=20_000)
    # A tar bomb is the same error (413 over HTTP), not an invalid adapter (422).
    tar_bomb = _tar(
        {"adapter_config.json": files["adapter_config.json"], "adapter_model.safetensors": b"\0" * 50_000}
    )
    assert len(tar_bomb) < 2_000
    with pytest.raises(AdapterTooLargeError, match="unpacks to more than"):
        read_upload([("bomb.tar.gz", tar_bomb)], max_bytes=20_000)


def test_reads_a_peft_save_pretrained_directory(tmp_path: Path):
    for name, content in peft_files(t=6).items():
        (tmp_path / name).write_bytes(content)
    assert read_adapter_dir(tmp_path).num_virtual_tokens == 6


# ----- prompt tuning and P-tuning: the virtual tokens' input embeddings, [T, hidden] -----------------------
def prompt_files(
    t: int = 5, width: int = SHAPE.hidden_size, rows: int | None = None, **config_overrides
) -> dict[str, bytes]:
    """A prompt-tuning adapter's files as PEFT 0.21 writes them (its config fields, for this SHAPE)."""
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": t,
        "num_layers": SHAPE.num_layers,
        "num_attention_heads": 4,  # the model's query heads: PEFT's field, not a K/V geometry here
        "token_dim": SHAPE.hidden_size,
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
        **config_overrides,
    }
    tensor = torch.randn(t if rows is None else rows, width)
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save({"prompt_embeddings": tensor}),
    }


P_TUNING = {"peft_type": "P_TUNING", "encoder_reparameterization_type": "MLP", "encoder_hidden_size": 16}


@pytest.mark.parametrize(
    ("config", "method"),
    [
        ({}, "prompt-tuning"),
        (
            {
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": "Be brief.",
                "tokenizer_name_or_path": "x",
            },
            "prompt-tuning",
        ),
        (P_TUNING, "p-tuning"),
        ({**P_TUNING, "encoder_reparameterization_type": "LSTM", "encoder_num_layers": 3}, "p-tuning"),
    ],
)
def test_prompt_learning_adapters_are_accepted(config, method):
    adapter = upload(prompt_files(t=6, **config))
    validate_adapter(adapter, SHAPE, max_virtual_tokens=64)
    assert adapter.is_prompt and adapter.method == method and adapter.num_virtual_tokens == 6


@pytest.mark.parametrize(
    ("files", "error", "message"),
    [
        (prompt_files(width=24), AdapterMismatchError, "rows have width 24 .* hidden size, 32"),
        (
            prompt_files(token_dim=24),
            AdapterMismatchError,
            "token_dim is 24 but the served base model's hidden size is 32",
        ),
        (prompt_files(num_layers=3), AdapterMismatchError, "num_layers is 3 but the served base model has 2"),
        (prompt_files(t=5, rows=4), InvalidAdapterError, "4 rows but num_virtual_tokens is 5"),
        (prompt_files(t=65), InvalidAdapterError, "above this server's limit of 64"),
        (
            prompt_files(**{**P_TUNING, "encoder_reparameterization_type": "GRU"}),
            InvalidAdapterError,
            "encoder_reparameterization_type is 'GRU'; P-tuning's prompt encoder is MLP or LSTM",
        ),
        (
            prompt_files(**{**P_TUNING, "encoder_hidden_size": 0}),
            InvalidAdapterError,
            "encoder_hidden_size must be a positive integer",
        ),
        (prompt_files(prompt_tuning_init="ZEROS"), InvalidAdapterError, "prompt_tuning_init is 'ZEROS'"),
        (prompt_files(task_type=None), InvalidAdapterError, "only CAUSAL_LM"),
    ],
)
def test_bad_prompt_learning_adapters_name_what_is_wrong(files, error, message):
    with pytest.raises(error, match=message):
        validate_adapter(upload(files), SHAPE, max_virtual_tokens=64)


def test_a_prompt_that_leaves_no_room_in_the_context_is_refused():
    adapter = upload(prompt_files(t=40))
    validate_adapter(adapter, SHAPE, max_virtual_tokens=64, context_tokens=41)
    with pytest.raises(
        InvalidAdapterError, match="holds 40 tokens in all .* no room would be left for a prompt"
    ):
        validate_adapter(adapter, SHAPE, max_virtual_tokens=64, context_tokens=40)


@pytest.mark.parametrize(
    "peft_type", ["LORA", "IA3", "ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING", "CPT", "LOHA", None]
)
def test_other_peft_methods_are_refused_naming_the_supported_ones(peft_type):
    with pytest.raises(InvalidAdapterError) as refused:
        upload(prompt_files(peft_type=peft_type))
    assert f"peft_type is {peft_type!r}" in str(refused.value)
    for supported in ("PREFIX_TUNING", "CARTRIDGE", "PROMPT_TUNING", "P_TUNING"):
        assert supported in str(refused.value)


def test_reads_peft_prompt_learning_directories(tmp_path: Path, tiny_model_dirs):
    from prefixserve.engine.model_loader import kv_shape_of
    from tests.tiny_models import PROMPT_KINDS, load_base, make_prompt_adapter

    base = tiny_model_dirs["llama"]
    shape = kv_shape_of(load_base(base).config)
    for i, kind in enumerate(PROMPT_KINDS):
        adapter = read_adapter_dir(make_prompt_adapter(base, tmp_path / kind, 3 + i, kind))
        validate_adapter(adapter, shape, max_virtual_tokens=64)
        assert adapter.num_virtual_tokens == 3 + i
        assert tuple(adapter.embeddings.shape) == (3 + i, shape.hidden_size)
