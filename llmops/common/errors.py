"""Typed errors every stage raises: each message names the file/row/key, the rule, and the fix."""


class LlmopsError(Exception):
    """Base class: an error the CLI prints as one clear line instead of a traceback."""


class ConfigError(LlmopsError):
    """params.yaml (or a --set override) is missing a key, has an unknown key, or a bad value."""


class DataError(LlmopsError):
    """Input data breaks a rule: an empty source, an unreadable format, a failed data contract."""


class StageError(LlmopsError):
    """A stage could not run or finish (a DVC stage failed, an upstream output is missing)."""


class RegistryError(LlmopsError):
    """A registered model, alias or version does not exist, or a registry download is incomplete."""


class ServeError(LlmopsError):
    """A model server did not start, did not become healthy, or failed its smoke or load test."""
