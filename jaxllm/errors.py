"""User-facing errors: one clear line, no traceback, non-zero exit (handled in app/cli.py).
The bottom of the import graph: imports no other jaxllm module."""

import importlib


class UserError(Exception):
    """A mistake the user can fix. The message names the field/file and the fix."""


class ConfigError(UserError):
    """A bad config value, key or combination."""


class DataError(UserError):
    """A missing, empty or malformed data source."""


class CheckpointError(UserError):
    """A missing, incompatible or foreign checkpoint."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, quota, permissions); earlier checkpoints are intact."""


class TrainingHalted(UserError):
    """Training stopped on purpose (e.g. non-finite loss with nan_policy=stop)."""


def require(module: str):
    """Imports an optional dependency of the `hf` extra, or says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"Hugging Face tokenizer support needs the `{module}` package: "
                        f"pip install 'jaxllm[hf]'") from None
