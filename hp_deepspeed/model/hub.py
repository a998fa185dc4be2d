"""The Hugging Face hub: the one place files are fetched from it.

Its own module because both the architecture config (``t5_config``: a hub id's config.json)
and the checkpoint loader (``hf_checkpoint``: its weights) fetch files, and the loader
already depends on the config; the fetch living in either of them would make the two import
each other.
"""

from __future__ import annotations

from pathlib import Path


def hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    """Download (or find in the local cache) the files of ``repo_id`` matching ``patterns``."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repository, no permission ...: one clear message
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a preset, and fetching it from the Hugging Face hub "
            f"failed: {type(err).__name__}: {err}"
        ) from None
