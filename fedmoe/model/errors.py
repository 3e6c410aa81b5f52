"""The model package's exception types."""


class ModelError(ValueError):
    """Bad model config, checkpoint or tokenizer input; the message names file/key, expected vs got."""


class CheckpointError(ModelError):
    """A checkpoint does not match the model: missing/unexpected key, shape or dtype mismatch."""
