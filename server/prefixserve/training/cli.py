"""`prefixserve train`: the typer command around `train_adapter`, plus the optional upload.

Only typer is imported at module level, so registering this command keeps `prefixserve --help` fast;
torch, transformers and PEFT load when the command runs. Wire it in prefixserve/cli.py with
`app.command("train")(train_command)`; `python -m prefixserve.training.cli` runs it on its own.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path

import typer

from prefixserve.training.defaults import DEFAULT_EPOCHS, DEFAULT_LEARNING_RATES, DEFAULT_MIN_STEPS


class Method(str, Enum):
    prefix = "prefix"
    prompt_tuning = "prompt-tuning"
    p_tuning = "p-tuning"


class PromptEncoder(str, Enum):
    mlp = "mlp"
    lstm = "lstm"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def train_command(
    model: str = typer.Option(
        ..., help="Base model: a hub id, a local directory, or 'tiny' (the built-in demo model)."
    ),
    data: str = typer.Option(
        ..., help="Training data: .jsonl/.json/.csv/.tsv/.parquet/.txt with `text` or `prompt`+`completion`."
    ),
    output: Path = typer.Option(..., help="Directory to write the adapter to (PEFT format, safetensors)."),
    method: Method = typer.Option(
        Method.prefix,
        help="prefix: keys/values for every layer (PEFT's prefix tuning); prompt-tuning: input embeddings of the "
        "virtual tokens; p-tuning: the same, made by a trained encoder (--prompt-encoder). See docs/training.md.",
    ),
    prompt_encoder: PromptEncoder = typer.Option(
        PromptEncoder.mlp, help="With --method p-tuning: the encoder that produces the virtual tokens."
    ),
    eval_file: str | None = typer.Option(
        None, help="Held-out data file; its loss is reported before and after."
    ),
    eval_fraction: float = typer.Option(
        0.0, min=0.0, max=0.9, help="Hold out this fraction of --data instead."
    ),
    num_virtual_tokens: int | None = typer.Option(
        None, min=1, help="Prefix length T (default 20; with --init text, the length of the text)."
    ),
    prefix_projection: bool | None = typer.Option(
        None,
        "--prefix-projection/--no-prefix-projection",
        help="Train the prefix through an MLP, which learns faster and steadier (default on; off with --init text).",
    ),
    encoder_hidden_size: int | None = typer.Option(
        None,
        min=1,
        help="Hidden size of the projection MLP, or of P-tuning's encoder (default: the model's hidden size).",
    ),
    init: str = typer.Option(
        "random",
        help='Init: random, zero (prefix only: PEFT init_weights="zero"), or text:"..." (prefix: the base model\'s '
        "keys/values for that text; prompt-tuning: the text's token embeddings).",
    ),
    init_chat_template: bool = typer.Option(
        False, help="With --init text: wrap the text as a system message in the model's chat template."
    ),
    learning_rate: float | None = typer.Option(
        None,
        min=0.0,
        help="Peak learning rate (linear decay). Default: "
        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LEARNING_RATES.items())
        + "; see docs/training.md.",
    ),
    epochs: float | None = typer.Option(
        None,
        min=0.0,
        help=f"Passes over the data (ignored when --max-steps is set). Default: {DEFAULT_EPOCHS:g}, and at "
        f"least {DEFAULT_MIN_STEPS} steps in all, so that a small data set still trains long enough.",
    ),
    max_steps: int | None = typer.Option(None, min=1, help="Stop after this many optimizer steps."),
    batch_size: int = typer.Option(8, min=1, help="Rows per step on the device."),
    gradient_accumulation_steps: int = typer.Option(
        1, min=1, help="Steps whose gradients add up to one update."
    ),
    max_length: int = typer.Option(512, min=2, help="Truncate rows to this many tokens."),
    add_eos: bool = typer.Option(
        True, help="End each row with the EOS token, so the adapter learns to stop."
    ),
    seed: int = typer.Option(0, help="Seed for the prefix init, data order and held-out split."),
    dtype: DType = typer.Option(
        DType.auto, help="Base model dtype. auto = bfloat16 on a GPU that has it, else float32."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar with the training loss."),
    upload: str | None = typer.Option(
        None, help="After training, PUT the adapter to this server URL (e.g. http://127.0.0.1:8000)."
    ),
    adapter_id: str | None = typer.Option(None, help="Adapter id for --upload."),
    api_key: str | None = typer.Option(None, envvar="PREFIXSERVE_API_KEY", help="Bearer token for --upload."),
) -> None:
    """Train a prefix-tuning (or prompt-tuning, P-tuning) adapter in PEFT's format on a frozen base model;
    optionally upload it to a server."""
    from prefixserve.training.errors import TrainingError

    if not logging.getLogger().handlers:  # the `prefixserve` script does not configure logging; show ours
        logging.basicConfig(format="%(levelname)s %(message)s")
    logging.getLogger("prefixserve").setLevel(logging.INFO)
    try:
        if upload and not adapter_id:
            raise TrainingError("--upload needs --adapter-id (the id to serve the adapter under)")
        if adapter_id:
            from prefixserve.training.upload import check_adapter_id

            check_adapter_id(adapter_id)  # a bad id fails now, not after training
        if upload:
            from prefixserve.training.upload import check_server

            check_server(upload, api_key)  # so does a server that is down, or a wrong key
        from prefixserve.training.train import train_adapter

        result = train_adapter(
            model,
            data,
            output,
            method=method.value,
            prompt_encoder=prompt_encoder.value,
            eval_file=eval_file,
            eval_fraction=eval_fraction,
            num_virtual_tokens=num_virtual_tokens,
            prefix_projection=prefix_projection,
            encoder_hidden_size=encoder_hidden_size,
            init=init,
            init_chat_template=init_chat_template,
            learning_rate=learning_rate,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            max_length=max_length,
            seed=seed,
            dtype=dtype.value,
            device=device,
            add_eos=add_eos,
            progress=progress,
        )
        typer.echo(
            f"trained {result.steps} steps on {result.num_train_examples} rows: "
            f"train loss {result.train_loss_before:.4f} -> {result.train_loss_after:.4f}"
        )
        if result.eval_loss_before is not None and result.eval_loss_after is not None:
            typer.echo(
                f"held-out loss ({result.num_eval_examples} rows) "
                f"{result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}"
            )
        typer.echo(f"adapter saved to {result.output_dir}")
        if upload and adapter_id:
            from prefixserve.training.upload import upload_adapter

            reply = upload_adapter(result.output_dir, upload, adapter_id, api_key=api_key)
            typer.echo(f"uploaded as {adapter_id!r} to {upload}: {reply}")
    except TrainingError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None


def main() -> None:
    app = typer.Typer(add_completion=False)
    app.command()(train_command)
    app()


if __name__ == "__main__":
    main()
